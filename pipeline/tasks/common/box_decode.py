"""Detection postprocessing outside the graph: raw head outputs → boxes, scores, labels.

Every runtime (torch, ONNX Runtime, OpenVINO, TensorRT) returns the same raw tensors of a
:class:`pipeline.tasks.common.detectors.DetRaw`; :func:`decode` turns them into detections the way
torchvision's ``RetinaNet`` / ``FCOS`` / ``SSD`` ``postprocess_detections`` do, with torch ops on
CPU tensors (data-dependent TopK/NMS stay out of the exported graph, where exporters and
runtimes handle them badly). :func:`torchvision_detector` rebuilds the torchvision detector
around a ``DetRaw``'s modules: the reference for :func:`decode`, and the source of torchvision's
training losses (``compute_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "retinanet": ("cls_logits", "bbox_regression"),
    "fcos": ("cls_logits", "bbox_regression", "bbox_ctrness"),
    "ssd": ("cls_logits", "bbox_regression"),
}
# The post-processing every runtime's raw outputs go through (torchvision's detector defaults).
POSTPROCESS = {"score_thresh": 0.05, "nms_iou": 0.5, "topk_candidates": 1000, "max_detections": 100}
_BOX_CODER_WEIGHTS = {"retinanet": (1.0, 1.0, 1.0, 1.0), "ssd": (10.0, 10.0, 5.0, 5.0)}  # torchvision's


def decode(
    outputs: Mapping[str, np.ndarray],
    anchors: np.ndarray,
    *,
    arch_kind: str,
    image_size: int,
    level_sizes: Sequence[int] | None = None,
    score_thresh: float = 0.05,
    nms_iou: float = 0.5,
    topk_candidates: int = 1000,
    max_detections: int = 100,
) -> list[dict[str, np.ndarray]]:
    """Detections per image from a :class:`~pipeline.tasks.common.detectors.DetRaw`'s raw outputs.

    ``outputs``: the raw arrays by output name (``OUTPUT_NAMES[arch_kind]``), batch first.
    ``anchors``: A×4 xyxy (``DetRaw.anchors``). ``level_sizes``: anchors per pyramid level
    (``DetRaw.level_sizes``), required for ``retinanet``/``fcos``, whose top-k candidates are
    taken per level as torchvision does; SSD takes them per class over all anchors.

    Scores: sigmoid (RetinaNet), sqrt(sigmoid(cls)·sigmoid(ctrness)) (FCOS), softmax without the
    background column (SSD); candidates above ``score_thresh``, the best ``topk_candidates``,
    boxes decoded with torchvision's coder and weights, clipped to the image, class-wise NMS at
    ``nms_iou``, the best ``max_detections`` kept. Returns one dict per image: ``boxes`` K×4 xyxy
    float32 (pixels of the ``image_size`` input), ``scores`` K float32 (descending), ``labels`` K
    int64 in 0..C-1 (SSD's background column removed), ``index`` K int64: the anchor (row of the
    raw outputs) each detection came from, where per-anchor outputs such as mask coefficients are.
    """
    import torch
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    if arch_kind not in OUTPUT_NAMES:
        raise ValueError(f"arch_kind {arch_kind!r}: expected one of {', '.join(OUTPUT_NAMES)}")
    missing = [n for n in OUTPUT_NAMES[arch_kind] if n not in outputs]
    if missing:
        raise ValueError(f"decode({arch_kind}): outputs lack {', '.join(missing)} (got {', '.join(outputs)})")
    # Copies: runtime outputs and DetRaw.anchors may be read-only, which torch tensors do not support.
    raw = {n: torch.from_numpy(np.array(outputs[n], dtype=np.float32)) for n in OUTPUT_NAMES[arch_kind]}
    all_anchors = torch.from_numpy(np.array(anchors, dtype=np.float32))
    num_anchors = all_anchors.shape[0]
    for name, t in raw.items():
        if t.dim() != 3 or t.shape[1] != num_anchors or t.shape[0] != raw["cls_logits"].shape[0]:
            raise ValueError(f"decode({arch_kind}): {name} has shape {tuple(t.shape)}, expected N×{num_anchors}×K")
    if arch_kind != "ssd":
        if level_sizes is None or sum(level_sizes) != num_anchors:
            raise ValueError(f"decode({arch_kind}): level_sizes {level_sizes} must sum to the {num_anchors} anchors")
    image_shape = (int(image_size), int(image_size))
    if arch_kind == "fcos":
        coder: Any = det_utils.BoxLinearCoder(normalize_by_size=True)
    else:
        coder = det_utils.BoxCoder(weights=_BOX_CODER_WEIGHTS[arch_kind])

    detections = []
    with torch.no_grad():
        for i in range(raw["cls_logits"].shape[0]):
            per_image = {n: t[i] for n, t in raw.items()}
            if arch_kind == "ssd":
                boxes, scores, labels, index = _ssd_candidates(per_image, all_anchors, coder, image_shape,
                                                               score_thresh, topk_candidates)
            else:
                boxes, scores, labels, index = _level_candidates(per_image, all_anchors, list(level_sizes), coder,
                                                                 image_shape, arch_kind, score_thresh, topk_candidates)
            keep = box_ops.batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
            if arch_kind == "ssd":
                labels = labels - 1  # torchvision's SSD labels count the background as class 0
            detections.append({
                "boxes": boxes[keep].numpy().astype(np.float32),
                "scores": scores[keep].numpy().astype(np.float32),
                "labels": labels[keep].numpy().astype(np.int64),
                "index": index[keep].numpy().astype(np.int64),
            })
    return detections


def _level_candidates(raw, anchors, level_sizes, coder, image_shape, kind, score_thresh, topk):
    """RetinaNet / FCOS ``postprocess_detections`` for one image, level by level (same ops)."""
    import torch
    from torchvision.ops import boxes as box_ops

    split = {n: t.split(level_sizes) for n, t in raw.items()}
    boxes_all, scores_all, labels_all, index_all = [], [], [], []
    offset = 0
    for level, anchors_per_level in enumerate(anchors.split(level_sizes)):
        logits = split["cls_logits"][level]
        num_classes = logits.shape[-1]
        if kind == "fcos":
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(split["bbox_ctrness"][level])).flatten()
        else:
            scores = torch.sigmoid(logits).flatten()
        keep = scores > score_thresh
        scores = scores[keep]
        idxs = torch.where(keep)[0]
        scores, order = scores.topk(min(topk, idxs.numel()))
        idxs = idxs[order]
        anchor_idxs = torch.div(idxs, num_classes, rounding_mode="floor")
        regression = split["bbox_regression"][level][anchor_idxs]
        if kind == "fcos":
            boxes = coder.decode(regression, anchors_per_level[anchor_idxs])
        else:
            boxes = coder.decode_single(regression, anchors_per_level[anchor_idxs])
        boxes_all.append(box_ops.clip_boxes_to_image(boxes, image_shape))
        scores_all.append(scores)
        labels_all.append(idxs % num_classes)
        index_all.append(anchor_idxs + offset)
        offset += len(anchors_per_level)
    return torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all), torch.cat(index_all)


def _ssd_candidates(raw, anchors, coder, image_shape, score_thresh, topk):
    """SSD ``postprocess_detections`` for one image: softmax, then top-k per foreground class."""
    import torch
    import torch.nn.functional as F
    from torchvision.ops import boxes as box_ops

    all_scores = F.softmax(raw["cls_logits"], dim=-1)
    all_boxes = box_ops.clip_boxes_to_image(coder.decode_single(raw["bbox_regression"], anchors), image_shape)
    boxes_all, scores_all, labels_all, index_all = [], [], [], []
    for label in range(1, all_scores.shape[-1]):
        score = all_scores[:, label]
        keep = torch.where(score > score_thresh)[0]
        score, box = score[keep], all_boxes[keep]
        score, idxs = score.topk(min(topk, score.numel()))
        boxes_all.append(box[idxs])
        scores_all.append(score)
        labels_all.append(torch.full_like(score, fill_value=label, dtype=torch.int64))
        index_all.append(keep[idxs])
    return torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all), torch.cat(index_all)


def torchvision_detector(
    model: Any,
    *,
    score_thresh: float = 0.05,
    nms_iou: float = 0.5,
    topk_candidates: int = 1000,
    max_detections: int = 100,
) -> Any:
    """The torchvision ``RetinaNet`` / ``FCOS`` / ``SSD`` sharing a ``DetRaw``'s backbone, head and
    anchors, with a transform that neither resizes, pads nor normalises (``min_size = max_size
    = S``, mean 0, std 1): fed the same normalised S×S images, its eval-mode detections are what
    :func:`decode` reproduces, and its ``compute_loss`` gives torchvision's training losses.
    Modules are shared, not copied: training one trains the other.
    """
    from torchvision.models import detection as det

    s = model.image_size
    common: dict[str, Any] = dict(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], score_thresh=score_thresh,
                                  nms_thresh=nms_iou, detections_per_img=max_detections,
                                  topk_candidates=topk_candidates)
    if model.arch_kind == "ssd":
        return det.ssd.SSD(model.backbone, model.anchor_generator, (s, s), model.num_classes + 1, head=model.head,
                           **common)
    cls = det.RetinaNet if model.arch_kind == "retinanet" else det.FCOS
    return cls(model.backbone, model.num_classes, min_size=s, max_size=s, size_divisible=1,
               anchor_generator=model.anchor_generator, head=model.head, **common)
