"""Image classification: one label per image, top-1 accuracy, cross-entropy, Hinton KD."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.tasks.base import PER_IMAGE_FRACTION, Metric, Source, Task

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.schema import DataConfig, KDConfig, OptimConfig
    from pipeline.data import DataBundle


class _Accuracy:
    """Top-1 accuracy over batches of logits."""

    def __init__(self, output: str):
        self.output = output
        self.correct = 0
        self.total = 0

    def update(self, outputs: dict[str, np.ndarray], targets: Any) -> None:
        logits = np.asarray(outputs[self.output])
        labels = np.asarray(targets.cpu() if hasattr(targets, "cpu") else targets).reshape(-1)
        self.correct += int((logits.argmax(axis=1) == labels).sum())
        self.total += int(labels.size)

    def compute(self) -> dict[str, float]:
        if self.total == 0:
            raise ValueError("accuracy: the loader yielded no samples")
        return {"accuracy": self.correct / self.total}


class Classification(Task):
    """``(image, int label)`` items; a model returning ``N×num_classes`` logits."""

    name = "classification"
    quality = (Metric("accuracy", "accuracy", unit=PER_IMAGE_FRACTION, axis="top-1 accuracy"),)
    history_metric = "acc"
    agreement = "top1_agreement"
    output_names = ("logits",)
    sources = (
        Source("digits", about="scikit-learn's 1,797 handwritten digits (embedded, no download)"),
        Source("imagefolder", {"root": "root = path with train/ and val/ subfolders"},
               about="root/train/<class>/*, root/val/<class>/*"),
        Source("torchvision", {"name": "name = a torchvision dataset class, e.g. 'CIFAR10'"},
               about="a torchvision.datasets class by name (data.name; data.root: its download folder)"),
    )
    default_pair = ("resnet34", "resnet18")
    model_options = ("small_input",)  # the stride-1 stem for small inputs
    gate_aliases = {"max_accuracy_drop": "max_metric_drop", "max_int8_accuracy_drop": "max_int8_metric_drop"}
    # The paper's classification settings: a channel mask (λ 0.15) on the last backbone stage.
    # Their α, 7e-5, fits a 7×7 ResNet layer4 at 224 px; "auto" fits any map (stages/mgd.py).
    mgd_defaults = {"alpha": "auto", "mask_ratio": 0.15, "mask": "channel"}
    # torchvision's classification reference: SGD with momentum, weight decay, warm-up + cosine.
    recipe = {"optim": {"optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
                        "grad_clip": 0.0},
              "batch_size": 64, "heal_lr": 0.01}
    kd_defaults = {"temperature": 4.0, "weight": 1.0}

    def check_data(self, cfg: "DataConfig", base_dir: Path) -> None:
        from pipeline.tasks.classification.data import check_data

        check_data(cfg, base_dir)

    def load_data(self, cfg: "DataConfig", seed: int, base_dir: Path) -> "DataBundle":
        from pipeline.tasks.classification.data import load_data

        return load_data(cfg, seed, base_dir)

    def unlabeled_transform(self, cfg: "DataConfig") -> Any:
        """The evaluation transform (resize, or resize + centre crop from 64 px; normalised)."""
        from pipeline.tasks.classification.transforms import eval_transform

        return eval_transform(cfg)

    def check_arch(self, arch: str) -> None:
        from pipeline.tasks.classification.models import check_arch

        check_arch(arch)

    def build_model(self, arch: str, num_classes: int, *, image_size: int, weights: str = "",
                    base_dir: Path = Path("."), small_input: str = "auto") -> "nn.Module":
        from pipeline.tasks.classification.models import build_model

        return build_model(arch, num_classes, image_size=image_size, small_input=small_input, weights=weights,
                           base_dir=base_dir)

    def default_layers(self, arch: str) -> list[str]:
        """The last feature stage, whatever the architecture: ResNet `layer4`, MobileNet /
        EfficientNet `features`, RegNet `trunk_output`, a timm model's last `feature_info` entry."""
        from pipeline.tasks.classification.models import default_tap

        return [default_tap(arch)]

    def prune_keep(self, model: "nn.Module") -> list[str]:
        from pipeline.taps import head_names

        return head_names(model)

    def loss(self, out: Any, targets: Any, cfg: "OptimConfig") -> "torch.Tensor":
        import torch.nn.functional as F

        return F.cross_entropy(self._logits(out), targets, label_smoothing=cfg.label_smoothing)

    def kd_loss(self, student_out: Any, teacher_out: Any, cfg: "KDConfig") -> "torch.Tensor":
        """Hinton et al. 2015: KL(teacher ‖ student) on temperature-softened logits, scaled by T²."""
        import torch.nn.functional as F

        t = cfg.temperature
        s, te = self._logits(student_out).float(), self._logits(teacher_out).float()
        return F.kl_div(F.log_softmax(s / t, dim=1), F.softmax(te / t, dim=1), reduction="batchmean") * (t * t)

    def train_correct(self, out: Any, targets: Any) -> tuple[int, int] | None:
        return int((self._logits(out).argmax(1) == targets).sum()), int(targets.numel())

    def evaluator(self, num_classes: int) -> _Accuracy:
        return _Accuracy(self.output_names[0])

    def postprocess(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Top-1 class per image."""
        return np.asarray(outputs[self.output_names[0]]).argmax(axis=1)

    def _logits(self, out: Any) -> "torch.Tensor":
        # Some torchvision classifiers return (logits, aux) in training mode.
        return out[0] if isinstance(out, (tuple, list)) else out


TASK = Classification()
