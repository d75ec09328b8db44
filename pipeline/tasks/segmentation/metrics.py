"""Segmentation metrics from one dataset-level confusion matrix.

mIoU is computed from the confusion matrix accumulated over the whole evaluation set, not as a
mean of per-image IoUs: per-image means over-weight small images and classes absent from an
image. A class that appears neither in the truth nor in the predictions has no IoU and is left
out of the mean (reported as ``None``), the convention of the VOC / Cityscapes evaluations.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, possibly on a GPU
        a = a.detach().cpu().numpy()
    return np.asarray(a)


class ConfusionMatrix:
    """Pixel counts ``matrix[target, pred]`` over every :meth:`update`, and the metrics from them.

    Pixels whose target is ``ignore_index`` are skipped. The matrix is a plain int64 array, so
    data-parallel workers can sum theirs (e.g. an all-reduce) before :meth:`compute`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self.matrix[:] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Count one batch: ``pred`` and ``target`` are integer class maps of the same shape.

        Numpy arrays or torch tensors, any leading dimensions. Raises ValueError on a shape
        mismatch, a non-integer array, or a class index outside ``0..num_classes - 1`` (other
        than ``ignore_index`` in the target): out-of-range values would silently land in
        another class's cell.
        """
        p, t = _as_numpy(pred), _as_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
            raise ValueError(f"pred and target must be integer class maps, got {p.dtype} and {t.dtype}")
        c = self.num_classes
        t = t.reshape(-1).astype(np.int64, copy=False)
        p = p.reshape(-1).astype(np.int64, copy=False)
        keep = t != self.ignore_index
        t, p = t[keep], p[keep]
        for name, a in (("target", t), ("pred", p)):
            if a.size and (a.min() < 0 or a.max() >= c):
                bad = a[(a < 0) | (a >= c)][0]
                raise ValueError(f"{name} has class index {bad}, outside 0..{c - 1} (ignore_index {self.ignore_index})")
        self.matrix += np.bincount(t * c + p, minlength=c * c).reshape(c, c)

    def compute(self) -> dict[str, Any]:
        """``{"miou", "pixel_accuracy", "iou_per_class"}`` from the counts so far, all in 0..1.

        ``IoU_c = TP / (TP + FP + FN)``; a class with ``TP + FP + FN == 0`` gets ``None`` and is
        left out of ``miou``. Pixel accuracy is correct pixels / counted (non-ignored) pixels.
        Raises ValueError when no pixel has been counted.
        """
        m = self.matrix
        total = int(m.sum())
        if total == 0:
            raise ValueError("no pixels counted: call update() with non-ignored pixels before compute()")
        tp = np.diag(m).astype(np.float64)
        union = m.sum(axis=0) + m.sum(axis=1) - tp  # TP + FP + FN
        iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(self.num_classes)]
        present = [v for v in iou if v is not None]
        return {
            "miou": float(np.mean(present)),
            "pixel_accuracy": float(tp.sum() / total),
            "iou_per_class": iou,
        }
