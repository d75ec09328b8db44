"""Tests for pipeline.tasks.common.scenes: seeded digit scenes for segmentation / detection (offline, CPU)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.tasks.common.scenes import IGNORE_INDEX, SceneSpec, Scenes, make_scenes, split_pools

N = 120


@pytest.fixture(scope="module")
def pools() -> tuple[np.ndarray, np.ndarray]:
    return split_pools(seed=0, val_fraction=0.2)


@pytest.fixture(scope="module")
def scenes(pools) -> Scenes:
    return make_scenes(SceneSpec(), N, seed=7, pool=pools[0])


def _same(a: Scenes, b: Scenes) -> bool:
    return (
        torch.equal(a.images, b.images)
        and torch.equal(a.masks, b.masks)
        and torch.equal(a.main_label, b.main_label)
        and all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
        and all(torch.equal(x, y) for x, y in zip(a.labels, b.labels, strict=True))
    )


def _mean_boxes(s: Scenes) -> float:
    return float(np.mean([len(b) for b in s.boxes]))


def test_shapes_and_dtypes(scenes):
    s = SceneSpec().image_size
    assert len(scenes) == N
    assert scenes.images.shape == (N, 1, s, s) and scenes.images.dtype == torch.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.masks.shape == (N, s, s) and scenes.masks.dtype == torch.uint8
    assert scenes.main_label.shape == (N,) and scenes.main_label.dtype == torch.int64
    assert len(scenes.boxes) == len(scenes.labels) == N
    for boxes, labels in zip(scenes.boxes, scenes.labels):
        assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == torch.int64 and len(labels) >= 1
        assert ((labels >= 0) & (labels <= 9)).all()
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert (boxes >= 0).all() and (boxes <= s).all()


def test_deterministic_and_seed_dependent(pools, scenes):
    again = make_scenes(SceneSpec(), N, seed=7, pool=pools[0])
    other = make_scenes(SceneSpec(), N, seed=8, pool=pools[0])
    assert _same(scenes, again)
    assert not torch.equal(scenes.images, other.images)
    assert not torch.equal(scenes.masks, other.masks)


def test_pools_are_disjoint_stratified_and_match_the_digits_split(pools):
    from sklearn.datasets import load_digits

    from pipeline.config import DataConfig
    from pipeline.tasks.classification.data import load_data

    train, val = pools
    y = load_digits().target
    assert train.dtype == val.dtype == np.int64
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(y)
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert set(y[train]) == set(y[val]) == set(range(10))
    assert abs(len(val) / len(y) - 0.2) < 0.01
    # Same digits held out as the classification source with the same seed and fraction.
    bundle = load_data(DataConfig(source="digits", image_size=8, val_fraction=0.2), seed=0)
    assert np.array_equal(bundle.val.indices, val)
    other_train, _ = split_pools(seed=1, val_fraction=0.2)
    assert not np.array_equal(other_train, train)


def test_pool_limits_the_digits_drawn():
    from sklearn.datasets import load_digits

    threes = np.flatnonzero(load_digits().target == 3)[:5]
    sc = make_scenes(SceneSpec(clutter=0), 20, seed=0, pool=threes)
    assert all((labels == 3).all() for labels in sc.labels)
    assert (sc.main_label == 3).all()
    assert set(torch.unique(sc.masks).tolist()) <= {0, 4, IGNORE_INDEX}


def test_mask_values(scenes):
    values = set(torch.unique(scenes.masks).tolist())
    assert values <= set(range(11)) | {IGNORE_INDEX}
    assert {0, IGNORE_INDEX} <= values and len(values - {0, IGNORE_INDEX}) >= 5


def test_boxes_hold_their_digits_pixels(scenes):
    s = SceneSpec().image_size
    for mask, boxes, labels in zip(scenes.masks, scenes.boxes, scenes.labels):
        for c in labels.unique().tolist():
            inside = torch.zeros((s, s), dtype=torch.bool)
            for x1, y1, x2, y2 in boxes[labels == c].long().tolist():
                inside[y1:y2, x1:x2] = True
            pixels = mask == c + 1
            # Every pixel labelled c belongs to a digit of class c, hence to one of their boxes.
            assert pixels.any() and not (pixels & ~inside).any()
        for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
            region = mask[y1:y2, x1:x2]
            assert (region == c + 1).any()
            # Tight: every box edge touches a stroke (its own, or a later digit's drawn over it).
            ink = (region > 0) & (region < IGNORE_INDEX)
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
        # No pixel is labelled with a class that has no box on the canvas.
        present = set(torch.unique(mask).tolist()) - {0, IGNORE_INDEX}
        assert present <= {c + 1 for c in labels.tolist()}


def test_main_label_is_the_class_of_the_largest_box(scenes):
    for boxes, labels, main in zip(scenes.boxes, scenes.labels, scenes.main_label):
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert int(main) == int(labels[int(area.argmax())])
        assert area[labels == main].max() == area.max()


def test_ignore_border(pools):
    base = SceneSpec(clutter=0)
    none = make_scenes(replace(base, ignore_border=0), 60, seed=1, pool=pools[0])
    one = make_scenes(replace(base, ignore_border=1), 60, seed=1, pool=pools[0])
    three = make_scenes(replace(base, ignore_border=3), 60, seed=1, pool=pools[0])
    assert not (none.masks == IGNORE_INDEX).any()
    n1, n3 = int((one.masks == IGNORE_INDEX).sum()), int((three.masks == IGNORE_INDEX).sum())
    assert 0 < n1 < n3
    # The ring only replaces background: digit labels are the same with or without it.
    digits = (none.masks > 0)
    assert torch.equal(one.masks[digits], none.masks[digits])
    assert torch.equal(none.masks[one.masks == 0], one.masks[one.masks == 0])


def test_more_digits_give_more_boxes(pools):
    few = make_scenes(SceneSpec(min_digits=1, max_digits=2), 80, seed=2, pool=pools[0])
    many = make_scenes(SceneSpec(min_digits=4, max_digits=6, max_overlap=0.4), 80, seed=2, pool=pools[0])
    assert all(1 <= len(b) <= 2 for b in few.boxes) and all(len(b) <= 6 for b in many.boxes)
    assert _mean_boxes(many) > _mean_boxes(few) + 2


def test_scale_and_overlap(pools):
    small = make_scenes(SceneSpec(min_scale=0.15, max_scale=0.2), 60, seed=3, pool=pools[0])
    large = make_scenes(SceneSpec(min_scale=0.4, max_scale=0.5), 60, seed=3, pool=pools[0])

    def mean_side(s: Scenes) -> float:
        b = torch.cat(s.boxes)
        return float(torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).mean())

    assert mean_side(large) > 2 * mean_side(small)
    apart = make_scenes(SceneSpec(max_overlap=0.0, min_digits=3, max_digits=4), 60, seed=3, pool=pools[0])
    for b in apart.boxes:
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                w = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
                h = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                assert w <= 0 or h <= 0


def test_contrast_noise_and_clutter(pools):
    quiet = SceneSpec(clutter=0, noise=0.0, ignore_border=0)
    dim = make_scenes(replace(quiet, min_contrast=0.2), 60, seed=4, pool=pools[0])
    bright = make_scenes(replace(quiet, min_contrast=1.0), 60, seed=4, pool=pools[0])
    stroke = lambda s: s.images[:, 0][(s.masks > 0) & (s.masks < IGNORE_INDEX)]  # noqa: E731
    assert stroke(bright).min() >= 0.5 - 1e-6  # full contrast: every stroke pixel has ≥ half ink
    assert stroke(bright).mean() > stroke(dim).mean() + 0.1

    def outside(s: Scenes) -> torch.Tensor:
        """Image pixels outside every digit box."""
        out = torch.ones_like(s.images[:, 0], dtype=torch.bool)
        for i, boxes in enumerate(s.boxes):
            for x1, y1, x2, y2 in boxes.long().tolist():
                out[i, y1:y2, x1:x2] = False
        return s.images[:, 0][out]

    # Without clutter, strong ink (≥ half) only lies on digits; clutter puts strokes elsewhere.
    assert int((outside(bright) >= 0.5).sum()) == 0
    cluttered = make_scenes(replace(quiet, min_contrast=1.0, clutter=6), 60, seed=4, pool=pools[0])
    assert int((outside(cluttered) >= 0.5).sum()) > 100
    noisy = make_scenes(replace(quiet, min_contrast=1.0, noise=0.1), 60, seed=4, pool=pools[0])
    assert float(outside(noisy).mean()) > float(outside(bright).mean()) + 0.02
    # Clutter, noise and contrast change the image only: digits and masks stay the same.
    assert torch.equal(cluttered.masks, bright.masks) and torch.equal(noisy.masks, bright.masks)
    assert torch.equal(dim.masks, bright.masks)


def test_other_sizes_and_bad_arguments(pools):
    sc = make_scenes(SceneSpec(image_size=32, min_scale=0.2), 10, seed=0, pool=pools[1])
    assert sc.images.shape == (10, 1, 32, 32) and sc.masks.shape == (10, 32, 32)
    assert len(make_scenes(SceneSpec(), 0, seed=0, pool=pools[1])) == 0
    with pytest.raises(ValueError, match="min_digits"):
        SceneSpec(min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="max_overlap"):
        SceneSpec(max_overlap=1.5)
    with pytest.raises(ValueError, match="pool"):
        make_scenes(SceneSpec(), 3, seed=0, pool=np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="pool"):
        make_scenes(SceneSpec(), 3, seed=0, pool=np.array([5000]))
