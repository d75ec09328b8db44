"""Distillation wiring, one function for every stage that distils: the distill stage's
students and the prune stage's healing.

:func:`distillation` loads the frozen teacher, builds the MGD blocks for the configured tap
pairs (probing the *current* student, so a pruned student gets align convs of its new widths),
hooks the taps and returns the loss: the task's own loss, plus MGD on the tapped features,
plus the task's logit KD term, per ``[distill] method``, and the stream of unlabelled images
(``[distill] unlabeled``) whose batches carry the distillation terms alone. The hooks are
removed on exit, so the saved student carries none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline import dist, unlabeled
from pipeline.models import load_frozen_teacher
from pipeline.unlabeled import Unlabeled
from stages.mgd import FeatureTap, MGDHead
from stages.training import LossFn
from stages.unlabeled_stream import UnlabeledStream

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


def part(out: Any, items: slice) -> Any:
    """Some of the images of a model output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(out, torch.Tensor):
        return out[items]
    if isinstance(out, dict):
        return {k: part(v, items) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(part(v, items) for v in out)
    return out


@dataclass
class Wiring:
    """What a training stage needs to distil one student: the loss, the trainable MGD blocks
    (the training loop's ``extra``), and the unlabelled stream (None without ``unlabeled``)."""

    loss_fn: LossFn | None = None
    head: MGDHead | None = None
    unlabeled: UnlabeledStream | None = None
    source: Unlabeled | None = None

    def record(self) -> dict[str, Any]:
        """What the manifest records of this student's distillation: MGD taps and α, unlabelled images."""
        return {**mgd_record(self.head), **(self.source.record() if self.source is not None else {})}


def _stream(ctx: "StageContext") -> tuple[UnlabeledStream | None, Unlabeled | None]:
    cfg = ctx.cfg.distill
    source = unlabeled.load(cfg.unlabeled, ctx.data, train_fraction=cfg.train_fraction, seed=ctx.cfg.pipeline.seed,
                            base_dir=ctx.cfg.resolve("."), transform=lambda: ctx.task.unlabeled_transform(ctx.cfg.data))
    if source is None:
        return None, None
    size = cfg.unlabeled_batch_size or ctx.cfg.data.batch_size
    log.info("unlabelled images: %d from %s, %d a step beside each labelled batch (distillation terms only)",
             source.count, source.source, min(size, source.count))
    # A folder is decoded from files: worker processes, as for the labelled loader ("rest" is
    # the training split's own dataset: in memory for the embedded sources).
    workers = ctx.data.workers(ctx.cfg.data.num_workers) if source.source != unlabeled.REST else 0
    # Under torchrun each rank draws its own batches (a seed per rank), as the labelled shards differ.
    return UnlabeledStream(source.dataset, size, seed=ctx.cfg.pipeline.seed + 7919 * dist.rank(), num_workers=workers,
                           pin_memory=ctx.device.type == "cuda"), source


@contextmanager
def distillation(ctx: "StageContext", student: nn.Module, method: str) -> Iterator[Wiring]:
    """The :class:`Wiring` for training ``student`` from the stage's `teacher` input.

    ``method = "none"`` gives an empty wiring: the training loop's default task loss, no
    unlabelled stream (the baseline learns from labels alone). With ``[distill] unlabeled``,
    each batch the loop hands the loss carries the unlabelled images after the labelled ones:
    they get the distillation terms only (``mgd_unlabeled``, ``kd_unlabeled``).
    """
    if method == "none":
        yield Wiring()
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
    stream, source = _stream(ctx)

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, Any, dict]:
        n = task.batch_size_of(targets)  # images past the first n are unlabelled
        extra = images.shape[0] > n
        out_all = model(images)
        out = part(out_all, slice(n)) if extra else out_all
        task_loss = task.loss(out, targets, cfg)
        terms = {"task": task_loss}
        with torch.no_grad():  # the teacher is a fixed target; its features feed MGD via the tap
            t_all = teacher(images)
        loss = task_loss
        if head is not None:
            s_feats, t_feats = s_tap.take(), t_tap.take()
            s_lab, t_lab = [f[:n] for f in s_feats], [f[:n] for f in t_feats]
            if head.pending:  # alpha = "auto": measured on this first batch, then fixed
                alpha = head.calibrate(s_lab, t_lab, task_loss)
                log.info("MGD alpha = \"auto\": %.4g (the MGD loss at the first batch = %g × the task loss %.4g)",
                         alpha, head.auto_ratio, float(task_loss.detach()))
            parts = head.terms(s_lab, t_lab)
            terms["mgd"] = sum(parts)
            terms.update(zip(tap_names, parts))
            loss = loss + terms["mgd"]
            if extra:
                terms["mgd_unlabeled"] = head([f[n:] for f in s_feats], [f[n:] for f in t_feats])
                loss = loss + terms["mgd_unlabeled"]
        if use_kd:
            terms["kd"] = cfg.kd.weight * task.kd_loss(out, part(t_all, slice(n)) if extra else t_all, cfg.kd)
            loss = loss + terms["kd"]
            if extra:
                terms["kd_unlabeled"] = cfg.kd.weight * task.kd_loss(part(out_all, slice(n, None)), part(t_all, slice(n, None)), cfg.kd)
                loss = loss + terms["kd_unlabeled"]
        return loss, out, terms

    try:
        yield Wiring(loss_fn, head, stream, source)
    finally:
        for tap in (s_tap, t_tap):
            if tap is not None:
                tap.remove()
