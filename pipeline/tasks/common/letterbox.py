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
