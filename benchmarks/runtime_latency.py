"""Latency of every deployment build, on every runtime this machine has, with one harness.

Rows: the demo run's own builds (read from its manifest: the teacher and the deployed student
in torch eager, ONNX Runtime FP32/INT8, OpenVINO FP32/INT8), and ResNet-18 and
MobileNetV3-Small at 224² (random weights, exported and quantized here with the pipeline's own
functions; INT8 calibrated on random inputs, so only their latency means anything). Each model
is timed at batch 1 and batch 32: p50 / p90 and speedup vs torch eager FP32 of the same model
at the same batch. TensorRT rows appear where the tensorrt package and a CUDA device exist.

    python benchmarks/runtime_latency.py                         # demo run + 224² models
    python benchmarks/runtime_latency.py --run runs/digits --models

Targets (issue 5): OpenVINO INT8 >= 2.5x OpenVINO FP32 at 224²; the deployed demo student
>= 10x faster than the teacher in torch eager at batch 1, within 1 point of its accuracy.
Run it on an otherwise idle machine: latency under CPU contention is meaningless.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.runtimes import OpenVINORuntime, OrtRuntime, TorchRuntime  # noqa: E402
from pipeline.bench import measure_latency, resolve_threads  # noqa: E402
from pipeline.tasks.classification.models import build_model  # noqa: E402

BATCHES = (1, 32)


def _p(runtime, shape, batch: int, runs: int, repeats: int) -> tuple[float, float]:
    """(p50, p90) in ms: medians over `repeats` blocks, robust to one noisy block."""
    stats = [measure_latency(runtime, shape, batch, warmup=max(3, runs // 5), runs=runs) for _ in range(repeats)]
    return statistics.median(s.p50_ms for s in stats), statistics.median(s.p90_ms for s in stats)


def _random_batches(shape, n: int = 8, batch: int = 4):
    rng = np.random.default_rng(0)
    return [(torch.from_numpy(rng.standard_normal((batch, *shape), dtype=np.float32)),) for _ in range(n)]


def _builds_for(model: torch.nn.Module, shape, tmp: Path, threads: int) -> dict:
    """torch eager, ORT FP32/INT8, OpenVINO FP32/INT8 of one model, via the pipeline's functions."""
    import openvino as ov

    from export.onnx import export_model, quantize_int8
    from export.openvino import quantize_int8 as ov_quantize_int8

    fp32 = tmp / "model.onnx"
    export_model(model, shape, fp32, opset=18, dynamic_batch=True)
    int8 = tmp / "model_int8.onnx"
    quantize_int8(fp32, int8, _random_batches(shape))
    ov_fp32 = ov.convert_model(str(fp32))
    ov.save_model(ov_fp32, str(tmp / "ov_fp32.xml"), compress_to_fp16=False)
    ov.save_model(ov_quantize_int8(ov_fp32, _random_batches(shape, batch=1, n=32)), str(tmp / "ov_int8.xml"),
                  compress_to_fp16=False)
    return {
        "torch eager fp32": TorchRuntime(model, "cpu", threads),
        "onnxruntime fp32": OrtRuntime(fp32, threads),
        "onnxruntime int8": OrtRuntime(int8, threads),
        "openvino fp32": OpenVINORuntime(tmp / "ov_fp32.xml", threads, precision="f32"),
        "openvino int8": OpenVINORuntime(tmp / "ov_int8.xml", threads, precision="f32"),
        **_tensorrt_rows(fp32, shape, tmp),
    }


def _tensorrt_rows(fp32: Path, shape, tmp: Path) -> dict:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    from export.runtimes import TensorRTRuntime
    from export.tensorrt import build_engine

    engine = build_engine(fp32, tmp / "model.engine", batch_size=max(BATCHES), input_shape=shape, workspace_mb=1024)
    return {"tensorrt fp32 (strongly typed)": TensorRTRuntime(engine)}


def _demo_builds(run: Path, threads: int) -> tuple[dict, dict, tuple[int, int, int]]:
    """The demo run's measured builds: runtimes, their recorded accuracy, the input shape."""
    from pipeline import config as config_mod
    from pipeline.manifest import Manifest
    from pipeline.tasks.classification.models import build_model as build
    from pipeline.models import load_student

    manifest = Manifest.load(run)
    cfg = config_mod.from_dict(manifest.model.pipeline["config"], base_dir=run)
    index = manifest.artifact_index()
    acc = {a: m.get("accuracy") for rec in manifest.model.stages.values() for a, m in rec.metrics.items()
           if isinstance(m, dict)}
    size = cfg.data.image_size
    shape = (3, size, size)
    sd = torch.load(run / index["teacher"][1].path, map_location="cpu", weights_only=True)
    num_classes = [v for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2][-1].shape[0]  # the head
    teacher = build(cfg.teacher.arch, num_classes, image_size=size, small_input=cfg.teacher.small_input)
    teacher.load_state_dict(sd)
    final = "pruned" if "pruned" in index else "student"
    student = load_student(run / index[final][1].path, cfg, num_classes)
    builds = {"teacher (torch eager fp32)": TorchRuntime(teacher, "cpu", threads),
              f"{final} (torch eager fp32)": TorchRuntime(student, "cpu", threads)}
    labels = {"teacher (torch eager fp32)": "teacher", f"{final} (torch eager fp32)": final}
    for art, label, make in (
        ("onnx", "onnxruntime fp32", lambda p: OrtRuntime(p, threads)),
        ("onnx_int8", "onnxruntime int8", lambda p: OrtRuntime(p, threads)),
        ("openvino_fp32", "openvino fp32", lambda p: OpenVINORuntime(p, threads, precision="f32")),
        ("openvino_int8", "openvino int8", lambda p: OpenVINORuntime(p, threads, precision="f32")),
    ):
        if art in index:
            builds[f"{final} ({label})"] = make(run / index[art][1].path)
            labels[f"{final} ({label})"] = art
    return builds, {k: acc.get(v) for k, v in labels.items()}, shape


def _table(title: str, builds: dict, shape, runs: int, repeats: int, accuracy: dict | None = None) -> dict:
    print(f"\n{title}")
    head = f"{'build':<36} {'acc':>7}" if accuracy else f"{'build':<36}"
    for b in BATCHES:
        head += f" {'b' + str(b) + ' p50':>10} {'p90':>8} {'vs eager':>9}"
    print(head)
    results: dict = {}
    base: dict[int, float] = {}
    for name, rt in builds.items():
        row = f"{name:<36}"
        if accuracy:
            a = accuracy.get(name)
            row += f" {a * 100:>6.2f}%" if a is not None else f" {'—':>7}"
        for b in BATCHES:
            p50, p90 = _p(rt, shape, b, runs if b == 1 else max(5, runs // 5), repeats)
            # "vs eager": the first torch-eager row of the table at the same batch.
            base.setdefault(b, p50)
            results.setdefault(name, {})[b] = (p50, p90)
            row += f" {p50:>10.3f} {p90:>8.3f} {base[b] / p50:>8.2f}x"
        print(row, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "digits", help="a finished demo run (skipped if absent)")
    ap.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v3_small"], help="224² models ('' for none)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="0: every usable core")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"{threads} threads; p50/p90 in ms, medians of {args.repeats} blocks; "
          f"'vs eager' = first torch-eager row's p50 / this p50 at the same batch")
    summary: dict = {}
    if (args.run / "manifest.json").is_file():
        builds, acc, shape = _demo_builds(args.run, threads)
        res = _table(f"demo run {args.run} ({shape[1]}², 'vs eager' = vs the teacher in torch eager)",
                     builds, shape, args.runs, args.repeats, acc)
        teacher_key = "teacher (torch eager fp32)"
        for name, r in res.items():
            if name != teacher_key:
                summary[f"demo {name}: speedup vs teacher eager at b1"] = res[teacher_key][1][0] / r[1][0]
    with tempfile.TemporaryDirectory() as tmp_dir:
        for arch in [m for m in args.models if m]:
            torch.manual_seed(0)
            model = build_model(arch, 1000, image_size=args.size, small_input="off").eval()
            tmp = Path(tmp_dir) / arch
            tmp.mkdir()
            shape = (3, args.size, args.size)
            res = _table(f"{arch} at {args.size}² (random weights)", _builds_for(model, shape, tmp, threads),
                         shape, args.runs, args.repeats)
            for b in BATCHES:
                summary[f"{arch} b{b}: openvino int8 vs fp32"] = res["openvino fp32"][b][0] / res["openvino int8"][b][0]
                summary[f"{arch} b{b}: onnxruntime int8 vs fp32"] = (
                    res["onnxruntime fp32"][b][0] / res["onnxruntime int8"][b][0])
    print("\nratios (p50):")
    print(json.dumps({k: round(v, 2) for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
