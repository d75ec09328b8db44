"""OpenVINO stage: FP32 IR of the exported student (and teacher), INT8 IR via NNCF.

The `onnx` artifact is converted with `openvino.convert_model` and saved as FP32 IR
(`compress_to_fp16=False`: weights stay FP32, not halved to FP16). Its logits are checked
against ONNX Runtime on up to 256 validation images at `f32` inference precision.
The INT8 IR comes from NNCF post-training quantization of that FP32 model (activation
statistics plus fast bias correction), calibrated on the calibration split only, a seeded
subset of the *training* images. With `accuracy_control = true` it is
`nncf.quantize_with_accuracy_control`, which reverts the layers that cost most accuracy to
floating point until the drop is within `max_accuracy_drop`; the accuracy it watches is
measured on the calibration split too, never on validation images: validation accuracy is
what the runner reports, and tuning on it would make that figure optimistic. The teacher's
ONNX export, when present, gets its own FP32 IR so speedups can be read against the teacher
on the same runtime.

Every build gets a `benchmark_app` command that reproduces its latency on a target machine.

Inputs: `onnx`, `teacher_onnx` (optional). Outputs: `openvino_fp32`
(`openvino/student_fp32.xml` + `.bin`, always built: it is also the INT8 source and
comparison), `openvino_int8` (`openvino/student_int8.xml`), `teacher_openvino_fp32`
(`openvino/teacher_fp32.xml`).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from export.head_scope import openvino_output_layers
from export.runtimes import OpenVINORuntime, OrtRuntime
from pipeline import dist, faults
from pipeline.errors import ConfigError
from pipeline.schema import OpenVINOConfig
from pipeline.manifest import ArtifactRole
from pipeline.stage import Measure, Probe, ProbeSpec, StageContext, StageResult, register
from pipeline.tasks import Task

if TYPE_CHECKING:
    import openvino as ov

log = logging.getLogger(__name__)

Config = OpenVINOConfig

# Validation images used for the ONNX Runtime parity check and the INT8-vs-FP32 agreement.
PARITY_IMAGES = 256
# Below this top-1 agreement with ONNX Runtime the FP32 IR is not the model that was exported.
MIN_PARITY_AGREEMENT = 0.99
# Prefix of the scratch folders IR files are written into before being moved into place.
_TMP_PREFIX = ".ir-tmp-"


class OpenVINOConversionError(RuntimeError):
    """An ONNX file that OpenVINO cannot convert (unsupported operator, unreadable file)."""


def _ov_reason(exc: Exception) -> str:
    """OpenVINO's message without its C++ source locations, as one line."""
    noise = ("Check '", "Exception from ", "FrontEnd API failed with", "Summary:")
    lines = [ln.strip(" -\t") for ln in str(exc).splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(noise)]
    return "; ".join(kept) or type(exc).__name__


def _convert(onnx_path: Path) -> "ov.Model":
    """`ov.convert_model` on an ONNX file; failures become one line naming the file and why."""
    import openvino as ov

    if not onnx_path.is_file():
        raise OpenVINOConversionError(f"cannot convert {onnx_path} to OpenVINO IR: file not found")
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises several unrelated types
        reason = _ov_reason(exc)
        if "Cannot recognize input model" in reason:
            # OpenVINO tried every frontend; the ONNX parser says why the file is not a model.
            try:
                import onnx

                onnx.load(str(onnx_path), load_external_data=False)
            except Exception as parse_exc:  # noqa: BLE001
                why = str(parse_exc).strip() or "unparsable"
                reason = f"not a valid ONNX model ({type(parse_exc).__name__}: {why})"
        raise OpenVINOConversionError(
            f"cannot convert {onnx_path} to OpenVINO IR: {reason} "
            "(fix the ONNX export, or set openvino.enabled = false)"
        ) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_ir(model: "ov.Model", xml_path: Path) -> Path:
    """Save `model` as `xml_path` + `.bin` so that a crash never leaves half an IR.

    Both files are written into a scratch folder next to the target and moved into place with
    `os.replace`, the `.bin` first and the `.xml` last: a reader that finds the new `.xml` also
    finds its weights, and the manifest hashes the pair, so a crash between the two moves is
    caught on resume. Weights stay FP32 (`compress_to_fp16=False`) for exact parity.
    """
    import openvino as ov

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=xml_path.parent))
    try:
        tmp_xml = tmp / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        tmp_bin = tmp_xml.with_suffix(".bin")
        for f in (tmp_bin, tmp_xml):
            _fsync(f)
        os.replace(tmp_bin, xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
        _fsync(xml_path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml_path


def _sweep(out_dir: Path, stale: tuple[str, ...]) -> None:
    """Remove scratch folders left by a crashed run, and IR files of builds not made this run
    (so the folder holds exactly what the manifest records)."""
    for p in out_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for stem in stale:
        for suffix in (".xml", ".bin"):
            (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)


def static_batch(model: "ov.Model") -> int | None:
    """The model's batch size when its batch axis is fixed, None when it is dynamic."""
    shape = model.input(0).get_partial_shape()
    if shape.rank.is_dynamic:
        return None
    return shape[0].get_length() if shape[0].is_static else None


def _val_batches(ctx: StageContext, batch: int, fixed: bool, limit: int = PARITY_IMAGES) -> Iterator[np.ndarray]:
    """Up to `limit` validation images as float32 NCHW batches (full batches only if `fixed`)."""
    seen = 0
    for images, _ in ctx.data.loader("val", batch, drop_last=fixed):
        if seen >= limit:
            break
        x = images.numpy()
        if not fixed:
            x = x[: limit - seen]
        seen += len(x)
        yield x


def _agreement(task: Task, ref, other, batches: Iterator[np.ndarray]) -> dict[str, Any]:
    """Max |raw output difference| and the task's prediction agreement of two runtimes on the same images."""
    max_diff, agree, n = 0.0, 0.0, 0
    for x in batches:
        p = task.parity(ref.outputs(x), other.outputs(x))
        max_diff = max(max_diff, p.max_abs_diff)
        agree += p.agreement * len(x)
        n += len(x)
    return {"max_abs_diff": max_diff if n else None, "agreement": agree / n if n else None, "images": n}


def calibration_loader(ctx: StageContext, batch: int):
    """The calibration split (training images, eval transform): the only data NNCF sees."""
    return ctx.data.loader("calibration", batch, drop_last=batch > 1)


def _images(item: tuple[Any, Any]) -> np.ndarray:
    """nncf.Dataset transform: a `(images, labels)` batch → the model input."""
    faults.point("calibration")
    return item[0].numpy()


def _calibration_metric(task: Task, num_classes: int):
    """NNCF validation_fn: the task's primary metric on calibration batches, and one value per batch.

    Runs on the calibration split (training images), never on validation images.
    """

    def validate(compiled: "ov.CompiledModel", items) -> tuple[float, list[float]]:
        total = task.evaluator(num_classes)
        per_item: list[float] = []
        for images, targets in items:
            result = compiled(images.numpy())
            outs = {name: np.asarray(result[compiled.output(i)], dtype=np.float32)
                    for i, name in enumerate(task.output_names)}
            one = task.evaluator(num_classes)
            one.update(outs, targets)
            total.update(outs, targets)
            try:
                per_item.append(one.compute()[task.metric])
            except ValueError:  # no object in this batch (detection): no mAP of its own; rank it neutral
                per_item.append(0.0)
        return (total.compute()[task.metric] if per_item else 0.0), per_item

    return validate


def _quantize(ctx: StageContext, model: "ov.Model", batch: int) -> tuple["ov.Model", dict[str, Any]]:
    """NNCF post-training INT8 quantization of `model`, calibrated on the calibration split."""
    import nncf

    cfg: OpenVINOConfig = ctx.cfg.openvino
    loader = calibration_loader(ctx, batch)
    steps = len(loader)
    if steps == 0:
        raise ConfigError(
            f"data.calibration_size = {ctx.cfg.data.calibration_size} gives {len(loader.dataset)} calibration images, "
            f"fewer than the ONNX model's fixed batch of {batch}; raise it or export with onnx.dynamic_batch = true"
        )
    images = steps * batch if batch > 1 else len(loader.dataset)
    calibration = nncf.Dataset(loader, _images)
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[cfg.preset]
    scope = _ignored_scope(ctx, model)
    info: dict[str, Any] = {
        "fp32_output_layers": len(scope.names) if scope is not None else 0,
        "calibration_images": images,
        "calibration_split": "calibration",
        "preset": cfg.preset,
        "accuracy_control": cfg.accuracy_control,
    }
    if cfg.accuracy_control:
        log.info("INT8: NNCF quantization with accuracy control (max drop %.4f, measured on %d calibration images)",
                 cfg.max_accuracy_drop, images)
        # The same calibration images validate: the val split stays untouched for the report.
        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, nncf.Dataset(calibration_loader(ctx, batch)),
            _calibration_metric(ctx.task, ctx.data.num_classes),
            max_drop=cfg.max_accuracy_drop, drop_type=nncf.DropType.ABSOLUTE, preset=preset, subset_size=steps,
            **({"ignored_scope": scope} if scope is not None else {}),
        )
        info["max_accuracy_drop"] = cfg.max_accuracy_drop
        info["accuracy_control_data"] = "calibration"
        info["accuracy_control_metric"] = ctx.task.metric
    else:
        log.info("INT8: NNCF post-training quantization on %d calibration images (preset %s)", images, cfg.preset)
        quantized = quantize_int8(model, loader, preset=cfg.preset, ignored_scope=scope)
    return quantized, info


def quantize_int8(model: "ov.Model", loader, *, preset: str = "performance", ignored_scope=None) -> "ov.Model":
    """NNCF post-training INT8 of an OpenVINO model over every batch of `loader` (`(images, ...)`).

    Used by the stage (calibration split) and by the benchmarks. `ignored_scope`: an
    ``nncf.IgnoredScope`` of layers kept in floating point.
    """
    import nncf

    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    kwargs = {"ignored_scope": ignored_scope} if ignored_scope is not None else {}
    return nncf.quantize(model, nncf.Dataset(loader, _images), preset=presets[preset], subset_size=len(loader),
                         **kwargs)


def _ignored_scope(ctx: StageContext, model: "ov.Model"):
    """The layers producing the outputs, kept FP when the task asks (detection heads); else None."""
    import nncf

    if not ctx.task.int8_fp32_outputs:
        return None
    names = openvino_output_layers(model)
    log.info("INT8: keeping the %d layers that produce the outputs in floating point", len(names))
    return nncf.IgnoredScope(names=names, validate=False)


def benchmark_command(ctx: StageContext, xml: Path, runtime: OpenVINORuntime) -> str:
    """A `benchmark_app` line, run from the workdir, that times this IR like the harness does:
    batch 1, one synchronous request on one stream, the same thread count and precision hint.

    benchmark_app refuses `-nthreads` together with a performance hint, so the latency hint's
    effect (one stream, synchronous requests) is spelled out with `-hint none`.
    """
    c, h, w = ctx.data.input_shape
    args = ["benchmark_app", "-m", Path(os.path.relpath(xml, ctx.workdir)).as_posix(), "-d", runtime.ov_device,
            "-hint", "none", "-api", "sync", "-nstreams", "1", "-nthreads", str(runtime.threads),
            "-shape", f"[1,{c},{h},{w}]"]
    if ctx.cfg.openvino.inference_precision != "default":
        args += ["-infer_precision", ctx.cfg.openvino.inference_precision]
    return shlex.join(args)


def _build_fp32(ctx: StageContext, model: "ov.Model", stem: str) -> tuple[Path, OpenVINORuntime]:
    xml = save_ir(model, ctx.out_dir / f"{stem}.xml")
    runtime = OpenVINORuntime(xml, threads=ctx.cfg.bench.threads, precision=ctx.cfg.openvino.inference_precision)
    log.info("%s: saved %s (inference precision asked %s, device uses %s)",
             stem, xml.name, ctx.cfg.openvino.inference_precision, runtime.precision)
    return xml, runtime


def _probe(int8: bool):
    """A probe build (for the prune stage's latency search): the model exported as the onnx stage
    exports it, converted, NNCF-quantized on the probe's few calibration images for INT8, and
    compiled with the stage's inference precision and the probe's threads."""

    def build(model, spec: ProbeSpec) -> OpenVINORuntime:
        import nncf

        from export.onnx import probe_export

        cfg: OpenVINOConfig = spec.cfg.openvino
        ov_model = _convert(probe_export(model, spec))
        if int8:
            scope = (nncf.IgnoredScope(names=openvino_output_layers(ov_model), validate=False)
                     if spec.task.int8_fp32_outputs else None)
            ov_model = quantize_int8(ov_model, spec.calibration, preset=cfg.preset, ignored_scope=scope)
        xml = save_ir(ov_model, spec.work_dir / f"probe_{'int8' if int8 else 'fp32'}.xml")
        return OpenVINORuntime(xml, threads=spec.threads, precision=cfg.inference_precision)

    return build


def _missing(*packages: str):
    def unavailable(cfg) -> str | None:
        import importlib.util

        absent = [p for p in packages if importlib.util.find_spec(p) is None]
        return f"{' and '.join(absent)} not installed" if absent else None

    return unavailable


PROBES = {
    "openvino_fp32": Probe(_probe(int8=False), reads=("onnx",), unavailable=_missing("openvino", "onnxruntime")),
    "openvino_int8": Probe(_probe(int8=True), reads=("onnx",), built=lambda cfg: "int8" in cfg.openvino.precisions, default=True,
                           unavailable=_missing("openvino", "nncf", "onnxruntime")),
}


@register("openvino", order=50, inputs=("onnx", "teacher_onnx?"), reads=("data",),
          enabled=lambda cfg: cfg.openvino.enabled, probes=PROBES,
          artifacts={
              "openvino_fp32": ArtifactRole(model="student", runtime="openvino", precision="fp32", target="openvino"),
              "openvino_int8": ArtifactRole(model="student", runtime="openvino", precision="int8", target="openvino",
                                            fp32="openvino_fp32"),
              "teacher_openvino_fp32": ArtifactRole(model="teacher", runtime="openvino", precision="fp32"),
          })
def run(ctx: StageContext) -> StageResult:
    """Build the FP32 IR (checked against ONNX Runtime), the INT8 IR (NNCF, calibration split
    only) and the teacher's FP32 IR; hand each to the runner to measure."""
    cfg: OpenVINOConfig = ctx.cfg.openvino
    want_int8 = "int8" in cfg.precisions
    has_teacher = "teacher_onnx" in ctx.inputs
    if not dist.is_main():
        # Under torchrun rank 0 alone converts, quantizes and writes (as in the onnx stage); the
        # runner's barrier waits for it. Every rank writing the same IR files would race.
        return StageResult(outputs={name: ctx.out_dir / f"{stem}.xml" for name, stem, wanted in (
            ("openvino_fp32", "student_fp32", True), ("openvino_int8", "student_int8", want_int8),
            ("teacher_openvino_fp32", "teacher_fp32", has_teacher)) if wanted})
    result = StageResult(outputs={})
    stale = tuple(s for s, keep in (("student_int8", want_int8), ("teacher_fp32", has_teacher)) if not keep)
    _sweep(ctx.out_dir, stale)
    prec = {"inference_precision": cfg.inference_precision}

    # FP32: always built, since INT8 is quantized from it and compared with it.
    onnx_path = ctx.inputs["onnx"]
    student = _convert(onnx_path)
    fixed = static_batch(student)
    fp32_xml, fp32_rt = _build_fp32(ctx, student, "student_fp32")
    fp32: dict[str, Any] = {**prec, "device_precision": fp32_rt.precision, "requested": "fp32" in cfg.precisions}
    if "fp32" not in cfg.precisions:
        fp32["note"] = "built as the INT8 source and comparison: 'fp32' is not in openvino.precisions"
        log.info("openvino_fp32: %s", fp32["note"])
    result.outputs["openvino_fp32"] = fp32_xml
    result.measure["openvino_fp32"] = Measure(fp32_rt, path=fp32_xml)
    result.commands["openvino_fp32"] = benchmark_command(ctx, fp32_xml, fp32_rt)

    # Parity at f32 whatever the configured hint: bf16 would hide (or fake) export errors.
    f32_rt = fp32_rt
    if fp32_rt.precision != "f32":
        f32_rt = OpenVINORuntime(fp32_xml, threads=ctx.cfg.bench.threads, precision="f32")
    batch = fixed or min(ctx.cfg.data.batch_size, PARITY_IMAGES)
    ort = OrtRuntime(onnx_path, threads=ctx.cfg.bench.threads)
    task = ctx.task
    agreement = task.agreement.replace("_", " ")
    par = _agreement(task, ort, f32_rt, _val_batches(ctx, batch, fixed is not None))
    fp32.update({"parity_reference": "onnxruntime", "parity_precision": "f32", "parity_images": par["images"],
                 "parity_max_abs_diff": par["max_abs_diff"], f"parity_{task.agreement}": par["agreement"]})
    if not par["images"]:
        result.warnings.append("openvino_fp32: no val images, so the parity check with ONNX Runtime did not run")
    else:
        log.info("openvino_fp32 vs ONNX Runtime on %d val images: max |Δoutput| %.2e, %s %.4f",
                 par["images"], par["max_abs_diff"], agreement, par["agreement"])
    if par["images"] and par["agreement"] < MIN_PARITY_AGREEMENT:
        result.warnings.append(
            f"openvino_fp32 vs ONNX Runtime: {agreement} only {par['agreement']:.2%} on "
            f"{par['images']} val images (max |Δoutput| {par['max_abs_diff']:.3g}): the IR is not the exported model"
        )
    result.metrics["openvino_fp32"] = fp32

    if want_int8:
        quantized, int8 = _quantize(ctx, student, fixed or 1)
        int8_xml = save_ir(quantized, ctx.out_dir / "student_int8.xml")
        int8_rt = OpenVINORuntime(int8_xml, threads=ctx.cfg.bench.threads, precision=cfg.inference_precision)
        cmp = _agreement(task, f32_rt, int8_rt, _val_batches(ctx, batch, fixed is not None))
        int8.update(prec, device_precision=int8_rt.precision, compared_with="openvino_fp32",
                    fp32_max_abs_diff=cmp["max_abs_diff"], compared_images=cmp["images"])
        int8[f"fp32_{task.agreement}"] = cmp["agreement"]
        if cmp["images"]:
            log.info("openvino_int8 vs openvino_fp32 on %d val images: %s %.4f", cmp["images"], agreement,
                     cmp["agreement"])
        result.outputs["openvino_int8"] = int8_xml
        result.measure["openvino_int8"] = Measure(int8_rt, path=int8_xml)
        result.metrics["openvino_int8"] = int8
        result.commands["openvino_int8"] = benchmark_command(ctx, int8_xml, int8_rt)

    if has_teacher:
        # The teacher on the same runtime: what the student's OpenVINO speedup is read against.
        t_xml, t_rt = _build_fp32(ctx, _convert(ctx.inputs["teacher_onnx"]), "teacher_fp32")
        result.outputs["teacher_openvino_fp32"] = t_xml
        result.measure["teacher_openvino_fp32"] = Measure(t_rt, path=t_xml)
        result.metrics["teacher_openvino_fp32"] = {**prec, "device_precision": t_rt.precision}
        result.commands["teacher_openvino_fp32"] = benchmark_command(ctx, t_xml, t_rt)
    return result
