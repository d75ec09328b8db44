"""Distill stage: train the compact student from the teacher with MGD (and/or KD).

Masked Generative Distillation (Yang et al. 2022, arXiv 2205.01529; see `stages/mgd.py`):
the student's task loss plus ``α · Σ(G(S' ⊙ M) − T)² / N`` on tapped feature maps. Classic
Hinton KD (temperature-softened logits, weighted by T²) is available alone or on top.
With ``baseline = true`` the same student is also trained without distillation, from the same
initial weights, on the same data order and budget, so the manifest shows what distillation
bought (`metrics["student"]` vs `metrics["student_baseline"]`). The teacher is frozen, in eval
mode, under no_grad; the MGD align/generation blocks are training-only and never saved in
the `student` artifact.

Inputs: `teacher` (state dict). Outputs: `student` (state dict), `student_baseline` (state
dict, when `baseline = true` and `method != "none"`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from export.runtimes import TorchRuntime
from pipeline.config import DistillConfig
from pipeline.evaluate import evaluate_module
from pipeline.models import build_model
from pipeline.stage import Measure, StageContext, StageResult, register
from stages._train import LossFn, fit, loaders, save_torch, state_dict_cpu
from stages.mgd import FeatureTap, MGDHead
from stages.teacher import build_teacher

log = logging.getLogger(__name__)

Config = DistillConfig


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(teacher ‖ student) on temperature-softened logits, scaled by T²."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1), F.softmax(teacher_logits.float() / t, dim=1), reduction="batchmean"
    ) * (t * t)


def _build_student(ctx: StageContext) -> nn.Module:
    cfg: DistillConfig = ctx.cfg.distill
    # Same seed before every build: the baseline and the distilled student start identical.
    torch.manual_seed(ctx.cfg.pipeline.seed)
    return build_model(
        cfg.student, ctx.data.num_classes, image_size=ctx.cfg.data.image_size, small_input=cfg.small_input,
        weights=cfg.weights, base_dir=ctx.cfg.resolve("."),
    )


def load_frozen_teacher(ctx: StageContext) -> nn.Module:
    """The trained teacher (`teacher` input) on the stage's device: eval mode, no gradients."""
    teacher = build_teacher(ctx, weights=str(ctx.inputs["teacher"]))
    teacher.to(ctx.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_loss(cfg: DistillConfig, teacher: nn.Module, head: MGDHead | None,
                  s_tap: FeatureTap | None, t_tap: FeatureTap | None) -> LossFn:
    """Task loss + MGD over the tapped features (when `head` is given) + KD (per `cfg.method`).

    The teacher runs under no_grad; its logits are only used by KD, its features by MGD.
    """
    use_kd = cfg.method in ("kd", "mgd+kd")

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            t_logits = teacher(images)
        if head is not None:
            loss = loss + head(s_tap.take(), t_tap.take())
        if use_kd:
            loss = loss + cfg.kd.weight * kd_loss(logits, t_logits, cfg.kd.temperature)
        return loss, logits

    return loss_fn


def _train(ctx: StageContext, name: str, method: str) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train one student (`method` "none" = task loss alone) and save its state dict."""
    cfg: DistillConfig = ctx.cfg.distill
    student = _build_student(ctx)
    head = s_tap = t_tap = None
    loss_fn = None
    if method != "none":
        teacher = load_frozen_teacher(ctx)
        student.to(ctx.device)
        run_cfg = cfg.model_copy(update={"method": method})
        if method in ("mgd", "mgd+kd"):
            m = cfg.mgd
            head = MGDHead(student, teacher, m.student_layers, m.teacher_layers, ctx.data.input_shape,
                           alpha=m.alpha, mask_ratio=m.mask_ratio, mask=m.mask)
            s_tap = FeatureTap(student, m.student_layers, role="student")
            t_tap = FeatureTap(teacher, m.teacher_layers, role="teacher")
            log.info("MGD pairs %s", ", ".join(
                f"{s}({l.student_channels}ch) → {t}({l.teacher_channels}ch){' +align' if l.align is not None else ''}"
                for (s, t), l in zip(head.pairs, head.losses)))
        loss_fn = distill_loss(run_cfg, teacher, head, s_tap, t_tap)
    train, val = loaders(ctx)
    try:
        history = fit(student, train_loader=train, val_loader=val, optim=cfg, device=ctx.device,
                      checkpoint=ctx.out_dir / f"{name}.checkpoint.pt", key=f"{ctx.key}:{name}",
                      desc=f"{name} {cfg.student} ({method})", loss_fn=loss_fn, extra=head)
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()  # the saved student carries no hooks
    save_torch(state_dict_cpu(student), ctx.out_dir / f"{name}.pt")
    return student, history.epochs


@register("distill", order=20, inputs=("teacher",), outputs=("student", "student_baseline"),
          config_keys=("distill", "teacher", "data"))
def run(ctx: StageContext) -> StageResult:
    """Train the distilled student (and the baseline student) and save their state dicts."""
    cfg: DistillConfig = ctx.cfg.distill
    result = StageResult(outputs={})
    bench = ctx.cfg.bench.threads
    student, hist = _train(ctx, "student", cfg.method)
    result.outputs["student"] = ctx.out_dir / "student.pt"
    result.measure["student"] = Measure(TorchRuntime(student, ctx.device, bench), model=student, path=result.outputs["student"])
    result.history["student"] = hist
    if cfg.baseline and cfg.method != "none":
        baseline, bhist = _train(ctx, "student_baseline", "none")
        result.outputs["student_baseline"] = ctx.out_dir / "student_baseline.pt"
        result.measure["student_baseline"] = Measure(
            TorchRuntime(baseline, ctx.device, bench), model=baseline, path=result.outputs["student_baseline"], reference=True)
        result.history["student_baseline"] = bhist
        val = ctx.data.loader("val", ctx.cfg.data.batch_size)
        teacher_acc = evaluate_module(load_frozen_teacher(ctx), val, ctx.device)
        baseline_acc = bhist[-1]["val_acc"] if bhist else evaluate_module(baseline, val, ctx.device)
        if teacher_acc <= baseline_acc:
            result.warnings.append(
                f"the teacher ({teacher_acc:.4f} val accuracy) does not beat the student trained alone "
                f"({baseline_acc:.4f}): distillation cannot be expected to help; train the teacher longer, "
                "give it pretrained weights, or pick a larger teacher"
            )
    return result
