"""Instance segmentation datasets: embedded digit scenes and a user's COCO instances JSON with masks.

Both give items ``(float32 3×S×S normalised image, target)`` with ``boxes``, ``labels``,
``masks`` (uint8 K×S×S, letterboxed: what training reads), ``rles`` / ``crowd_rles`` (the masks
of the original image as COCO RLEs: what evaluation scores against), crowd regions, and the
letterbox (``orig_size``, ``scale``, ``pad``); the bundle's calibration split is drawn from the
training images seen through the evaluation transform, never from val.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Subset

from pipeline.data import DataBundle, calibration_positions, resolve_path, subset_positions
from pipeline.errors import ConfigError
from pipeline.schema import DataConfig

log = logging.getLogger(__name__)

COCO_KEYS = ("train_images", "train_annotations", "val_images", "val_annotations")


def _coco_paths(cfg: DataConfig, base_dir: Path) -> list[Path]:
    return [resolve_path(getattr(cfg, k), base_dir) for k in COCO_KEYS]


def check_data(cfg: DataConfig, base_dir: Path) -> None:
    """Preflight: every annotation (box and mask) checked and every image header read (a DataError
    naming the file and the annotation id)."""
    if cfg.image_size % 32:
        raise ConfigError(f"data.image_size = {cfg.image_size}: instance segmentation needs a multiple of 32 "
                          "(64, 96, 128, ...)")
    if cfg.source == "coco":
        from pipeline.tasks.common.coco import load_coco_splits

        load_coco_splits(*_coco_paths(cfg, base_dir), masks=True)
    else:
        from pipeline.tasks.common.scenes import scene_spec

        scene_spec(cfg)


def _share(dataset, fraction: float, seed: int):
    """A seeded share of a training set (``[data] train_fraction``), in the original order."""
    if fraction >= 1:
        return dataset
    return Subset(dataset, subset_positions(None, len(dataset), fraction, seed).tolist())


def load_data(cfg: DataConfig, seed: int, base_dir: Path) -> DataBundle:
    """Train / val / calibration splits of the configured source."""
    from pipeline.tasks.common.coco import detection_collate

    if cfg.source == "coco":
        from pipeline.tasks.common.coco import coco_datasets, load_coco_splits

        train_split, val_split = load_coco_splits(*_coco_paths(cfg, base_dir), masks=True)
        train, plain, val, classes = coco_datasets(train_split, val_split, cfg,
                                                   lambda d: _share(d, cfg.train_fraction, seed))
    else:
        from pipeline.tasks.common.scenes import make_scenes, scene_spec, split_pools
        from pipeline.tasks.instance_segmentation.scenes import SCENE_CLASSES, SceneInstanceDataset

        spec = scene_spec(cfg)
        train_pool, val_pool = split_pools(seed, cfg.val_fraction)
        # The layout seeds of detection's scenes: the same digits, boxes and images, plus masks.
        train_scenes = make_scenes(spec, cfg.scenes.train_images, seed=2 * seed, pool=train_pool, instances=True)
        val_scenes = make_scenes(spec, cfg.scenes.val_images, seed=2 * seed + 1, pool=val_pool, instances=True)
        train = _share(SceneInstanceDataset(train_scenes, cfg.mean, cfg.std), cfg.train_fraction, seed)
        plain, val, classes = train, SceneInstanceDataset(val_scenes, cfg.mean, cfg.std), list(SCENE_CLASSES)
    n = len(plain)
    calibration = Subset(plain, calibration_positions(n, cfg.calibration_size, seed).tolist())
    bundle = DataBundle(train=train, val=val, calibration=calibration, classes=classes, image_size=cfg.image_size,
                        collate=detection_collate, in_memory=cfg.source != "coco")  # scenes: generated tensors
    log.info("data %s (instance segmentation): %d classes, train %d, val %d, calibration %d, %d px", cfg.source,
             len(classes), len(train), len(val), len(calibration), cfg.image_size)
    return bundle
