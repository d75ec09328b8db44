"""Tests for pipeline.tasks.segmentation.metrics: mIoU from a dataset-level confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tasks.segmentation.metrics import ConfusionMatrix


def test_hand_computed_example():
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    out = cm.compute()
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert out["iou_per_class"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 6)


def test_perfect_prediction_and_torch_input():
    target = torch.tensor([[[0, 1], [2, 3]]])  # leading batch dim
    cm = ConfusionMatrix(4)
    cm.update(target.clone(), target)
    assert cm.compute() == {"miou": 1.0, "pixel_accuracy": 1.0, "iou_per_class": [1.0, 1.0, 1.0, 1.0]}


def test_ignore_index_is_skipped():
    target = np.array([0, 1, 255, 255, 1])
    pred = np.array([0, 1, 1, 0, 0])  # the two wrong-looking ignore pixels do not count
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    out = cm.compute()
    assert cm.matrix.sum() == 3
    assert out["pixel_accuracy"] == pytest.approx(2 / 3)
    assert out["iou_per_class"] == pytest.approx([1 / 2, 1 / 2])

    other = ConfusionMatrix(2, ignore_index=1)
    other.update(pred, np.array([0, 1, 0, 0, 1]))
    assert other.matrix.sum() == 3 and other.compute()["pixel_accuracy"] == pytest.approx(2 / 3)


def test_class_absent_from_both_is_excluded():
    target = np.array([0, 0, 2, 2])
    pred = np.array([0, 2, 2, 2])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    out = cm.compute()
    assert out["iou_per_class"][1] is None and out["iou_per_class"][3] is None
    assert out["iou_per_class"][0] == pytest.approx(1 / 2) and out["iou_per_class"][2] == pytest.approx(2 / 3)
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_only_predicted_or_only_true_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1, 1]), np.array([0, 0, 2]))  # 1 only predicted, 2 only true
    out = cm.compute()
    assert out["iou_per_class"] == pytest.approx([1 / 2, 0.0, 0.0])
    assert out["miou"] == pytest.approx(1 / 6)


def test_errors_and_reset():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shapes differ"):
        cm.update(np.zeros((2, 3), dtype=np.int64), np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="no pixels counted"):
        cm.compute()
    cm.update(np.array([1]), np.array([255]))  # all ignored: still nothing counted
    with pytest.raises(ValueError, match="no pixels counted"):
        cm.compute()
    with pytest.raises(ValueError, match="pred has class index 3"):
        cm.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="target has class index 7"):
        cm.update(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([0.0]), np.array([0]))
    cm.update(np.array([1]), np.array([1]))
    cm.reset()
    assert cm.matrix.sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_over_batches(seed):
    from sklearn.metrics import confusion_matrix, jaccard_score

    c = 6
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(5):
        shape = (int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9)))
        target = rng.integers(0, c - 1, size=shape)  # class 5 is never true ...
        pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, c - 2, size=shape))  # ... nor predicted
        target = np.where(rng.random(shape) < 0.1, 255, target)
        batches.append((pred.astype(np.int64), target.astype(np.uint8)))

    cm = ConfusionMatrix(c)
    for i, (pred, target) in enumerate(batches):
        # Mix input types: torch tensors for some batches, numpy for the others.
        cm.update(torch.from_numpy(pred) if i % 2 else pred, torch.from_numpy(target) if i % 2 else target)
    out = cm.compute()

    p = np.concatenate([b[0].ravel() for b in batches])
    t = np.concatenate([b[1].ravel() for b in batches]).astype(np.int64)
    keep = t != 255
    p, t = p[keep], t[keep]
    # All at once through an independent implementation.
    sk = confusion_matrix(t, p, labels=list(range(c)))
    assert np.array_equal(cm.matrix, sk)
    present = sorted(set(t) | set(p))
    assert c - 1 not in present
    jac = jaccard_score(t, p, labels=present, average=None)
    expected = [None] * c
    for k, v in zip(present, jac):
        expected[k] = float(v)
    assert out["iou_per_class"][c - 1] is None
    assert out["iou_per_class"] == pytest.approx(expected)
    assert out["miou"] == pytest.approx(float(np.mean(jac)))
    assert out["pixel_accuracy"] == pytest.approx(float(np.mean(t == p)))
    assert 0 <= out["miou"] <= 1 and 0 <= out["pixel_accuracy"] <= 1
