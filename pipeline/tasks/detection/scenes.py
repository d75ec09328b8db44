"""Detection on the embedded scene generator (:mod:`pipeline.tasks.common.scenes`): no download, no user data.

Items have the same form as :class:`pipeline.tasks.common.coco.CocoDetectionDataset`'s, so one model,
loss and evaluator serve both sources. A scene is already square at the model's size, so its
letterbox is the identity (``scale`` 1, ``pad`` ``(0, 0)``) and ``orig_size`` is ``(S, S)``.
There is no flip augmentation: a mirrored digit is another symbol (or none), so a flip would
teach wrong labels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from pipeline.tasks.common.scenes import SceneSpec, Scenes, make_scenes, split_pools

log = logging.getLogger(__name__)

SCENE_CLASSES = [str(d) for d in range(10)]  # contiguous label d is digit d
VAL_FRACTION = 0.2  # of the digits held out for val: the classification `digits` split
_VAL_SEED_OFFSET = 1_000_003  # val scenes use a different layout stream from train's


class SceneDetectionDataset(Dataset):
    """Items ``(float32 3×S×S normalised image, target)`` from rendered :class:`Scenes`.

    ``target``: ``boxes`` float32 K×4 ``x1, y1, x2, y2`` (pixel edges), ``labels`` int64 K
    (digit classes 0..9), empty ``crowd_boxes`` / ``crowd_labels``, ``image_id`` (the index),
    ``orig_size`` ``(S, S)``, ``scale`` 1.0 and ``pad`` ``(0, 0)``. The single channel is
    repeated to three and normalised per item (3× less memory than storing RGB).
    """

    def __init__(self, scenes: Scenes, mean: tuple[float, float, float], std: tuple[float, float, float]):
        self.scenes = scenes
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.class_names = list(SCENE_CLASSES)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} scenes")
        x = self.scenes.images[i]  # (1, S, S)
        s = int(x.shape[-1])
        target = {
            "boxes": self.scenes.boxes[i].to(torch.float32).clone(),
            "labels": self.scenes.labels[i].to(torch.int64).clone(),
            "crowd_boxes": torch.zeros((0, 4), dtype=torch.float32),
            "crowd_labels": torch.zeros((0,), dtype=torch.int64),
            "image_id": i,
            "orig_size": (s, s),
            "scale": 1.0,
            "pad": (0, 0),
        }
        return (x.expand(3, -1, -1) - self.mean) / self.std, target


def _calibration_positions(n_train: int, size: int, seed: int) -> np.ndarray:
    """Seeded sorted positions into the training split (the rule :mod:`pipeline.data` uses)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return np.sort(torch.randperm(n_train, generator=g)[: min(size, n_train)].numpy())


def scene_detection_splits(
    spec: SceneSpec,
    train_images: int,
    val_images: int,
    seed: int,
    calibration_size: int,
    *,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.5, 0.5, 0.5),
) -> tuple[SceneDetectionDataset, SceneDetectionDataset, Dataset]:
    """``(train, val, calibration)`` detection datasets rendered from ``spec``.

    Train and val scenes draw digits from the disjoint pools of :func:`split_pools` (val holds
    handwriting never seen in training) and use different layout seeds. Calibration is a seeded
    subset of ``calibration_size`` *train* scenes (all of them when fewer), never val. The same
    arguments give identical splits. Raises ValueError for a negative count.
    """
    if train_images < 1 or val_images < 1 or calibration_size < 0:
        raise ValueError(f"need train_images ≥ 1, val_images ≥ 1 and calibration_size ≥ 0, "
                         f"got {train_images}, {val_images}, {calibration_size}")
    train_pool, val_pool = split_pools(seed, VAL_FRACTION)
    train = SceneDetectionDataset(make_scenes(spec, train_images, seed=seed, pool=train_pool), mean, std)
    val = SceneDetectionDataset(make_scenes(spec, val_images, seed=seed + _VAL_SEED_OFFSET, pool=val_pool), mean, std)
    calibration = Subset(train, _calibration_positions(train_images, calibration_size, seed).tolist())
    log.info("scene detection: train %d, val %d, calibration %d scenes of %d px",
             len(train), len(val), len(calibration), spec.image_size)
    return train, val, calibration
