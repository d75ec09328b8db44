"""Tests for pipeline.tasks.common.coco_eval: hand-computable COCO mAP cases, and agreement with pycocotools run
directly on a COCO file in original coordinates."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from pipeline.tasks.common.coco import CocoDetectionDataset, boxes_to_letterbox, load_coco_split
from pipeline.tasks.common.coco_eval import CocoMAP
from tests.test_cocodata import write_coco

# One 100×60 image letterboxed to 50: scale 0.5, pad (0, 10).
SCALE, PAD, ORIG = 0.5, (0, 10), (60, 100)
GT = torch.tensor([[10.0, 10.0, 50.0, 50.0]])  # original pixels, class 0
CROWD = torch.tensor([[60.0, 0.0, 100.0, 60.0]])


def _target(boxes=GT, labels=(0,), crowd=None, crowd_labels=(0,)) -> dict:
    t = {"boxes": boxes_to_letterbox(boxes, SCALE, PAD), "labels": torch.tensor(labels, dtype=torch.int64),
         "image_id": 0, "orig_size": ORIG, "scale": SCALE, "pad": PAD}
    if crowd is not None:
        t["crowd_boxes"] = boxes_to_letterbox(crowd, SCALE, PAD)
        t["crowd_labels"] = torch.tensor(crowd_labels, dtype=torch.int64)
    return t


def _pred(boxes_orig, scores, labels) -> dict:
    """A prediction given in original pixels, handed over in the letterboxed frame like a model's."""
    return {"boxes": boxes_to_letterbox(torch.tensor(boxes_orig, dtype=torch.float32), SCALE, PAD),
            "scores": torch.tensor(scores), "labels": torch.tensor(labels)}


def _score(preds, targets, classes=("a", "b")) -> dict:
    m = CocoMAP(list(classes))
    m.update(preds, targets)
    return m.compute()


def test_perfect_prediction_scores_one():
    # COCOeval divides by tp + fp + eps, so a perfect score is 1 - 2e-16.
    assert _score([_pred([[10, 10, 50, 50]], [0.9], [0])], [_target()]) == pytest.approx({"map": 1.0, "map_50": 1.0})


def test_iou_0_63_counts_at_0_5_0_55_0_6_only():
    # Shifted 9 px on a 40 px box: IoU = 31·40 / (49·40) ≈ 0.633, a match at 3 of the 10 thresholds.
    r = _score([_pred([[19, 10, 59, 50]], [0.9], [0])], [_target()])
    assert r["map_50"] == pytest.approx(1.0)
    assert r["map"] == pytest.approx(0.3)


def test_wrong_label_scores_zero():
    assert _score([_pred([[10, 10, 50, 50]], [0.9], [1])], [_target()]) == {"map": 0.0, "map_50": 0.0}


def test_crowd_region_absorbs_a_detection_without_a_false_positive():
    inside_crowd = [[65, 5, 90, 50], [10, 10, 50, 50]]
    preds = [_pred(inside_crowd, [0.95, 0.9], [0, 0])]
    assert _score(preds, [_target(crowd=CROWD)])["map"] == pytest.approx(1.0)
    # Without the crowd, the higher-scored extra box is a false positive: precision 1/2 at full recall.
    assert _score(preds, [_target()])["map"] == pytest.approx(0.5)
    # A crowd region belongs to its class: a crowd of class 1 does not excuse a class-0 detection.
    assert _score(preds, [_target(crowd=CROWD, crowd_labels=(1,))])["map"] == pytest.approx(0.5)


def test_boxes_are_scored_in_original_pixels():
    # The same prediction, expressed in two letterbox frames of one image, scores the same.
    m = CocoMAP(["a"])
    t2 = {"boxes": boxes_to_letterbox(GT, 0.25, (0, 5)), "labels": torch.tensor([0]), "image_id": 0,
          "orig_size": ORIG, "scale": 0.25, "pad": (0, 5)}
    shifted = torch.tensor([[19.0, 10.0, 59.0, 50.0]])
    m.update([{"boxes": boxes_to_letterbox(shifted, 0.25, (0, 5)), "scores": torch.tensor([0.9]),
               "labels": torch.tensor([0])}], [t2])
    assert m.compute()["map"] == pytest.approx(0.3)
    # A prediction spilling outside the image is clipped to it before scoring (as a box would be).
    spill = [[-20, 10, 52, 50]]  # clipped: [0, 10, 52, 50], IoU 40/52 ≈ 0.77 -> 6 of 10 thresholds
    assert _score([_pred(spill, [0.9], [0])], [_target()], ("a",))["map"] == pytest.approx(0.6)


def test_empty_predictions_score_zero_and_missing_truth_is_an_error():
    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    assert _score([empty], [_target()]) == {"map": 0.0, "map_50": 0.0}
    no_gt = _target(boxes=torch.zeros((0, 4)), labels=(), crowd=CROWD)
    with pytest.raises(ValueError, match="no ground-truth"):
        _score([_pred([[10, 10, 50, 50]], [0.9], [0])], [no_gt])
    with pytest.raises(ValueError, match="no ground-truth"):
        CocoMAP(["a"]).compute()


def test_bad_inputs_are_value_errors():
    m = CocoMAP(["a", "b"])
    with pytest.raises(ValueError, match="label 2"):
        m.update([_pred([[10, 10, 50, 50]], [0.9], [2])], [_target()])
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        m.update([_pred([], [], []), _pred([], [], [])], [_target()])
    with pytest.raises(ValueError, match="crowd_labels"):
        t = _target(crowd=CROWD)
        del t["crowd_labels"]
        m.update([_pred([], [], [])], [t])


def test_matches_pycocotools_on_the_original_file(tmp_path):
    """Detections on a real COCO file: CocoMAP (letterboxed items) = COCOeval on the JSON itself."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images_dir, ann = write_coco(tmp_path)
    split = load_coco_split(images_dir, ann, what="val")
    # Original pixels, original category ids: a near hit, a poor hit, a wrong class, one in the crowd.
    dets = {
        11: [([5, 7, 12, 10], 0.9, 7), ([24, 4, 10, 20], 0.6, 3), ([20, 2, 16, 24], 0.5, 7)],
        12: [([2, 4, 14, 18], 0.8, 3), ([1, 31, 15, 15], 0.95, 7)],
        13: [([3, 3, 10, 10], 0.85, 3)],
    }
    reference = [{"image_id": i, "bbox": b, "score": s, "category_id": c} for i, ds in dets.items() for b, s, c in ds]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(reference), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    expected_map, expected_50 = ev.stats[0], ev.stats[1]
    assert 0 < expected_map < expected_50 < 1  # a case that exercises partial credit

    ds = CocoDetectionDataset(split, 24, (0.5,) * 3, (0.25,) * 3, augment=False)
    metric = CocoMAP(split.class_names)
    label = {cid: k for k, cid in enumerate(split.category_ids)}
    for i in range(len(ds)):
        _, t = ds[i]
        xyxy = torch.tensor([[x, y, x + w, y + h] for (x, y, w, h), _, _ in dets[t["image_id"]]], dtype=torch.float32)
        pred = {"boxes": boxes_to_letterbox(xyxy, t["scale"], t["pad"]),
                "scores": torch.tensor([s for _, s, _ in dets[t["image_id"]]]),
                "labels": torch.tensor([label[c] for _, _, c in dets[t["image_id"]]])}
        metric.update([pred], [t])
    result = metric.compute()
    assert result["map"] == pytest.approx(expected_map, abs=1e-6)
    assert result["map_50"] == pytest.approx(expected_50, abs=1e-6)
