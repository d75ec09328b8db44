"""ONNX stage: export the final student (and the teacher) to ONNX, prove parity, build INT8.

The student a deployment starts from (`pruned` when pruning ran, else the distilled
`student`) is exported to one self-contained ONNX file (input `input`, outputs named by the
task, e.g. `logits`; optional dynamic batch axis), checked with `onnx.checker` (full check),
optionally simplified with onnxslim and checked again. Parity is then proven on real validation
images: ONNX Runtime CPU raw outputs against torch eager's (max abs difference and the task's
prediction agreement, e.g. top-1 for classification, failing the stage beyond `[onnx]
parity_atol` / `parity_min_agreement`; the tolerance is never below float32 rounding at the
outputs' magnitude), and the dynamic batch axis is checked to give the same outputs per image
at batch 1 and batch N.

With `[onnx] int8 = true`, ONNX Runtime's static post-training quantization builds a Q/DQ
model (QUInt8 activations, per-channel QInt8 weights) calibrated on the *calibration* split
(training images, never evaluation ones). With `[onnx] export_teacher = true` the teacher is
exported with the same checks, as the same-runtime reference for speedups: at small inputs
torch eager is dominated by per-op overhead, so only a comparison on one runtime says what
compression bought.

An export that fails on an operator the exporter cannot translate raises
:class:`UnsupportedOperatorError` naming the operator and the module (its qualified name in the
model, e.g. ``layer4.1.custom``) that calls it.

Inputs: `pruned|student` (state dict or pruned payload), `teacher` (state dict).
Outputs: `onnx` (`onnx/student.onnx`), `onnx_int8` (`onnx/student_int8.onnx`),
`teacher_onnx` (`onnx/teacher.onnx`).
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from torch import nn

from export.calibration import calibration_reader
from export.head_scope import onnx_output_layers
from export.onnx_errors import OnnxExportError, ParityError, UnsupportedOperatorError, diagnose, first_line  # noqa: F401
from export.runtimes import OrtRuntime
from pipeline import dist, faults
from pipeline.errors import ConfigError
from pipeline.schema import OnnxConfig
from pipeline.manifest import ArtifactRole, atomic_write_bytes
from pipeline.models import build_teacher, load_final_student
from pipeline.stage import Measure, Probe, ProbeSpec, StageContext, StageResult, register
from pipeline.tasks import Task
from pipeline.torch_runtime import TorchRuntime

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

Config = OnnxConfig

STUDENT_FILE = "student.onnx"
INT8_FILE = "student_int8.onnx"
TEACHER_FILE = "teacher.onnx"
INPUT_NAME = "input"
PARITY_IMAGES = 256  # val images compared between torch and ONNX Runtime
BATCH_CHECK_IMAGES = 8  # images run one by one to prove the dynamic batch axis
# The torch.export-based exporter translates to opset 18 and only down-converts (often
# unsuccessfully) below it; the TorchScript exporter handles older opsets natively.
DYNAMO_MIN_OPSET = 18
# Float32 rounding allowance for the parity check, in ulps of the largest logit (see _tolerance):
# ORT and torch reorder sums differently; a few ulps is what a correct export shows.
FLOAT32_ULPS = 64
# Why a fallback to the TorchScript exporter deserves a warning.
_TRACE_CAVEAT = "the TorchScript tracer bakes in data-dependent control flow: check the model has none"


# --------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------


def _publish(model: "onnx.ModelProto", path: Path) -> None:
    """Serialize `model` as ONE file, check it (full check), then atomically move it into place.

    The check runs on the temporary file, so a model that fails it never appears under its
    final name, and a crash leaves at most a hidden `.tmp` file, never half an artifact.
    """
    import onnx

    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GiB
        raise OnnxExportError(
            f"{path.name}: the model is too large for a single ONNX file (protobuf limit 2 GiB): {exc}"
        ) from None

    def check(tmp: Path) -> None:
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxExportError(f"{path.name} fails onnx.checker (full check): {first}") from exc

    atomic_write_bytes(path, data, check=check)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _export_params() -> set[str]:
    return set(inspect.signature(torch.onnx.export).parameters)


def _exporters(opset: int) -> list[str]:
    """The exporters to try, in order.

    The torch.export-based exporter (`dynamo=True`; stable from torch 2.6, the default since
    2.9, where the TorchScript one is deprecated) comes first at opset >= 18, with the
    TorchScript exporter as the fallback for models torch.export cannot trace. Below opset 18
    the TorchScript exporter comes first (it emits old opsets natively). torch 2.4 has only the
    TorchScript exporter; on 2.5 the new one was a beta and is only the fallback.
    """
    if "dynamo" not in _export_params():
        return ["torchscript"]
    if torch.__version__ < (2, 6):  # TorchVersion compares with tuples
        return ["torchscript", "dynamo"]
    return ["dynamo", "torchscript"] if opset >= DYNAMO_MIN_OPSET else ["torchscript", "dynamo"]


def _run_exporter(exporter: str, model: nn.Module, example: torch.Tensor, file: Path, opset: int,
                  dynamic: bool, output_names: tuple[str, ...]) -> None:
    params = _export_params()
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=list(output_names), opset_version=opset)
    batch_axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    if exporter == "dynamo":
        kwargs.update(dynamo=True, verbose=False)
        if "external_data" in params:
            # Weights inline. The file is re-serialized by _publish anyway, so a sidecar
            # written by an older torch (no such argument) is folded in and never kept.
            kwargs["external_data"] = False
        if "artifacts_dir" in params:
            kwargs["artifacts_dir"] = str(file.parent)  # failure reports stay in the temp dir
        if dynamic:
            if "dynamic_shapes" in params:
                # A tuple matches the positional arguments, whatever the forward's parameter is called.
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
            else:
                kwargs["dynamic_axes"] = batch_axes
    else:
        if "dynamo" in params:
            kwargs["dynamo"] = False
        if dynamic:
            kwargs["dynamic_axes"] = batch_axes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings: the checks below judge the result
        torch.onnx.export(model, (example,), str(file), **kwargs)


def _opset_of(model: "onnx.ModelProto") -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _export(model: nn.Module, input_shape: tuple[int, ...], opset: int, dynamic: bool,
            work_dir: Path, output_names: tuple[str, ...]) -> tuple["onnx.ModelProto", str, str | None]:
    """Export `model` (eval mode, CPU); return `(ModelProto with weights inline, exporter, fallback)`.

    `fallback` is None when the preferred exporter worked, else why it did not.

    Tries the exporters of :func:`_exporters` in order; when all fail, raises
    :class:`UnsupportedOperatorError` (op and module named) or :class:`OnnxExportError`.
    """
    import onnx

    model = model.cpu().eval()
    # Batch 2 for a dynamic axis: torch.export specializes a dimension of size 1.
    example = torch.randn(2 if dynamic else 1, *input_shape, generator=torch.Generator().manual_seed(0))
    errors: list[tuple[str, BaseException]] = []
    for exporter in _exporters(opset):
        with tempfile.TemporaryDirectory(dir=work_dir, prefix=".export-") as tmp:
            file = Path(tmp) / "model.onnx"
            try:
                _run_exporter(exporter, model, example, file, opset, dynamic, output_names)
                # onnx.load pulls in any external-data sidecar from the temp dir; the dir
                # (sidecar included) is deleted on leaving the block.
                proto = onnx.load(str(file))
            except Exception as exc:  # noqa: BLE001 - every exporter failure is diagnosed below
                log.debug("%s exporter failed", exporter, exc_info=True)
                errors.append((exporter, exc))
                continue
        got = _opset_of(proto)
        if got != opset:
            errors.append((exporter, OnnxExportError(f"the {exporter} exporter produced opset {got}, not {opset}")))
            continue
        fallback = None
        if errors:
            fallback = f"the {errors[0][0]} exporter failed ({first_line(errors[0][1])}); used the {exporter} exporter"
        return proto, exporter, fallback
    raise diagnose(model, example, opset, errors)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _tolerance(atol: float, scale: float) -> float:
    """`atol`, raised to the float32 resolution floor at the reference outputs' magnitude `scale`.

    Reordered float32 sums differ by a few ulps, and an ulp grows with the value: at logits
    near 2,000 one ulp is 2.4e-4, so a 1e-3 tolerance there would test rounding, not the
    export. For ordinary logits (|x| below ~100) the floor is under 1e-3 and `atol` rules.
    """
    return max(atol, FLOAT32_ULPS * float(np.finfo(np.float32).eps) * scale)


def parity_metrics(task: Task, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], *, atol: float,
                   min_agreement: float, what: str = "onnx", against: str = "torch") -> dict[str, float | int]:
    """Compare the exported model's raw outputs (`candidate`) with `against`'s (`reference`).

    Returns `parity_max_abs_diff`, `parity_<agreement>` (the task's: `parity_top1_agreement`
    for classification), `parity_tolerance` (the allowed difference, see :func:`_tolerance`)
    and `parity_images`; raises :class:`ParityError` giving both figures and the config key to
    change when the difference exceeds the tolerance or the agreement is below `min_agreement`.
    """
    try:
        p = task.parity(reference, candidate)
    except ValueError as exc:
        raise ParityError(f"{what} parity vs {against}: {exc}") from None
    agreement = task.agreement.replace("_", " ")
    tol = _tolerance(atol, p.scale)
    figures = f"max abs output difference {p.max_abs_diff:.3g}, {agreement} {p.agreement:.4f} on {p.count} val images"
    if not p.max_abs_diff <= tol:  # also catches NaN
        floor = f"; float32 floor at outputs up to {p.scale:.3g}: {tol:.3g}" if tol > atol else ""
        raise ParityError(f"{what} parity vs {against} failed: {figures}; the difference exceeds onnx.parity_atol = "
                          f"{atol:g}{floor} (raise onnx.parity_atol if this is acceptable)")
    if not p.agreement >= min_agreement:
        raise ParityError(f"{what} parity vs {against} failed: {figures}; the agreement is below "
                          f"onnx.parity_min_agreement = {min_agreement:g} (lower it if this is acceptable)")
    return {"parity_max_abs_diff": p.max_abs_diff, f"parity_{task.agreement}": p.agreement, "parity_tolerance": tol,
            "parity_images": int(p.count)}


def _val_images(ctx: StageContext, limit: int = PARITY_IMAGES) -> np.ndarray:
    """Up to `limit` validation images as one float32 NCHW array (parity only, never calibration)."""
    chunks, n = [], 0
    for batch in ctx.data.loader("val", ctx.cfg.data.batch_size):
        x = batch[0].detach().cpu().numpy().astype(np.float32, copy=False)
        chunks.append(x[: limit - n])
        n += len(chunks[-1])
        if n >= limit:
            break
    if not chunks:
        raise ConfigError("data: the validation split is empty; the ONNX parity check needs val images")
    return np.concatenate(chunks)


def run_batches(runtime: Any, images: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Every raw output of `runtime` on `images`, run `batch` images at a time, concatenated per output."""
    parts = [runtime.outputs(images[i : i + batch]) for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}


def _check_dynamic_batch(runtime: OrtRuntime, images: np.ndarray, atol: float, what: str) -> float:
    """Batch 1 and batch N must give the same outputs per image; returns the max abs difference."""
    x = images[:BATCH_CHECK_IMAGES]
    batched = runtime.outputs(x)
    single = run_batches(runtime, x, 1)
    diff = max(float(np.max(np.abs(batched[n] - single[n]))) for n in batched)
    if not diff <= atol:
        raise ParityError(f"{what}: outputs at batch {len(x)} differ from batch 1 by {diff:.3g} > {atol:.3g} "
                          "(onnx.parity_atol); the dynamic batch axis is broken (set onnx.dynamic_batch = false to "
                          "export a fixed batch)")
    return diff


def _ort(path: Path, threads: int) -> OrtRuntime:
    """ONNX Runtime on CPU. A fixed-batch export (`[onnx] dynamic_batch = false`) is run in pieces
    of its batch and timed at it: `OrtRuntime` reads the batch from the model."""
    return OrtRuntime(path, threads=threads)


# --------------------------------------------------------------------------------------------
# One FP32 build
# --------------------------------------------------------------------------------------------


@dataclass
class _Build:
    """One FP32 build: its metrics, its raw outputs on the parity images, and why the fallback exporter was used."""

    metrics: dict[str, Any]
    outputs: dict[str, np.ndarray]
    fallback: str | None


def export_model(model: nn.Module, input_shape: tuple[int, ...], path: Path, *, opset: int = 18,
                 dynamic_batch: bool = True, simplify: bool = True, what: str = "model",
                 output_names: tuple[str, ...] = ("logits",)) -> tuple[str, str | None, bool]:
    """Export `model` to ONE checked ONNX file at `path` (input `input`, outputs `output_names`).

    Returns `(exporter, fallback reason or None, simplified)`. Used by the stage and by the
    benchmarks, so both measure the same files.
    """
    proto, exporter, fallback = _export(model, input_shape, opset, dynamic_batch, Path(path).parent, output_names)
    if fallback:
        log.warning("%s: %s", what, fallback)
    _publish(proto, path)  # checked before simplification too: a broken export is not blamed on onnxslim
    simplified = False
    if simplify:
        import onnxslim

        try:
            slim = onnxslim.slim(proto)
        except Exception as exc:  # noqa: BLE001 - simplification is an optimisation, not a requirement
            log.warning("%s: onnxslim failed (%s); keeping the unsimplified model", what, first_line(exc))
        else:
            try:
                _publish(slim, path)
                simplified = True
            except OnnxExportError as exc:  # the checked unsimplified file stays in place
                log.warning("%s: the simplified model fails the check (%s); keeping the unsimplified model", what, exc)
    log.info("%s: exported %s with the %s exporter (opset %d%s)", what, Path(path).name, exporter, opset,
             ", simplified" if simplified else "")
    return exporter, fallback, simplified


def _build_fp32(ctx: StageContext, model: nn.Module, path: Path, images: np.ndarray, what: str) -> _Build:
    """Export, check, simplify, check again, prove parity (and the dynamic batch)."""
    cfg: OnnxConfig = ctx.cfg.onnx
    task = ctx.task
    exporter, fallback, simplified = export_model(model, ctx.data.input_shape, path, opset=cfg.opset,
                                                  dynamic_batch=cfg.dynamic_batch, simplify=cfg.simplify, what=what,
                                                  output_names=task.output_names)
    # Leave torch's threads as they are.
    torch_rt = TorchRuntime(model, "cpu", threads=torch.get_num_threads(), output_names=task.output_names)
    ort_rt = _ort(path, ctx.cfg.bench.threads)
    batch = ctx.cfg.data.batch_size  # a fixed-batch build runs it in pieces of its own batch
    reference = run_batches(torch_rt, images, batch)
    candidate = run_batches(ort_rt, images, batch)
    metrics: dict[str, Any] = parity_metrics(task, reference, candidate, atol=cfg.parity_atol,
                                             min_agreement=cfg.parity_min_agreement, what=what)
    if cfg.dynamic_batch:
        metrics["batch_check_max_abs_diff"] = _check_dynamic_batch(ort_rt, images, metrics["parity_tolerance"], what)
    log.info("%s: parity vs torch: max abs diff %.3g, %s %.4f", what, metrics["parity_max_abs_diff"],
             task.agreement.replace("_", " "), metrics[f"parity_{task.agreement}"])
    metrics.update(runtime="onnxruntime", precision="fp32", opset=cfg.opset, exporter=exporter, simplified=simplified,
                   dynamic_batch=cfg.dynamic_batch)
    return _Build(metrics, candidate, fallback)


# --------------------------------------------------------------------------------------------
# INT8
# --------------------------------------------------------------------------------------------


class _Skip(Exception):
    """Pre-processing not wanted (the model already had it)."""


def quantize_int8(fp32: Path, path: Path, batches: Iterable, *, dynamic: bool = True,
                  keep_outputs_fp32: bool = False, exclude: Iterable[str] = (), preprocess: bool = True) -> dict[str, Any]:
    """Static Q/DQ INT8 for ONNX Runtime CPU: QUInt8 activations, per-channel QInt8 weights,
    MinMax calibration over `batches` of `(images, ...)`. Writes ONE checked file at `path`.
    `keep_outputs_fp32`: the last weighted layers before the outputs stay FP32 (detection heads).
    `exclude`: more node names kept FP32 (the INT8 fallback's); `preprocess = False` for a model
    that already went through ORT's pre-processing (node names then stay those of `fp32`).

    Returns what was done (recorded in the manifest). Used by the stage (calibration split) and
    by the benchmarks.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".int8-") as tmp:
        source = fp32
        preprocessed = False
        try:
            if not preprocess:
                raise _Skip
            # ORT's recommended pre-processing: symbolic shape inference + graph optimisation,
            # so that quantization sees fused Conv+BN and known shapes.
            from onnxruntime.quantization.shape_inference import quant_pre_process

            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32), str(pre))
            source, preprocessed = pre, True
        except _Skip:
            pass
        except Exception as exc:  # noqa: BLE001 - optional step: quantize the plain export instead
            log.warning("onnx_int8: quant_pre_process failed (%s); quantizing the model as exported", first_line(exc))
        reader = calibration_reader(batches, INPUT_NAME, None if dynamic else 1,  # a fixed-batch export takes one image
                                    description="onnx_int8 calibration")
        out = Path(tmp) / "int8.onnx"
        head = onnx_output_layers(onnx.load(str(source))) if keep_outputs_fp32 else []
        excluded = head + [n for n in exclude if n not in head]
        quantize_static(
            str(source), str(out), reader,
            quant_format=QuantFormat.QDQ,
            # U8 activations with S8 weights: the combination ORT's x86 CPU kernels run fastest.
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
        )
        _publish(onnx.load(str(out)), path)
    log.info("onnx_int8: quantized on %d calibration images (QDQ, QUInt8 activations, per-channel QInt8 weights)",
             reader.images)
    return {
        "runtime": "onnxruntime", "precision": "int8", "quant_format": "QDQ", "activation_type": "QUInt8",
        "weight_type": "QInt8", "per_channel": True, "calibrate_method": "MinMax",
        "calibration_images": int(reader.images), "preprocessed": preprocessed, "fp32_output_layers": len(head),
    }


def _build_int8(ctx: StageContext, fp32: Path, path: Path) -> dict[str, Any]:
    """Static Q/DQ quantization with ONNX Runtime, calibrated on the calibration split (never val)."""
    cfg: OnnxConfig = ctx.cfg.onnx
    if len(ctx.data.calibration) == 0:  # type: ignore[arg-type]
        raise ConfigError("data.calibration_size: the calibration split is empty; onnx.int8 needs calibration images")
    info = quantize_int8(fp32, path, ctx.data.loader("calibration", ctx.cfg.data.batch_size), dynamic=cfg.dynamic_batch,
                         keep_outputs_fp32=ctx.task.int8_fp32_outputs)
    return {**info, "calibration_split": "calibration", "opset": cfg.opset}


# --------------------------------------------------------------------------------------------
# Probe builds (timed by the prune stage's latency search)
# --------------------------------------------------------------------------------------------


def probe_export(model: nn.Module, spec: ProbeSpec) -> Path:
    """`model` exported as the stage exports the student (`[onnx]` opset, batch axis,
    simplification) to `spec.work_dir/probe.onnx`, without the parity checks."""
    cfg: OnnxConfig = spec.cfg.onnx
    path = spec.work_dir / "probe.onnx"
    export_model(model, spec.input_shape, path, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                 simplify=cfg.simplify, what="probe", output_names=spec.task.output_names)
    return path


def _probe(int8: bool):
    def build(model: nn.Module, spec: ProbeSpec) -> OrtRuntime:
        path = probe_export(model, spec)
        if int8:
            q = spec.work_dir / "probe_int8.onnx"
            quantize_int8(path, q, spec.calibration, dynamic=spec.cfg.onnx.dynamic_batch,
                          keep_outputs_fp32=spec.task.int8_fp32_outputs)
            path = q
        return _ort(path, spec.threads)

    return build


def _ort_missing(cfg) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("onnxruntime") else "onnxruntime is not installed"


PROBES = {
    "onnx": Probe(_probe(int8=False), reads=("onnx",), unavailable=_ort_missing),
    "onnx_int8": Probe(_probe(int8=True), reads=("onnx",), built=lambda cfg: cfg.onnx.int8, unavailable=_ort_missing),
}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _warn_fallback(result: StageResult, artifact: str, build: _Build) -> None:
    if build.fallback:
        caveat = f"; {_TRACE_CAVEAT}" if build.metrics["exporter"] == "torchscript" else ""
        result.warnings.append(f"{artifact}: {build.fallback}{caveat}")


@register("onnx", order=40, inputs=("pruned|student", "teacher"), reads=("data", "distill", "teacher"),
          enabled=lambda cfg: cfg.onnx.enabled, probes=PROBES,
          artifacts={
              "onnx": ArtifactRole(model="student", runtime="onnxruntime", precision="fp32", target="onnxruntime"),
              "onnx_int8": ArtifactRole(model="student", runtime="onnxruntime", precision="int8", target="onnxruntime",
                                        fp32="onnx"),
              "teacher_onnx": ArtifactRole(model="teacher", runtime="onnxruntime", precision="fp32"),
          })
def run(ctx: StageContext) -> StageResult:
    """Export the final student (and the teacher) to ONNX, prove parity, build the INT8 Q/DQ model."""
    cfg: OnnxConfig = ctx.cfg.onnx
    threads = ctx.cfg.bench.threads
    outputs = {"onnx": ctx.out_dir / STUDENT_FILE}
    if cfg.int8:
        outputs["onnx_int8"] = ctx.out_dir / INT8_FILE
    if cfg.export_teacher:
        outputs["teacher_onnx"] = ctx.out_dir / TEACHER_FILE
    if not dist.is_main():
        return StageResult(outputs=outputs)  # under torchrun rank 0 builds; the runner's barrier waits for it
    result = StageResult(outputs={})
    images = _val_images(ctx)

    source, student = load_final_student(ctx)
    path = outputs["onnx"]
    build = _build_fp32(ctx, student, path, images, "onnx")
    _warn_fallback(result, "onnx", build)
    result.outputs["onnx"] = path
    result.metrics["onnx"] = {**build.metrics, "source": source}
    result.measure["onnx"] = Measure(_ort(path, threads), model=student, path=path)
    faults.point("onnx-export")  # the student's file is written, the rest is not

    if cfg.int8:
        int8 = outputs["onnx_int8"]
        q = _build_int8(ctx, path, int8)
        q_rt = _ort(int8, threads)
        q_out = run_batches(q_rt, images, ctx.cfg.data.batch_size)
        # Not a gate (INT8 is expected to move outputs): recorded so a bad calibration is visible.
        q[f"{ctx.task.agreement}_vs_fp32"] = ctx.task.parity(build.outputs, q_out).agreement
        result.outputs["onnx_int8"] = int8
        result.metrics["onnx_int8"] = q
        result.measure["onnx_int8"] = Measure(q_rt, model=student, path=int8)

    if cfg.export_teacher:
        teacher = build_teacher(ctx.cfg, ctx.data.num_classes, weights=str(ctx.inputs["teacher"])).cpu().eval()
        tpath = outputs["teacher_onnx"]
        try:
            tbuild = _build_fp32(ctx, teacher, tpath, images, "teacher_onnx")
        except (OnnxExportError, ParityError) as exc:
            # The teacher build is a reference for speedups, not a deliverable: its failure must
            # not block the student's deployment, but it is reported and nothing is measured.
            tpath.unlink(missing_ok=True)
            result.warnings.append(f"teacher_onnx not built, so no same-runtime speedup: {exc}")
        else:
            _warn_fallback(result, "teacher_onnx", tbuild)
            result.outputs["teacher_onnx"] = tpath
            result.metrics["teacher_onnx"] = {**tbuild.metrics, "source": "teacher"}
            result.measure["teacher_onnx"] = Measure(_ort(tpath, threads), model=teacher, path=tpath)
    return result
