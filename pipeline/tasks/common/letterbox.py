"""Letterboxing: fit an image into an ``S×S`` square with its aspect ratio kept, and map boxes.

The image is resized bilinearly so its longer side is ``S`` and centred on a grey canvas
(:data:`PAD_VALUE` = 0.5 in [0, 1]: close to the usual normalisation mean, so the padding
normalises to about zero and adds no strong artificial edge). A point ``p`` of the original maps
to ``p * scale + pad``; :func:`boxes_from_letterbox` inverts it (for evaluation in the original
image's coordinates, as COCO scores them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

PAD_VALUE = 0.5  # letterbox canvas grey, in [0, 1] before normalisation


def letterbox(image: Any, size: int) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """``(float32 3×S×S in [0, 1], scale, (left, top))``: ``image`` resized to fit ``S×S``.

    The aspect ratio is kept (the longer side becomes ``S``; the shorter is rounded to whole
    pixels, at most half a pixel off ``scale``), resized bilinearly and centred on a canvas of
    grey :data:`PAD_VALUE`. A point ``p`` of the original maps to ``p * scale + pad``.
    """
    from PIL import Image

    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    left, top = (size - nw) // 2, (size - nh) // 2
    resized = image.convert("RGB").resize((nw, nh), Image.Resampling.BILINEAR)
    canvas = torch.full((3, size, size), PAD_VALUE, dtype=torch.float32)
    pixels = torch.from_numpy(np.array(resized, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
    canvas[:, top : top + nh, left : left + nw] = pixels
    return canvas, scale, (left, top)


def _resized(frame: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) of a ``frame = (w, h)`` image inside the letterbox, as :func:`letterbox` rounds it."""
    w, h = frame
    return max(1, round(w * scale)), max(1, round(h * scale))


def masks_to_letterbox(masks: np.ndarray, scale: float, pad: tuple[int, int], size: int) -> torch.Tensor:
    """Original-image masks (K×h×w, nonzero inside) in the letterboxed frame: uint8 K×S×S.

    Resized as :func:`letterbox` resizes the image (bilinear, then a pixel is inside where at
    least half of it is), placed at ``pad``; the padding is outside every mask.
    """
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(masks)).to(torch.float32)
    k, h, w = m.shape
    out = torch.zeros((k, size, size), dtype=torch.uint8)
    if k == 0:
        return out
    nw, nh = _resized((w, h), scale)
    resized = F.interpolate(m[:, None], size=(nh, nw), mode="bilinear", align_corners=False)[:, 0] >= 0.5
    out[:, pad[1] : pad[1] + nh, pad[0] : pad[0] + nw] = resized.to(torch.uint8)
    return out


def masks_from_letterbox(masks: torch.Tensor, scale: float, pad: tuple[int, int], orig_w: int, orig_h: int) -> torch.Tensor:
    """Letterboxed mask probabilities (K×S×S, 0..1) back to the original image: bool K×h×w.

    The image's region of the canvas is cut out (the padding dropped) and resized bilinearly to
    ``orig_h × orig_w``; a pixel is inside where the probability is at least 0.5.
    """
    import torch.nn.functional as F

    m = torch.as_tensor(masks).to(torch.float32)
    if m.shape[0] == 0:
        return torch.zeros((0, orig_h, orig_w), dtype=torch.bool)
    nw, nh = _resized((orig_w, orig_h), scale)
    region = m[:, pad[1] : pad[1] + nh, pad[0] : pad[0] + nw]
    if region.shape[-2:] != (orig_h, orig_w):
        region = F.interpolate(region[:, None], size=(orig_h, orig_w), mode="bilinear", align_corners=False)[:, 0]
    return region >= 0.5


def _as_boxes(boxes: Any) -> torch.Tensor:
    # float64 so a round trip through the letterbox frame gives the original numbers back.
    t = torch.as_tensor(boxes).detach().cpu().to(torch.float64)
    return t.reshape(-1, 4)


def boxes_to_letterbox(boxes_xyxy: Any, scale: float, pad: tuple[int, int]) -> torch.Tensor:
    """Original-image ``x1, y1, x2, y2`` boxes (K×4) to the letterboxed frame, float32."""
    b = _as_boxes(boxes_xyxy)
    offset = torch.tensor([pad[0], pad[1], pad[0], pad[1]], dtype=torch.float64)
    return (b * scale + offset).to(torch.float32)


def boxes_from_letterbox(boxes_xyxy: Any, scale: float, pad: tuple[int, int], orig_w: int, orig_h: int) -> torch.Tensor:
    """Letterboxed ``x1, y1, x2, y2`` boxes (K×4) back to the original image, clipped to it, float32."""
    b = _as_boxes(boxes_xyxy)
    offset = torch.tensor([pad[0], pad[1], pad[0], pad[1]], dtype=torch.float64)
    b = (b - offset) / scale
    limit = torch.tensor([orig_w, orig_h, orig_w, orig_h], dtype=torch.float64)
    return b.clamp(min=torch.zeros(4, dtype=torch.float64), max=limit).to(torch.float32)


class LetterboxTransform:
    """PIL image → letterboxed, normalised ``3×S×S`` tensor, as the COCO readers make their
    images (a class, not a closure: DataLoader workers pickle it)."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Any) -> torch.Tensor:
        x, _, _ = letterbox(image, self.size)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
