"""Tests for pipeline.tasks.common.coco: tiny COCO instances files and images built in tmp_path."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.tasks.common.coco import (
    PAD_VALUE,
    CocoDetectionDataset,
    boxes_from_letterbox,
    boxes_to_letterbox,
    detection_collate,
    letterbox,
    load_coco_split,
    load_coco_splits,
)
from pipeline.errors import DataError

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

# Three images of different sizes; category ids 3 and 7 (listed out of order); image 12 holds a
# crowd region; image 13 has no annotation (a negative).
BASE = {
    "images": [
        {"id": 11, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 12, "file_name": "sub/b.jpg", "width": 20, "height": 50},
        {"id": 13, "file_name": "c.png", "width": 32, "height": 32},
    ],
    "annotations": [
        {"id": 101, "image_id": 11, "category_id": 7, "bbox": [4, 6, 12, 10], "iscrowd": 0, "area": 120},
        {"id": 102, "image_id": 11, "category_id": 3, "bbox": [20, 2, 16, 24], "iscrowd": 0, "area": 384},
        {"id": 103, "image_id": 12, "category_id": 3, "bbox": [2, 4, 14, 18], "iscrowd": 0, "area": 252},
        {"id": 104, "image_id": 12, "category_id": 7, "bbox": [0, 30, 20, 20], "iscrowd": 1, "area": 400},
    ],
    "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
}


def write_coco(root: Path, data: dict | None = None, name: str = "instances.json") -> tuple[Path, Path]:
    """Images (white rectangles where the non-crowd boxes are) and the JSON; ``(images_dir, json)``."""
    data = copy.deepcopy(BASE) if data is None else data
    images_dir = root / "images"
    for im in data["images"]:
        path = images_dir / im["file_name"]
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((im["height"], im["width"], 3), dtype=np.uint8)
        pixels[..., 2] = 60  # a faint blue background, so the grey padding is distinguishable
        for a in data["annotations"]:
            if a["image_id"] == im["id"] and not a.get("iscrowd"):
                x, y, w, h = a["bbox"]
                pixels[y : y + h, x : x + w] = 255
        Image.fromarray(pixels).save(path, quality=100) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    ann = root / name
    ann.write_text(json.dumps(data))
    return images_dir, ann


@pytest.fixture()
def coco(tmp_path: Path) -> tuple[Path, Path]:
    return write_coco(tmp_path)


def test_valid_split_maps_categories_and_keeps_crowds_and_negatives(coco):
    images_dir, ann = coco
    split = load_coco_split(images_dir, ann, what="train")
    assert split.category_ids == [3, 7] and split.class_names == ["cat", "dog"]
    assert [im.id for im in split.images] == [11, 12, 13]
    a, b, c = split.images
    assert (a.width, a.height, b.width, b.height) == (40, 30, 20, 50)
    assert b.path == images_dir / "sub" / "b.jpg"
    np.testing.assert_array_equal(a.boxes, [[4, 6, 16, 16], [20, 2, 36, 26]])
    np.testing.assert_array_equal(a.labels, [1, 0])  # dog (id 7) -> 1, cat (id 3) -> 0
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    np.testing.assert_array_equal(b.boxes, [[2, 4, 16, 22]])
    np.testing.assert_array_equal(b.crowd_boxes, [[0, 30, 20, 50]])  # the crowd is not a target
    np.testing.assert_array_equal(b.crowd_labels, [1])
    assert c.boxes.shape == (0, 4) and c.labels.shape == (0,) and c.crowd_boxes.shape == (0, 4)


def test_dataset_items_letterbox_image_and_boxes_together(coco):
    split = load_coco_split(*coco, what="val")
    ds = CocoDetectionDataset(split, 20, MEAN, STD, augment=False)
    assert len(ds) == 3 and ds.class_names == ["cat", "dog"]
    x, t = ds[0]  # 40×30 -> scale 0.5, 20×15 centred: pad (0, 2)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert t["scale"] == 0.5 and t["pad"] == (0, 2) and t["orig_size"] == (30, 40) and t["image_id"] == 11
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 5.0, 8.0, 10.0], [10.0, 3.0, 18.0, 15.0]]))
    assert t["labels"].tolist() == [1, 0]
    raw = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(raw[:, :2], torch.full((3, 2, 20), PAD_VALUE))  # grey bands
    torch.testing.assert_close(raw[:, 17:], torch.full((3, 3, 20), PAD_VALUE))
    for x1, y1, x2, y2 in t["boxes"].long().tolist():  # the white rectangles sit inside the boxes
        assert raw[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() > 0.9
    _, tb = ds[1]  # 20×50 -> 8×20 at pad (6, 0); the crowd region comes letterboxed too
    assert tb["pad"] == (6, 0)
    torch.testing.assert_close(tb["crowd_boxes"], torch.tensor([[6.0, 12.0, 14.0, 20.0]]))
    assert tb["crowd_labels"].tolist() == [1]
    _, tc = ds[2]
    assert tc["boxes"].shape == (0, 4) and tc["labels"].shape == (0,)

    images, targets = detection_collate([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 20, 20) and [tt["image_id"] for tt in targets] == [11, 12, 13]


def test_augment_flips_image_and_boxes_together(coco):
    split = load_coco_split(*coco, what="train")
    plain = CocoDetectionDataset(split, 20, MEAN, STD, augment=False)
    aug = CocoDetectionDataset(split, 20, MEAN, STD, augment=True)
    x0, t0 = plain[0]
    flipped = Image.open(split.images[0].path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    xf, _, pad = letterbox(flipped, 20)
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        x, t = aug[0]
        if torch.equal(x, x0):
            torch.testing.assert_close(t["boxes"], t0["boxes"])
            seen.add("plain")
        else:
            torch.testing.assert_close(x, (xf - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
            # Boxes mirrored in the original (40 px wide), then letterboxed with the same scale/pad.
            expected = boxes_to_letterbox(torch.tensor([[24.0, 6, 36, 16], [4, 2, 20, 26]]), 0.5, pad)
            torch.testing.assert_close(t["boxes"], expected)
            assert t["pad"] == pad and t["labels"].tolist() == [1, 0]
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


@pytest.mark.parametrize("w,h,size", [(40, 30, 20), (20, 50, 25), (33, 17, 64), (7, 7, 16)])
def test_letterbox_geometry_and_box_round_trip(w, h, size):
    x, scale, (left, top) = letterbox(Image.new("RGB", (w, h), (255, 255, 255)), size)
    assert x.shape == (3, size, size) and scale == size / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    assert (left, top) == ((size - nw) // 2, (size - nh) // 2)
    assert torch.all(x[:, top : top + nh, left : left + nw] == 1.0)
    assert int((x == 1.0).all(dim=0).sum()) == nw * nh  # everything else is padding: documented grey
    assert PAD_VALUE == 0.5 and int((x == 0.5).all(dim=0).sum()) == size * size - nw * nh
    rng = np.random.default_rng(w * h)
    xy = rng.uniform(0, 1, size=(6, 2, 2)) * [w, h]
    boxes = torch.tensor(np.concatenate([xy.min(1), xy.max(1)], axis=1), dtype=torch.float32)
    back = boxes_from_letterbox(boxes_to_letterbox(boxes, scale, (left, top)), scale, (left, top), w, h)
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-5)


def test_boxes_from_letterbox_clips_to_the_original_image():
    out = boxes_from_letterbox(torch.tensor([[-4.0, 0.0, 30.0, 12.0]]), 0.5, (0, 2), 40, 30)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 40.0, 20.0]]))


def test_out_of_image_boxes_are_clipped_with_one_warning(tmp_path, caplog):
    data = copy.deepcopy(BASE)
    data["annotations"][0]["bbox"] = [-3, 6, 12, 10]  # 3 px left of the image
    data["annotations"][2]["bbox"] = [2, 40, 14, 18]  # 8 px below the image
    images_dir, ann = write_coco(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.common.coco"):
        split = load_coco_split(images_dir, ann, what="train")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 box(es)" in warnings[0].getMessage() and str(ann) in warnings[0].getMessage()
    np.testing.assert_array_equal(split.images[0].boxes[0], [0, 6, 9, 16])
    np.testing.assert_array_equal(split.images[1].boxes[0], [2, 40, 16, 50])


def _mutate(data: dict, case: str) -> tuple[dict, str]:
    """Apply one bad-data case; returns the data and the id the message must name."""
    anns, images = data["annotations"], data["images"]
    if case == "unknown image":
        anns[1]["image_id"] = 999
        return data, "999"
    if case == "unknown category":
        anns[1]["category_id"] = 5
        return data, "102"
    if case == "zero width":
        anns[2]["bbox"] = [2, 4, 0, 18]
        return data, "103"
    if case == "negative height":
        anns[3]["bbox"] = [0, 30, 20, -1]  # crowd boxes follow the same rule
        return data, "104"
    if case == "wholly outside":
        anns[0]["bbox"] = [41, 6, 12, 10]
        return data, "101"
    if case == "missing file":
        images[2]["file_name"] = "nope.png"
        return data, "13"
    if case == "size mismatch":
        images[0]["width"] = 41
        return data, "11"
    if case == "escaping file_name":
        images[2]["file_name"] = "../c.png"
        return data, "13"
    if case == "empty split":
        data["images"], data["annotations"] = [], []
        return data, "no images"
    raise AssertionError(case)


CASES = ["unknown image", "unknown category", "zero width", "negative height", "wholly outside", "missing file",
         "size mismatch", "escaping file_name", "empty split"]


@pytest.mark.parametrize("case", CASES)
def test_bad_annotations_name_the_file_and_the_id(tmp_path, case):
    images_dir, _ = write_coco(tmp_path)  # images first, from the good data
    data, ident = _mutate(copy.deepcopy(BASE), case)
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        load_coco_split(images_dir, ann, what="train")
    message = str(info.value)
    assert str(ann) in message and ident in message and "\n" not in message


def test_unreadable_image_names_the_file_and_id(coco):
    images_dir, ann = coco
    (images_dir / "c.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"image id 13.*c\.png"):
        load_coco_split(images_dir, ann, what="train")


def test_image_corrupted_after_the_check_fails_at_item_time_naming_it(coco):
    images_dir, ann = coco
    ds = CocoDetectionDataset(load_coco_split(images_dir, ann, what="val"), 16, MEAN, STD, augment=False)
    (images_dir / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"a\.png.*image id 11"):
        ds[0]


def test_malformed_json_gives_line_and_column(tmp_path):
    images_dir, _ = write_coco(tmp_path)
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(DataError) as info:
        load_coco_split(images_dir, ann, what="val")
    assert str(ann) in str(info.value) and "line 2, column 18" in str(info.value)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    data = copy.deepcopy(BASE)
    images_dir, _ = write_coco(tmp_path, data)
    del data[key]
    ann = tmp_path / "partial.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"partial\.json.*'{key}'"):
        load_coco_split(images_dir, ann, what="train")


def test_train_and_val_must_share_categories(tmp_path):
    images_dir, train_ann = write_coco(tmp_path)
    val = copy.deepcopy(BASE)
    val["categories"] = [{"id": 3, "name": "cat"}, {"id": 9, "name": "bird"}]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] == 3]
    _, val_ann = write_coco(tmp_path, val, name="val.json")
    with pytest.raises(DataError) as info:
        load_coco_splits(images_dir, train_ann, images_dir, val_ann)
    message = str(info.value)
    assert "7 'dog'" in message and "9 'bird'" in message and "3 'cat'" not in message
    train, same = load_coco_splits(images_dir, train_ann, images_dir, train_ann)
    assert train.category_ids == same.category_ids == [3, 7]
