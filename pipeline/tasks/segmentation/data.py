"""Segmentation datasets: embedded digit scenes and a user's image + mask-PNG folders.

Both give items ``(float32 3×S×S normalised image, int64 S×S mask)`` with mask value = class
index and 255 = ignore, and a :class:`~pipeline.data.DataBundle` whose calibration split is
drawn from the training images (evaluation transform), never from val.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from pipeline.schema import DataConfig
from pipeline.data import DataBundle
from pipeline.errors import ConfigError
from pipeline.tasks.common.scenes import scene_spec

log = logging.getLogger(__name__)

SCENE_CLASSES = ["background", *(str(d) for d in range(10))]


class SceneSegmentation(Dataset):
    """In-memory scenes: images (one channel, repeated to RGB and normalised per item) and masks."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, mean, std):
        self.images = images  # N×1×S×S in [0, 1]
        self.masks = masks.long()  # N×S×S
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[i].expand(3, -1, -1) - self.mean) / self.std, self.masks[i]


def _calibration(train: Dataset, size: int, seed: int) -> Subset:
    g = torch.Generator().manual_seed(seed)
    n = len(train)  # type: ignore[arg-type]
    return Subset(train, sorted(torch.randperm(n, generator=g)[: min(size, n)].tolist()))


def load_scenes(cfg: DataConfig, seed: int) -> DataBundle:
    """Seeded train / val scenes from disjoint digit pools (val holds unseen handwriting)."""
    from pipeline.tasks.common.scenes import make_scenes, split_pools

    spec = scene_spec(cfg)
    train_pool, val_pool = split_pools(seed, cfg.val_fraction)
    # Different seeds for the two splits: the same layouts must not repeat across them.
    train = make_scenes(spec, cfg.scenes.train_images, seed=2 * seed, pool=train_pool)
    val = make_scenes(spec, cfg.scenes.val_images, seed=2 * seed + 1, pool=val_pool)
    keep = max(2, int(round(cfg.train_fraction * len(train))))
    train_set = SceneSegmentation(train.images[:keep], train.masks[:keep], cfg.mean, cfg.std)
    val_set = SceneSegmentation(val.images, val.masks, cfg.mean, cfg.std)
    return DataBundle(train=train_set, val=val_set, calibration=_calibration(train_set, cfg.calibration_size, seed),
                      classes=list(SCENE_CLASSES), image_size=cfg.image_size, in_memory=True)


def _mask_root(cfg: DataConfig, base_dir: Path) -> Path:
    root = Path(cfg.root).expanduser()
    root = root if root.is_absolute() else Path(base_dir) / root
    if not root.is_dir():
        raise ConfigError(f"data.root = '{cfg.root}': directory {root} does not exist; point it at a folder with "
                          "train/images, train/masks, val/images and val/masks")
    return root


def check_masks(cfg: DataConfig, base_dir: Path) -> None:
    """Preflight of a mask folder: layout, pairs, sizes and class values (every mask is read)."""
    from pipeline.tasks.segmentation.maskfolder import scan_split

    root = _mask_root(cfg, base_dir)
    for split in ("train", "val"):
        scan_split(root, split, cfg.num_classes)


def load_masks(cfg: DataConfig, seed: int, base_dir: Path) -> DataBundle:
    """A user's `root/{train,val}/{images,masks}` folders; calibration from train, eval transform."""
    from pipeline.tasks.segmentation.maskfolder import MaskFolderDataset, scan_split

    root = _mask_root(cfg, base_dir)
    train_pairs, val_pairs = scan_split(root, "train", cfg.num_classes), scan_split(root, "val", cfg.num_classes)
    if cfg.train_fraction < 1:
        rng = np.random.default_rng(seed)
        keep = max(2, int(round(cfg.train_fraction * len(train_pairs))))
        train_pairs = [train_pairs[i] for i in sorted(rng.permutation(len(train_pairs))[:keep])]
    s, mean, std = cfg.image_size, cfg.mean, cfg.std
    train = MaskFolderDataset(train_pairs, s, mean, std, augment=cfg.augment)
    plain = MaskFolderDataset(train_pairs, s, mean, std, augment=False)  # calibration sees the eval transform
    val = MaskFolderDataset(val_pairs, s, mean, std, augment=False)
    names = list(cfg.class_names) or [str(c) for c in range(cfg.num_classes)]
    return DataBundle(train=train, val=val, calibration=_calibration(plain, cfg.calibration_size, seed),
                      classes=names, image_size=s)
