"""Distillation wiring, one function for every stage that distils: the distill stage's
students and the prune stage's healing.

:func:`distillation` loads the frozen teacher, builds the MGD blocks for the configured tap
pairs (probing the *current* student, so a pruned student gets align convs of its new widths),
hooks the taps and returns the loss: the task's own loss, plus MGD on the tapped features,
plus the task's logit KD term, per ``[distill] method``. The hooks are removed on exit, so
the saved student carries none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.run_models import load_frozen_teacher
from stages.mgd import FeatureTap, MGDHead
from stages.training import LossFn

if TYPE_CHECKING:
    from pipeline.stage import StageContext

log = logging.getLogger(__name__)

METHODS = ("mgd", "kd", "mgd+kd", "none")


def _describe_tap(tap: dict) -> str:
    """"layer4 512×4×4 → layer4 512×8×8 (+align, resample student 4×4 → 8×8)" for the log."""
    dims = lambda shape: "×".join(str(d) for d in shape)  # noqa: E731
    extras = [x for x in ("+align" if tap["align"] else "",
                          f"resample {tap['resample']}" if tap["resample"] != "none" else "") if x]
    return (f"{tap['student']} {dims(tap['student_shape'])} → {tap['teacher']} {dims(tap['teacher_shape'])}"
            + (f" ({', '.join(extras)})" if extras else ""))


def mgd_record(head: MGDHead | None) -> dict[str, Any]:
    """What the manifest records of a student's MGD: each tap pair (C×H×W on both sides, align,
    resampling, the α used) and how α was chosen."""
    if head is None:
        return {}
    return {"mgd_alpha": head.losses[0].alpha, "mgd_alpha_rule": "auto" if head.auto else "set",
            "mgd_taps": head.describe()}


@contextmanager
def distillation(ctx: "StageContext", student: nn.Module, method: str) -> Iterator[tuple[LossFn | None, MGDHead | None]]:
    """``(loss_fn, mgd_blocks)`` for training ``student`` from the stage's `teacher` input.

    ``method = "none"`` gives ``(None, None)``: the training loop's default task loss. The MGD
    blocks are trainable and must be handed to the training loop as its ``extra`` modules.
    """
    if method == "none":
        yield None, None
        return
    cfg, task = ctx.cfg.distill, ctx.task
    teacher = load_frozen_teacher(ctx)
    student.to(ctx.device)
    head = s_tap = t_tap = None
    if method in ("mgd", "mgd+kd"):
        m = cfg.mgd
        head = MGDHead(student, teacher, m.student_layers, m.teacher_layers, ctx.data.input_shape,
                       alpha=m.alpha, mask_ratio=m.mask_ratio, mask=m.mask, seed=ctx.cfg.pipeline.seed,
                       resample=m.resample, auto_ratio=m.auto_ratio)
        s_tap = FeatureTap(student, m.student_layers, role="student")
        t_tap = FeatureTap(teacher, m.teacher_layers, role="teacher")
        log.info("MGD pairs %s", "; ".join(_describe_tap(t) for t in head.taps))
    use_kd = method in ("kd", "mgd+kd")
    tap_names = [f"mgd[{s}]" for s, _ in head.pairs] if head is not None and len(head.pairs) > 1 else []

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, Any, dict]:
        out = model(images)
        task_loss = task.loss(out, targets, cfg)
        terms = {"task": task_loss}
        with torch.no_grad():  # the teacher is a fixed target; its features feed MGD via the tap
            t_out = teacher(images)
        loss = task_loss
        if head is not None:
            s_feats, t_feats = s_tap.take(), t_tap.take()
            if head.pending:  # alpha = "auto": measured on this first batch, then fixed
                alpha = head.calibrate(s_feats, t_feats, task_loss)
                log.info("MGD alpha = \"auto\": %.4g (the MGD loss at the first batch = %g × the task loss %.4g)",
                         alpha, head.auto_ratio, float(task_loss.detach()))
            parts = head.terms(s_feats, t_feats)
            terms["mgd"] = sum(parts)
            terms.update(zip(tap_names, parts))
            loss = loss + terms["mgd"]
        if use_kd:
            terms["kd"] = cfg.kd.weight * task.kd_loss(out, t_out, cfg.kd)
            loss = loss + terms["kd"]
        return loss, out, terms

    try:
        yield loss_fn, head
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
