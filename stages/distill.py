"""Distill stage: train the compact student from the teacher with MGD (and/or KD).

Masked Generative Distillation (Yang et al. 2022, arXiv 2205.01529; see `stages/mgd.py`):
the student's task loss plus ``α · Σ(G(S' ⊙ M) − T)² / N`` on tapped feature maps. The task's
logit KD term (Hinton KD for classification) is available alone or on top. The wiring is
`stages/distill_loss.py`, shared with pruning's healing.
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
from torch import nn

from pipeline import unlabeled
from pipeline.errors import ConfigError
from pipeline.schema import DistillConfig
from pipeline.evaluate import evaluate_module
from pipeline.manifest import ArtifactRole
from pipeline.models import build_student, build_teacher, check_weights_file, load_frozen_teacher
from pipeline.stage import Measure, StageContext, StageResult, register
from pipeline.tasks import task_for
from pipeline.torch_runtime import TorchRuntime
from stages.distill_loss import distillation
from stages.mgd import MGDHead
from stages.training import fit, loaders, save_torch, state_dict_cpu

log = logging.getLogger(__name__)

Config = DistillConfig


def _build_student(ctx: StageContext) -> nn.Module:
    # Same seed before every build: the baseline and the distilled student start identical.
    torch.manual_seed(ctx.cfg.pipeline.seed)
    return build_student(ctx.cfg, ctx.data.num_classes)


def init_from_teacher(student: nn.Module, teacher: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Copy the teacher's tensors under ``prefixes`` (the task's ``init_student_prefixes``) into
    the student where names and shapes match; return the names copied. The MGD authors start
    their RetinaNet students from the teacher's neck and head this way (``init_student``)."""
    own = student.state_dict()
    copied = {k: v for k, v in teacher.state_dict().items()
              if k.startswith(prefixes) and k in own and own[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return sorted(copied)


def _train(ctx: StageContext, name: str, method: str, then: str = "") -> tuple[nn.Module, list[dict[str, float]], dict]:
    """Train one student (`method` "none" = task loss alone) and save its state dict; `then`
    tells the time estimate what follows this student. Returns the student, its history and
    what the manifest records of its MGD (taps, α)."""
    cfg: DistillConfig = ctx.cfg.distill
    student = _build_student(ctx)
    if cfg.init_student and method != "none":
        copied = init_from_teacher(student, load_frozen_teacher(ctx), ctx.task.init_student_prefixes)
        log.info("%s: init_student copied %d tensors of the teacher's neck and head (%d elements)", name,
                 len(copied), sum(student.state_dict()[k].numel() for k in copied))
    with distillation(ctx, student, method) as wiring:
        train, val = loaders(ctx, ctx.cfg.distill.train_fraction)
        # Building the MGD blocks drew from the global RNG; reseed so that every student sees
        # the same augmentation draws (MGD masks have a generator of their own).
        torch.manual_seed(ctx.cfg.pipeline.seed)
        history = fit(student, train_loader=train, val_loader=val, optim=cfg, device=ctx.device,
                      checkpoint=ctx.resume_file(f"{name}.checkpoint.pt"), key=f"{ctx.key}:{name}",
                      desc=f"{name} {cfg.student} ({method})", task=ctx.task, num_classes=ctx.data.num_classes,
                      loss_fn=wiring.loss_fn, extra=wiring.head, then=then, unlabeled=wiring.unlabeled)
        record = wiring.record()
    save_torch(state_dict_cpu(student), ctx.out_dir / f"{name}.pt")
    return student, history.epochs, record


def preflight(cfg) -> None:
    """The student architecture and weights, and the MGD taps, checked before anything trains.

    Tap layers must exist and pair up in spatial size: probed on randomly initialised models,
    so a typo or an impossible pairing fails before the teacher trains, not after.
    """
    task = task_for(cfg)
    try:
        task.check_arch(cfg.distill.student)
    except ConfigError as exc:
        raise ConfigError(f"distill.student: {exc}") from None
    task.check_pair(cfg.teacher.arch, cfg.distill.student)
    if cfg.distill.weights and not cfg.distill.weights.startswith("torchvision:"):
        check_weights_file(cfg, "distill", build_student)
    if cfg.distill.method != "none":
        unlabeled.check(cfg.distill.unlabeled, cfg.distill.train_fraction, cfg.resolve("."))
    if cfg.distill.method in ("mgd", "mgd+kd"):
        m = cfg.distill.mgd
        with torch.random.fork_rng():  # probing must not shift the run's random stream
            MGDHead(build_student(cfg, 10, weights=""), build_teacher(cfg, 10, weights=""),
                    m.student_layers, m.teacher_layers, (3, cfg.data.image_size, cfg.data.image_size),
                    alpha=m.alpha, mask_ratio=m.mask_ratio, mask=m.mask, resample=m.resample)


@register("distill", order=20, inputs=("teacher",), reads=("teacher", "data"), preflight=preflight,
          artifacts={"student": ArtifactRole(model="student", runtime="torch", precision="fp32", target="torch"),
                     "student_baseline": ArtifactRole(model="baseline", runtime="torch", precision="fp32")})
def run(ctx: StageContext) -> StageResult:
    """Train the distilled student (and the baseline student) and save their state dicts."""
    cfg: DistillConfig = ctx.cfg.distill
    task = ctx.task
    result = StageResult(outputs={})
    bench = ctx.cfg.bench.threads
    with_baseline = cfg.baseline and cfg.method != "none"
    then = (f"the baseline student follows ({cfg.epochs} epochs, task loss alone: somewhat faster)"
            if with_baseline else "")
    student, hist, wired = _train(ctx, "student", cfg.method, then)
    result.outputs["student"] = ctx.out_dir / "student.pt"
    result.measure["student"] = Measure(TorchRuntime(student, ctx.device, bench, output_names=task.output_names),
                                        model=student, path=result.outputs["student"])
    result.history["student"] = hist
    workers = ctx.data.workers(ctx.cfg.data.num_workers)
    result.metrics["student"] = {"data_workers": workers, **wired}
    if with_baseline:
        baseline, bhist, _ = _train(ctx, "student_baseline", "none")
        result.outputs["student_baseline"] = ctx.out_dir / "student_baseline.pt"
        result.measure["student_baseline"] = Measure(
            TorchRuntime(baseline, ctx.device, bench, output_names=task.output_names), model=baseline,
            path=result.outputs["student_baseline"])
        result.history["student_baseline"] = bhist
        result.metrics["student_baseline"] = {"data_workers": workers}
        val = ctx.data.loader("val", ctx.cfg.data.batch_size)
        n = ctx.data.num_classes
        teacher_q = evaluate_module(load_frozen_teacher(ctx), val, ctx.device, task, n)[task.metric]
        key = f"val_{task.history_metric}"
        baseline_q = bhist[-1][key] if bhist else evaluate_module(baseline, val, ctx.device, task, n)[task.metric]
        if teacher_q <= baseline_q:
            result.warnings.append(
                f"the teacher ({teacher_q:.4f} val {task.metric}) does not beat the student trained alone "
                f"({baseline_q:.4f}): distillation cannot be expected to help; train the teacher longer, "
                "give it pretrained weights, or pick a larger teacher"
            )
    return result
