"""Check the whole CUDA path on a machine with an NVIDIA GPU, and print what it measured.

    ./noxw -s gpu_check                                   # in the CUDA venv nox builds
    python benchmarks/gpu_check.py                        # in a venv you made (a Jetson's)
    python benchmarks/gpu_check.py --quick                # fewer epochs: a smoke run in ~a minute
    python benchmarks/gpu_check.py --config configs/cifar10.toml --workdir runs/gpu-check

Steps, each reported as ok, FAILED or skipped with the reason:

1. environment: torch and the CUDA it was built for, the GPU and its compute capability, the
   driver, TensorRT, ONNX Runtime's providers, and the autocast dtype training picks here
   (bf16 from compute capability 8.0, else fp16 with a grad scaler);
2. the suite's GPU and TensorRT tests (`pytest -m "gpu or tensorrt"`);
3. the demo config on CUDA (`device = "cuda"`: AMP, channels_last and cudnn.benchmark, as
   training does there) up to the TensorRT engine (`--target tensorrt`): each stage's status and
   time, each build's accuracy and latency from the run's manifest, the engine's TensorRT
   version and GPU, or why it was not built;
4. the teacher and distill stages under a 2-process torchrun (NCCL, one GPU per rank), which
   needs two GPUs.

Nothing here is a figure it did not measure: every number comes from this machine's run. Exit
code 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.report.sections import config_toml  # noqa: E402

# Keys whose value may be a path relative to the config file (the generated config lives elsewhere).
PATH_KEYS = (("data", "root"), ("teacher", "weights"), ("distill", "unlabeled"))
QUICK = {"teacher": {"epochs": 2}, "distill": {"epochs": 3}, "prune": {"heal_epochs": 1}}


@dataclass
class Step:
    name: str
    status: str = "ok"  # ok | FAILED | skipped
    lines: list[str] = field(default_factory=list)

    def fail(self, why: str) -> "Step":
        self.status = "FAILED"
        self.lines.append(why)
        return self

    def skip(self, why: str) -> "Step":
        self.status = "skipped"
        self.lines.append(why)
        return self


def _run(cmd: list[str], timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    print(f"$ {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def _tail(text: str, n: int = 15) -> list[str]:
    return ["  | " + line for line in text.strip().splitlines()[-n:]]


# -- 1. environment -----------------------------------------------------------------------------


def environment() -> Step:
    step = Step("environment")
    import torch

    step.lines.append(f"torch {torch.__version__}, built for CUDA {torch.version.cuda or '(none: a CPU build)'}")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        step.lines.append(f"nvidia-smi: {smi or '(no output)'}")
    except (OSError, subprocess.SubprocessError) as exc:
        step.lines.append(f"nvidia-smi: not available ({type(exc).__name__})")
    if not torch.cuda.is_available():
        return step.fail("torch.cuda.is_available() is False: no CUDA device for this torch (driver older than "
                         f"CUDA {torch.version.cuda}? a CPU-only torch?)")
    from stages.training import _amp_dtype

    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        dtype = _amp_dtype(torch.device("cuda", i), True)
        step.lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}, "
                          f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB; training autocast "
                          f"dtype {str(dtype).replace('torch.', '')}{' + grad scaler' if dtype == torch.float16 else ''}")
    try:
        import tensorrt

        step.lines.append(f"tensorrt {tensorrt.__version__}")
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError when libnvinfer cannot load
        step.lines.append(f"tensorrt: not importable ({type(exc).__name__}: {exc}); the engine steps will say so")
    try:
        import onnxruntime as ort

        step.lines.append(f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}")
    except ImportError as exc:
        step.lines.append(f"onnxruntime: {exc}")
    return step


# -- 2. the suite's GPU tests -------------------------------------------------------------------


def gpu_tests() -> Step:
    step = Step("GPU and TensorRT tests")
    proc = _run([sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-q", "-rs", "-p", "no:cacheprovider"],
                timeout=1800)
    summary = next((line for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ (passed|failed|skipped)",
                                                                                      line)), "")
    step.lines.append(summary.strip("= ") or "(no pytest summary)")
    step.lines += [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    if proc.returncode != 0:
        step.lines += _tail(proc.stdout + proc.stderr)
        return step.fail(f"pytest exited {proc.returncode}")
    if " passed" not in summary:
        return step.fail("no GPU test ran (all skipped): see the reasons above")
    return step


# -- 3. the demo on CUDA ------------------------------------------------------------------------


def _config(source: Path, workdir: Path, quick: bool, name: str) -> Path:
    """`source` with the workdir, device and (with --quick) epochs replaced, written into workdir."""
    raw = tomllib.loads(source.read_text())
    for table, key in PATH_KEYS:
        value = raw.get(table, {}).get(key)
        if isinstance(value, str) and value and value != "rest" and not value.startswith("torchvision:"):
            raw[table][key] = str((source.parent / value).resolve())
    raw.setdefault("pipeline", {}).update(workdir=str(workdir), device="cuda")
    if quick:
        for table, values in QUICK.items():
            raw.setdefault(table, {}).update(values)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir.parent / f"{name}.toml"
    path.write_text(config_toml(raw))
    return path


def _fmt(value, spec: str = ".3f", unit: str = "") -> str:
    return f"{value:{spec}}{unit}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _manifest_lines(workdir: Path) -> tuple[list[str], dict]:
    """What the run in `workdir` recorded, one line per stage and per measured build."""
    path = workdir / "manifest.json"
    if not path.is_file():
        return ["no manifest.json was written"], {}
    manifest = json.loads(path.read_text())
    task = manifest.get("pipeline", {}).get("task")
    metric = task.get("metric", "accuracy") if isinstance(task, dict) else "accuracy"
    lines = []
    for name, rec in manifest.get("stages", {}).items():
        lines.append(f"stage {name}: {rec.get('status')} in {_fmt(rec.get('seconds'), '.1f', ' s')} on "
                     f"{rec.get('device', '?')}{(': ' + rec['reason']) if rec.get('reason') else ''}")
        for art, m in rec.get("metrics", {}).items():
            if not isinstance(m, dict) or "latency_p50_ms" not in m:
                continue
            batch = f"batch {m.get('batch_size')}{' (fixed)' if m.get('batch_fixed') else ''}"
            lines.append(f"  {art:<24} {metric} {_fmt(m.get(metric), '.4f')}  p50 {_fmt(m.get('latency_p50_ms'))} ms  "
                         f"p90 {_fmt(m.get('latency_p90_ms'))} ms  {batch}: {_fmt(m.get('throughput_ips'), ',.0f')} img/s"
                         f"{'  train ' + _fmt(m.get('train_seconds'), '.1f', ' s') if 'train_seconds' in m else ''}")
        for art, why in rec.get("unavailable", {}).items():
            lines.append(f"  {art:<24} not built: {why}")
    return lines, manifest


def demo(config: Path, workdir: Path, quick: bool) -> Step:
    step = Step("demo on CUDA up to the TensorRT engine")
    cfg = _config(config, workdir, quick, "single")
    proc = _run([sys.executable, "-m", "pipeline", "run", str(cfg), "--target", "tensorrt"], timeout=3600)
    lines, manifest = _manifest_lines(workdir)
    step.lines.append(f"config {cfg} (from {config}), exit code {proc.returncode}")
    step.lines += lines
    if proc.returncode not in (0, 3):  # 3: a gate failed, which is the run's verdict, not a broken path
        step.lines += _tail(proc.stderr or proc.stdout)
        return step.fail(f"the pipeline exited {proc.returncode}")
    trt = manifest.get("stages", {}).get("tensorrt", {})
    engine = trt.get("metrics", {}).get("trt_engine")
    if engine:
        step.lines.append(f"engine: TensorRT {engine.get('tensorrt_version')} on {engine.get('device_name')}, "
                          f"max batch {engine.get('max_batch')}, workspace {engine.get('workspace_mb')} MiB")
    else:
        return step.fail(f"trt_engine was not built: {trt.get('unavailable', {}).get('trt_engine', 'no tensorrt stage')}")
    if any(rec.get("device", "cpu") == "cpu" for rec in manifest.get("stages", {}).values() if rec.get("device")):
        return step.fail("a stage ran on the CPU although device = 'cuda'")
    return step


# -- 4. torchrun on two GPUs --------------------------------------------------------------------


def torchrun(config: Path, workdir: Path, quick: bool) -> Step:
    step = Step("2-process torchrun (NCCL), teacher and distill")
    import torch

    if torch.cuda.device_count() < 2:
        return step.skip(f"needs two GPUs, one per rank; this machine has {torch.cuda.device_count()}")
    cfg = _config(config, workdir, quick, "torchrun")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "pipeline", "run", str(cfg), "--until", "distill"], timeout=3600, env={"OMP_NUM_THREADS": "1"})
    lines, manifest = _manifest_lines(workdir)
    step.lines.append(f"config {cfg}, exit code {proc.returncode}")
    step.lines += lines
    if proc.returncode not in (0, 3):
        step.lines += _tail(proc.stderr or proc.stdout, 25)
        return step.fail(f"torchrun exited {proc.returncode}")
    stages = manifest.get("stages", {})
    if not all(stages.get(s, {}).get("status") == "ok" for s in ("teacher", "distill")):
        return step.fail("teacher and distill did not both finish")
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "pipeline.toml", help="the pipeline config (the demo)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "gpu-check", help="where the runs are written")
    ap.add_argument("--quick", action="store_true", help="2 teacher, 3 distill, 1 healing epochs: a smoke run")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the suite's GPU tests")
    args = ap.parse_args()
    workdir = args.workdir.resolve()

    steps = [environment()]
    if steps[0].status == "FAILED":
        steps += [Step(n).skip("no CUDA device") for n in (
            "GPU and TensorRT tests", "demo on CUDA up to the TensorRT engine",
            "2-process torchrun (NCCL), teacher and distill")]
    else:
        steps.append(Step("GPU and TensorRT tests").skip("--skip-tests") if args.skip_tests else gpu_tests())
        steps.append(demo(args.config, workdir / "single", args.quick))
        steps.append(torchrun(args.config, workdir / "torchrun", args.quick))

    print("\n== gpu_check: what this machine did ==")
    for step in steps:
        print(f"\n[{step.status}] {step.name}")
        for line in step.lines:
            print(f"  {line}")
    counts = {k: sum(s.status == k for s in steps) for k in ("ok", "skipped", "FAILED")}
    failed = [s.name for s in steps if s.status == "FAILED"]
    print("\n" + ", ".join(f"{n} {k}" for k, n in counts.items()) + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
