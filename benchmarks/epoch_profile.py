"""Where does a training epoch of the demo go? A profile of one epoch, and what the speed-ups buy.

For the demo's models and data (`pipeline.toml`: ResNet-34 teacher, ResNet-18 student, digits at
its image size, its batch size), in one run:
  1. one teacher epoch over the full training split, profiled with torch.profiler: the share of
     data loading (the DataLoader, tensors in memory) and the top operators by self CPU time;
  2. the median step time of teacher and student at 32 px and at the config's size, with torch's
     convolution weight gradient and with the GEMM one of `stages/fast_conv_grad.py` (interleaved, so
     drift on a noisy machine hits every variant alike), and the ratios.

    python benchmarks/epoch_profile.py
    python benchmarks/epoch_profile.py --config configs/digits.toml --steps 12
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from pipeline import config
from pipeline.tasks.classification.data import load_data
from pipeline.tasks.classification.models import build_model
from stages.fast_conv_grad import fast_weight_grad

ROOT = Path(__file__).resolve().parents[1]


def _model(arch: str, size: int, small_input: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(arch, 10, image_size=size, small_input=small_input).train()


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def profile_epoch(cfg: config.Config) -> None:
    """Profile one teacher epoch the way the teacher stage runs it (CPU, fast weight gradient)."""
    data = load_data(cfg.data, cfg.pipeline.seed, cfg.resolve("."))
    loader = data.loader("train", cfg.data.batch_size, seed=cfg.pipeline.seed)
    model = _model(cfg.teacher.arch, cfg.data.image_size, cfg.teacher.small_input)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    with fast_weight_grad(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        it = iter(loader)
        while True:
            with record_function("data loading"):
                batch = next(it, None)
            if batch is None:
                break
            with record_function("train step"):
                _step(model, opt, *batch)
    wall = time.perf_counter() - t0
    events = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in events.values())
    loading = events["data loading"].cpu_time_total if "data loading" in events else 0.0
    step = events["train step"].cpu_time_total if "train step" in events else 0.0
    print(f"one {cfg.teacher.arch} epoch: {len(loader)} steps of {cfg.data.batch_size} at {cfg.data.image_size} px, "
          f"{wall:.1f} s wall (under the profiler); data loading {100 * loading / (loading + step):.1f}% of "
          f"loading + step time")
    print(f"{'operator':40s} {'self CPU %':>10s}")
    top = sorted((e for e in events.values() if not e.key.startswith(("data loading", "train step"))),
                 key=lambda e: -e.self_cpu_time_total)[:10]
    for e in top:
        print(f"{e.key[:40]:40s} {100 * e.self_cpu_time_total / total:10.1f}")


def step_times(cfg: config.Config, steps: int) -> None:
    """Median train-step time per model, input size and weight-gradient path; interleaved."""
    batch = cfg.data.batch_size
    sizes = sorted({32, cfg.data.image_size}, reverse=True)
    variants = []
    for arch, small in ((cfg.teacher.arch, cfg.teacher.small_input), (cfg.distill.student, cfg.distill.small_input)):
        for size in sizes:
            model = _model(arch, size, small)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
            for fast in (False, True):
                variants.append(((arch, size, fast), model, opt, x, y))
    times: dict[tuple, list[float]] = {v[0]: [] for v in variants}
    for i in range(steps + 2):
        for name, model, opt, x, y in variants:
            with fast_weight_grad(model) if name[2] else contextlib.nullcontext():
                t = time.perf_counter()
                _step(model, opt, x, y)
                if i >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian train step, batch {batch}, {torch.get_num_threads()} threads, {steps} steps each (interleaved):")
    print(f"{'model':10s} {'px':>4s} {'torch wgrad ms':>15s} {'GEMM wgrad ms':>14s} {'speedup':>8s} {'vs 32 px torch':>15s}")
    for arch in dict.fromkeys(k[0] for k in med):
        for size in sizes:
            slow, fast = med[(arch, size, False)], med[(arch, size, True)]
            print(f"{arch:10s} {size:4d} {slow * 1e3:15.0f} {fast * 1e3:14.0f} {slow / fast:7.2f}x "
                  f"{med[(arch, 32, False)] / fast:14.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "pipeline.toml"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    args = ap.parse_args()
    cfg = config.load(args.config)
    profile_epoch(cfg)
    step_times(cfg, args.steps)


if __name__ == "__main__":
    main()
