"""Tests for the shared latency harness (`pipeline.bench`) and `export.runtimes.TorchRuntime`."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from export.runtimes import TorchRuntime
from pipeline import bench
from pipeline.bench import LATENCY_KEYS, LatencyStats, Runtime, latency_metrics, measure_latency, resolve_threads
from pipeline.config import BenchConfig

SHAPE = (3, 8, 8)


class FakeRuntime:
    """Records every call; `infer` takes `durations(i)` seconds on call i (0-based)."""

    name = "fake"
    output_names = ("logits",)
    device = "cpu"

    def __init__(self, durations=lambda i: 0.0, threads: int = 3, clock: "FakeClock | None" = None):
        self.threads = threads
        self.durations = durations
        self.clock = clock
        self.prepared_shapes: list[tuple[int, ...]] = []
        self.infer_calls = 0

    def prepare(self, batch: np.ndarray):
        assert batch.dtype == np.float32
        self.prepared_shapes.append(batch.shape)
        return batch

    def infer(self, prepared):
        d = self.durations(self.infer_calls)
        self.infer_calls += 1
        if self.clock is not None:
            self.clock.now += d  # virtual time: exact, independent of machine load
        elif d:
            time.sleep(d)
        return prepared

    def outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": np.zeros((len(batch), 2), dtype=np.float32)}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    return clock


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # TorchRuntime sets a process-wide thread count; keep other tests unaffected.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tiny_cnn(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


# --- resolve_threads -------------------------------------------------------------------------


def test_resolve_threads_zero_means_all_usable_cores():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    assert resolve_threads(0) == expected
    assert resolve_threads(3) == 3
    with pytest.raises(ValueError):
        resolve_threads(-1)


# --- measure_latency -------------------------------------------------------------------------


def test_measure_latency_real_sleep_percentiles_and_counts():
    rt = FakeRuntime(durations=lambda i: 0.002)

    stats = measure_latency(rt, SHAPE, 2, warmup=3, runs=15)

    assert isinstance(stats, LatencyStats)
    assert rt.infer_calls == 3 + 15
    assert rt.prepared_shapes == [(2, *SHAPE)]  # generated and prepared once, outside the loop
    assert stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert 1.9 <= stats.p50_ms < 20.0  # sleep(2 ms) never returns early; generous upper band for load
    assert (stats.batch, stats.warmup, stats.runs, stats.threads) == (2, 3, 15, 3)
    assert stats.throughput_ips == pytest.approx(2 / (stats.p50_ms / 1e3))


def test_measure_latency_excludes_warmup(fake_clock):
    # Call i takes (i + 1) ms: warm-up calls are 1..5 ms, timed calls 6..10 ms.
    rt = FakeRuntime(durations=lambda i: (i + 1) * 1e-3, clock=fake_clock)

    stats = measure_latency(rt, SHAPE, 1, warmup=5, runs=5)

    timed = np.arange(6, 11, dtype=float)
    assert stats.p50_ms == pytest.approx(np.percentile(timed, 50))
    assert stats.p90_ms == pytest.approx(np.percentile(timed, 90))
    assert stats.p99_ms == pytest.approx(np.percentile(timed, 99))
    assert stats.mean_ms == pytest.approx(8.0)
    assert stats.p50_ms <= stats.p90_ms <= stats.p99_ms


def test_measure_latency_throughput_is_batch_over_median(fake_clock):
    rt = FakeRuntime(durations=lambda i: 0.002, clock=fake_clock)

    stats = measure_latency(rt, SHAPE, 4, warmup=0, runs=5)

    assert stats.p50_ms == pytest.approx(2.0)
    assert stats.throughput_ips == pytest.approx(4 / 0.002)


def test_measure_latency_inputs_seeded():
    seen: list[np.ndarray] = []
    rt = FakeRuntime()
    rt.prepare = lambda batch: seen.append(batch.copy()) or batch  # type: ignore[method-assign]

    measure_latency(rt, SHAPE, 2, warmup=0, runs=1, seed=7)
    measure_latency(rt, SHAPE, 2, warmup=0, runs=1, seed=7)
    measure_latency(rt, SHAPE, 2, warmup=0, runs=1, seed=8)

    np.testing.assert_array_equal(seen[0], seen[1])
    assert not np.array_equal(seen[0], seen[2])


@pytest.mark.parametrize("kwargs", [dict(batch=0, warmup=0, runs=1), dict(batch=1, warmup=0, runs=0)])
def test_measure_latency_rejects_bad_counts(kwargs):
    with pytest.raises(ValueError):
        measure_latency(FakeRuntime(), SHAPE, kwargs.pop("batch"), **kwargs)


# --- latency_metrics -------------------------------------------------------------------------


def test_latency_metrics_keys_threads_and_runs(fake_clock):
    rt = FakeRuntime(durations=lambda i: 0.001, threads=5, clock=fake_clock)
    cfg = BenchConfig(warmup=1, runs=3, batch_runs=2)

    metrics = latency_metrics(rt, SHAPE, batch_size=8, bench=cfg)

    assert set(metrics) == set(LATENCY_KEYS) == {
        "latency_p50_ms",
        "latency_p90_ms",
        "latency_p99_ms",
        "throughput_ips",
        "batch_latency_p50_ms",
        "batch_size",
        "batch_fixed",
        "threads",
    }
    assert metrics["threads"] == 5
    assert metrics["batch_size"] == 8 and metrics["batch_fixed"] is False
    assert metrics["latency_p50_ms"] == pytest.approx(1.0)
    assert metrics["throughput_ips"] == pytest.approx(8 / 0.001)
    assert rt.prepared_shapes == [(1, *SHAPE), (8, *SHAPE)]
    # batch 1: 1 warm-up + 3 runs; batch 8: max(1, 2) warm-up + 2 runs.
    assert rt.infer_calls == (1 + 3) + (2 + 2)


# --- TorchRuntime ----------------------------------------------------------------------------


class _TwoHeads(nn.Module):
    """A model with two raw outputs, returned as a tuple or a dict."""

    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict

    def forward(self, x):
        a, b = x.mean(dim=(2, 3)), x.amax(dim=(1, 2, 3))
        return {"scores": a, "peaks": b} if self.as_dict else (a, b)


@pytest.mark.parametrize("as_dict", [False, True])
def test_torch_runtime_returns_every_output_by_name(as_dict):
    x = np.random.default_rng(0).standard_normal((2, *SHAPE), dtype=np.float32)
    rt = TorchRuntime(_TwoHeads(as_dict), threads=1, output_names=("scores", "peaks"))

    out = rt.outputs(x)

    assert list(out) == ["scores", "peaks"]
    np.testing.assert_allclose(out["scores"], x.mean(axis=(2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["peaks"], x.max(axis=(1, 2, 3)), rtol=1e-6)


def test_torch_runtime_outputs_match_module():
    model = _tiny_cnn()
    x = np.random.default_rng(0).standard_normal((4, *SHAPE), dtype=np.float32)
    model.eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    model.train()

    rt = TorchRuntime(model, threads=1)
    outputs = rt.outputs(x)
    got = outputs["logits"]

    assert isinstance(rt, Runtime)
    assert list(outputs) == ["logits"]
    assert got.dtype == np.float32 and got.shape == (4, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not model.training  # the runtime runs the model in eval mode


def test_torch_runtime_prepare_infer_shapes_and_threads():
    rt = TorchRuntime(_tiny_cnn(), device="cpu", threads=0)
    x = np.zeros((3, *SHAPE), dtype=np.float32)

    prepared = rt.prepare(x)
    out = rt.infer(prepared)

    assert (rt.name, rt.device) == ("torch", "cpu")
    assert rt.threads == resolve_threads(0) == torch.get_num_threads()
    assert isinstance(prepared, torch.Tensor) and prepared.shape == (3, *SHAPE) and prepared.is_contiguous()
    assert prepared.device.type == "cpu" and prepared.dtype == torch.float32
    assert tuple(out.shape) == (3, 5)


def test_torch_runtime_refixes_threads_and_channels_last():
    rt = TorchRuntime(_tiny_cnn(), threads=1, channels_last=True)
    torch.set_num_threads(2)  # another runtime changed the process-wide setting

    prepared = rt.prepare(np.zeros((2, *SHAPE), dtype=np.float32))

    assert rt.threads == 1 and torch.get_num_threads() == 1
    assert prepared.is_contiguous(memory_format=torch.channels_last)
    assert tuple(rt.infer(prepared).shape) == (2, 5)


def test_torch_runtime_through_harness():
    rt = TorchRuntime(_tiny_cnn(), threads=1)

    metrics = latency_metrics(rt, SHAPE, batch_size=4, bench=BenchConfig(warmup=1, runs=3, batch_runs=1))

    assert metrics["threads"] == 1
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p90_ms"] <= metrics["latency_p99_ms"]
    assert metrics["throughput_ips"] > 0


def test_a_fixed_batch_runtime_is_timed_at_its_own_batch(fake_clock):
    # An `[onnx] dynamic_batch = false` build accepts batch 1 only: timing it at batch_size
    # would fail inside the runtime (or measure something it never runs).
    rt = FakeRuntime(durations=lambda i: 0.002, clock=fake_clock)
    rt.static_batch = 1
    metrics = latency_metrics(rt, SHAPE, batch_size=64, bench=BenchConfig(warmup=1, runs=3, batch_runs=2))
    assert set(metrics) == set(LATENCY_KEYS)
    assert rt.prepared_shapes == [(1, *SHAPE), (1, *SHAPE)]
    assert metrics["batch_size"] == 1 and metrics["batch_fixed"] is True
    assert metrics["throughput_ips"] == pytest.approx(1 / 0.002)
    assert metrics["batch_latency_p50_ms"] == pytest.approx(2.0)


def test_in_pieces_pads_the_last_piece_of_a_fixed_batch():
    from export.runtimes import in_pieces

    seen = []

    def run(x):
        seen.append(len(x))
        return {"logits": x.reshape(len(x), -1)[:, :2] * 2, "index": x[:, 0, 0, 0].copy()}

    images = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    out = in_pieces(run, images, 4, fixed=True)
    assert seen == [4, 4, 4]  # 10 images: two full pieces and a padded one
    np.testing.assert_array_equal(out["index"], images[:, 0, 0, 0])
    np.testing.assert_array_equal(out["logits"], images.reshape(10, -1)[:, :2] * 2)
    seen.clear()
    assert in_pieces(run, images, 4, fixed=False)["index"].shape == (10,) and seen == [4, 4, 2]
    seen.clear()
    assert in_pieces(run, images, None, fixed=True)["index"].shape == (10,) and seen == [10]
