"""COCO instance masks: polygons and both RLE forms decode to the pixels they describe; bad
segmentations are one DataError naming the file and the annotation id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.tasks.common.coco_masks import decode, encode, segmentation_rle

H, W = 6, 8
FILE = Path("instances_val.json")


def _rle(segmentation):
    return segmentation_rle(segmentation, H, W, path=FILE, aid=7)


def test_a_square_polygon_fills_its_pixels():
    mask = decode(_rle([[2, 1, 6, 1, 6, 5, 2, 5]]))  # x 2..6, y 1..5
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert mask[1:5, 2:6].all() and mask.sum() == 16


def test_two_polygons_of_one_object_merge():
    mask = decode(_rle([[0, 0, 2, 0, 2, 2, 0, 2], [5, 3, 7, 3, 7, 5, 5, 5]]))
    assert mask[0:2, 0:2].all() and mask[3:5, 5:7].all() and mask.sum() == 8


def test_rle_forms_round_trip_a_mask():
    truth = np.zeros((H, W), np.uint8)
    truth[2:5, 1:7] = 1
    compressed = encode(truth)
    assert isinstance(compressed["counts"], str) and compressed["size"] == [H, W]
    assert np.array_equal(decode(_rle(compressed)), truth)
    # The uncompressed form: run lengths over the column-major pixels, starting with zeros.
    flat = truth.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    assert sum(counts) == H * W
    assert np.array_equal(decode(_rle({"size": [H, W], "counts": counts})), truth)


def test_random_masks_round_trip_through_the_compressed_string():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        truth = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        rle = segmentation_rle(encode(truth), h, w, path=FILE, aid=1)
        assert np.array_equal(decode(rle), truth)


@pytest.mark.parametrize("segmentation, message", [
    (None, "annotation id 7 has no 'segmentation'"),
    ([], "an empty list"),
    ([[1, 1, 4, 1]], "polygon 0 has 2 point(s); a polygon needs at least 3"),
    ([[1, 1, 4, 1, 4]], "flat list of x, y pixel coordinates"),
    ([[1, 1, 4, 1, "x", 3]], "flat list of x, y pixel coordinates"),
    ({"size": [W, H], "counts": [H * W]}, "RLE size [8, 6] is not its image's [height, width] = [6, 8]"),
    ({"size": [H, W], "counts": [10, 5]}, "RLE counts cover 15 pixels"),
    ({"size": [H, W], "counts": [-1, 49]}, "non-negative integers"),
    ({"size": [H, W], "counts": 12}, "a list of integers or a compressed string"),
    ({"size": [H, W], "counts": "zzzz"}, "compressed RLE 'counts' is not a valid run-length string of a 6×8 image"),
    ({"size": [H, W], "counts": ""}, "compressed RLE 'counts' is not a valid run-length string"),
    ({"size": [H, W], "counts": "0"}, "compressed RLE 'counts' is not a valid run-length string"),
    ({"counts": "abc"}, "must be a list of polygons or an RLE"),
    ("polygon", "must be a list of polygons or an RLE"),
])
def test_bad_segmentations_are_one_line_naming_file_and_annotation(segmentation, message):
    with pytest.raises(DataError) as exc:
        _rle(segmentation)
    text = str(exc.value)
    assert message in text and "instances_val.json: annotation id 7" in text and "\n" not in text
