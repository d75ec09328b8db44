"""COCO instance masks: an annotation's ``segmentation`` checked and decoded with pycocotools'
mask API, and predicted masks encoded back to RLE for ``COCOeval(iouType="segm")``.

A ``segmentation`` is one of what COCO files hold:

- polygons: a list of ``[x1, y1, x2, y2, ...]`` lists in pixels, each of at least 3 points
  (parts of one object: merged into one mask);
- an uncompressed RLE: ``{"size": [h, w], "counts": [int, ...]}`` (crowd regions);
- a compressed RLE: ``{"size": [h, w], "counts": "<string>"}``.

An RLE's ``size`` must be its image's ``[height, width]``. Anything else is a :class:`DataError`
naming the annotation file and the annotation id.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataError


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _string_counts(text: str) -> list[int] | None:
    """The run lengths of COCO's compressed RLE string (each run in 5-bit groups, offset by
    48, the sign in the last group's 0x10 bit, runs after the second stored as the difference
    to the one two before: pycocotools' rleFrString), or None if the string is malformed."""
    runs: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                return None
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def segmentation_rle(segmentation: Any, height: int, width: int, *, path: Path, aid: Any) -> dict[str, Any]:
    """The annotation's ``segmentation`` as one compressed RLE (``counts`` bytes) of its
    ``height × width`` image, checked (see the module docstring)."""
    from pycocotools import mask as mask_api

    where = f"{path}: annotation id {aid}"
    if segmentation is None:
        raise DataError(f"{where} has no 'segmentation'; instance masks need polygons or an RLE")
    if isinstance(segmentation, list):
        if not segmentation:
            raise DataError(f"{where}: 'segmentation' is an empty list; give at least one polygon")
        for k, poly in enumerate(segmentation):
            if not _numbers(poly) or len(poly) % 2:
                raise DataError(f"{where}: polygon {k} must be a flat list of x, y pixel coordinates (finite numbers)")
            if len(poly) < 6:
                raise DataError(f"{where}: polygon {k} has {len(poly) // 2} point(s); a polygon needs at least 3")
        return mask_api.merge(mask_api.frPyObjects([[float(v) for v in p] for p in segmentation], height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise DataError(f"{where}: 'segmentation' must be a list of polygons or an RLE {{'size': [h, w], 'counts': ...}}")
    size = segmentation["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in size)):
        raise DataError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
    if size != [height, width]:
        raise DataError(f"{where}: RLE size {size} is not its image's [height, width] = [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise DataError(f"{where}: uncompressed RLE 'counts' must be non-negative integers")
        if sum(counts) != height * width:
            raise DataError(f"{where}: RLE counts cover {sum(counts)} pixels, its image {height}×{width} = "
                            f"{height * width}")
        return mask_api.frPyObjects({"size": size, "counts": counts}, height, width)
    if isinstance(counts, str):
        runs = _string_counts(counts)
        if runs is None or any(c < 0 for c in runs) or sum(runs) != height * width:
            raise DataError(f"{where}: compressed RLE 'counts' is not a valid run-length string of a "
                            f"{height}×{width} image")
        return {"size": size, "counts": counts.encode("ascii")}
    raise DataError(f"{where}: RLE 'counts' must be a list of integers or a compressed string, "
                    f"got a JSON {type(counts).__name__}")


def decode(rle: dict[str, Any]) -> np.ndarray:
    """A compressed RLE as an ``H×W`` uint8 mask (1 inside)."""
    from pycocotools import mask as mask_api

    return np.ascontiguousarray(mask_api.decode(rle))


def encode(mask: np.ndarray) -> dict[str, Any]:
    """An ``H×W`` mask (nonzero inside) as a compressed RLE with a JSON-ready ``counts`` string,
    the form ``COCOeval(iouType="segm")`` reads predictions in."""
    from pycocotools import mask as mask_api

    rle = mask_api.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
