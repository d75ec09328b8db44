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

from export.runtimes import TorchRuntime
from pipeline.config import TeacherConfig
from pipeline.models import build_model
from pipeline.stage import Measure, StageContext, StageResult, register
from stages._train import fit, loaders, save_torch, state_dict_cpu

log = logging.getLogger(__name__)

Config = TeacherConfig


def build_teacher(ctx: StageContext, weights: str | None = None) -> torch.nn.Module:
    """The teacher architecture for this run's data (random, configured or given weights)."""
    cfg: TeacherConfig = ctx.cfg.teacher
    return build_model(
        cfg.arch,
        ctx.data.num_classes,
        image_size=ctx.cfg.data.image_size,
        small_input=cfg.small_input,
        weights=cfg.weights if weights is None else weights,
        base_dir=ctx.cfg.resolve("."),
    )


@register("teacher", order=10, outputs=("teacher",), config_keys=("teacher", "data"))
def run(ctx: StageContext) -> StageResult:
    """Train the teacher and save its state dict."""
    cfg: TeacherConfig = ctx.cfg.teacher
    torch.manual_seed(ctx.cfg.pipeline.seed)
    model = build_teacher(ctx)
    train, val = loaders(ctx)
    history = fit(
        model,
        train_loader=train,
        val_loader=val,
        optim=cfg,
        device=ctx.device,
        checkpoint=ctx.out_dir / "checkpoint.pt",
        key=ctx.key,
        desc=f"teacher {cfg.arch}",
    )
    path = ctx.out_dir / "teacher.pt"
    save_torch(state_dict_cpu(model), path)
    return StageResult(
        outputs={"teacher": path},
        measure={"teacher": Measure(TorchRuntime(model, ctx.device, ctx.cfg.bench.threads), model=model, path=path)},
        metrics={"teacher": {"train_seconds": history.seconds, "epochs": len(history.epochs)}},
        history={"teacher": history.epochs},
    )
