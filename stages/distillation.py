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
                       alpha=m.alpha, mask_ratio=m.mask_ratio, mask=m.mask, seed=ctx.cfg.pipeline.seed)
        s_tap = FeatureTap(student, m.student_layers, role="student")
        t_tap = FeatureTap(teacher, m.teacher_layers, role="teacher")
        log.info("MGD pairs %s", ", ".join(
            f"{s}({blk.student_channels}ch) → {t}({blk.teacher_channels}ch){' +align' if blk.align is not None else ''}"
            for (s, t), blk in zip(head.pairs, head.losses)))
    use_kd = method in ("kd", "mgd+kd")

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, Any]:
        out = model(images)
        loss = task.loss(out, targets, cfg)
        with torch.no_grad():  # the teacher is a fixed target; its features feed MGD via the tap
            t_out = teacher(images)
        if head is not None:
            loss = loss + head(s_tap.take(), t_tap.take())
        if use_kd:
            loss = loss + cfg.kd.weight * task.kd_loss(out, t_out, cfg.kd)
        return loss, out

    try:
        yield loss_fn, head
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
