"""Classification's image transforms: PIL image → normalised float tensor ``3×S×S``.

:func:`eval_transform` is the one preprocessing used for val, calibration, export and runtime
evaluation (and for ``[distill] unlabeled`` image files); :func:`train_transform` adds the
augmentation.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline.data import ToRGB
from pipeline.schema import DataConfig

# Datasets of characters/digits: a horizontal flip turns them into other (or no) symbols,
# so flip augmentation would teach the model wrong labels.
_NO_FLIP_DATASETS = frozenset({"MNIST", "EMNIST", "KMNIST", "QMNIST", "SVHN", "USPS", "SEMEION", "Omniglot"})


def _flip_ok(cfg: DataConfig) -> bool:
    return cfg.source != "digits" and not (cfg.source == "torchvision" and cfg.name in _NO_FLIP_DATASETS)


def eval_transform(cfg: DataConfig) -> Callable[[Any], torch.Tensor]:
    """The evaluation transform: PIL image -> normalised float tensor ``3×S×S``.

    ``S ≥ 64``: Resize(int(S/0.875)) + CenterCrop(S) (the ImageNet recipe); smaller inputs are
    resized straight to ``(S, S)`` because a centre crop would cut off too much of a tiny image.
    Digits are never cropped (a crop would cut strokes), so they always use Resize((S, S)).
    """
    from torchvision import transforms as T

    s = cfg.image_size
    if s >= 64 and cfg.source != "digits":
        geometry = [T.Resize(int(s / 0.875)), T.CenterCrop(s)]
    else:
        geometry = [T.Resize((s, s))]
    return T.Compose([ToRGB(), *geometry, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def train_transform(cfg: DataConfig) -> Callable[[Any], torch.Tensor]:
    """The training transform: PIL image -> normalised float tensor ``3×S×S``.

    With ``augment``: RandomResizedCrop(S) + horizontal flip for ``S ≥ 64``, else
    Resize((S, S)) + RandomCrop(S, padding=S//8) + flip. No flips for digit/character datasets.
    Without ``augment`` this is :func:`eval_transform`. The in-memory ``digits`` source applies
    the tensor equivalent (random translation) itself; this PIL version is for its images on disk.
    """
    from torchvision import transforms as T

    if not cfg.augment:
        return eval_transform(cfg)
    s = cfg.image_size
    flip = [T.RandomHorizontalFlip()] if _flip_ok(cfg) else []
    if s >= 64 and cfg.source != "digits":
        geometry = [T.RandomResizedCrop(s)]
    else:
        geometry = [T.Resize((s, s)), T.RandomCrop(s, padding=max(s // 8, 1))]
    return T.Compose([ToRGB(), *geometry, *flip, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
