"""The one latency harness, shared by every runtime (torch, ONNX Runtime, OpenVINO, TensorRT).

Every artifact is timed the same way so the numbers are comparable across runtimes:
inputs are generated once (seeded) and converted to the runtime's native form once, outside
the timer; warm-up runs are untimed; each timed run is one synchronous `infer` bracketed by
`time.perf_counter`; percentiles come from the timed runs only. A runtime plugs in by
implementing :class:`Runtime`; the harness never knows which backend it is timing.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from pipeline.schema import BenchConfig

log = logging.getLogger(__name__)

# The exact metric keys `latency_metrics` returns (names fixed by the manifest contract).
LATENCY_KEYS = (
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "throughput_ips",
    "batch_latency_p50_ms",
    "batch_size",
    "batch_fixed",
    "threads",
)


@runtime_checkable
class Runtime(Protocol):
    """What the harness and the accuracy code need from a runtime.

    `prepare` is called outside the timer; `infer` is what is timed and must block until the
    results are ready (e.g. `torch.cuda.synchronize` on CUDA), otherwise asynchronous
    backends would report only the launch time.
    """

    name: str  # "torch", "onnxruntime", "openvino", "tensorrt"
    output_names: tuple[str, ...]  # the keys of `outputs`, in the model's order
    device: str  # "cpu", "cuda:0", ...
    threads: int  # intra-op threads this runtime was fixed to (recorded in metrics)
    # Optional (read with getattr, default None): `static_batch`, the only batch size a build
    # with a fixed input batch accepts. `outputs` must then take any number of images (in pieces
    # of that batch), and the harness times `infer` at that batch only.

    def prepare(self, batch: np.ndarray) -> Any:
        """Convert a float32 NCHW array to the runtime's native input."""
        ...

    def infer(self, prepared: Any) -> Any:
        """Run one synchronous inference on a prepared input."""
        ...

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every raw output of the model on a float32 NCHW batch, as float32 numpy by output name."""
        ...


@dataclass(frozen=True)
class LatencyStats:
    """Timing of one runtime at one batch size."""

    batch: int
    warmup: int
    runs: int
    threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float  # images per second = batch / (median seconds per run)


def resolve_threads(requested: int) -> int:
    """Turn the configured thread count into a concrete one: 0 means every core we may use.

    `sched_getaffinity` is preferred over `os.cpu_count()` because containers and `taskset`
    restrict the usable cores without changing the machine's core count.
    """
    if requested < 0:
        raise ValueError(f"threads must be >= 0, got {requested}")
    if requested > 0:
        return requested
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def measure_latency(
    runtime: Runtime,
    input_shape: tuple[int, int, int],
    batch: int,
    *,
    warmup: int,
    runs: int,
    seed: int = 0,
) -> LatencyStats:
    """Time `runs` synchronous inferences of a `(batch, *input_shape)` input after `warmup` untimed ones.

    The input is generated once (seeded standard normal, float32) and prepared once, outside
    the timer, so only the runtime's inference is measured.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")

    rng = np.random.default_rng(seed)
    data = rng.standard_normal((batch, *input_shape), dtype=np.float32)
    prepared = runtime.prepare(data)

    for _ in range(warmup):
        runtime.infer(prepared)

    times = np.empty(runs, dtype=np.float64)
    # A garbage-collection pause inside one run would land in the tail percentiles and make
    # p99 depend on unrelated allocations; timeit disables gc for the same reason.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(runs):
            t0 = time.perf_counter()
            runtime.infer(prepared)
            times[i] = time.perf_counter() - t0
    finally:
        if gc_was_enabled:
            gc.enable()

    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    stats = LatencyStats(
        batch=batch,
        warmup=warmup,
        runs=runs,
        threads=int(runtime.threads),
        p50_ms=float(p50 * 1e3),
        p90_ms=float(p90 * 1e3),
        p99_ms=float(p99 * 1e3),
        mean_ms=float(times.mean() * 1e3),
        throughput_ips=float(batch / p50) if p50 > 0 else float("inf"),
    )
    log.info(
        "%s/%s batch %d: p50 %.3f ms, p90 %.3f ms, p99 %.3f ms, %.1f img/s (%d runs, %d warm-up, %d threads)",
        runtime.name,
        runtime.device,
        batch,
        stats.p50_ms,
        stats.p90_ms,
        stats.p99_ms,
        stats.throughput_ips,
        runs,
        warmup,
        stats.threads,
    )
    return stats


def latency_metrics(
    runtime: Runtime,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int,
    bench: "BenchConfig",
) -> dict[str, float | int]:
    """The latency metrics recorded for every artifact.

    Batch 1 with `bench.warmup` / `bench.runs` gives the latency percentiles; the configured
    `batch_size` with at least 2 warm-up runs and `bench.batch_runs` timed runs gives the
    throughput. A runtime whose input batch is fixed (`static_batch`, e.g. an `[onnx]
    dynamic_batch = false` export) accepts no other batch, so both are timed at its own batch:
    `batch_size` then records that batch, not the configured one, and `batch_fixed` is true.
    Returns exactly the keys in :data:`LATENCY_KEYS`.
    """
    fixed = getattr(runtime, "static_batch", None)
    if fixed is not None and fixed != batch_size:
        log.info("%s: the build's batch is fixed at %d, so it is timed at batch %d, not at batch_size %d",
                 runtime.name, fixed, fixed, batch_size)
    single = measure_latency(runtime, input_shape, fixed or 1, warmup=bench.warmup, runs=bench.runs)
    # The batched input is a new shape: backends allocate and pick kernels on its first runs,
    # so it is always warmed a little even when the user set warmup = 0.
    batch = fixed or batch_size
    batched = measure_latency(
        runtime, input_shape, batch, warmup=max(bench.warmup, 2), runs=bench.batch_runs
    )
    return {
        "latency_p50_ms": single.p50_ms,
        "latency_p90_ms": single.p90_ms,
        "latency_p99_ms": single.p99_ms,
        "throughput_ips": batched.throughput_ips,
        "batch_latency_p50_ms": batched.p50_ms,
        "batch_size": int(batch),
        "batch_fixed": fixed is not None,
        "threads": int(runtime.threads),
    }
