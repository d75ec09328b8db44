"""Tests for pipeline.tasks.detection.scenes: detection items from the seeded scene generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import pipeline.tasks.detection.scenes as detscenes
from pipeline.tasks.common.coco import detection_collate
from pipeline.tasks.detection.scenes import SCENE_CLASSES, SceneDetectionDataset, scene_detection_splits
from pipeline.tasks.common.scenes import SceneSpec, make_scenes, split_pools

MEAN = (0.2, 0.4, 0.6)
STD = (0.5, 0.25, 0.125)
SPEC = SceneSpec(image_size=32, min_scale=0.2, max_scale=0.4, clutter=1)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(SPEC, 6, seed=0, pool=split_pools(0)[0])


def test_items_match_the_generator(scenes):
    ds = SceneDetectionDataset(scenes, MEAN, STD)
    assert len(ds) == 6 and ds.class_names == SCENE_CLASSES == [str(d) for d in range(10)]
    for i in range(len(ds)):
        x, t = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        raw = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        torch.testing.assert_close(raw, scenes.images[i].expand(3, -1, -1))  # one channel, repeated
        assert torch.equal(t["boxes"], scenes.boxes[i]) and t["boxes"].dtype == torch.float32
        assert torch.equal(t["labels"], scenes.labels[i]) and t["labels"].dtype == torch.int64
        assert len(t["boxes"]) >= 1
        assert t["image_id"] == i and t["orig_size"] == (32, 32) and t["scale"] == 1.0 and t["pad"] == (0, 0)
        assert t["crowd_boxes"].shape == (0, 4) and t["crowd_labels"].shape == (0,)
    # Items are copies: a training loop editing a target must not change the scenes.
    _, t = ds[0]
    t["boxes"] += 1
    assert torch.equal(ds[0][1]["boxes"], scenes.boxes[0])
    images, targets = detection_collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 32, 32) and [tt["image_id"] for tt in targets] == [0, 1]
    with pytest.raises(IndexError):
        ds[6]


def test_splits_use_disjoint_pools_and_calibrate_on_train(monkeypatch):
    calls = []
    real = detscenes.make_scenes

    def spy(spec, n, *, seed, pool):
        calls.append((n, seed, np.asarray(pool).copy()))
        return real(spec, n, seed=seed, pool=pool)

    monkeypatch.setattr(detscenes, "make_scenes", spy)
    train, val, calibration = scene_detection_splits(SPEC, 10, 5, seed=3, calibration_size=4, mean=MEAN, std=STD)
    assert (len(train), len(val), len(calibration)) == (10, 5, 4)
    train_pool, val_pool = split_pools(3, 0.2)
    (n_train, seed_train, pool_train), (n_val, seed_val, pool_val) = calls
    assert (n_train, n_val) == (10, 5) and seed_train != seed_val
    assert np.array_equal(pool_train, train_pool) and np.array_equal(pool_val, val_pool)
    # Calibration is a subset of the train scenes, seen without change, never val.
    assert isinstance(calibration, Subset) and calibration.dataset is train
    assert len(set(calibration.indices)) == 4 and all(0 <= k < 10 for k in calibration.indices)
    for j, k in enumerate(calibration.indices):
        x, t = calibration[j]
        assert torch.equal(x, train[k][0]) and torch.equal(t["boxes"], train[k][1]["boxes"])
    assert not torch.equal(train.scenes.images[:5], val.scenes.images)


def test_splits_are_deterministic_and_calibration_is_capped():
    a = scene_detection_splits(SPEC, 6, 3, seed=1, calibration_size=50)
    b = scene_detection_splits(SPEC, 6, 3, seed=1, calibration_size=50)
    assert torch.equal(a[0].scenes.images, b[0].scenes.images) and torch.equal(a[1].scenes.images, b[1].scenes.images)
    assert sorted(a[2].indices) == list(range(6))  # all train scenes when fewer than asked
    other = scene_detection_splits(SPEC, 6, 3, seed=2, calibration_size=2)
    assert not torch.equal(other[0].scenes.images, a[0].scenes.images)
    with pytest.raises(ValueError):
        scene_detection_splits(SPEC, 0, 3, seed=1, calibration_size=2)
