"""Teacher stage: fine-tune (or train) the big model that the student will learn from.

MGD (Yang et al. 2022, arXiv 2205.01529) distils from a teacher that is better than the
student trained alone, so this stage trains the configured torchvision (or timm) model on the
user's data with the shared training loop.

Inputs: none (the dataset and optional initial weights from `[teacher]`).
Outputs: `teacher` — the trained model's state dict (`teacher/teacher.pt`).
"""

from __future__ import annotations

import logging

import torch

from pipeline.errors import ConfigError
from pipeline.schema import TeacherConfig
from pipeline.manifest import ArtifactRole
from pipeline.models import build_teacher, check_weights_file
from pipeline.stage import Measure, StageContext, StageResult, register
from pipeline.tasks import task_for
from pipeline.torch_runtime import TorchRuntime
from stages.training import fit, loaders, save_torch, state_dict_cpu

log = logging.getLogger(__name__)

Config = TeacherConfig


def preflight(cfg) -> None:
    """The teacher architecture exists for the task and its `weights` file (if any) fits it."""
    try:
        task_for(cfg).check_arch(cfg.teacher.arch)
    except ConfigError as exc:
        raise ConfigError(f"teacher.arch: {exc}") from None
    if cfg.teacher.weights and not cfg.teacher.weights.startswith("torchvision:"):
        check_weights_file(cfg, "teacher", build_teacher)


@register("teacher", order=10, reads=("data",), preflight=preflight,
          artifacts={"teacher": ArtifactRole(model="teacher", runtime="torch", precision="fp32")})
def run(ctx: StageContext) -> StageResult:
    """Train the teacher and save its state dict."""
    cfg: TeacherConfig = ctx.cfg.teacher
    torch.manual_seed(ctx.cfg.pipeline.seed)
    model = build_teacher(ctx.cfg, ctx.data.num_classes)
    train, val = loaders(ctx)
    history = fit(
        model,
        train_loader=train,
        val_loader=val,
        optim=cfg,
        device=ctx.device,
        checkpoint=ctx.resume_file("checkpoint.pt"),
        key=ctx.key,
        desc=f"teacher {cfg.arch}",
        task=ctx.task,
        num_classes=ctx.data.num_classes,
    )
    path = ctx.out_dir / "teacher.pt"
    save_torch(state_dict_cpu(model), path)
    return StageResult(
        outputs={"teacher": path},
        measure={"teacher": Measure(TorchRuntime(model, ctx.device, ctx.cfg.bench.threads,
                                                 output_names=ctx.task.output_names), model=model, path=path)},
        metrics={"teacher": {"train_seconds": history.seconds, "epochs": len(history.epochs),
                             "data_workers": ctx.data.workers(ctx.cfg.data.num_workers)}},
        history={"teacher": history.epochs},
    )
