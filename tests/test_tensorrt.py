"""TensorRT stage: symmetric INT8 Q/DQ ONNX, calibration cache, trtexec command, engine on CUDA.

The stage's `run(ctx)` is called directly on an ONNX file exported here from a small CNN
trained for a few seconds on the digits at 8 px (so top-1 agreement means something), with a
hand-made StageContext; it never depends on the onnx stage. Engine tests need the tensorrt
package and a CUDA device and skip with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import struct
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from export import tensorrt as trt_stage
from export.runtimes import OrtRuntime
from pipeline import config
from pipeline.errors import LibraryError, UserError
from pipeline.tasks.classification.data import load_data
from pipeline.manifest import Manifest, StageRecord, artifact_record
from pipeline.stage import REGISTRY, StageContext

DATA = {"source": "digits", "image_size": 8, "batch_size": 32, "calibration_size": 32, "augment": False}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The digits at 8 px, loaded once for the module."""
    cfg = config.from_dict({"data": DATA})
    return load_data(cfg.data, 0, base_dir=tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def fp32_onnx(bundle, tmp_path_factory) -> Path:
    """A 2-conv CNN trained 3 epochs (~95% val accuracy), exported with a dynamic batch axis."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for epoch in range(3):
            for x, y in bundle.loader("train", 64, shuffle=True, seed=epoch):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        path = tmp_path_factory.mktemp("fp32") / "student.onnx"
        torch.onnx.export(model, torch.zeros(1, 3, 8, 8), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture
def make_ctx(tmp_path, bundle, fp32_onnx):
    """Factory: a StageContext for the tensorrt stage with `[tensorrt]` overrides and the FP32 ONNX
    placed in the run directory as the onnx stage would (`onnx/student.onnx`)."""

    def make(data=None, **tensorrt) -> StageContext:
        cfg = config.from_dict({"pipeline": {"workdir": "run", "device": "cpu"}, "data": DATA,
                                "tensorrt": tensorrt, "bench": {"threads": 1}}, tmp_path)
        src = cfg.workdir / "onnx" / "student.onnx"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(fp32_onnx.read_bytes())
        return StageContext(cfg=cfg, name="tensorrt", workdir=cfg.workdir, inputs={"onnx": src},
                            device=torch.device("cpu"), key="test", _data=data or bundle)

    return make


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, as on a machine without it (also on machines that have it)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _val_images(bundle, n=256) -> np.ndarray:
    return torch.stack([bundle.val[i][0] for i in range(min(n, len(bundle.val)))]).numpy()


def _qdq_scales(path: Path) -> dict[str, float]:
    """Activation scales read straight from the Q/DQ graph (independent of the stage's helper)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def _parse_cache(path: Path) -> tuple[str, dict[str, float]]:
    lines = path.read_text().splitlines()
    entries = {}
    for line in lines[1:]:
        m = re.fullmatch(r"(.+): ([0-9a-f]{8})", line)
        assert m, f"malformed cache line {line!r}"
        entries[m.group(1)] = struct.unpack(">f", bytes.fromhex(m.group(2)))[0]
    return lines[0], entries


# -- trt_qdq ----------------------------------------------------------------------------------


def test_stage_is_registered_with_its_contract():
    stage = REGISTRY["tensorrt"]
    assert stage.order == 60 and stage.inputs == ("onnx",)
    assert stage.outputs == ("trt_qdq", "trt_calib_cache", "trt_engine")
    assert set(stage.reads) == {"tensorrt", "data"}  # [onnx] reaches it through the onnx artifact's hash
    assert stage.artifacts["trt_qdq"].latency_note and stage.artifacts["trt_qdq"].fp32 == "onnx"
    assert stage.artifacts["trt_engine"].target == "tensorrt" and [c.name for c in stage.commands] == ["build-engine"]
    cfg = config.from_dict({"tensorrt": {"enabled": False}})
    assert not stage.enabled(cfg)


def test_qdq_is_symmetric_int8_and_agrees_with_fp32(make_ctx, bundle, no_tensorrt):
    ctx = make_ctx(calibration="entropy")
    result = trt_stage.run(ctx)

    qdq = result.outputs["trt_qdq"]
    assert qdq == ctx.workdir / "tensorrt" / "student_qdq.onnx" and qdq.is_file()
    model = onnx.load(str(qdq))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 5
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # Weights: INT8 initializers with one scale per output channel; biases stay float.
    conv_w = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None]
    assert conv_w and all(w.dtype == np.int8 for w in conv_w)
    w_scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert all(s.size > 1 for s in w_scales)
    # The logits are not quantized: the graph output comes straight from the Gemm.
    out = model.graph.output[0].name
    assert next(n for n in model.graph.node if out in n.output).op_type == "Gemm"

    images = _val_images(bundle)
    ref = OrtRuntime(ctx.inputs["onnx"], threads=1).outputs(images)["logits"].argmax(1)
    got = OrtRuntime(qdq, threads=1).outputs(images)["logits"].argmax(1)
    assert (ref == got).mean() >= 0.9

    m = result.metrics["trt_qdq"]
    assert m["calibration"] == "entropy" and m["calibration_images"] == 32 and m["calibration_split"] == "calibration"
    assert "not representative of TensorRT" in m["latency_note"]
    measure = result.measure["trt_qdq"]
    assert isinstance(measure.runtime, OrtRuntime) and measure.path == qdq
    assert not REGISTRY["tensorrt"].artifacts["trt_qdq"].reference
    assert "trt_engine" not in result.measure


def test_calibration_methods_differ_and_per_tensor_weights(make_ctx, no_tensorrt):
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        ctx = make_ctx(calibration=method, percentile=99.9, per_channel=method != "entropy")
        result = trt_stage.run(ctx)
        assert result.metrics["trt_qdq"]["calibration"] == method
        scales[method] = _qdq_scales(result.outputs["trt_qdq"])
        assert scales[method] and all(s > 0 for s in scales[method].values())
        if method == "percentile":
            assert result.metrics["trt_qdq"]["calibration_percentile"] == 99.9
        if method == "entropy":  # per_channel = false: one scale per weight tensor
            model = onnx.load(str(result.outputs["trt_qdq"]))
            inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
            assert all(inits[n.input[1]].size == 1 for n in model.graph.node
                       if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    mm, pc = scales["minmax"], scales["percentile"]
    assert mm.keys() == pc.keys()
    # A percentile clips the tail that min/max keeps: never wider, and narrower somewhere.
    assert all(pc[k] <= mm[k] * (1 + 1e-6) for k in mm)
    assert any(pc[k] < mm[k] * 0.999 for k in mm)


class _Forbidden(torch.utils.data.Dataset):
    def __init__(self, split):
        self.split = split

    def __len__(self):
        return 100

    def __getitem__(self, i):
        raise AssertionError(f"the tensorrt stage read a {self.split} image")


class _Counting(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.seen = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.base[i]


def test_calibration_reads_only_calibration_images(make_ctx, bundle, no_tensorrt):
    spy = _Counting(bundle.calibration)
    data = dataclasses.replace(bundle, train=_Forbidden("train"), val=_Forbidden("val"), calibration=spy)
    result = trt_stage.run(make_ctx(data=data, calibration="minmax"))
    assert sorted(spy.seen) == list(range(len(bundle.calibration))) == list(range(32))
    assert result.metrics["trt_qdq"]["calibration_images"] == 32


# -- trt_calib_cache --------------------------------------------------------------------------


def test_cache_format_matches_qdq_scales(make_ctx, bundle, no_tensorrt):
    ctx = make_ctx(calibration="minmax")
    result = trt_stage.run(ctx)
    cache = result.outputs["trt_calib_cache"]
    assert cache == ctx.workdir / "tensorrt" / "calibration.cache"

    header, entries = _parse_cache(cache)
    version = trt_stage._version_code(trt_stage.DEFAULT_TRT_VERSION)
    assert header == f"TRT-{version}-EntropyCalibration2" == "TRT-100300-EntropyCalibration2"
    qdq = _qdq_scales(result.outputs["trt_qdq"])
    assert entries.keys() == qdq.keys() and "input" in entries
    for name, scale in qdq.items():
        assert entries[name] == pytest.approx(scale, rel=1e-6)
    # Names are those of the FP32 ONNX, which `trtexec --calib` reads.
    fp32 = onnx.load(str(ctx.inputs["onnx"]))
    names = {t for n in fp32.graph.node for t in n.output} | {i.name for i in fp32.graph.input}
    assert entries.keys() <= names
    # scale = amax / 127, amax of the calibration images for min/max calibration.
    amax = max(float(x.abs().max()) for x, _ in bundle.loader("calibration", 32))
    assert entries["input"] == pytest.approx(amax / 127, rel=1e-5)
    assert trt_stage.read_calibration_cache(cache) == (header, pytest.approx(entries))
    m = result.metrics["trt_calib_cache"]
    assert m["tensors"] == len(entries) and m["header"] == header


def test_version_codes():
    assert trt_stage._version_code("10.3.0.26") == 100300
    assert trt_stage._version_code("10.13.2") == 101302
    assert trt_stage._version_code("8.6.1.6") == 8601


# -- trt_engine where TensorRT is absent -------------------------------------------------------


def _check_trtexec(command: str, workdir: Path) -> dict[str, str]:
    argv = shlex.split(command)
    assert argv[0] == "trtexec"
    flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in argv[1:])
    for key in ("onnx", "calib"):
        if key in flags:
            assert not Path(flags[key]).is_absolute() and (workdir / flags[key]).is_file(), flags[key]
    assert flags["minShapes"] == "input:1x3x8x8"
    assert flags["optShapes"] == flags["maxShapes"] == "input:32x3x8x8"
    assert flags["memPoolSize"] == "workspace:256M"
    return flags


def test_without_tensorrt_the_engine_is_unavailable_with_a_command(make_ctx, no_tensorrt):
    ctx = make_ctx(workspace_mb=256)
    stale = ctx.out_dir / "student.engine"
    stale.write_bytes(b"engine of an earlier trt_qdq")
    result = trt_stage.run(ctx)

    assert set(result.outputs) == {"trt_qdq", "trt_calib_cache"} and "trt_engine" not in result.measure
    assert result.unavailable["trt_engine"].startswith("tensorrt not installed")
    assert not stale.exists()
    flags = _check_trtexec(result.commands["trt_engine"], ctx.workdir)
    assert flags["onnx"] == "tensorrt/student_qdq.onnx" and "stronglyTyped" in flags
    assert flags["saveEngine"] == "tensorrt/student.engine" and "int8" not in flags
    implicit = _check_trtexec(result.commands["trt_calib_cache"], ctx.workdir)
    assert implicit["onnx"] == "onnx/student.onnx" and implicit["calib"] == "tensorrt/calibration.cache"
    assert "int8" in implicit and "stronglyTyped" not in implicit


def test_engine_reasons_build_engine_false_and_no_cuda(make_ctx, monkeypatch):
    result = trt_stage.run(make_ctx(build_engine=False))
    assert result.unavailable["trt_engine"] == "[tensorrt] build_engine = false"
    assert result.commands["trt_engine"].startswith("trtexec ")

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.7.0.23"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = trt_stage.run(make_ctx())
    assert result.unavailable["trt_engine"].startswith("no CUDA device")
    # The cache header names the TensorRT installed here, which is the one that would read it.
    header, _ = _parse_cache(result.outputs["trt_calib_cache"])
    assert header == "TRT-100700-EntropyCalibration2"


def test_tensorrt_11_gets_no_calibration_cache(make_ctx, monkeypatch):
    # TensorRT 11 removed implicit INT8 (calibrators, trtexec --int8 --calib): a cache and its
    # command would be dead weight there, and the engine build never needed them.
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "11.1.0.106"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx = make_ctx()
    stale = ctx.out_dir / "calibration.cache"
    stale.write_text("TRT-100300-EntropyCalibration2\n")
    result = trt_stage.run(ctx)
    assert set(result.outputs) == {"trt_qdq"} and not stale.exists()
    assert "removed in 11.0" in result.unavailable["trt_calib_cache"]
    assert "TensorRT 8.x-10.x" in result.unavailable["trt_calib_cache"]
    assert "trt_calib_cache" not in result.commands and "trt_calib_cache" not in result.metrics
    assert result.commands["trt_engine"].startswith("trtexec --onnx=tensorrt/student_qdq.onnx")
    assert result.unavailable["trt_engine"].startswith("no CUDA device")


def test_cache_says_which_tensorrt_it_serves(make_ctx, no_tensorrt):
    m = trt_stage.run(make_ctx()).metrics["trt_calib_cache"]
    assert m["serves"] == trt_stage.CACHE_SERVES and "8.x-10.x" in m["serves"] and "11" in m["serves"]


def test_tensorrt_older_than_10_is_a_reason_not_a_build(make_ctx, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = trt_stage.run(make_ctx())
    assert "too old" in result.unavailable["trt_engine"] and "10.0 or newer" in result.unavailable["trt_engine"]
    header, _ = _parse_cache(result.outputs["trt_calib_cache"])
    assert header == "TRT-8601-EntropyCalibration2"  # TensorRT 8.6 still reads a cache


def _fixed_batch_onnx(tmp_path: Path) -> Path:
    """A small CNN exported as `[onnx] dynamic_batch = false` does: input [1, 3, 8, 8]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 8, 8), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path


def test_fixed_batch_onnx_is_calibrated_and_measured_at_its_batch(make_ctx, tmp_path, bundle, no_tensorrt):
    """`[onnx] dynamic_batch = false`: trt_qdq keeps the fixed batch, the trtexec command sets no
    shapes, and the runner's measurement on ONNX Runtime runs at batch 1, not batch_size 32."""
    from pipeline.evaluate import measure
    from pipeline.tasks import get_task

    ctx = make_ctx()
    ctx.inputs["onnx"].write_bytes(_fixed_batch_onnx(tmp_path).read_bytes())
    result = trt_stage.run(ctx)
    assert "Shapes" not in result.commands["trt_engine"] and "Shapes" not in result.commands["trt_calib_cache"]
    runtime = result.measure["trt_qdq"].runtime
    assert runtime.static_batch == 1
    metrics = measure(runtime, val_loader=bundle.loader("val", 32), input_shape=bundle.input_shape, batch_size=32,
                      bench=config.BenchConfig(warmup=1, runs=3, batch_runs=2), task=get_task("classification"),
                      num_classes=10)
    assert metrics["batch_size"] == 1 and metrics["batch_fixed"] is True and 0 <= metrics["accuracy"] <= 1


# -- TensorRT failures on a machine that has it (faked here) ----------------------------------


class _DeviceSwitch:
    """Stands in for torch.cuda.device: records which device is current while TensorRT is called."""

    def __init__(self):
        self.current: list = []
        self.entered: list = []

    def __call__(self, device):
        switch = self

        class _Ctx:
            def __enter__(self):
                switch.current.append(torch.device(device))
                switch.entered.append(torch.device(device))

            def __exit__(self, *exc):
                switch.current.pop()

        return _Ctx()


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device as far as the stage's checks and device switches can tell (no kernels run)."""
    switch = _DeviceSwitch()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", switch)
    return switch


def _fake_tensorrt(monkeypatch, version="10.7.0.23", **members) -> types.ModuleType:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = version

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    fake.Logger = Logger
    for name, value in members.items():
        setattr(fake, name, value)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def _no_factory(*args, **kwargs):
    # What pybind11 raises when nvinfer's factory returns nullptr (CUDA/driver mismatch, NVIDIA/TensorRT#2913).
    raise TypeError("pybind11::init(): factory function returned nullptr")


def test_builder_type_error_is_a_library_error_and_keeps_trt_qdq(make_ctx, monkeypatch, fake_cuda):
    _fake_tensorrt(monkeypatch, Builder=_no_factory)
    ctx = make_ctx()
    target = ctx.out_dir / "x.engine"
    with pytest.raises(LibraryError, match="could not create a builder.*driver"):
        trt_stage.build_engine(ctx.inputs["onnx"], target, batch_size=4, input_shape=(3, 8, 8), workspace_mb=16)
    assert not target.exists()

    result = trt_stage.run(ctx)
    assert set(result.outputs) == {"trt_qdq", "trt_calib_cache"} and set(result.measure) == {"trt_qdq"}
    reason = result.unavailable["trt_engine"]
    assert reason.startswith("engine build failed: TensorRT failed:") and "nullptr" in reason
    assert any("trt_engine" in w and "kept" in w for w in result.warnings)
    assert result.commands["trt_engine"].startswith("trtexec ")
    assert fake_cuda.entered == [torch.device("cuda", 0)]  # built with the stage's device current


def test_engine_that_does_not_load_keeps_the_finished_work(make_ctx, monkeypatch, fake_cuda):
    def fake_build(qdq, engine, **kwargs):
        engine.write_bytes(b"serialized engine")
        return engine

    def fake_runtime(path, device):
        raise LibraryError("TensorRT", f"10.7.0 could not load {Path(path).name}")

    _fake_tensorrt(monkeypatch)
    monkeypatch.setattr(trt_stage, "build_engine", fake_build)
    monkeypatch.setattr(trt_stage, "TensorRTRuntime", fake_runtime)
    ctx = make_ctx()
    result = trt_stage.run(ctx)
    assert set(result.outputs) == {"trt_qdq", "trt_calib_cache"} and "trt_engine" not in result.measure
    assert "could not load student.engine" in result.unavailable["trt_engine"]
    assert not (ctx.out_dir / "student.engine").exists()  # nothing on disk that the manifest does not record


def test_tensorrt_runtime_library_failures_are_named(tmp_path, monkeypatch, fake_cuda):
    from export.runtimes import TensorRTRuntime

    engine = tmp_path / "student.engine"
    engine.write_bytes(b"engine")
    _fake_tensorrt(monkeypatch, Runtime=_no_factory)
    with pytest.raises(LibraryError, match="could not create a runtime on cuda:1"):
        TensorRTRuntime(engine, device="cuda:1")

    class StaleRuntime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return None  # an engine of another TensorRT version or GPU

    _fake_tensorrt(monkeypatch, Runtime=StaleRuntime)
    with pytest.raises(LibraryError, match="could not load student.engine.*rebuild"):
        TensorRTRuntime(engine, device="cuda:1")
    assert set(fake_cuda.entered) == {torch.device("cuda", 1)}


def test_tensorrt_runtime_infers_on_its_engines_device(fake_cuda, monkeypatch):
    """`pipeline.device = "cuda:1"`: the engine was loaded with cuda:1 current, so every call into
    its execution context must run with cuda:1 current too, whatever the current device is."""
    from export.runtimes import TensorRTRuntime

    calls = []

    class Context:
        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", fake_cuda.current[-1] if fake_cuda.current else None))
            return True

        def set_tensor_address(self, name, ptr):
            calls.append(("set_tensor_address", fake_cuda.current[-1] if fake_cuda.current else None))

        def execute_async_v3(self, stream):
            calls.append(("execute_async_v3", fake_cuda.current[-1] if fake_cuda.current else None))
            return True

    class Stream:
        cuda_stream = 0

        def wait_stream(self, other):
            pass

        def synchronize(self):
            calls.append(("synchronize", fake_cuda.current[-1] if fake_cuda.current else None))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: object())
    rt = TensorRTRuntime.__new__(TensorRTRuntime)
    rt.path, rt._device, rt.context, rt.stream = Path("student.engine"), torch.device("cuda", 1), Context(), Stream()
    rt.input_names, rt.output_names, rt.static_batch, rt.max_batch = ("input",), ("logits",), None, 8
    x = torch.zeros(2, 3, 8, 8)
    rt._outputs = {tuple(x.shape): {"logits": torch.zeros(2, 10)}}
    assert set(rt.infer(x)) == {"logits"}
    assert [c[0] for c in calls] == ["set_input_shape", "set_tensor_address", "set_tensor_address",
                                     "execute_async_v3", "synchronize"]
    assert {c[1] for c in calls} == {torch.device("cuda", 1)}


def _finished_run(ctx, result) -> Path:
    """A manifest as the runner would leave it after the tensorrt stage."""
    manifest = Manifest(ctx.workdir)
    manifest.stages["tensorrt"] = StageRecord(
        status="ok", outputs={n: artifact_record(p, ctx.workdir) for n, p in result.outputs.items()},
        config={k: getattr(ctx.cfg, k).model_dump(mode="json") for k in ("tensorrt", "data")},
        unavailable=result.unavailable, commands=result.commands)
    manifest.save()
    return ctx.workdir


def test_build_engine_from_run_errors(make_ctx, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no manifest.json"):
        trt_stage.build_engine_from_run(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    Manifest(empty).save()
    with pytest.raises(UserError, match="no trt_qdq artifact"):
        trt_stage.build_engine_from_run(empty)

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ctx = make_ctx()
    run_dir = _finished_run(ctx, trt_stage.run(ctx))
    with pytest.raises(UserError, match="tensorrt not installed.*trtexec"):
        trt_stage.build_engine_from_run(run_dir)
    qdq = run_dir / "tensorrt" / "student_qdq.onnx"
    qdq.write_bytes(qdq.read_bytes() + b"\0")
    with pytest.raises(UserError, match="cannot be trusted"):
        trt_stage.build_engine_from_run(run_dir)
    assert not (run_dir / "tensorrt" / "student.engine").exists()


def test_tensorrt_runtime_needs_tensorrt(no_tensorrt, tmp_path):
    from export.runtimes import TensorRTRuntime

    with pytest.raises(ImportError):
        TensorRTRuntime(tmp_path / "student.engine")


# -- trt_engine on a CUDA machine with TensorRT -----------------------------------------------


def _require_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="engine tests need the tensorrt package (NVIDIA GPU machines only)")
    if not torch.cuda.is_available():
        pytest.skip("engine tests need a CUDA device; none is visible")
    return trt


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_builds_and_agrees_with_qdq(make_ctx, bundle):
    trt = _require_tensorrt()
    ctx = make_ctx(calibration="entropy")
    result = trt_stage.run(ctx)
    assert "trt_engine" not in result.unavailable, result.unavailable
    engine = result.outputs["trt_engine"]
    assert engine == ctx.workdir / "tensorrt" / "student.engine" and engine.stat().st_size > 0
    header, _ = _parse_cache(result.outputs["trt_calib_cache"])
    assert header == f"TRT-{trt_stage._version_code(trt.__version__)}-EntropyCalibration2"

    runtime = result.measure["trt_engine"].runtime
    assert runtime.name == "tensorrt" and runtime.device.startswith("cuda:") and runtime.threads == 1
    assert runtime.input_names == ("input",) and runtime.output_names == ("logits",)
    images = _val_images(bundle, 100)  # > the batch 32 profile: outputs() splits it
    logits = runtime.outputs(images)["logits"]
    assert logits.shape == (100, 10) and logits.dtype == np.float32
    ref = OrtRuntime(result.outputs["trt_qdq"], threads=1).outputs(images)["logits"].argmax(1)
    assert (logits.argmax(1) == ref).mean() >= 0.9
    out = runtime.infer(runtime.prepare(images[:1]))["logits"]
    assert out.is_cuda and tuple(out.shape) == (1, 10)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_engine_from_run_builds(make_ctx):
    _require_tensorrt()
    ctx = make_ctx(build_engine=False)
    run_dir = _finished_run(ctx, trt_stage.run(ctx))
    engine = trt_stage.build_engine_from_run(run_dir)
    assert engine == run_dir / "tensorrt" / "student.engine" and engine.stat().st_size > 0
    from export.runtimes import TensorRTRuntime

    assert TensorRTRuntime(engine).outputs(np.zeros((2, 3, 8, 8), np.float32))["logits"].shape == (2, 10)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_fixed_batch_engine_runs_any_number_of_images(make_ctx, tmp_path, bundle):
    _require_tensorrt()
    ctx = make_ctx()
    ctx.inputs["onnx"].write_bytes(_fixed_batch_onnx(tmp_path).read_bytes())
    result = trt_stage.run(ctx)
    assert "trt_engine" not in result.unavailable, result.unavailable
    runtime = result.measure["trt_engine"].runtime
    assert runtime.static_batch == runtime.max_batch == 1
    images = _val_images(bundle, 37)
    logits = runtime.outputs(images)["logits"]
    assert logits.shape == (37, 10)
    ref = OrtRuntime(result.outputs["trt_qdq"], threads=1).outputs(images)["logits"]
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.9
    from pipeline.bench import latency_metrics

    timed = latency_metrics(runtime, (3, 8, 8), batch_size=32, bench=config.BenchConfig(warmup=2, runs=5, batch_runs=3))
    assert timed["batch_size"] == 1 and timed["batch_fixed"] is True


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_on_a_second_gpu(make_ctx, bundle):
    _require_tensorrt()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (pipeline.device = 'cuda:1')")
    ctx = dataclasses.replace(make_ctx(), device=torch.device("cuda", 1))
    result = trt_stage.run(ctx)
    assert "trt_engine" not in result.unavailable, result.unavailable
    runtime = result.measure["trt_engine"].runtime
    assert runtime.device == "cuda:1" and torch.cuda.current_device() == 0
    out = runtime.infer(runtime.prepare(_val_images(bundle, 4)))["logits"]
    assert out.device == torch.device("cuda", 1) and tuple(out.shape) == (4, 10)
