"""Detection datasets for the task: embedded digit scenes (boxes) and a user's COCO instances JSON.

Both give items ``(float32 3×S×S normalised image, target dict)`` (see
:class:`pipeline.tasks.common.coco.CocoDetectionDataset`) and a :class:`~pipeline.data.DataBundle`
whose collate keeps targets as a list (box counts differ per image) and whose calibration split
is drawn from the training images seen through the evaluation transform, never from val.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from pipeline.schema import DataConfig
from pipeline.data import DataBundle
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

_COCO_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")


def _path(cfg: DataConfig, key: str, base_dir: Path) -> Path:
    p = Path(getattr(cfg, key)).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def check_data(cfg: DataConfig, base_dir: Path) -> None:
    """Preflight: every annotation checked and every image header read (a DataError naming the file)."""
    if cfg.image_size % 32:
        raise ConfigError(f"data.image_size = {cfg.image_size}: detection needs a multiple of 32 (64, 96, 128, ...)")
    if cfg.source == "coco":
        from pipeline.tasks.common.coco import load_coco_splits

        load_coco_splits(*(_path(cfg, k, base_dir) for k in _COCO_KEYS))
    else:
        from pipeline.tasks.common.scenes import scene_spec

        scene_spec(cfg)


def _subset(dataset, fraction: float, seed: int) -> object:
    """A seeded share of a training set (``[data] train_fraction``), in the original order."""
    if fraction >= 1:
        return dataset
    n = len(dataset)
    keep = max(2, int(round(fraction * n)))
    rng = np.random.default_rng(seed)
    return Subset(dataset, sorted(rng.permutation(n)[:keep].tolist()))


def load_data(cfg: DataConfig, seed: int, base_dir: Path) -> DataBundle:
    """Train / val / calibration splits of the configured detection source."""
    from pipeline.tasks.common.coco import detection_collate

    if cfg.source == "coco":
        from pipeline.tasks.common.coco import coco_datasets, load_coco_splits

        train_split, val_split = load_coco_splits(*(_path(cfg, k, base_dir) for k in _COCO_KEYS))
        train, plain, val, classes = coco_datasets(train_split, val_split, cfg,
                                                   lambda d: _subset(d, cfg.train_fraction, seed))
    else:
        from pipeline.tasks.detection.scenes import SCENE_CLASSES, SceneDetectionDataset
        from pipeline.tasks.common.scenes import make_scenes, split_pools
        from pipeline.tasks.common.scenes import scene_spec

        spec = scene_spec(cfg)
        train_pool, val_pool = split_pools(seed, cfg.val_fraction)
        # Different layout seeds for the splits (and from segmentation's): no layout repeats.
        train_scenes = make_scenes(spec, cfg.scenes.train_images, seed=2 * seed, pool=train_pool)
        val_scenes = make_scenes(spec, cfg.scenes.val_images, seed=2 * seed + 1, pool=val_pool)
        train = _subset(SceneDetectionDataset(train_scenes, cfg.mean, cfg.std), cfg.train_fraction, seed)
        plain, val, classes = train, SceneDetectionDataset(val_scenes, cfg.mean, cfg.std), list(SCENE_CLASSES)
    g = torch.Generator().manual_seed(seed)
    n = len(plain)
    calibration = Subset(plain, sorted(torch.randperm(n, generator=g)[: min(cfg.calibration_size, n)].tolist()))
    bundle = DataBundle(train=train, val=val, calibration=calibration, classes=classes, image_size=cfg.image_size,
                        collate=detection_collate, in_memory=cfg.source != "coco")  # scenes: generated tensors
    boxes = sum(len(val[i][1]["boxes"]) for i in range(len(val))) if cfg.source != "coco" else None
    log.info("data %s (detection): %d classes, train %d, val %d%s, calibration %d, %d px", cfg.source, len(classes),
             len(train), len(val), f" ({boxes} boxes)" if boxes is not None else "", len(calibration), cfg.image_size)
    return bundle
