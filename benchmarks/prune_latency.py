"""Does channel pruning buy measured speed, not only fewer MACs?

For ResNet-18 at 224² (and the demo's 32², standard stem) the student is pruned with the
pipeline's own pruner (Torch-Pruning, magnitude importance, round_to 8, head kept) at each
ratio, exported to ONNX, and timed with the pipeline's single latency harness at batch 1 on
every runtime available here: torch eager, ONNX Runtime FP32 and OpenVINO FP32 (f32 hint).
Printed per row: the MAC ratio and each runtime's measured latency speedup vs the unpruned
model on the same runtime. Weights are random: latency does not depend on their values.

    python benchmarks/prune_latency.py                    # 224 and 32, ratios 0.3 0.5 0.7
    python benchmarks/prune_latency.py --sizes 224 --ratios 0.5 --runs 100

Target (issue 4): 50% channel pruning gives >= 1.6x measured speedup on OpenVINO at 224².
Run it on an otherwise idle machine: latency under CPU contention is meaningless.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.runtimes import OpenVINORuntime, OrtRuntime, TorchRuntime  # noqa: E402
from pipeline.bench import measure_latency, resolve_threads  # noqa: E402
from pipeline.config import PruneConfig  # noqa: E402
from pipeline.evaluate import count_macs  # noqa: E402
from pipeline.tasks.classification.models import build_model  # noqa: E402
from pipeline.tasks import get_task  # noqa: E402
from stages.prune import make_pruner  # noqa: E402


def _export(model: torch.nn.Module, size: int, path: Path) -> Path:
    """Single-file ONNX at batch 1 (what the harness times)."""
    from export.onnx import export_model  # the pipeline's own exporter

    export_model(model, (3, size, size), path, opset=18, dynamic_batch=True, what=path.stem)
    return path


def _runtimes(model: torch.nn.Module, size: int, threads: int, tmp: Path, tag: str) -> dict:
    onnx_path = _export(model, size, tmp / f"{tag}.onnx")
    return {
        "torch": TorchRuntime(model, "cpu", threads),
        "onnxruntime": OrtRuntime(onnx_path, threads),
        "openvino": OpenVINORuntime(onnx_path, threads, precision="f32"),
    }


def _p50(runtime, size: int, runs: int, warmup: int, repeats: int) -> float:
    # Median over `repeats` separate timing blocks, each itself a median: robust to a noisy block.
    return statistics.median(
        measure_latency(runtime, (3, size, size), 1, warmup=warmup, runs=runs).p50_ms for _ in range(repeats)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 32])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--threads", type=int, default=0, help="0: every usable core")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = resolve_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"{args.arch}, batch 1, {threads} threads, p50 = median of {args.repeats} blocks of {args.runs} runs")
    header = f"{'size':>5} {'ratio':>5} {'MACs':>9} {'MAC ratio':>9}"
    for rt in ("torch", "onnxruntime", "openvino"):
        header += f" {rt + ' ms':>15} {'speedup':>8}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for size in args.sizes:
            classes = 1000 if size >= 128 else 10
            base_p50: dict[str, float] = {}
            base_macs = 0
            for ratio in [0.0, *args.ratios]:
                torch.manual_seed(0)
                model = build_model(args.arch, classes, image_size=size, small_input="off").eval()
                if ratio > 0:
                    pruner = make_pruner(model, torch.zeros(1, 3, size, size), PruneConfig(ratio=ratio), args.arch,
                                         get_task("classification"))
                    pruner.step()
                macs = count_macs(model, (3, size, size))
                base_macs = base_macs or macs
                row = f"{size:>5} {ratio:>5.1f} {macs / 1e6:>8.1f}M {macs / base_macs:>9.3f}"
                for name, rt in _runtimes(model, size, threads, tmp, f"{size}_{ratio}").items():
                    p50 = _p50(rt, size, args.runs, args.warmup, args.repeats)
                    base_p50.setdefault(name, p50)
                    row += f" {p50:>15.3f} {base_p50[name] / p50:>7.2f}x"
                print(row, flush=True)


if __name__ == "__main__":
    main()
