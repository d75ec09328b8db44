"""Instance segmentation post-processing outside the graph: raw outputs → boxes, scores, labels, masks.

Every runtime returns the same raw tensors of an :class:`~pipeline.tasks.instance_segmentation.models.InstRaw`;
what a deployment runs after the network, identically for every runtime:

1. **Boxes**: FCOS's decode + class-wise NMS, :func:`pipeline.tasks.common.box_decode.decode`
   with :data:`POSTPROCESS` (torchvision's defaults: score > 0.05, the best 1,000 candidates per
   level, NMS at IoU 0.5, the best 100 per image). It also says which location each detection
   came from.
2. **Mask coefficients** of the kept detections: ``mask_coeffs[n, location]`` (K values).
3. **Mask assembly** (:func:`paste_masks`): ``sigmoid(coefficients @ protos)`` at the
   prototypes' resolution (S/4), upsampled bilinearly to the input side S, set to 0 outside the
   detection's box, and inside where at least :data:`MASK_THRESHOLD`.
4. **Letterbox inverse** (:func:`pipeline.tasks.common.letterbox.masks_from_letterbox`): the
   image's region of the S×S canvas, resized bilinearly to the original image, thresholded again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tasks.common.box_decode import POSTPROCESS, decode

MASK_THRESHOLD = 0.5
_CHUNK = 32  # masks upsampled at once: bounds the memory of S×S float maps at large S


def decode_instances(outputs: Mapping[str, np.ndarray], anchors: np.ndarray, *, image_size: int,
                     level_sizes: Sequence[int], **postprocess: Any) -> list[dict[str, np.ndarray]]:
    """Detections per image with their masks at the prototypes' resolution.

    ``outputs``: the raw arrays by name (``cls_logits``, ``bbox_regression``, ``bbox_ctrness``,
    ``mask_coeffs``, ``protos``), batch first. Returns per image: ``boxes`` K×4 xyxy (input
    pixels), ``scores`` K (descending), ``labels`` K, ``index`` K (the location) and
    ``proto_masks`` float32 K×S/4×S/4: the mask probabilities before upsampling and cropping
    (:func:`paste_masks` finishes them).
    """
    settings = {**POSTPROCESS, **postprocess}
    coeffs = np.asarray(outputs["mask_coeffs"], dtype=np.float32)
    protos = np.asarray(outputs["protos"], dtype=np.float32)
    if coeffs.ndim != 3 or protos.ndim != 4 or coeffs.shape[0] != protos.shape[0] or coeffs.shape[2] != protos.shape[1]:
        raise ValueError(f"decode_instances: mask_coeffs {coeffs.shape} and protos {protos.shape} do not pair "
                         "(expected N×A×K and N×K×H×W)")
    detections = decode(outputs, anchors, arch_kind="fcos", image_size=image_size, level_sizes=level_sizes, **settings)
    for i, det in enumerate(detections):
        k, h, w = protos[i].shape
        logits = coeffs[i][det["index"]] @ protos[i].reshape(k, h * w)
        det["proto_masks"] = (1.0 / (1.0 + np.exp(-logits))).reshape(-1, h, w).astype(np.float32)
    return detections


def paste_masks(proto_masks: Any, boxes: Any, image_size: int) -> torch.Tensor:
    """Mask probabilities in the S×S input frame: upsampled bilinearly from the prototypes'
    resolution and zero outside each box (pixel centres outside ``x1, y1, x2, y2``). float32 K×S×S."""
    m = torch.as_tensor(np.asarray(proto_masks, dtype=np.float32))
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    if m.shape[0] != b.shape[0]:
        raise ValueError(f"paste_masks: {m.shape[0]} masks for {b.shape[0]} boxes")
    if m.shape[0] == 0:
        return torch.zeros((0, image_size, image_size), dtype=torch.float32)
    up = F.interpolate(m[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
    centres = torch.arange(image_size, dtype=torch.float32) + 0.5
    inside_x = (centres[None, :] >= b[:, 0:1]) & (centres[None, :] <= b[:, 2:3])  # K×S
    inside_y = (centres[None, :] >= b[:, 1:2]) & (centres[None, :] <= b[:, 3:4])
    return up * (inside_y[:, :, None] & inside_x[:, None, :])


def input_masks(det: Mapping[str, Any], image_size: int) -> torch.Tensor:
    """A decoded image's masks as bool K×S×S in the input frame (:func:`paste_masks`, thresholded)."""
    return paste_masks(det["proto_masks"], det["boxes"], image_size) >= MASK_THRESHOLD


def original_rles(det: Mapping[str, Any], target: Mapping[str, Any], image_size: int) -> list[dict[str, Any]]:
    """A decoded image's masks in its original image (the letterbox inverse) as COCO compressed RLEs,
    assembled :data:`_CHUNK` at a time."""
    from pipeline.tasks.common.coco_masks import encode
    from pipeline.tasks.common.letterbox import masks_from_letterbox

    h, w = (int(v) for v in target["orig_size"])
    scale, pad = float(target.get("scale", 1.0)), tuple(target.get("pad", (0, 0)))
    rles: list[dict[str, Any]] = []
    for lo in range(0, len(det["boxes"]), _CHUNK):
        probs = paste_masks(det["proto_masks"][lo : lo + _CHUNK], det["boxes"][lo : lo + _CHUNK], image_size)
        # Thresholded in the input frame first, as the parity check and a deployment see them.
        probs = (probs >= MASK_THRESHOLD).to(torch.float32)
        rles += [encode(m.numpy()) for m in masks_from_letterbox(probs, scale, pad, w, h)]
    return rles


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two bool masks of one shape (1.0 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
