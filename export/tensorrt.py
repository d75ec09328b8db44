"""TensorRT stage: an explicit-quantization INT8 ONNX, its calibration cache, and an engine on CUDA.

TensorRT takes INT8 in two forms, and this stage writes both from one calibration:

- `trt_qdq`: explicit quantization. ONNX Runtime's static post-training quantization inserts
  QuantizeLinear/DequantizeLinear pairs calibrated on the *calibration* split (training images,
  never evaluation ones) with `[tensorrt] calibration` (minmax | entropy | percentile).
  TensorRT accepts only symmetric signed INT8 Q/DQ, so activations and weights are QInt8 with
  every zero point 0 (scale = amax / 127), weights per output channel when `per_channel`, and
  biases stay FP32. Following TensorRT's Q/DQ placement advice the outputs of weighted layers
  (Conv, Gemm, MatMul) are not quantized, which also keeps the logits in FP32. Accuracy is
  measured on ONNX Runtime CPU (same numerics as TensorRT's INT8, not its speed).
- `trt_calib_cache`: the same activation scales as a TensorRT calibration cache (text:
  `TRT-<version>-EntropyCalibration2`, then `tensor: <big-endian hex of the float32 scale>`),
  for implicit quantization of the FP32 ONNX (`trtexec --int8 --calib=`). ONNX Runtime's own
  `write_calibration_table` writes `name amax` lines without the header or hex encoding, which
  TensorRT does not read, so the cache is written here from the Q/DQ scales. It serves
  TensorRT 8.x-10.x only: TensorRT 11 removed implicit INT8 (`BuilderFlag.INT8`, the
  calibrators, `trtexec --int8 --calib`), so where TensorRT 11 is installed the cache is not
  written and is recorded as unavailable; `trt_qdq` carries the same scales for every version.
- `trt_engine`: a serialized engine built from `trt_qdq` with the TensorRT Python API (ONNX
  parser, strongly typed network, one optimization profile from batch 1 to the configured
  batch, or the model's own batch when it is fixed), only where the `tensorrt` package (10.0
  or newer) and a CUDA device are present. Engines are specific to the GPU and TensorRT
  version, so the stage always records the `trtexec` command that builds the same engine on the
  target (a Jetson builds on the Jetson), and `build_engine_from_run` builds it from a finished
  run directory. A TensorRT failure (no builder for this driver, a rejected model, an engine that
  does not load or run) is a :class:`LibraryError`: the engine is recorded as unavailable with
  the reason and `trt_qdq` and the cache are kept.

Under torchrun only rank 0 calibrates and builds; the other ranks wait at the runner's barrier.

Inputs: `onnx`. Outputs: `trt_qdq` (`tensorrt/student_qdq.onnx`), `trt_calib_cache`
(`tensorrt/calibration.cache`), `trt_engine` (`tensorrt/student.engine`, CUDA machines only).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.calibration import calibration_reader
from export.head_scope import onnx_output_layers
from export.runtimes import OrtRuntime, TensorRTRuntime
from pipeline import dist
from pipeline.schema import DataConfig, TensorRTConfig
from pipeline.errors import ConfigError, LibraryError, UserError
from pipeline.manifest import ArtifactRole, Manifest, atomic_write_bytes, verify_artifact
from pipeline.stage import Command, Measure, Probe, ProbeSpec, StageContext, StageResult, register

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

Config = TensorRTConfig

QDQ_FILE = "student_qdq.onnx"
CACHE_FILE = "calibration.cache"
ENGINE_FILE = "student.engine"
IMPLICIT_ENGINE_FILE = "student_implicit.engine"
# Written into the cache header when the tensorrt package is not installed here: TensorRT
# ignores a cache whose header names another version, so a user on a different release edits
# line 1 (JetPack 6 ships TensorRT 10.3).
DEFAULT_TRT_VERSION = "10.3.0"
# trtexec's --calib reader is an entropy-calibrator-2 cache reader whatever method produced the
# scales; the header must name that algorithm or TensorRT discards the table.
CACHE_ALGORITHM = "EntropyCalibration2"
# The TensorRT releases that read a calibration cache: implicit INT8 was removed in 11.0.
CACHE_SERVES = "TensorRT 8.x-10.x (implicit INT8: trtexec --int8 --calib=); TensorRT 11 removed implicit INT8"
# The engine build needs strongly typed networks with Q/DQ (TensorRT 10.0 and newer).
MIN_TRT_MAJOR = 10
# TensorRT's Q/DQ placement advice: do not quantize the outputs of weighted layers.
_WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
LATENCY_NOTE = (
    "measured on ONNX Runtime CPU: signed-INT8 Q/DQ latency there is not representative of TensorRT "
    "(the accuracy is: same INT8 numerics); build trt_engine on the target for TensorRT latency"
)


# --------------------------------------------------------------------------------------------
# Quantization (ONNX Runtime)
# --------------------------------------------------------------------------------------------


def graph_input(path: Path) -> tuple[str, list[int | None]]:
    """Name and dims (None where symbolic) of the model's one real input."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(f"{path.name}: the TensorRT stage expects one image input, the model has "
                          f"{', '.join(i.name for i in inputs) or 'none'}")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _input_shape(dims: list[int | None], fallback: tuple[int, int, int]) -> tuple[int, ...]:
    """The per-image shape (without batch): the model's static dims, the data's where symbolic."""
    rest = dims[1:]
    if len(rest) == len(fallback):
        return tuple(d if d is not None else f for d, f in zip(rest, fallback))
    if all(d is not None for d in rest):
        return tuple(rest)  # type: ignore[arg-type]
    return tuple(fallback)


def quantize_calibrated(ctx: StageContext, source: Path, target: Path, input_name: str,
              fixed_batch: int | None, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """Write the symmetric signed-INT8 Q/DQ model to `target` (atomically), calibrated on the
    calibration split; return the image count and the number of output layers kept in floating point."""
    return quantize_qdq(ctx.cfg.tensorrt, ctx.data.loader("calibration", ctx.cfg.data.batch_size), source, target,
                        input_name, fixed_batch, keep_outputs_fp32=ctx.task.int8_fp32_outputs, work_dir=ctx.out_dir,
                        exclude=exclude)


def quantize_qdq(cfg: TensorRTConfig, batches, source: Path, target: Path, input_name: str, fixed_batch: int | None,
                 *, keep_outputs_fp32: bool, work_dir: Path, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """The symmetric signed-INT8 Q/DQ model TensorRT takes, calibrated on `batches` of `(images, ...)`.
    `exclude`: more nodes kept in floating point (no Q/DQ around them: TensorRT runs them in FP16/FP32)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".qdq-") as tmp:
        # Shape inference only: graph optimisation would rename or fuse tensors, and the cache's
        # tensor names must be those of the FP32 ONNX that `trtexec --calib` reads.
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(source), str(pre), skip_optimization=True)
        reader = calibration_reader(batches, input_name, fixed_batch,
                                    description=f"trt_qdq calibration ({cfg.calibration})")
        extra: dict[str, Any] = {
            "ActivationSymmetric": True,  # zero point 0: TensorRT rejects asymmetric INT8
            "WeightSymmetric": True,
            "CalibTensorRangeSymmetric": True,  # calibrate |x|, the range a symmetric scale covers
            "QuantizeBias": False,  # TensorRT takes FP32 biases, not INT32 Q/DQ ones
            "OpTypesToExcludeOutputQuantization": _WEIGHTED_OPS,
            # TensorRT quantizes weights per output channel: axis 1 of a MatMul's [in, out] weight.
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        }
        if cfg.calibration == "percentile":
            extra["CalibPercentile"] = cfg.percentile
        out = Path(tmp) / "qdq.onnx"
        # Detection heads stay FP (the task asks): TensorRT then runs those layers in FP16/FP32.
        excluded = onnx_output_layers(onnx.load(str(pre))) if keep_outputs_fp32 else []
        head = len(excluded)
        excluded += [n for n in exclude if n not in excluded]
        chatter = io.StringIO()
        # ORT's histogram calibrators print progress to stdout; keep it out of the user's terminal.
        with contextlib.redirect_stdout(chatter):
            quantize_static(
                str(pre), str(out), reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=cfg.per_channel, reduce_range=False,
                calibrate_method=getattr(CalibrationMethod, _METHODS[cfg.calibration]),
                nodes_to_exclude=excluded, extra_options=extra,
            )
        log.debug("onnxruntime calibration: %s", chatter.getvalue().strip())
        if reader.images == 0:
            raise ConfigError("data.calibration_size: the calibration split gave no images; INT8 calibration needs some")
        model = onnx.load(str(out))
        _check_trt_compatible(model)
        atomic_write_bytes(target, model.SerializeToString())
    return reader.images, head


def _initializers(model: "onnx.ModelProto") -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _check_trt_compatible(model: "onnx.ModelProto") -> None:
    """Every Q/DQ zero point is an INT8 zero: what TensorRT's explicit quantization accepts."""
    inits = _initializers(model)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = inits.get(node.input[2])
            if zp is None or zp.dtype != np.int8 or np.any(zp != 0):
                raise RuntimeError(f"Q/DQ node {node.name or node.output[0]} has a zero point TensorRT cannot use "
                                   f"({None if zp is None else (zp.dtype, zp.ravel()[:4].tolist())})")


def activation_scales(model: "onnx.ModelProto") -> dict[str, float]:
    """Per-tensor INT8 scales of the activations quantized in a Q/DQ model.

    Keys are the names of the FP32 tensors fed to each QuantizeLinear (the names they carry in
    the FP32 ONNX); values are the scales (amax / 127 for symmetric INT8).
    """
    inits = _initializers(model)
    scales: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue  # weights are quantized per channel into the model itself, not the cache
        scale = inits[node.input[1]]
        if scale.size != 1:
            raise RuntimeError(f"activation {node.input[0]!r} has a per-channel scale; TensorRT needs per-tensor")
        scales.setdefault(node.input[0], float(scale.reshape(())))
    return scales


# --------------------------------------------------------------------------------------------
# Calibration cache
# --------------------------------------------------------------------------------------------


def _version_code(version: str) -> int:
    """TensorRT's integer version: 10.3.0 -> 100300 (from TensorRT 10), 8.6.1 -> 8601 (before)."""
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in version.split(".")[:3]]
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def _major(version: str) -> int:
    digits = "".join(ch for ch in version.split(".")[0] if ch.isdigit())
    return int(digits or 0)


def _cache_unusable(installed: str | None) -> str | None:
    """Why a calibration cache means nothing to the TensorRT installed here, or None."""
    if installed is not None and _major(installed) >= 11:
        return (f"TensorRT {installed} has no implicit INT8 calibration (removed in 11.0, with trtexec --int8 "
                f"--calib), so a calibration cache would be unused; trt_qdq carries the same scales as Q/DQ nodes. "
                f"The cache serves {CACHE_SERVES.split(' (')[0]}")
    return None


def _installed_tensorrt() -> str | None:
    """The installed tensorrt version, or None when the package does not import here."""
    try:
        import tensorrt as trt
    except Exception:  # noqa: BLE001 - ImportError, or OSError when libnvinfer lacks a driver
        return None
    version = getattr(trt, "__version__", None)
    return str(version) if version else None


def calibration_cache_text(scales: dict[str, float], trt_version: str) -> str:
    """TensorRT's calibration-cache text for per-tensor `scales` (amax / 127)."""
    lines = [f"TRT-{_version_code(trt_version)}-{CACHE_ALGORITHM}"]
    for name, scale in scales.items():
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def read_calibration_cache(path: Path) -> tuple[str, dict[str, float]]:
    """Parse a TensorRT calibration cache: (header line, {tensor name: scale})."""
    text = Path(path).read_text(encoding="ascii")
    header, *rows = text.splitlines()
    scales = {}
    for row in rows:
        if row.strip():
            name, _, value = row.rpartition(": ")  # tensor names may contain ": "
            scales[name] = struct.unpack(">f", bytes.fromhex(value.strip()))[0]
    return header, scales


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def _tensorrt_missing() -> str | None:
    """Why an engine cannot be built on this machine, or None when it can."""
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError without an NVIDIA driver
        return f"tensorrt not installed ({type(exc).__name__}: {exc})"
    import torch

    version = str(getattr(tensorrt, "__version__", "0"))
    if _major(version) < MIN_TRT_MAJOR:
        return (f"tensorrt {version} is too old: the engine build needs TensorRT {MIN_TRT_MAJOR}.0 or newer "
                "(strongly typed networks)")
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _parser_error(err: Any) -> str:
    """One line per ONNX parser error: node index, name and operator where TensorRT gives them."""
    where = []
    node = err.node() if callable(getattr(err, "node", None)) else -1
    if node >= 0:
        where.append(f"node {node}")
    for attr in ("node_name", "node_operator"):
        fn = getattr(err, attr, None)  # TensorRT >= 10 only
        if callable(fn) and fn():
            where.append(str(fn()))
    prefix = f"[{' '.join(where)}] " if where else ""
    return f"{prefix}{err.code()}: {err.desc()}"


def build_engine(qdq_path: Path, engine_path: Path, *, batch_size: int, input_shape: tuple[int, ...],
                 workspace_mb: int) -> Path:
    """Build a serialized TensorRT engine from a Q/DQ ONNX and write it atomically to `engine_path`.

    The network is strongly typed: the Q/DQ nodes fix every precision, so no precision builder
    flag is set (TensorRT 11 removed them; 10.x needs the STRONGLY_TYPED creation flag, which 11
    keeps as a no-op). A dynamic batch axis gets one optimization profile: min batch 1, opt and
    max `batch_size`, image dims `input_shape`; a fixed batch is built as it is. Builds on the
    current CUDA device. Raises :class:`UserError` when TensorRT (>= 10) or CUDA is absent and
    :class:`LibraryError` when TensorRT fails: no builder (a driver older than TensorRT's CUDA
    makes `trt.Builder` raise TypeError, NVIDIA/TensorRT#2913), a rejected model (every parser
    error), or no engine.
    """
    missing = _tensorrt_missing()
    if missing:
        raise UserError(f"cannot build a TensorRT engine here: {missing}")
    import tensorrt as trt

    qdq_path, engine_path = Path(qdq_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr" when CUDA cannot start
        raise LibraryError("TensorRT", f"{trt.__version__} could not create a builder ({exc}); the NVIDIA driver is "
                           "probably older than the CUDA this TensorRT was built for (nvidia-smi shows the "
                           "driver's CUDA version)") from exc
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strong is None else 1 << int(strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(qdq_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LibraryError("TensorRT", f"its ONNX parser rejected {qdq_path.name}: " + "; ".join(errors or ["no details"]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        batch = dims[0] if dims[0] > 0 else None
        image = tuple(d if d > 0 else s for d, s in zip(dims[1:], input_shape))
        profile = profile or builder.create_optimization_profile()
        profile.set_shape(tensor.name, (batch or 1, *image), (batch or batch_size, *image), (batch or batch_size, *image))
    if profile is not None:
        config.add_optimization_profile(profile)

    log.info("tensorrt: building %s from %s (TensorRT %s, strongly typed, %s, workspace %d MiB)", engine_path.name,
             qdq_path.name, trt.__version__, f"batch 1..{batch_size}" if profile is not None else "fixed shape",
             workspace_mb)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LibraryError("TensorRT", f"it could not build an engine from {qdq_path.name} (see the TensorRT log above)")
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    return engine_path


def build_engine_from_run(run_dir: Path) -> Path:
    """Build `tensorrt/student.engine` from the `trt_qdq` artifact of a finished run.

    Reads `run_dir/manifest.json`, re-hashes `trt_qdq` (a changed file is never trusted), and
    builds with the batch size and workspace the run used. For `python -m pipeline build-engine
    RUN_DIR` on the deployment machine. Raises :class:`ConfigError` when the run has no
    trustworthy `trt_qdq` or TensorRT/CUDA are absent. The manifest itself is not changed.
    """
    run_dir = Path(run_dir)
    manifest = Manifest.load(run_dir)
    if not manifest.path.is_file():
        raise ConfigError(f"{run_dir}: no manifest.json; pass the run directory (the config's pipeline.workdir)")
    found = manifest.artifact_index().get("trt_qdq")
    if found is None:
        raise ConfigError(f"{run_dir}: the run has no trt_qdq artifact; run the pipeline with [tensorrt] enabled = true first")
    stage, art = found
    bad = verify_artifact(art, run_dir)
    if bad:
        raise ConfigError(f"{run_dir}: trt_qdq cannot be trusted ({bad}); re-run the {stage} stage")
    missing = _tensorrt_missing()
    if missing:
        raise UserError(f"cannot build a TensorRT engine here: {missing}; run build-engine on a machine with "
                          f"TensorRT and a CUDA GPU, or use the trtexec command in the manifest (stages.{stage}.commands.trt_engine)")
    record = manifest.stages[stage]
    data = {**DataConfig().model_dump(), **record.config.get("data", {})}
    trt_cfg = {**TensorRTConfig().model_dump(), **record.config.get("tensorrt", {})}
    qdq = run_dir / art.path
    _, dims = graph_input(qdq)
    s = int(data["image_size"])
    return build_engine(qdq, qdq.parent / ENGINE_FILE, batch_size=int(data["batch_size"]),
                        input_shape=_input_shape(dims, (3, s, s)), workspace_mb=int(trt_cfg["workspace_mb"]))


def _shape_flags(input_name: str, dims: list[int | None], image: tuple[int, ...], batch_size: int) -> list[str]:
    if all(d is not None for d in dims):
        return []  # a static model: trtexec refuses shapes for it
    batch = dims[0]
    shape = "x".join(str(d) for d in image)
    return [f"--minShapes={input_name}:{batch or 1}x{shape}", f"--optShapes={input_name}:{batch or batch_size}x{shape}",
            f"--maxShapes={input_name}:{batch or batch_size}x{shape}"]


def _rel(path: Path, workdir: Path) -> str:
    return Path(os.path.relpath(path, workdir)).as_posix()


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _build_engine_command(run_dir: Path) -> str:
    return f"engine: {build_engine_from_run(run_dir)}"


def _probe_engine(model, spec: ProbeSpec) -> TensorRTRuntime:
    """A probe build (for the prune stage's latency search): the Q/DQ model calibrated on the probe's
    few images and its engine at batch 1, on the current CUDA device."""
    from export.onnx import probe_export

    cfg: TensorRTConfig = spec.cfg.tensorrt
    source = probe_export(model, spec)
    input_name, dims = graph_input(source)
    image = _input_shape(dims, spec.input_shape)
    qdq = spec.work_dir / "probe_qdq.onnx"
    quantize_qdq(cfg, spec.calibration, source, qdq, input_name, dims[0] if dims else None,
                 keep_outputs_fp32=spec.task.int8_fp32_outputs, work_dir=spec.work_dir)
    engine = build_engine(qdq, spec.work_dir / "probe.engine", batch_size=1, input_shape=image,
                          workspace_mb=cfg.workspace_mb)
    return TensorRTRuntime(engine)


PROBES = {"trt_engine": Probe(_probe_engine, built=lambda cfg: cfg.tensorrt.build_engine,
                              unavailable=lambda cfg: _tensorrt_missing())}


@register("tensorrt", order=60, inputs=("onnx",), reads=("data",), enabled=lambda cfg: cfg.tensorrt.enabled,
          artifacts={
              "trt_qdq": ArtifactRole(model="student", runtime="onnxruntime", precision="int8", fp32="onnx",
                                      latency_note=LATENCY_NOTE),
              "trt_calib_cache": ArtifactRole(model="none"),
              "trt_engine": ArtifactRole(model="student", runtime="tensorrt", precision="int8", target="tensorrt"),
          },
          probes=PROBES,
          commands=(Command("build-engine", "build the TensorRT engine of a finished run on this machine "
                                            "(TensorRT + CUDA)", _build_engine_command),))
def run(ctx: StageContext) -> StageResult:
    """Calibrate the Q/DQ ONNX and its cache; build the engine where TensorRT and CUDA are present."""
    import torch

    cfg: TensorRTConfig = ctx.cfg.tensorrt
    source = ctx.inputs["onnx"]
    qdq_path, cache_path, engine_path = ctx.out_dir / QDQ_FILE, ctx.out_dir / CACHE_FILE, ctx.out_dir / ENGINE_FILE
    installed = _installed_tensorrt()
    cache_unusable = _cache_unusable(installed)
    if not dist.is_main():
        # Under torchrun rank 0 alone calibrates, builds and writes (as in the onnx stage); the
        # runner's barrier waits for it. Every GPU building at once would race on these files.
        return StageResult(outputs={"trt_qdq": qdq_path, **({} if cache_unusable else {"trt_calib_cache": cache_path})})

    input_name, dims = graph_input(source)
    image = _input_shape(dims, ctx.data.input_shape)
    batch = ctx.cfg.data.batch_size

    images, fp32_layers = quantize_calibrated(ctx, source, qdq_path, input_name, dims[0] if dims else None)
    import onnx

    scales = activation_scales(onnx.load(str(qdq_path)))
    result = StageResult(outputs={"trt_qdq": qdq_path})
    result.measure["trt_qdq"] = Measure(OrtRuntime(qdq_path, threads=ctx.cfg.bench.threads), path=qdq_path)
    result.metrics["trt_qdq"] = {
        "runtime": "onnxruntime", "precision": "int8", "quant_format": "QDQ",
        "activation_type": "QInt8 symmetric", "weight_type": "QInt8 symmetric", "per_channel": cfg.per_channel,
        "calibration": cfg.calibration, "calibration_images": int(images), "calibration_split": "calibration",
        "fp32_output_layers": fp32_layers,
        **({"calibration_percentile": cfg.percentile} if cfg.calibration == "percentile" else {}),
        "quantized_activations": len(scales), "latency_note": LATENCY_NOTE,
    }

    shapes = _shape_flags(input_name, dims, image, batch)
    pool = f"--memPoolSize=workspace:{cfg.workspace_mb}M"
    # --stronglyTyped: needed by TensorRT 10's trtexec, a deprecated no-op from 11.0 on.
    result.commands["trt_engine"] = shlex.join(
        ["trtexec", f"--onnx={_rel(qdq_path, ctx.workdir)}", "--stronglyTyped", *shapes, pool,
         f"--saveEngine={_rel(engine_path, ctx.workdir)}"])

    if cache_unusable:
        cache_path.unlink(missing_ok=True)  # one written for an older TensorRT would be read as this run's
        result.unavailable["trt_calib_cache"] = cache_unusable
        log.info("tensorrt: %s calibration on %d images, %d activation scales -> %s; trt_calib_cache not written: %s",
                 cfg.calibration, images, len(scales), qdq_path.name, cache_unusable)
    else:
        header_version = installed or DEFAULT_TRT_VERSION
        atomic_write_bytes(cache_path, calibration_cache_text(scales, header_version).encode("ascii"))
        log.info("tensorrt: %s calibration on %d images, %d activation scales -> %s, %s", cfg.calibration, images,
                 len(scales), qdq_path.name, cache_path.name)
        result.outputs["trt_calib_cache"] = cache_path
        result.metrics["trt_calib_cache"] = {
            "tensors": len(scales), "header": f"TRT-{_version_code(header_version)}-{CACHE_ALGORITHM}",
            "tensorrt_version": header_version, "serves": CACHE_SERVES,
            "note": ("TensorRT ignores a cache whose header names another version: " +
                     ("written for the TensorRT installed here" if installed else
                      f"tensorrt is not installed here, so the header names {DEFAULT_TRT_VERSION}; on another 8.x-10.x "
                      "release replace line 1 with TRT-<its version code>-EntropyCalibration2 (10.7.0 -> 100700, "
                      "8.6.1 -> 8601)")),
        }
        result.commands["trt_calib_cache"] = shlex.join(
            ["trtexec", f"--onnx={_rel(source, ctx.workdir)}", "--int8", f"--calib={_rel(cache_path, ctx.workdir)}",
             *shapes, pool, f"--saveEngine={_rel(ctx.out_dir / IMPLICIT_ENGINE_FILE, ctx.workdir)}"])

    # An engine left by an earlier run was built from another trt_qdq: never leave it next to this one.
    engine_path.unlink(missing_ok=True)
    reason = "[tensorrt] build_engine = false" if not cfg.build_engine else _tensorrt_missing()
    if reason:
        result.unavailable["trt_engine"] = reason
        log.info("tensorrt: trt_engine not built: %s (trtexec command recorded)", reason)
        return result

    device = ctx.device if ctx.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    try:
        with torch.cuda.device(device):
            build_engine(qdq_path, engine_path, batch_size=batch, input_shape=image, workspace_mb=cfg.workspace_mb)
        runtime = TensorRTRuntime(engine_path, device=device)
        # One inference here, where a failure keeps trt_qdq and the cache, not in the runner's measurement.
        runtime.outputs(np.zeros((runtime.static_batch or 1, *image), dtype=np.float32))
    except RuntimeError as exc:  # LibraryError, or a CUDA error raised through torch
        error = exc if isinstance(exc, LibraryError) else LibraryError("TensorRT", f"{type(exc).__name__}: {exc}")
        # The Q/DQ model and the cache are still valid deliverables: keep them, say loudly why
        # the engine is missing, and leave the trtexec command for a verbose retry.
        engine_path.unlink(missing_ok=True)
        result.unavailable["trt_engine"] = f"engine build failed: {error}"
        result.warnings.append(f"trt_engine: {error}; trt_qdq and the trtexec command are kept")
        log.warning("tensorrt: trt_engine not built: %s", error)
        return result
    import tensorrt as trt

    result.outputs["trt_engine"] = engine_path
    result.measure["trt_engine"] = Measure(runtime, path=engine_path)
    result.metrics["trt_engine"] = {"runtime": "tensorrt", "precision": "int8", "tensorrt_version": str(trt.__version__),
                                    "device_name": torch.cuda.get_device_name(device), "workspace_mb": cfg.workspace_mb,
                                    "max_batch": runtime.max_batch}
    return result
