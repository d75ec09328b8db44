"""Classification's data sources: ``digits``, ``imagefolder`` and ``torchvision``.

- ``digits``: scikit-learn's 1,797 handwritten 8×8 digits, shipped inside scikit-learn (no
  download), resized once to ``image_size`` and kept in memory as tensors.
- ``imagefolder``: a user's tree ``root/train/<class>/*`` and ``root/val/<class>/*``.
- ``torchvision``: a ``torchvision.datasets`` class by name (CIFAR10, MNIST, ...).

Images are seen through :mod:`~pipeline.tasks.classification.transforms`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from pipeline.errors import ConfigError
from pipeline.schema import DataConfig
from pipeline.data import (
    DataBundle,
    TransformedDataset,
    calibration_positions,
    labels_of,
    load_rgb,
    resolve_path,
    subset_positions,
)
from pipeline.tasks.classification.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

class DigitsDataset(Dataset):
    """In-memory digits: a view (``indices``) into one shared tensor of resized images.

    Images are stored once as a single channel in [0, 1] (3× less memory than RGB; at 224 px
    the full set would otherwise take over 1 GB) and repeated / normalised per item, which is
    cheap compared with the model step.
    """

    def __init__(
        self,
        images: torch.Tensor,  # (N, 1, S, S) in [0, 1], shared by every split
        labels: torch.Tensor,  # (N,) int64
        indices: np.ndarray,  # positions in `images` that make up this split
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        shift: int = 0,  # max random translation in pixels (0: none)
    ):
        self.images = images
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.shift = shift

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def targets(self) -> list[int]:
        """Labels of this split, in item order."""
        return self.labels[torch.from_numpy(self.indices)].tolist()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        x = self.images[j]  # (1, S, S)
        if self.shift:
            # Random crop of the zero-padded image = a random translation; 0 is the digits'
            # background, so padding before normalising adds no artificial border.
            p = self.shift
            s = x.shape[-1]
            padded = F.pad(x, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = padded[:, top : top + s, left : left + s]
        x = (x.expand(3, -1, -1) - self.mean) / self.std
        return x, int(self.labels[j])


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    s = cfg.image_size
    raw = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    # Resize once for the whole set: per-item resizing would dominate a tiny model's step.
    images = F.interpolate(raw, size=(s, s), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    y = digits.target

    train_idx, val_idx = train_test_split(
        np.arange(len(y)), test_size=cfg.val_fraction, stratify=y, random_state=seed
    )
    train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
    # train_fraction shrinks train only, after the val split, so val is the same for all fractions.
    train_idx = train_idx[subset_positions(y[train_idx], len(train_idx), cfg.train_fraction, seed)]
    calib_idx = train_idx[calibration_positions(len(train_idx), cfg.calibration_size, seed)]

    shift = max(s // 8, 1) if cfg.augment else 0
    train = DigitsDataset(images, labels, train_idx, cfg.mean, cfg.std, shift=shift)
    val = DigitsDataset(images, labels, val_idx, cfg.mean, cfg.std)
    calibration = DigitsDataset(images, labels, calib_idx, cfg.mean, cfg.std)
    classes = [str(c) for c in digits.target_names]
    return DataBundle(train=train, val=val, calibration=calibration, classes=classes, image_size=s, in_memory=True)


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def _has_image(folder: Path) -> bool:
    """True if ``folder`` holds at least one image file (recursively, like ImageFolder); stops early."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for _dirpath, _dirs, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def _check_imagefolder_split(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise ConfigError(
            f"data.root = '{root}': missing {split}/ folder; expected {root}/{split}/<class>/<image files>"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"data.root = '{root}': {split}/ has no class folders; expected {root}/{split}/<class>/<image files>"
        )
    empty = [c for c in classes if not _has_image(folder / c)]
    if empty:
        raise ConfigError(
            f"data.root = '{root}': {split}/ class folders with no images: {', '.join(empty[:5])}"
            f"{' ...' if len(empty) > 5 else ''}; add images (.png, .jpg, ...) or remove the folders"
        )
    return classes


def _check_imagefolder(cfg: DataConfig, base_dir: Path) -> tuple[Path, list[str]]:
    root = resolve_path(cfg.root, base_dir)
    if not root.is_dir():
        raise ConfigError(
            f"data.root = '{cfg.root}': directory {root} does not exist; "
            "point it at a folder with train/<class>/ and val/<class>/ subfolders"
        )
    train_classes = _check_imagefolder_split(root, "train")
    val_classes = _check_imagefolder_split(root, "val")
    if len(train_classes) < 2:
        raise ConfigError(
            f"data.root = '{root}': train/ has {len(train_classes)} class folder ({', '.join(train_classes)}); "
            "classification needs at least 2"
        )
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = []
        if only_train:
            parts.append(f"only in train/: {', '.join(only_train)}")
        if only_val:
            parts.append(f"only in val/: {', '.join(only_val)}")
        raise ConfigError(
            f"data.root = '{root}': train/ and val/ class folders differ ({'; '.join(parts)}); "
            "both need the same class folders"
        )
    return root, train_classes


def _load_imagefolder(cfg: DataConfig, base_dir: Path) -> tuple[Dataset, Dataset, list[str], np.ndarray | None]:
    from torchvision.datasets import ImageFolder

    root, classes = _check_imagefolder(cfg, base_dir)
    train_raw = ImageFolder(str(root / "train"), loader=load_rgb)
    val = ImageFolder(str(root / "val"), transform=eval_transform(cfg), loader=load_rgb)
    return train_raw, val, classes, labels_of(train_raw)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def check_data(cfg: DataConfig, base_dir: Path = Path(".")) -> None:
    """Cheap preflight of ``[data]``: paths, folders, class sets, dataset name; decodes no images.

    Raises :class:`ConfigError` (one line naming the key and what to do) so the runner can stop
    before any stage starts. :func:`load_data` repeats these checks.
    """
    if cfg.source == "imagefolder":
        _check_imagefolder(cfg, Path(base_dir))
    elif cfg.source == "torchvision":
        from pipeline.tasks.classification.torchvision_data import check_torchvision

        check_torchvision(cfg, Path(base_dir))
    # digits ships inside scikit-learn: nothing to check


def load_data(cfg: DataConfig, seed: int, base_dir: Path = Path(".")) -> DataBundle:
    """Build the train / val / calibration splits described by ``cfg``.

    ``seed`` fixes the digits train/val split, the ``train_fraction`` subset and the
    calibration subset. ``cfg.root`` is resolved against ``base_dir`` when relative.
    Raises :class:`ConfigError` for a user mistake (missing folders, unknown dataset, ...).
    """
    base_dir = Path(base_dir)
    if cfg.source == "digits":
        bundle = _load_digits(cfg, seed)
    else:
        if cfg.source == "imagefolder":
            train_raw, val, classes, labels = _load_imagefolder(cfg, base_dir)
        else:
            from pipeline.tasks.classification.torchvision_data import load_torchvision

            train_raw, val, classes, labels = load_torchvision(cfg, base_dir)
        if len(classes) < 2:
            raise ConfigError(f"data: the dataset has {len(classes)} class; classification needs at least 2")
        keep = subset_positions(labels, len(train_raw), cfg.train_fraction, seed)  # type: ignore[arg-type]
        train_src: Dataset = train_raw if len(keep) == len(train_raw) else Subset(train_raw, keep.tolist())  # type: ignore[arg-type]
        # One scan of the training images, two views: augmented for training, eval for calibration.
        train = TransformedDataset(train_src, train_transform(cfg))
        calib_pos = calibration_positions(len(train_src), cfg.calibration_size, seed)  # type: ignore[arg-type]
        calibration = Subset(TransformedDataset(train_src, eval_transform(cfg)), calib_pos.tolist())
        bundle = DataBundle(train=train, val=val, calibration=calibration, classes=classes, image_size=cfg.image_size)
    log.info(
        "data %s: %d classes, train %d, val %d, calibration %d, %d px",
        cfg.source,
        bundle.num_classes,
        len(bundle.train),  # type: ignore[arg-type]
        len(bundle.val),  # type: ignore[arg-type]
        len(bundle.calibration),  # type: ignore[arg-type]
        bundle.image_size,
    )
    return bundle
