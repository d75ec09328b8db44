"""Semantic segmentation: a class per pixel, mIoU, MGD on the last backbone stage plus logit KD.

The MGD settings are the authors' segmentation ones (yzd-v/MGD `seg/`): a pixel mask with
λ = 0.75 and α = 2e-5 on the last backbone stage; `method = "mgd+kd"` adds their channel-wise
logit distillation: for each (image, class) map a softmax over the H·W positions at T = 4,
``3 · Σ p_T (log p_T − log p_S) · T² / (C·N)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.tasks.base import Metric, Source, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.schema import Config, DataConfig, KDConfig, OptimConfig
    from pipeline.data import DataBundle

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


class _MIoU:
    """Dataset-level confusion matrix over argmax label maps."""

    def __init__(self, output: str, num_classes: int):
        from pipeline.tasks.segmentation.metrics import ConfusionMatrix

        self.output = output
        self.matrix = ConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX)

    def update(self, outputs: dict[str, np.ndarray], targets: Any) -> None:
        pred = np.asarray(outputs[self.output]).argmax(axis=1)
        self.matrix.update(pred, np.asarray(targets.cpu() if hasattr(targets, "cpu") else targets))

    def compute(self) -> dict[str, float]:
        out = self.matrix.compute()
        return {"miou": float(out["miou"]), "pixel_accuracy": float(out["pixel_accuracy"])}


class Segmentation(Task):
    """``(image, S×S class-index mask)`` items; a model returning ``N×C×S×S`` logits."""

    name = "segmentation"
    quality = (Metric("miou", "mIoU"), Metric("pixel_accuracy", "pixel accuracy"))
    history_metric = "miou"
    agreement = "pixel_agreement"
    output_names = ("logits",)
    sources = (
        Source("scenes", about="digit scenes composed from scikit-learn's digits (embedded), a mask per scene"),
        Source("masks", {"root": "root = path with train/images, train/masks, val/images and val/masks",
                         "num_classes": "the class count, background included (>= 2)"},
               about="root/{train,val}/{images,masks}/*: mask PNGs of class indices, 255 = ignore"),
    )
    default_pair = ("deeplabv3_resnet34", "deeplabv3_resnet18")
    # The authors' λ and pixel mask; their α (2e-5) fits 1/8 of 512×1024, "auto" fits any map.
    mgd_defaults = {"alpha": "auto", "mask_ratio": 0.75, "mask": "pixel"}
    # From scratch on a few hundred images: AdamW with warm-up learns where SGD lr 0.02 stalls;
    # clipping at the authors' detection max-norm keeps an early spike from diverging.
    recipe = {"optim": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "warmup_epochs": 1,
                        "grad_clip": 35.0},
              "batch_size": 16, "heal_lr": 5e-4}
    kd_defaults = {"temperature": 4.0, "weight": 3.0}

    def check_config(self, cfg: "Config") -> None:
        if cfg.data.source == "masks" and cfg.data.num_classes < 2:
            raise ConfigError("data.num_classes: source 'masks' needs the class count, background included (>= 2)")

    def check_data(self, cfg: "DataConfig", base_dir: Path) -> None:
        from pipeline.tasks.segmentation.data import check_masks, scene_spec

        if cfg.source == "masks":
            check_masks(cfg, base_dir)
        else:
            scene_spec(cfg)

    def load_data(self, cfg: "DataConfig", seed: int, base_dir: Path) -> "DataBundle":
        from pipeline.tasks.segmentation.data import load_masks, load_scenes

        bundle = load_masks(cfg, seed, base_dir) if cfg.source == "masks" else load_scenes(cfg, seed)
        log.info("data %s (segmentation): %d classes, train %d, val %d, calibration %d, %d px", cfg.source,
                 bundle.num_classes, len(bundle.train), len(bundle.val), len(bundle.calibration), bundle.image_size)
        return bundle

    def unlabeled_transform(self, cfg: "DataConfig") -> Any:
        """Resized bilinearly to ``S×S`` and normalised, as the mask-folder reader makes its images."""
        from torchvision import transforms as T

        from pipeline.data import ToRGB

        s = cfg.image_size
        return T.Compose([ToRGB(), T.Resize((s, s)), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    def check_arch(self, arch: str) -> None:
        from pipeline.tasks.segmentation.models import check_seg_arch

        check_seg_arch(arch)

    def build_model(self, arch: str, num_classes: int, *, image_size: int, weights: str = "",
                    base_dir: Path = Path(".")) -> "nn.Module":
        from pipeline.tasks.segmentation.models import build_seg_model

        return build_seg_model(arch, num_classes, weights=weights, base_dir=base_dir)

    def default_layers(self, arch: str) -> list[str]:
        """The last backbone stage, where the authors tap segmentation models."""
        from pipeline.tasks.segmentation.models import last_backbone_stage

        return [last_backbone_stage(arch)]

    def prune_keep(self, model: "nn.Module") -> list[str]:
        from pipeline.tasks.segmentation.models import seg_head_layers

        return seg_head_layers(model)

    def loss(self, out: Any, targets: Any, cfg: "OptimConfig") -> "torch.Tensor":
        import torch.nn.functional as F

        return F.cross_entropy(out, targets, ignore_index=IGNORE_INDEX, label_smoothing=cfg.label_smoothing)

    def kd_loss(self, student_out: Any, teacher_out: Any, cfg: "KDConfig") -> "torch.Tensor":
        """Channel-wise distillation: per (image, class) map, softmax over H·W at temperature T;
        ``Σ p_T (log p_T − log p_S) · T² / (C·N)`` (the weight is applied by the caller)."""
        import torch.nn.functional as F

        t = cfg.temperature
        n, c = student_out.shape[:2]
        s = student_out.float().reshape(n * c, -1) / t
        te = teacher_out.float().reshape(n * c, -1) / t
        p_t = F.softmax(te, dim=1)
        return (p_t * (F.log_softmax(te, dim=1) - F.log_softmax(s, dim=1))).sum() * (t * t) / (c * n)

    def evaluator(self, num_classes: int) -> _MIoU:
        return _MIoU(self.output_names[0], num_classes)

    def postprocess(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """A class index per pixel (N×H×W)."""
        return np.asarray(outputs[self.output_names[0]]).argmax(axis=1)


TASK = Segmentation()
