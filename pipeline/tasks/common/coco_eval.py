"""COCO box and mask mAP, computed by the maintained reference evaluator (``pycocotools.cocoeval``).

Detection AP has many easy-to-get-wrong details (101-point interpolation, crowd regions, the
100-detections cap, classes without ground truth): rather than re-implement them, predictions
and ground truth are accumulated in memory, mapped back to each image's original pixels (where
COCO scores boxes: its area ranges are in original pixels), and handed to ``COCOeval``.

- ``map``: AP averaged over IoU 0.50:0.05:0.95 and the classes that have ground truth
  (area "all", at most 100 detections per image), the COCO headline number.
- ``map_50``: the same at IoU 0.5 only (the VOC-style number).
- With masks (instance segmentation), also ``mask_map`` and ``mask_map_50``: the same from
  ``COCOeval(iouType="segm")`` on RLE-encoded masks of the original image; a ground-truth
  object's area (COCO's area ranges) is then its mask's, as in COCO.

Crowd regions (``iscrowd = 1``) are ignored as in COCO: a detection overlapping one is neither a
true nor a false positive. COCO category ids are the contiguous labels + 1 (COCO treats 0 as
"no match" internally, so ids start at 1).
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
import torch

from pipeline.tasks.common.letterbox import boxes_from_letterbox

log = logging.getLogger(__name__)


def box_pairs(ref_boxes: np.ndarray, ref_labels: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
              iou: float) -> list[tuple[int, int]]:
    """``(reference index, box index)`` of the reference boxes that have a same-label box at IoU ≥
    ``iou`` (greedy, one to one, in reference order): how far two runtimes' detections of one image agree."""
    from torchvision.ops import box_iou

    if len(ref_boxes) == 0 or len(boxes) == 0:
        return []
    overlap = box_iou(torch.as_tensor(np.asarray(ref_boxes, np.float32)), torch.as_tensor(np.asarray(boxes, np.float32)))
    same = torch.as_tensor(np.asarray(ref_labels))[:, None] == torch.as_tensor(np.asarray(labels))[None, :]
    overlap = torch.where(same, overlap, torch.zeros(()))
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    pairs = []
    for i, row in enumerate(overlap):
        row = torch.where(taken, torch.full_like(row, -1.0), row)
        best = int(row.argmax())
        if row[best] >= iou:
            taken[best] = True
            pairs.append((i, best))
    return pairs


def box_matches(ref_boxes: np.ndarray, ref_labels: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                iou: float) -> int:
    """How many reference boxes :func:`box_pairs` pairs with a box."""
    return len(box_pairs(ref_boxes, ref_labels, boxes, labels, iou))


def _xywh(boxes_xyxy: torch.Tensor) -> list[list[float]]:
    b = boxes_xyxy.to(torch.float64)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def _labels(value: Any, n: int, num_classes: int, what: str) -> list[int]:
    labels = torch.as_tensor(value).detach().cpu().reshape(-1).to(torch.int64)
    if labels.numel() != n:
        raise ValueError(f"{what}: {labels.numel()} labels for {n} boxes")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"{what}: label {int(bad)} outside 0..{num_classes - 1}")
    return labels.tolist()


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress to stdout; keep it out of the pipeline's logs and CLI output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue():
        log.debug("pycocotools: %s", buf.getvalue().strip().replace("\n", " | "))


class CocoMAP:
    """Accumulates detections and ground truth over :meth:`update` calls; :meth:`compute` scores them.

    Every target seen becomes one evaluation image (numbered internally, so the same
    ``image_id`` may come twice, e.g. from two data-parallel shards, without colliding).
    With ``masks``, predictions and targets carry masks as RLEs (``rles``, ``crowd_rles``: see
    :meth:`update`), and :meth:`compute` adds the mask mAP.
    """

    def __init__(self, class_names: list[str], *, masks: bool = False):
        if not class_names:
            raise ValueError("class_names must name at least one class")
        self.class_names = list(class_names)
        self.masks = masks
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._images: list[dict[str, Any]] = []
        self._gt: list[dict[str, Any]] = []
        self._dt: list[dict[str, Any]] = []
        self._dt_masks: list[dict[str, Any]] = []  # the same detections with masks: COCO's "segm" results

    def update(self, preds: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
        """Add one batch: ``preds[i]`` (``boxes`` K×4 xyxy, ``scores`` K, ``labels`` K) for ``targets[i]``.

        Both are in the target's letterboxed frame (its ``scale`` / ``pad``; absent: 1 and
        ``(0, 0)``) and are mapped back to the original ``orig_size`` ``(h, w)``, predictions
        clipped to the image. ``crowd_boxes`` (with ``crowd_labels``) in a target are crowd
        regions. Tensors may live on any device. With masks, ``pred["rles"]`` and
        ``target["rles"]`` / ``target["crowd_rles"]`` are the predicted and ground-truth masks as
        COCO compressed RLEs of the original image (``orig_size``), one per box. Raises
        ValueError for mismatched lengths or a label outside the classes.
        """
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        c = len(self.class_names)
        # Checked in full before anything is kept, so a bad batch leaves the metric unchanged.
        images: list[dict[str, Any]] = []
        gts: list[dict[str, Any]] = []
        dts: list[dict[str, Any]] = []
        dt_masks: list[dict[str, Any]] = []
        for pred, target in zip(preds, targets):
            h, w = (int(v) for v in target["orig_size"])
            scale, pad = float(target.get("scale", 1.0)), tuple(target.get("pad", (0, 0)))
            image_id = len(self._images) + len(images) + 1
            images.append({"id": image_id, "width": w, "height": h})

            groups = [(target["boxes"], target["labels"], 0, target.get("rles"))]
            crowd = target.get("crowd_boxes")
            if crowd is not None and torch.as_tensor(crowd).numel():
                if target.get("crowd_labels") is None:
                    raise ValueError("a target with crowd_boxes needs crowd_labels (a crowd region belongs to one class)")
                groups.append((crowd, target["crowd_labels"], 1, target.get("crowd_rles")))
            for boxes, labels, iscrowd, rles in groups:
                b = boxes_from_letterbox(boxes, scale, pad, w, h)  # type: ignore[arg-type]
                if self.masks and (rles is None or len(rles) != len(b)):
                    raise ValueError(f"target: {len(b)} {'crowd ' if iscrowd else ''}boxes need as many RLE masks "
                                     f"({'crowd_rles' if iscrowd else 'rles'}), got {None if rles is None else len(rles)}")
                for k, (box, label) in enumerate(zip(_xywh(b), _labels(labels, len(b), c, "target"))):
                    gt = {"image_id": image_id, "category_id": label + 1, "bbox": box, "area": box[2] * box[3],
                          "iscrowd": iscrowd}
                    if self.masks:
                        from pycocotools import mask as mask_api

                        gt["segmentation"] = dict(rles[k])
                        gt["area"] = float(mask_api.area(gt["segmentation"]))
                    gts.append(gt)

            b = boxes_from_letterbox(pred["boxes"], scale, pad, w, h)  # type: ignore[arg-type]
            scores = torch.as_tensor(pred["scores"]).detach().cpu().reshape(-1).to(torch.float64).tolist()
            if len(scores) != len(b):
                raise ValueError(f"prediction: {len(scores)} scores for {len(b)} boxes")
            labels = _labels(pred["labels"], len(b), c, "prediction")
            for box, score, label in zip(_xywh(b), scores, labels):
                dts.append({"image_id": image_id, "category_id": label + 1, "bbox": box, "score": score})
            if self.masks:
                # Separate result lists: COCO's loadRes reads a result with a bbox as a box only.
                rles = pred.get("rles")
                if rles is None or len(rles) != len(b):
                    raise ValueError(f"prediction: {len(b)} boxes need as many RLE masks (rles), "
                                     f"got {None if rles is None else len(rles)}")
                for rle, score, label in zip(rles, scores, labels):
                    dt_masks.append({"image_id": image_id, "category_id": label + 1, "segmentation": rle, "score": score})
        for g in gts:
            g["id"] = len(self._gt) + 1  # COCOeval reads a ground-truth id of 0 as "unmatched"
            self._gt.append(g)
        self._images += images
        self._dt += dts
        self._dt_masks += dt_masks

    def compute(self) -> dict[str, float]:
        """``{"map", "map_50"}`` in 0..1 over every image seen (with masks, also ``mask_map``,
        ``mask_map_50``).

        No predictions at all gives 0.0 for each. Raises ValueError when there is no (non-crowd)
        ground-truth box: AP is undefined without objects to find.
        """
        if not any(g["iscrowd"] == 0 for g in self._gt):
            raise ValueError(f"no ground-truth boxes in {len(self._images)} image(s): mAP is undefined")
        result = self._score("bbox", self._dt, "map")
        if self.masks:
            result.update(self._score("segm", self._dt_masks, "mask_map"))
        log.debug("coco map over %d images, %d detections: %s", len(self._images), len(self._dt), result)
        return result

    def _score(self, iou_type: str, results: list[dict[str, Any]], name: str) -> dict[str, float]:
        """``{name, name_50}``: COCOeval of ``results`` against the ground truth seen."""
        if not results:
            return {name: 0.0, f"{name}_50": 0.0}
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with _quiet():
            gt = COCO()
            gt.dataset = {
                "images": list(self._images),
                "annotations": [dict(a) for a in self._gt],
                "categories": [{"id": k + 1, "name": n} for k, n in enumerate(self.class_names)],
            }
            gt.createIndex()
            dt = gt.loadRes([dict(d) for d in results])  # loadRes adds keys in place: give it copies
            ev = COCOeval(gt, dt, iouType=iou_type)
            ev.evaluate()
            ev.accumulate()
        # precision: [IoU thresholds, recall points, classes, area ranges, max dets]; -1 marks a
        # class without ground truth, left out of the mean exactly as COCOeval.summarize does.
        area = ev.params.areaRngLbl.index("all")
        most = len(ev.params.maxDets) - 1  # 100 detections per image
        precision = ev.eval["precision"][:, :, :, area, most]
        at_50 = precision[int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))]

        def mean(p: np.ndarray) -> float:
            valid = p[p > -1]
            return float(valid.mean()) if valid.size else 0.0

        return {name: mean(precision), f"{name}_50": mean(at_50)}
