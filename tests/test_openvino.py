"""OpenVINO stage, called directly with hand-made ONNX inputs (no dependency on the onnx stage):
FP32 parity with ONNX Runtime, INT8 via NNCF on the calibration split only, accuracy control,
the teacher's reference build, benchmark_app commands, conversion errors, atomic writes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import nncf  # noqa: E402
import openvino as ov  # noqa: E402

from export import openvino as ov_stage  # noqa: E402
from export.runtimes import OpenVINORuntime, OrtRuntime  # noqa: E402
from pipeline import config, stage  # noqa: E402
from pipeline.data import DataBundle  # noqa: E402
from pipeline.stage import StageContext  # noqa: E402
from tests.conftest import tiny_cfg, tiny_data  # noqa: E402

pytestmark = pytest.mark.openvino

BENCHMARK_APP = Path(sys.executable).with_name("benchmark_app")


# -- fixtures --------------------------------------------------------------------------------


_cfg = tiny_cfg


def _ctx(workdir: Path, bundle: DataBundle, inputs: dict[str, Path], extra: str = "") -> StageContext:
    ctx = StageContext(cfg=_cfg(workdir, extra), name="openvino", workdir=workdir, inputs=inputs,
                       device=torch.device("cpu"), key="test")
    ctx._data = bundle  # the digits are loaded once per module
    return ctx


def _export(model: nn.Module, path: Path, dynamic: bool = True) -> Path:
    kwargs = {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}} if dynamic else {}
    with warnings.catch_warnings():  # the TorchScript exporter is asked for on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model.eval(), torch.zeros(1, 3, 8, 8), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"], **kwargs)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> DataBundle:
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory, bundle) -> dict[str, Path]:
    """A 2-layer CNN trained for a few seconds (so its top-1 is not a constant and INT8
    agreement means something), the same CNN with a fixed batch of 1, and an untrained
    torchvision ResNet-18 as the teacher."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    student = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.train()
    for _ in range(8):
        for x, y in bundle.loader("train", 64, seed=0):
            opt.zero_grad()
            F.cross_entropy(student(x), y).backward()
            opt.step()
    teacher = torchvision.models.resnet18(num_classes=10)
    return {
        "student": _export(student, d / "student.onnx"),
        "static": _export(student, d / "student_static.onnx", dynamic=False),
        "teacher": _export(teacher, d / "teacher.onnx"),
    }


@pytest.fixture(scope="module")
def full(tmp_path_factory, bundle, onnx_files):
    """One default run (fp32 + int8, teacher present), shared by the read-only tests."""
    workdir = tmp_path_factory.mktemp("full") / "run"
    ctx = _ctx(workdir, bundle, {"onnx": onnx_files["student"], "teacher_onnx": onnx_files["teacher"]})
    return ctx, ov_stage.run(ctx)


class _Recording(torch.utils.data.Dataset):
    """A split that logs every image read with the phase it happened in."""

    def __init__(self, base, split: str, log: list, phase: list):
        self.base, self.split, self.log, self.phase = base, split, log, phase

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.log.append((self.split, self.phase[0]))
        return self.base[i]


def _recording_bundle(bundle: DataBundle, monkeypatch) -> tuple[DataBundle, list]:
    """A copy of `bundle` whose val/calibration reads are logged as ("split", "quantize" |
    "other"), with every NNCF entry point marking the "quantize" phase."""
    log, phase = [], ["other"]
    for name in ("quantize", "quantize_with_accuracy_control"):
        real = getattr(nncf, name)

        def wrapped(*args, _real=real, **kwargs):
            phase[0] = "quantize"
            try:
                return _real(*args, **kwargs)
            finally:
                phase[0] = "other"

        monkeypatch.setattr(nncf, name, wrapped)
    rec = DataBundle(train=bundle.train, val=_Recording(bundle.val, "val", log, phase),
                     calibration=_Recording(bundle.calibration, "calibration", log, phase),
                     classes=bundle.classes, image_size=bundle.image_size)
    return rec, log


def _op_types(xml: Path) -> set[str]:
    return {op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops()}


def _val_images(bundle: DataBundle, n: int = 128) -> np.ndarray:
    return next(iter(bundle.loader("val", n)))[0].numpy()


# -- FP32 ------------------------------------------------------------------------------------


def test_fp32_ir_matches_onnxruntime(full, bundle, onnx_files):
    ctx, res = full
    xml = res.outputs["openvino_fp32"]
    assert xml == ctx.out_dir / "student_fp32.xml" and xml.with_suffix(".bin").is_file()
    assert 'element_type="f16"' not in xml.read_text()  # compress_to_fp16=False: weights stay FP32
    x = _val_images(bundle)
    ref = OrtRuntime(onnx_files["student"], threads=1).outputs(x)["logits"]
    got = OpenVINORuntime(xml, threads=1, precision="f32").outputs(x)["logits"]
    assert np.abs(ref - got).max() < 1e-3
    m = res.metrics["openvino_fp32"]
    assert m["parity_max_abs_diff"] < 1e-3 and m["parity_top1_agreement"] == 1.0
    assert m["parity_images"] == 256 and m["parity_precision"] == "f32"
    assert m["inference_precision"] == "f32" and m["device_precision"] == "f32" and m["requested"] is True
    assert not res.warnings
    measure = res.measure["openvino_fp32"]
    assert measure.path == xml and measure.runtime.precision == "f32"
    assert not stage.REGISTRY["openvino"].artifacts["openvino_fp32"].reference


# -- INT8 ------------------------------------------------------------------------------------


def test_int8_ir_is_quantized_and_agrees_with_fp32(full, bundle):
    _, res = full
    int8, fp32 = res.outputs["openvino_int8"], res.outputs["openvino_fp32"]
    assert "FakeQuantize" in _op_types(int8) and "FakeQuantize" not in _op_types(fp32)
    x = _val_images(bundle, 256)
    a = OpenVINORuntime(fp32, threads=1).outputs(x)["logits"]
    b = OpenVINORuntime(int8, threads=1).outputs(x)["logits"]
    assert len(np.unique(a.argmax(1))) >= 5  # a trained model: agreement is not trivially 1
    assert np.abs(a - b).max() > 0  # the INT8 build really computes something else
    agreement = float(np.mean(a.argmax(1) == b.argmax(1)))
    assert agreement >= 0.9
    m = res.metrics["openvino_int8"]
    assert m["fp32_top1_agreement"] == pytest.approx(agreement, abs=1e-9) and m["compared_images"] == 256
    assert m["calibration_images"] == len(bundle.calibration) == 32
    assert m["calibration_split"] == "calibration" and m["preset"] == "performance"
    assert m["accuracy_control"] is False and "accuracy_control_data" not in m
    assert not stage.REGISTRY["openvino"].artifacts["openvino_int8"].reference


@pytest.mark.parametrize("accuracy_control", [False, True])
def test_calibration_reads_only_calibration_images(accuracy_control, tmp_path, bundle, onnx_files, monkeypatch):
    rec, log = _recording_bundle(bundle, monkeypatch)
    ctx = _ctx(tmp_path / "run", rec, {"onnx": onnx_files["student"]},
               f"[openvino]\naccuracy_control = {str(accuracy_control).lower()}\npreset = 'mixed'\n")
    res = ov_stage.run(ctx)
    during = [split for split, phase in log if phase == "quantize"]
    assert "val" not in during
    assert during.count("calibration") >= len(bundle.calibration)
    assert ("val", "other") in log  # parity and agreement do read val, outside NNCF
    m = res.metrics["openvino_int8"]
    assert m["preset"] == "mixed" and m["accuracy_control"] is accuracy_control


def test_accuracy_control_mode(tmp_path, bundle, onnx_files, monkeypatch):
    seen = {}
    real = nncf.quantize_with_accuracy_control

    def spy(model, calibration_dataset, validation_dataset, validation_fn, **kwargs):
        seen.update(kwargs)
        return real(model, calibration_dataset, validation_dataset, validation_fn, **kwargs)

    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", spy)
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: pytest.fail("plain quantize used in accuracy-control mode"))
    ctx = _ctx(tmp_path / "run", bundle, {"onnx": onnx_files["student"]},
               "[openvino]\naccuracy_control = true\nmax_accuracy_drop = 0.02\n")
    res = ov_stage.run(ctx)
    assert seen["max_drop"] == 0.02 and seen["drop_type"] == nncf.DropType.ABSOLUTE
    m = res.metrics["openvino_int8"]
    assert m["accuracy_control"] is True and m["accuracy_control_data"] == "calibration"
    assert m["max_accuracy_drop"] == 0.02
    assert res.outputs["openvino_int8"].is_file()
    assert "FakeQuantize" in _op_types(res.outputs["openvino_int8"])


# -- precisions, teacher -----------------------------------------------------------------------


def test_fp32_only_builds_no_int8_and_clears_stale_files(tmp_path, bundle, onnx_files, monkeypatch):
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: pytest.fail("int8 built though not requested"))
    # bf16 asked for the build: the parity check must still run at f32 (bf16 would blur it).
    ctx = _ctx(tmp_path / "run", bundle, {"onnx": onnx_files["student"]},
               "[openvino]\nprecisions = ['fp32']\ninference_precision = 'bf16'\n")
    # Leftovers of an earlier run with int8 and of a crashed save.
    (ctx.out_dir / "student_int8.xml").write_text("old")
    (ctx.out_dir / "student_int8.bin").write_text("old")
    (ctx.out_dir / ".ir-tmp-crashed").mkdir()
    res = ov_stage.run(ctx)
    assert set(res.outputs) == set(res.measure) == set(res.commands) == {"openvino_fp32"}
    assert set(res.metrics) == {"openvino_fp32"}
    assert sorted(p.name for p in ctx.out_dir.iterdir()) == ["student_fp32.bin", "student_fp32.xml"]
    m = res.metrics["openvino_fp32"]
    assert m["inference_precision"] == "bf16"
    assert m["device_precision"] == res.measure["openvino_fp32"].runtime.precision
    assert m["parity_max_abs_diff"] < 1e-3 and m["parity_precision"] == "f32"
    assert "-infer_precision bf16" in res.commands["openvino_fp32"]


def test_int8_only_still_builds_fp32_with_a_note(tmp_path, bundle, onnx_files):
    # A fixed batch of 1 also exercises the static-shape path (calibration and parity at batch 1).
    ctx = _ctx(tmp_path / "run", bundle, {"onnx": onnx_files["static"]}, "[openvino]\nprecisions = ['int8']\n")
    res = ov_stage.run(ctx)
    assert set(res.outputs) == {"openvino_fp32", "openvino_int8"}
    m = res.metrics["openvino_fp32"]
    assert m["requested"] is False and "not in openvino.precisions" in m["note"]
    assert m["parity_max_abs_diff"] < 1e-3 and m["parity_images"] == 256
    assert res.metrics["openvino_int8"]["calibration_images"] == 32


def test_teacher_build_is_reference_only(full):
    ctx, res = full
    xml = res.outputs["teacher_openvino_fp32"]
    assert xml == ctx.out_dir / "teacher_fp32.xml" and xml.with_suffix(".bin").is_file()
    roles = stage.REGISTRY["openvino"].artifacts
    assert {n for n in res.measure if roles[n].reference} == {"teacher_openvino_fp32"}
    assert res.measure["teacher_openvino_fp32"].path == xml
    assert res.metrics["teacher_openvino_fp32"]["device_precision"] == "f32"
    ops = ov.Core().read_model(str(xml)).get_ops()
    assert sum(op.get_type_name() == "Convolution" for op in ops) == 20  # ResNet-18, not the student


# -- commands ----------------------------------------------------------------------------------


def test_benchmark_commands_present(full):
    _, res = full
    cmds = res.commands
    assert set(cmds) == {"openvino_fp32", "openvino_int8", "teacher_openvino_fp32"}
    c = cmds["openvino_int8"]
    assert c.startswith("benchmark_app -m openvino/student_int8.xml -d CPU ")
    for flag in ("-nthreads 1", "-infer_precision f32", "-shape '[1,3,8,8]'", "-nstreams 1", "-api sync"):
        assert flag in c
    assert "openvino/teacher_fp32.xml" in cmds["teacher_openvino_fp32"]
    for v in cmds.values():  # run from the workdir: the model path is relative
        argv = shlex.split(v)
        assert not os.path.isabs(argv[argv.index("-m") + 1])


@pytest.mark.slow
@pytest.mark.skipif(not BENCHMARK_APP.is_file(), reason="benchmark_app is not installed next to this python")
def test_benchmark_command_runs(full):
    ctx, res = full
    env = {**os.environ, "PATH": f"{BENCHMARK_APP.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(res.commands["openvino_int8"] + " -niter 20", shell=True, cwd=ctx.workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Latency" in proc.stdout and "Count:" in proc.stdout


# -- errors and atomic writes ------------------------------------------------------------------


def _unsupported_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("FooBarOp", ["input"], ["logits"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), str(path))
    return path


@pytest.mark.parametrize("kind", ["unsupported_op", "garbage"])
def test_unconvertible_onnx_gives_a_clear_error(kind, tmp_path, bundle):
    path = tmp_path / "bad.onnx"
    if kind == "garbage":
        path.write_bytes(b"this is not a protobuf")
    else:
        _unsupported_onnx(path)
    ctx = _ctx(tmp_path / "run", bundle, {"onnx": path})
    with pytest.raises(ov_stage.OpenVINOConversionError) as err:
        ov_stage.run(ctx)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "cannot convert" in msg
    assert ("FooBarOp" in msg) if kind == "unsupported_op" else ("not a valid ONNX model" in msg)
    assert "src/" not in msg  # no C++ source locations
    assert list(ctx.out_dir.iterdir()) == []


def test_artifacts_are_written_atomically(full, tmp_path, onnx_files, monkeypatch):
    ctx, res = full
    names = sorted(p.name for p in ctx.out_dir.iterdir())
    assert names == sorted(f"{s}.{e}" for s in ("student_fp32", "student_int8", "teacher_fp32") for e in ("xml", "bin"))

    # A save that dies half-way leaves the previous IR untouched and no scratch files behind.
    model = ov.convert_model(str(onnx_files["student"]))
    target = ov_stage.save_ir(model, tmp_path / "m.xml")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("m.*")}
    real = ov.save_model

    def dies(model, path, **kwargs):
        real(model, path, **kwargs)
        Path(path).with_suffix(".bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ov, "save_model", dies)
    with pytest.raises(OSError, match="disk full"):
        ov_stage.save_ir(model, target)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("m.*")} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_teacher_to_openvino(tmp_path, tiny_config, cli):
    # Untrained models (epochs = 0) keep this about the chain, not about training.
    path = tiny_config(extra="[teacher]\nepochs = 0\n[distill]\nepochs = 0\nbaseline = false\n"
                             "[onnx]\nint8 = false\n[tensorrt]\nenabled = false\n")
    proc = cli("run", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    rec = manifest["stages"]["openvino"]
    assert rec["status"] == "ok" and rec["reference"] == ["teacher_openvino_fp32"]
    assert set(rec["inputs"]) == {"onnx", "teacher_onnx"}
    assert {n: o["path"] for n, o in rec["outputs"].items()} == {
        "openvino_fp32": "openvino/student_fp32.xml", "openvino_int8": "openvino/student_int8.xml",
        "teacher_openvino_fp32": "openvino/teacher_fp32.xml"}
    for name, out in rec["outputs"].items():
        xml = tmp_path / "run" / out["path"]
        assert out["bytes"] == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size  # the IR pair
        m = rec["metrics"][name]
        assert {"accuracy", "latency_p50_ms", "latency_p90_ms", "size_bytes", "device_precision"} <= set(m)
    assert rec["metrics"]["openvino_fp32"]["parity_max_abs_diff"] < 1e-3
    assert rec["metrics"]["openvino_int8"]["calibration_images"] == 32
    assert set(rec["commands"]) == set(rec["outputs"])


def test_fixed_batch_ir_is_measured_at_its_own_batch(tmp_path, bundle, onnx_files):
    """A `dynamic_batch = false` export on OpenVINO, measured as the runner does at the
    configured batch_size 64: OpenVINO refuses a [64,3,8,8] input for a [1,3,8,8] model, so
    evaluation runs in pieces of 1 and latency and throughput are timed at batch 1."""
    from pipeline.config import BenchConfig
    from pipeline.evaluate import measure
    from pipeline.tasks import get_task

    ctx = _ctx(tmp_path / "run", bundle, {"onnx": onnx_files["static"]}, "[openvino]\nprecisions = ['fp32']\n")
    res = ov_stage.run(ctx)
    static = res.measure["openvino_fp32"].runtime
    dynamic = OpenVINORuntime(onnx_files["student"], threads=1)
    assert static.static_batch == 1 and dynamic.static_batch is None
    task, bench = get_task("classification"), BenchConfig(warmup=1, runs=3, batch_runs=2)
    got = {name: measure(rt, val_loader=bundle.loader("val", 64), input_shape=bundle.input_shape, batch_size=64,
                         bench=bench, task=task, num_classes=bundle.num_classes)
           for name, rt in (("static", static), ("dynamic", dynamic))}
    assert got["static"]["accuracy"] == pytest.approx(got["dynamic"]["accuracy"], abs=1e-9)
    assert got["static"]["batch_size"] == 1 and got["static"]["batch_fixed"] is True
    assert got["dynamic"]["batch_size"] == 64 and got["dynamic"]["batch_fixed"] is False


def test_under_torchrun_only_rank_0_builds_the_ir(tmp_path, monkeypatch):
    """A rank other than 0 returns the paths rank 0 writes and touches nothing (no race on the IR)."""
    from export import openvino as ov_stage
    from pipeline import config, dist
    from pipeline.stage import StageContext

    monkeypatch.setattr(dist, "is_main", lambda: False)
    monkeypatch.setattr(ov_stage, "_convert", lambda *a: pytest.fail("rank 1 converted"))
    cfg = config.from_dict({"pipeline": {"workdir": str(tmp_path)}})
    ctx = StageContext(cfg=cfg, name="openvino", workdir=tmp_path, device=__import__("torch").device("cpu"), key="k",
                       inputs={"onnx": tmp_path / "onnx" / "student.onnx", "teacher_onnx": tmp_path / "t.onnx"})
    result = ov_stage.run(ctx)
    assert {k: v.name for k, v in result.outputs.items()} == {
        "openvino_fp32": "student_fp32.xml", "openvino_int8": "student_int8.xml",
        "teacher_openvino_fp32": "teacher_fp32.xml"}
    assert not result.measure and not any(p.exists() for p in result.outputs.values())
