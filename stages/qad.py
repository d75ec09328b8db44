"""QAD stage (`[qad]`): quantization-aware distillation of the final student.

When the OpenVINO post-training INT8 build fails `max_int8_metric_drop` (``when = "ptq_fails"``,
the default of a `[qad]` table) or always (``when = "always"``), the final student (`pruned`, else
`student`) gets NNCF's quantization-aware training: ``nncf.quantize`` on the torch model inserts
fake-quantize ops calibrated on the calibration split, then the model is fine-tuned for a few
epochs at a low learning rate with the task loss plus the distillation terms of `[distill]
method` against the frozen teacher, and the `[distill] unlabeled` images' distillation terms:
the same wiring (:func:`stages.distill_loss.distillation`) as distillation and healing. BatchNorm statistics stay frozen while fine-tuning, as usual for QAT.

Builds: `openvino_int8_qad`, the fine-tuned fake-quantized model converted by OpenVINO (its
FakeQuantize ops run as INT8), measured by the runner like every build and gated against
`openvino_fp32`; `trt_qdq_qad`, a symmetric signed-INT8 Q/DQ ONNX for TensorRT: the fine-tuned
weights exported to ONNX and quantized with the `[tensorrt]` recipe (NNCF's unsigned activation
ranges are not what TensorRT takes), its accuracy measured on ONNX Runtime CPU and its TensorRT
latency `unavailable` without TensorRT.

Inputs: `pruned|student`, `teacher`, `onnx`, `openvino_fp32`, `openvino_int8` (optional: without
it ``ptq_fails`` has nothing to judge, and QAD does not run). Outputs: `openvino_int8_qad`
(`qad/student_int8_qad.xml`), `trt_qdq_qad` (`qad/student_qdq_qad.onnx`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export import tensorrt as trt_stage
from export.onnx import export_model
from export.openvino import benchmark_command, save_ir
from export.runtimes import OpenVINORuntime, OrtRuntime
from pipeline import dist
from pipeline.errors import ConfigError
from pipeline.evaluate import evaluate_runtime
from pipeline.manifest import ArtifactRole
from pipeline.models import load_final_student
from pipeline.schema import QadConfig
from pipeline.stage import Measure, StageContext, StageResult, register
from stages.distill_loss import distillation
from stages.training import task_loss

log = logging.getLogger(__name__)

Config = QadConfig

GATE = "max_int8_metric_drop"
OV_FILE, TRT_FILE = "student_int8_qad.xml", "student_qdq_qad.onnx"
TRT_UNMEASURED = ("TensorRT latency needs TensorRT and a CUDA device: build an engine from trt_qdq_qad on the target "
                  "(its accuracy is measured on ONNX Runtime CPU, same INT8 numerics)")


def preflight(cfg) -> None:
    """QAD fine-tunes against the teacher with the OpenVINO build as its gate's reference."""
    if cfg.qad.when == "off":
        return
    if not cfg.openvino.enabled or "int8" not in cfg.openvino.precisions:
        raise ConfigError("qad: needs the OpenVINO INT8 build to compare with (openvino.enabled = true and \"int8\" in "
                          "openvino.precisions), or set qad.when = \"off\"")
    if not cfg.onnx.enabled:
        raise ConfigError("qad: needs the ONNX export (onnx.enabled = true), or set qad.when = \"off\"")


def _metric(ctx: StageContext, runtime: Any) -> float:
    threads = torch.get_num_threads()
    try:
        loader = ctx.data.loader("val", ctx.cfg.data.batch_size)
        return float(evaluate_runtime(runtime, loader, ctx.task, ctx.data.num_classes)[ctx.task.metric])
    finally:
        torch.set_num_threads(threads)


def _ptq_verdict(ctx: StageContext) -> tuple[bool, str]:
    """(run QAD?, why) per `when`: the OpenVINO PTQ build against its FP32 build on the runner's images."""
    when = ctx.cfg.qad.when
    if when == "always":
        return True, "qad.when = \"always\""
    gate = ctx.cfg.gates.int8_metric_drop()
    if gate is None:
        return False, "no INT8 drop gate (gates.max_int8_metric_drop) for PTQ to fail"
    if "openvino_int8" not in ctx.inputs:
        return False, "no OpenVINO PTQ build to judge"
    prec, threads = ctx.cfg.openvino.inference_precision, ctx.cfg.bench.threads
    f, q = (ctx.measured.get(n, {}).get(ctx.task.metric) for n in ("openvino_fp32", "openvino_int8"))
    if f is None or q is None:  # what the gate read; evaluated here only without the runner's record
        f = _metric(ctx, OpenVINORuntime(ctx.inputs["openvino_fp32"], threads, precision=prec))
        q = _metric(ctx, OpenVINORuntime(ctx.inputs["openvino_int8"], threads, precision=prec))
    drop = f - q
    if drop <= gate[1] + 1e-9:
        return False, f"openvino_int8 passes {gate[0]} (drop {drop * 100:.2f} pt <= {gate[1] * 100:.2f} pt)"
    return True, f"openvino_int8 fails {gate[0]} (drop {drop * 100:.2f} pt > {gate[1] * 100:.2f} pt)"


def _reference_kernels_on_cpu(device: torch.device) -> None:
    """On a CPU, NNCF's fake-quantize uses its torch-native reference functions instead of a C++
    extension it would compile on first use (minutes on a small machine, and NNCF gives up after
    60 s). NNCF falls back to the same functions itself when the build fails; same arithmetic."""
    if device.type != "cpu":
        return
    from nncf.torch.quantization import extensions
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions

    namespace = extensions.QuantizedFunctionsCPU
    if getattr(namespace, "_loaded_namespace", None) is None:
        namespace._loaded_namespace = ReferenceQuantizedFunctions


def fake_quantize(model: nn.Module, loader, example: torch.Tensor, device: torch.device) -> nn.Module:
    """NNCF QAT: the model with fake-quantize ops, their ranges calibrated on `loader`'s images."""
    import nncf

    _reference_kernels_on_cpu(device)
    model.eval()
    return nncf.quantize(model, nncf.Dataset(loader, lambda item: item[0]), subset_size=max(1, len(loader)))


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def fine_tune(ctx: StageContext, model: nn.Module) -> dict[str, Any]:
    """Fine-tune the fake-quantized student with the task loss + the distillation terms of
    `[distill] method`; returns what was done (steps, seconds, last loss terms)."""
    from stages.training import loaders

    cfg: QadConfig = ctx.cfg.qad
    dcfg = ctx.cfg.distill
    train, _ = loaders(ctx, dcfg.train_fraction)
    t0, steps, last = time.perf_counter(), 0, {}
    with distillation(ctx, model, dcfg.method) as wiring:
        loss_fn = wiring.loss_fn or task_loss(ctx.task, dcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        if wiring.head is not None:
            params += [p for p in wiring.head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        stream = wiring.unlabeled  # [distill] unlabeled: their batches carry the distillation terms alone
        for epoch in range(cfg.epochs):
            model.train()
            _freeze_bn(model)
            if stream is not None:
                stream.start_epoch(epoch)
            for images, targets in (b[:2] for b in train):
                images = images.to(ctx.device)
                if stream is not None:
                    images = torch.cat([images, stream.next().to(ctx.device)])
                loss, _, terms = loss_fn(model, images, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                last = {k: float(v.detach()) for k, v in terms.items()}
                if cfg.max_steps and steps >= cfg.max_steps:
                    break
            log.info("qad: epoch %d/%d, %d steps, loss terms %s", epoch + 1, cfg.epochs, steps,
                     ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        record = wiring.record()
    model.eval()
    return {"steps": steps, "train_seconds": time.perf_counter() - t0, "last_loss_terms": last,
            "method": dcfg.method, "lr": cfg.lr, "epochs": cfg.epochs, **record}


def to_openvino(model: nn.Module, example: torch.Tensor, output_names: tuple[str, ...]):
    """The fake-quantized torch model as an OpenVINO model (FakeQuantize ops: INT8 at inference),
    input named `input` and outputs named as the task names them."""
    import openvino as ov

    with torch.no_grad():
        ov_model = ov.convert_model(model.cpu().eval(), example_input=example)
    ov_model.inputs[0].get_tensor().set_names({"input"})
    for out, name in zip(ov_model.outputs, output_names):
        out.get_tensor().set_names({name})
    return ov_model


def fine_tuned_weights(qmodel: nn.Module, ctx: StageContext, student: nn.Module) -> nn.Module:
    """A plain copy of the student holding the fine-tuned weights (NNCF's hook state left out)."""
    import copy

    plain = copy.deepcopy(student).cpu().eval()
    own = plain.state_dict()
    tuned = {k: v for k, v in qmodel.state_dict().items() if k in own and v.shape == own[k].shape}
    plain.load_state_dict({**own, **tuned})
    return plain


@register("qad", order=70, inputs=("pruned|student", "teacher", "onnx", "openvino_fp32", "openvino_int8?"),
          reads=("data", "distill", "teacher", "gates", "openvino", "onnx", "tensorrt"),
          enabled=lambda cfg: cfg.qad.when != "off", preflight=preflight,
          off_reason=lambda cfg: "off (no [qad] table, or qad.when = \"off\")",
          artifacts={
              "openvino_int8_qad": ArtifactRole(model="student", runtime="openvino", precision="int8",
                                                target="openvino", fp32="openvino_fp32",
                                                alternative_of="openvino_int8", recipe="qad", made_for=GATE),
              "trt_qdq_qad": ArtifactRole(model="student", runtime="onnxruntime", precision="int8", fp32="onnx",
                                          latency_note=trt_stage.LATENCY_NOTE, alternative_of="trt_qdq",
                                          recipe="qad", made_for=GATE),
          })
def run(ctx: StageContext) -> StageResult:
    """Fine-tune the student with fake quantization and the teacher; build OpenVINO INT8 and a Q/DQ ONNX."""
    result = StageResult(outputs={})
    if not dist.is_main():
        return result
    go, why = _ptq_verdict(ctx)
    result.metrics["qad"] = {"decision": why, "ran": go}
    if not go:
        log.info("qad: not running: %s", why)
        return result
    log.info("qad: running: %s", why)
    torch.manual_seed(ctx.cfg.pipeline.seed)
    _, student = load_final_student(ctx)
    student = student.cpu().eval()
    c, h, w = ctx.data.input_shape
    example = torch.zeros(1, c, h, w)
    t0 = time.perf_counter()
    qmodel = fake_quantize(student, ctx.data.loader("calibration", ctx.cfg.data.batch_size), example, ctx.device)
    info = fine_tune(ctx, qmodel.to(ctx.device))
    qmodel = qmodel.cpu().eval()
    threads, prec = ctx.cfg.bench.threads, ctx.cfg.openvino.inference_precision

    xml = save_ir(to_openvino(qmodel, example, ctx.task.output_names), ctx.out_dir / OV_FILE)
    rt = OpenVINORuntime(xml, threads, precision=prec)
    result.outputs["openvino_int8_qad"] = xml
    result.measure["openvino_int8_qad"] = Measure(rt, path=xml)
    result.commands["openvino_int8_qad"] = benchmark_command(ctx, xml, rt)
    result.metrics["openvino_int8_qad"] = {"recipe": "qad", "alternative_of": "openvino_int8", "made_for": GATE,
                                           "compared_with": "openvino_fp32", "qat": "nncf.quantize (torch)", **info}

    if ctx.cfg.tensorrt.enabled:
        plain = fine_tuned_weights(qmodel, ctx, student)
        with tempfile.TemporaryDirectory(dir=ctx.out_dir, prefix=".qad-") as tmp:
            fp32 = Path(tmp) / "qad_fp32.onnx"
            export_model(plain, ctx.data.input_shape, fp32, opset=ctx.cfg.onnx.opset,
                         dynamic_batch=ctx.cfg.onnx.dynamic_batch, simplify=ctx.cfg.onnx.simplify, what="qad",
                         output_names=ctx.task.output_names)
            input_name, dims = trt_stage.graph_input(fp32)
            fixed = dims[0] if dims and isinstance(dims[0], int) else None
            target = ctx.out_dir / TRT_FILE
            trt_stage.quantize_calibrated(ctx, fp32, target, input_name, fixed)
        result.outputs["trt_qdq_qad"] = target
        result.measure["trt_qdq_qad"] = Measure(OrtRuntime(target, threads=threads), path=target)
        result.metrics["trt_qdq_qad"] = {"recipe": "qad", "alternative_of": "trt_qdq", "made_for": GATE,
                                         "latency_note": TRT_UNMEASURED}
        result.unavailable["trt_engine_qad"] = TRT_UNMEASURED
    result.metrics["openvino_int8_qad"]["wall_seconds"] = time.perf_counter() - t0
    return result
