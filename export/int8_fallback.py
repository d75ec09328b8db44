"""INT8 fallback stage: when an INT8 build fails `max_int8_metric_drop`, keep its most sensitive
layers in floating point until the gate passes or `[int8_fallback] max_fp_layers` is hit.

For each INT8 build of the run (ONNX Runtime `onnx_int8`, OpenVINO `openvino_int8`, the TensorRT
Q/DQ ONNX `trt_qdq`) the stage measures its primary metric and its FP32 counterpart's on the
images the runner evaluates on (the same loader, so the same figures the gate reads). A build
that passes, or a run without an INT8 drop gate, is left alone: the stage then builds nothing.
A build that fails gets a search (:mod:`export.int8_search`) over the quantized layers ranked by
the output error each adds on calibration images (:mod:`export.sensitivity`); each step is a
real build, kept in floating point by the runtime's own mechanism: ORT `nodes_to_exclude`, an
NNCF `IgnoredScope` for OpenVINO, no Q/DQ around the layer in TensorRT's Q/DQ ONNX. Each step's
layers, metric, drop and batch-1 p50 latency (the shared harness) are recorded. The chosen build
is an alternative artifact, measured by the runner like every other build and gated against
the same FP32 build; the ship choice then weighs PTQ, PTQ + fallback, QAD and FP32.

Because the search reads the evaluation images, the chosen build's figure is a selected one
(as a gate-guided choice always is); set `[data] dev_fraction` to search and gate on a
development split instead. The TensorRT build's latency is not measurable without TensorRT:
its steps record none, and the engine stays `unavailable`.

Inputs: `onnx`, and when present `onnx_int8`, `openvino_fp32`, `openvino_int8`, `trt_qdq`.
Outputs: `onnx_int8_fallback` (`int8_fallback/student_int8_fallback.onnx`),
`openvino_int8_fallback` (`int8_fallback/student_int8_fallback.xml`), `trt_qdq_fallback`
(`int8_fallback/student_qdq_fallback.onnx`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export import tensorrt as trt_stage
from export.int8_search import SearchResult, fallback
from export.onnx import quantize_int8 as ort_quantize
from export.openvino import benchmark_command, save_ir, quantize_int8 as ov_quantize
from export.runtimes import OpenVINORuntime, OrtRuntime
from export.sensitivity import LayerError, openvino_names, rank_layers
from pipeline import dist
from pipeline.bench import measure_latency
from pipeline.evaluate import evaluate_runtime
from pipeline.manifest import ArtifactRole
from pipeline.schema import Int8FallbackConfig
from pipeline.stage import Measure, StageContext, StageResult, register

log = logging.getLogger(__name__)

Config = Int8FallbackConfig

GATE = "max_int8_metric_drop"
RECIPE = "ptq+fallback"
PROXY = ("per-layer output error on calibration images: the NMSE each weighted layer's output gains over "
         "its input's, ONNX Runtime Q/DQ vs FP32")
ONNX_FILE, OV_FILE, TRT_FILE = "student_int8_fallback.onnx", "student_int8_fallback.xml", "student_qdq_fallback.onnx"
TRT_UNMEASURED = ("TensorRT latency needs TensorRT and a CUDA device: build an engine from trt_qdq_fallback on the "
                  "target (its accuracy is measured on ONNX Runtime CPU, same INT8 numerics)")


class _Threads:
    """Restore torch's thread count after a runtime set its own (as the runner does)."""

    def __enter__(self) -> None:
        import torch

        self.n = torch.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.n)


def _metric(ctx: StageContext, runtime: Any) -> float:
    """The primary metric on the runner's evaluation loader."""
    with _Threads():
        loader = ctx.data.loader("val", ctx.cfg.data.batch_size)
        return float(evaluate_runtime(runtime, loader, ctx.task, ctx.data.num_classes)[ctx.task.metric])


def _quality(ctx: StageContext, name: str, runtime: Callable[[], Any]) -> float:
    """An input build's primary metric: as the runner measured it (what its gate read), else evaluated."""
    known = ctx.measured.get(name, {}).get(ctx.task.metric)
    return float(known) if known is not None else _metric(ctx, runtime())


def _p50(ctx: StageContext, runtime: Any) -> float:
    """Batch-1 p50 latency with the shared harness and the run's `[bench]` settings."""
    with _Threads():
        b = ctx.cfg.bench
        batch = getattr(runtime, "static_batch", None) or 1
        return measure_latency(runtime, ctx.data.input_shape, batch, warmup=b.warmup, runs=b.runs).p50_ms


def _calibration_images(ctx: StageContext, limit: int) -> list[np.ndarray]:
    out, seen = [], 0
    for images, *_ in ctx.data.loader("calibration", ctx.cfg.data.batch_size):
        x = images.numpy()[: limit - seen]
        out.append(x)
        seen += len(x)
        if seen >= limit:
            break
    return out


def _search(what: str, ranked: list[str], build: Callable[[tuple[str, ...]], tuple[float, float | None]],
            fp32: float, budget: float, limit: int) -> SearchResult:
    log.info("%s: searching the fewest of %d ranked layers to keep in floating point (at most %d)",
             what, len(ranked), limit)
    found = fallback(ranked, build, fp32, budget, limit)
    for s in found.steps:
        log.info("%s: %d layer(s) in FP -> %s drop %.2f pt%s", what, len(s.fp_layers), "passes" if s.passed else "fails",
                 s.drop * 100, f", p50 {s.latency_p50_ms:.3g} ms" if s.latency_p50_ms is not None else "")
    log.info("%s: stopped at %s", what, found.stopped)
    return found


def _record(alt_of: str, fp32_name: str, fp32: float, ptq: float, found: SearchResult,
            ranking: list[LayerError], latency_note: str | None = None) -> dict[str, Any]:
    chosen = found.chosen or (found.steps[-1] if found.steps else None)
    rec = {"recipe": RECIPE, "alternative_of": alt_of, "made_for": GATE, "compared_with": fp32_name,
           "fp32_metric": fp32, "ptq_metric": ptq, "ptq_drop": fp32 - ptq,
           "fp_layers": list(chosen.fp_layers) if chosen else [], "fp_layer_count": len(chosen.fp_layers) if chosen else 0,
           "gate_reached": found.chosen is not None, "search": found.record(),
           "sensitivity_proxy": PROXY, "sensitivity": [e.record() for e in ranking[:16]]}
    if latency_note:
        rec["latency_note"] = latency_note
    return rec


@register("int8_fallback", order=65, inputs=("onnx", "onnx_int8?", "openvino_fp32?", "openvino_int8?", "trt_qdq?"),
          reads=("data", "gates", "onnx", "openvino", "tensorrt"),
          enabled=lambda cfg: cfg.int8_fallback.max_fp_layers > 0 and cfg.gates.int8_metric_drop() is not None,
          off_reason=lambda cfg: ("disabled in the config ([int8_fallback] max_fp_layers = 0)"
                                  if cfg.int8_fallback.max_fp_layers == 0 else
                                  "no INT8 drop gate (gates.max_int8_metric_drop) for an INT8 build to fail"),
          artifacts={
              "onnx_int8_fallback": ArtifactRole(model="student", runtime="onnxruntime", precision="int8",
                                                 target="onnxruntime", fp32="onnx", alternative_of="onnx_int8",
                                                 recipe=RECIPE, made_for=GATE),
              "openvino_int8_fallback": ArtifactRole(model="student", runtime="openvino", precision="int8",
                                                     target="openvino", fp32="openvino_fp32",
                                                     alternative_of="openvino_int8", recipe=RECIPE, made_for=GATE),
              "trt_qdq_fallback": ArtifactRole(model="student", runtime="onnxruntime", precision="int8", fp32="onnx",
                                               latency_note=trt_stage.LATENCY_NOTE, alternative_of="trt_qdq",
                                               recipe=RECIPE, made_for=GATE),
          })
def run(ctx: StageContext) -> StageResult:
    """Search a floating-point fallback for every INT8 build that fails its drop gate."""
    result = StageResult(outputs={})
    gate = ctx.cfg.gates.int8_metric_drop()
    if gate is None:
        result.metrics["search"] = {"note": "no INT8 drop gate (gates.max_int8_metric_drop): nothing to recover"}
        return result
    if not dist.is_main():
        return result
    budget = gate[1]
    threads = ctx.cfg.bench.threads
    f_onnx = _quality(ctx, "onnx", lambda: OrtRuntime(ctx.inputs["onnx"], threads=threads))
    failing: dict[str, tuple[float, float]] = {}  # build -> (fp32 metric, ptq metric)
    notes: dict[str, str] = {}
    for name in ("onnx_int8", "trt_qdq"):
        if name in ctx.inputs:
            failing[name] = (f_onnx, _quality(ctx, name, lambda n=name: OrtRuntime(ctx.inputs[n], threads=threads)))
    if "openvino_int8" in ctx.inputs and "openvino_fp32" in ctx.inputs:
        prec = ctx.cfg.openvino.inference_precision
        failing["openvino_int8"] = tuple(  # type: ignore[assignment]
            _quality(ctx, n, lambda n=n: OpenVINORuntime(ctx.inputs[n], threads, precision=prec))
            for n in ("openvino_fp32", "openvino_int8"))
    for name, (f, q) in list(failing.items()):
        if f - q <= budget + 1e-9:
            notes[name] = f"passes {gate[0]} (drop {(f - q) * 100:.2f} pt <= {budget * 100:.2f} pt): no fallback"
            del failing[name]
        else:
            log.info("%s: drop %.2f pt over the %.2f pt budget: searching a fallback", name, (f - q) * 100, budget * 100)
    result.metrics["search"] = {"note": "; ".join(f"{k}: {v}" for k, v in notes.items()) or "every INT8 build failed"}
    if not failing:
        return result

    cfg: Int8FallbackConfig = ctx.cfg.int8_fallback
    task = ctx.task
    calibration = ctx.data.loader("calibration", ctx.cfg.data.batch_size)
    with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".search-") as tmp_name:
        tmp = Path(tmp_name)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = tmp / "pre.onnx"
        quant_pre_process(str(ctx.inputs["onnx"]), str(pre))
        dynamic = ctx.cfg.onnx.dynamic_batch
        ptq = tmp / "ptq.onnx"
        ort_quantize(pre, ptq, calibration, dynamic=dynamic, keep_outputs_fp32=task.int8_fp32_outputs, preprocess=False)
        ranking = rank_layers(pre, ptq, _calibration_images(ctx, cfg.sensitivity_images), threads=threads)
        ranked = [e.name for e in ranking]
        if task.int8_fp32_outputs:  # already floating point: not a choice the search makes
            from export.head_scope import onnx_output_layers
            import onnx

            head = set(onnx_output_layers(onnx.load(str(pre))))
            ranked = [n for n in ranked if n not in head]
        log.info("sensitivity (%s): most sensitive %s", PROXY, ", ".join(ranked[:5]))
        counter = iter(range(10_000))

        if "onnx_int8" in failing:
            def build_ort(excluded: tuple[str, ...]) -> tuple[float, float | None]:
                path = tmp / f"ort-{next(counter)}.onnx"
                ort_quantize(pre, path, calibration, dynamic=dynamic, keep_outputs_fp32=task.int8_fp32_outputs,
                             exclude=excluded, preprocess=False)
                rt = OrtRuntime(path, threads=threads)
                return _metric(ctx, rt), _p50(ctx, rt)

            f, q = failing["onnx_int8"]
            found = _search("onnx_int8", ranked, build_ort, f, budget, cfg.max_fp_layers)
            final = ctx.out_dir / ONNX_FILE
            ort_quantize(pre, final, calibration, dynamic=dynamic, keep_outputs_fp32=task.int8_fp32_outputs,
                         exclude=_kept(found), preprocess=False)
            result.outputs["onnx_int8_fallback"] = final
            result.measure["onnx_int8_fallback"] = Measure(OrtRuntime(final, threads=threads), path=final)
            result.metrics["onnx_int8_fallback"] = _record("onnx_int8", "onnx", f, q, found, ranking)

        if "trt_qdq" in failing:
            input_name, dims = trt_stage.graph_input(ctx.inputs["onnx"])
            fixed = dims[0] if dims and isinstance(dims[0], int) else None

            def build_trt(excluded: tuple[str, ...]) -> tuple[float, float | None]:
                path = tmp / f"trt-{next(counter)}.onnx"
                trt_stage.quantize_calibrated(ctx, ctx.inputs["onnx"], path, input_name, fixed, exclude=excluded)
                return _metric(ctx, OrtRuntime(path, threads=threads)), None  # not TensorRT's latency

            f, q = failing["trt_qdq"]
            found = _search("trt_qdq", ranked, build_trt, f, budget, cfg.max_fp_layers)
            final = ctx.out_dir / TRT_FILE
            trt_stage.quantize_calibrated(ctx, ctx.inputs["onnx"], final, input_name, fixed, exclude=_kept(found))
            result.outputs["trt_qdq_fallback"] = final
            result.measure["trt_qdq_fallback"] = Measure(OrtRuntime(final, threads=threads), path=final)
            result.metrics["trt_qdq_fallback"] = _record("trt_qdq", "onnx", f, q, found, ranking, TRT_UNMEASURED)
            result.unavailable["trt_engine_fallback"] = TRT_UNMEASURED

        if "openvino_int8" in failing:
            _openvino(ctx, result, tmp, pre, ranked, ranking, failing["openvino_int8"], budget, counter)
    return result


def _kept(found: SearchResult) -> tuple[str, ...]:
    """The layers the artifact keeps in FP: the chosen step's, else the last (largest) one tried."""
    step = found.chosen or (found.steps[-1] if found.steps else None)
    return step.fp_layers if step else ()


def _openvino(ctx: StageContext, result: StageResult, tmp: Path, pre: Path, ranked: list[str],
              ranking: list[LayerError], metrics: tuple[float, float], budget: float, counter) -> None:
    import nncf
    import onnx
    import openvino as ov

    from export.head_scope import openvino_output_layers
    from export.openvino import calibration_loader, static_batch

    ov_cfg = ctx.cfg.openvino
    threads = ctx.cfg.bench.threads
    model = ov.Core().read_model(str(ctx.inputs["openvino_fp32"]))
    names = openvino_names(model, onnx.load(str(pre)), ranked)
    ov_ranked = [n for n in ranked if n in names]
    if len(ov_ranked) < len(ranked):
        result.warnings.append(f"openvino_int8_fallback: {len(ranked) - len(ov_ranked)} ranked layer(s) have no "
                               "OpenVINO op of the same name or output tensor; the search skips them")
    head = openvino_output_layers(model) if ctx.task.int8_fp32_outputs else []
    loader = calibration_loader(ctx, static_batch(model) or 1)

    def quantize(excluded: tuple[str, ...]) -> "ov.Model":
        scope = nncf.IgnoredScope(names=sorted(set(head) | {names[n] for n in excluded}), validate=False)
        return ov_quantize(model.clone(), loader, preset=ov_cfg.preset, ignored_scope=scope)

    def build_ov(excluded: tuple[str, ...]) -> tuple[float, float | None]:
        xml = save_ir(quantize(excluded), tmp / f"ov-{next(counter)}.xml")
        rt = OpenVINORuntime(xml, threads, precision=ov_cfg.inference_precision)
        return _metric(ctx, rt), _p50(ctx, rt)

    f, q = metrics
    found = _search("openvino_int8", ov_ranked, build_ov, f, budget, ctx.cfg.int8_fallback.max_fp_layers)
    xml = save_ir(quantize(_kept(found)), ctx.out_dir / OV_FILE)
    rt = OpenVINORuntime(xml, threads, precision=ov_cfg.inference_precision)
    result.outputs["openvino_int8_fallback"] = xml
    result.measure["openvino_int8_fallback"] = Measure(rt, path=xml)
    rec = _record("openvino_int8", "openvino_fp32", f, q, found, ranking)
    rec["openvino_layers"] = [names[n] for n in rec["fp_layers"]]
    result.metrics["openvino_int8_fallback"] = rec
    result.commands["openvino_int8_fallback"] = benchmark_command(ctx, xml, rt)
