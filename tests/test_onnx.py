"""ONNX stage: export, checks, parity, dynamic batch, INT8 Q/DQ, teacher reference, caching, errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from export import onnx as onnx_stage
from export.runtimes import OrtRuntime
from pipeline import config
from pipeline.manifest import Manifest
from pipeline.runner import Runner, RunOptions
from pipeline.tasks import get_task
from tests.conftest import TINY_TOML, merge_toml, run_cli

# Untrained models are enough to test an export, and the stages after this one are disabled:
# they are not what these tests are about.
ONNX_TOML = """
[teacher]
epochs = 0
[distill]
baseline = false
epochs = 0
[onnx]
opset = 18
[openvino]
enabled = false
[tensorrt]
enabled = false
"""


class _Run:
    def __init__(self, cfg, proc, manifest):
        self.cfg, self.proc, self.manifest = cfg, proc, manifest
        self.rec = manifest.stages["onnx"]
        self.files = {name: cfg.workdir / art.path for name, art in self.rec.outputs.items()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> _Run:
    """One tiny teacher → distill → onnx run through the CLI, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("onnx_run")
    path = root / "pipeline.toml"
    path.write_text(merge_toml(TINY_TOML + ONNX_TOML))
    proc = run_cli("run", str(path), "--until", "onnx")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = config.load(path)
    return _Run(cfg, proc, Manifest.load(cfg.workdir))


@pytest.mark.slow
def test_end_to_end_manifest_and_files(tiny_run):
    import onnx

    cfg, rec, files = tiny_run.cfg, tiny_run.rec, tiny_run.files
    assert rec.status == "ok" and set(files) == {"onnx", "onnx_int8", "teacher_onnx"}
    assert rec.reference == ["teacher_onnx"]
    for name in files:  # measured by the shared harness, on ONNX Runtime
        m = rec.metrics[name]
        assert m["runtime"] == "onnxruntime" and m["threads"] == cfg.bench.threads
        assert m["accuracy"] > 0 and m["latency_p90_ms"] > 0 and m["params"] > 0 and m["size_bytes"] > 0
    # Parity within the configured tolerance, measured on real val images.
    m = rec.metrics["onnx"]
    assert m["parity_max_abs_diff"] <= m["parity_tolerance"] == cfg.onnx.parity_atol  # small logits: no float32 floor
    assert m["parity_top1_agreement"] >= cfg.onnx.parity_min_agreement
    assert m["parity_images"] == 256 and m["batch_check_max_abs_diff"] <= cfg.onnx.parity_atol
    assert m["source"] == "student" and m["opset"] == 18 and m["simplified"] is True
    assert m["exporter"] == ("dynamo" if "dynamo" in inspect.signature(torch.onnx.export).parameters else "torchscript")
    t = rec.metrics["teacher_onnx"]
    assert t["parity_max_abs_diff"] <= t["parity_tolerance"] and t["parity_top1_agreement"] >= 0.99
    q = rec.metrics["onnx_int8"]
    assert (q["activation_type"], q["weight_type"], q["calibrate_method"]) == ("QUInt8", "QInt8", "MinMax")
    assert q["calibration_images"] == cfg.data.calibration_size  # the calibration split, all of it
    assert not rec.warnings
    # One self-contained file per artifact: no external-data sidecar, no leftovers.
    out_dir = cfg.workdir / "onnx"
    assert sorted(p.name for p in out_dir.iterdir()) == ["student.onnx", "student_int8.onnx", "teacher.onnx"]
    for path in files.values():
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.slow
def test_dynamic_batch_on_onnxruntime(tiny_run):
    from export.runtimes import OrtRuntime

    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8), dtype=np.float32)
    for name in ("onnx", "teacher_onnx", "onnx_int8"):
        rt = OrtRuntime(tiny_run.files[name], threads=1)
        five = rt.outputs(x)["logits"]
        ones = np.concatenate([rt.outputs(x[i : i + 1])["logits"] for i in range(5)])
        assert five.shape == (5, 10)
        np.testing.assert_allclose(five, ones, atol=1e-4, err_msg=name)


@pytest.mark.slow
def test_int8_is_qdq_with_uint8_activations(tiny_run):
    import onnx

    model = onnx.load(str(tiny_run.files["onnx_int8"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    init = {t.name: t for t in model.graph.initializer}
    zero_points = {init[n.input[2]].data_type for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in init}
    assert zero_points == {onnx.TensorProto.UINT8}  # every activation is quantized to uint8
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights, "the conv weights are stored as int8"


@pytest.mark.slow
def test_second_run_is_all_cached(tiny_run):
    out = Runner(tiny_run.cfg, RunOptions(until_stage="onnx")).run()
    assert out.code == 0, out.messages
    for name in ("teacher", "distill", "onnx"):
        before, after = tiny_run.manifest.stages[name], out.manifest.stages[name]
        assert after.status == "ok" and (after.key, after.ended) == (before.key, before.ended), name  # not re-run


def test_disabled_stage_is_skipped(tmp_path, tiny_config):
    cfg = config.load(tiny_config(extra="[onnx]\nenabled = false\n"))
    out = Runner(cfg, RunOptions(only={"onnx"})).run()
    assert out.code == 0, out.messages
    assert out.manifest.stages["onnx"].status == "skipped"


def _parity(ref, got, **kw):
    task = get_task("classification")
    return onnx_stage.parity_metrics(task, {"logits": ref}, {"logits": got}, **kw)


def test_parity_helper_passes_and_fails():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 10)).astype(np.float32)
    ok = _parity(ref, ref + 1e-5, atol=1e-3, min_agreement=0.99)
    assert ok["parity_max_abs_diff"] == pytest.approx(1e-5, rel=1e-2) and ok["parity_top1_agreement"] == 1.0
    with pytest.raises(onnx_stage.ParityError, match=r"0\.5.*onnx\.parity_atol"):
        _parity(ref, ref + 0.5, atol=1e-3, min_agreement=0.0)
    flipped = ref.copy()
    flipped[:5] = -flipped[:5]  # 5 of 20 images change their top-1 class
    with pytest.raises(onnx_stage.ParityError, match=r"agreement 0\.75.*onnx\.parity_min_agreement"):
        _parity(ref, flipped, atol=100.0, min_agreement=0.99)
    with pytest.raises(onnx_stage.ParityError):
        _parity(ref, ref * np.nan, atol=1.0, min_agreement=0.0)
    # Logits near 2,000 (a diverged model): float32 alone differs by ~1e-3 after reordering, so
    # the tolerance rises to a few ulps there; a real error at that scale still fails.
    big = ref * 2000
    assert _parity(big, big + 2e-3, atol=1e-3, min_agreement=0.99)["parity_tolerance"] > 2e-3
    with pytest.raises(onnx_stage.ParityError, match="float32 floor"):
        _parity(big, big + 0.5, atol=1e-3, min_agreement=0.0)


class _QR(nn.Module):
    def forward(self, x):
        return x + torch.linalg.qr(x)[0]  # ONNX has no QR decomposition


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.custom = _QR()

    def forward(self, x):
        return self.custom(self.conv(x))


def test_unsupported_op_names_op_and_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.ReLU(), _Block()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(onnx_stage.UnsupportedOperatorError) as info:
        onnx_stage._export(model, (3, 8, 8), 18, True, tmp_path, ("logits",))
    err = info.value
    assert err.op == "aten::linalg_qr" and err.module == "1.1.custom"
    assert "aten::linalg_qr" in str(err) and "'1.1.custom'" in str(err)
    assert list(tmp_path.iterdir()) == []  # no partial file, no sidecar, no report


def test_fixed_batch_export_runs_any_batch(tmp_path, tiny_model):
    proto, _, _ = onnx_stage._export(tiny_model, (3, 8, 8), 18, False, tmp_path, ("logits",))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    path = tmp_path / "fixed.onnx"
    onnx_stage._publish(proto, path)
    rt = onnx_stage._ort(path, threads=1)
    assert rt.static_batch == 1 and OrtRuntime(path, threads=1).static_batch == 1
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = tiny_model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(rt.outputs(x)["logits"], ref, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


def test_fixed_batch_export_is_measured_at_its_own_batch(tmp_path, tiny_model):
    """The runner's measurement of a `dynamic_batch = false` build at batch_size 64 on ONNX
    Runtime: evaluation in pieces of batch 1, latency and throughput timed at batch 1."""
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.config import BenchConfig
    from pipeline.evaluate import measure

    proto, _, _ = onnx_stage._export(tiny_model, (3, 8, 8), 18, False, tmp_path, ("logits",))
    path = tmp_path / "fixed.onnx"
    onnx_stage._publish(proto, path)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(70, 3, 8, 8, generator=g)
    with torch.no_grad():
        labels = tiny_model.eval()(images).argmax(1)  # the model's own answers: accuracy 1.0
    metrics = measure(OrtRuntime(path, threads=1), val_loader=DataLoader(TensorDataset(images, labels), batch_size=64),
                      input_shape=(3, 8, 8), batch_size=64, bench=BenchConfig(warmup=1, runs=3, batch_runs=2),
                      task=get_task("classification"), num_classes=10)
    assert metrics["accuracy"] == 1.0
    assert metrics["batch_size"] == 1 and metrics["batch_fixed"] is True
    assert metrics["throughput_ips"] > 0 and metrics["latency_p50_ms"] > 0
