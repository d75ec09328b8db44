"""Instance segmentation on a user's COCO instances JSON: polygons, compressed and uncompressed
RLE (crowd regions), masks letterboxed with their images; bad masks stop the run with one line
naming the file and the annotation id; and the whole chain through the CLI (every stage
measures mask mAP on its own runtime, no NMS or TopK in the exported graph)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import DataError
from pipeline.tasks.common.coco import CocoDetectionDataset, load_coco_split
from pipeline.tasks.common.coco_masks import decode as rle_decode, encode as rle_encode
from tests.conftest import run_cli

SIZES = [(64, 48), (40, 64), (56, 56), (80, 40), (48, 72), (64, 64)]  # (width, height)
COLORS = {3: (230, 40, 40), 7: (40, 200, 60)}


def _shape(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, list[float]]:
    """A filled triangle inside a random box: its mask and its polygon."""
    bw, bh = int(rng.integers(w // 3, w // 2)), int(rng.integers(h // 3, h // 2))
    x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    poly = [x, y + bh, x + bw / 2, y, x + bw, y + bh]
    from pycocotools import mask as mask_api

    mask = mask_api.decode(mask_api.frPyObjects([poly], h, w))[:, :, 0]
    return mask, [float(v) for v in poly]


def coco_masks_tree(root: Path, *, n_train: int = 16, n_val: int = 6) -> dict[str, list]:
    """A user-style COCO dataset with masks: PNGs of several sizes with coloured triangles;
    category ids 3 and 7; polygons, compressed RLEs, and one crowd region as an uncompressed RLE
    (train); a negative image per split. Returns the JSON of each split."""
    rng = np.random.default_rng(0)
    out = {}
    aid = 100
    for split, count in (("train", n_train), ("val", n_val)):
        folder = root / split
        folder.mkdir(parents=True)
        images, anns = [], []
        for i in range(count):
            w, h = SIZES[i % len(SIZES)]
            pixels = np.zeros((h, w, 3), np.uint8)
            pixels[...] = (30, 30, 90)
            iid = 1000 * (split == "val") + i + 1
            images.append({"id": iid, "file_name": f"im{i}.png", "width": w, "height": h})
            if i != 2:
                for k, cid in enumerate((3, 7) if i % 3 else (7,)):
                    mask, poly = _shape(rng, w, h)
                    pixels[mask > 0] = COLORS[cid]
                    ys, xs = np.nonzero(mask)
                    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                    aid += 1
                    crowd = int(split == "train" and i == 4 and k == 0)
                    if crowd:  # COCO's crowds: uncompressed RLE
                        from pycocotools import mask as mask_api

                        counts, run, value = [], 0, 0
                        for v in np.asfortranarray(mask).ravel(order="F"):
                            if v != value:
                                counts.append(run)
                                run, value = 0, v
                            run += 1
                        counts.append(run)
                        seg = {"size": [h, w], "counts": counts}
                        assert (mask_api.decode(mask_api.frPyObjects(seg, h, w)) == mask).all()
                    elif k:  # compressed RLE
                        seg = rle_encode(mask)
                    else:
                        seg = [poly]
                    anns.append({"id": aid, "image_id": iid, "category_id": cid, "bbox": bbox, "segmentation": seg,
                                 "area": int(mask.sum()), "iscrowd": crowd})
            Image.fromarray(pixels).save(folder / f"im{i}.png")
        data = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "green"}, {"id": 3, "name": "red"}]}
        (root / f"{split}.json").write_text(json.dumps(data))
        out[split] = data
    return out


def test_polygons_and_rles_decode_and_letterbox_with_their_image(tmp_path):
    data = coco_masks_tree(tmp_path, n_train=6, n_val=2)
    split = load_coco_split(tmp_path / "train", tmp_path / "train.json", what="train", masks=True)
    ds = CocoDetectionDataset(split, 64, (0.5,) * 3, (0.25,) * 3, augment=False)

    crowds = 0
    for i, im in enumerate(split.images):
        x, target = ds[i]
        assert target["masks"].shape == (len(target["boxes"]), 64, 64) and target["masks"].dtype == torch.uint8
        assert len(target["rles"]) == len(target["boxes"]) and len(target["crowd_rles"]) == len(target["crowd_boxes"])
        crowds += len(target["crowd_rles"])
        for mask, box, rle in zip(target["masks"], target["boxes"], target["rles"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            # The letterboxed mask lies in its letterboxed box (within a pixel of resampling).
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
            original = rle_decode(rle)
            assert original.shape == (im.height, im.width) and original.sum() > 0
        # the original masks are the annotations' own pixels
        anns = [a for a in data["train"]["annotations"] if a["image_id"] == im.id and not a["iscrowd"]]
        assert sum(int(rle_decode(r).sum()) for r in target["rles"]) == sum(a["area"] for a in anns)
    assert crowds == 1


def test_a_flipped_item_flips_its_masks_and_carries_no_evaluation_masks(tmp_path):
    coco_masks_tree(tmp_path, n_train=4, n_val=2)
    split = load_coco_split(tmp_path / "train", tmp_path / "train.json", what="train", masks=True)
    plain = CocoDetectionDataset(split, 64, (0.5,) * 3, (0.25,) * 3, augment=False)[0][1]
    torch.manual_seed(0)
    flips = CocoDetectionDataset(split, 64, (0.5,) * 3, (0.25,) * 3, augment=True)
    flipped = next(t for t in (flips[0][1] for _ in range(20)) if "rles" not in t)
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1)) or torch.equal(
        flipped["masks"][:, :, 1:], plain["masks"].flip(-1)[:, :, :-1])  # a letterbox pad of odd width shifts by 1


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "has no 'segmentation'"),
    ("two_points", "polygon 0 has 2 point(s); a polygon needs at least 3"),
    ("rle_size", "RLE size [10, 10] is not its image's [height, width]"),
])
def test_bad_masks_name_the_file_and_the_annotation_id(tmp_path, case, message):
    data = coco_masks_tree(tmp_path, n_train=3, n_val=1)["train"]
    bad = copy.deepcopy(data)
    ann = bad["annotations"][0]
    if case == "missing":
        del ann["segmentation"]
    elif case == "two_points":
        ann["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]
    else:
        ann["segmentation"] = {"size": [10, 10], "counts": [100]}
    path = _write(tmp_path, bad)

    with pytest.raises(DataError) as err:
        load_coco_split(tmp_path / "train", path, what="train", masks=True)
    assert str(path) in str(err.value) and f"annotation id {ann['id']}" in str(err.value) and message in str(err.value)
    load_coco_split(tmp_path / "train", path, what="train")  # detection reads no masks: the same file is fine


INST_TOML = """
[pipeline]
task = "instance_segmentation"
workdir = "run"
device = "cpu"
[data]
source = "coco"
train_images = "coco/train"
train_annotations = "coco/train.json"
val_images = "coco/val"
val_annotations = "coco/val.json"
image_size = 64
calibration_size = 4
[teacher]
fpn_channels = 64
epochs = 1
[distill]
fpn_channels = 64
epochs = 1
baseline = false
[prune]
enabled = true
ratio = 0.3
heal_epochs = 1
[onnx]
export_teacher = false
opset = 17
[bench]
warmup = 1
runs = 3
batch_runs = 1
threads = 1
[gates]
max_metric_drop = 1.0
"""


def test_a_bad_mask_is_one_line_exit_2_before_anything_trains(tmp_path):
    data = coco_masks_tree(tmp_path / "coco", n_train=3, n_val=2)["val"]
    bad = data["annotations"][1]
    bad["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    (tmp_path / "coco" / "val.json").write_text(json.dumps(data))
    (tmp_path / "inst.toml").write_text(INST_TOML)

    out = run_cli("run", str(tmp_path / "inst.toml"))

    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "val.json" in lines[0] and f"annotation id {bad['id']}" in lines[0] and "at least 3" in lines[0]
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_instance_segmentation_end_to_end_on_a_coco_dataset_with_the_task_defaults(tmp_path):
    import onnx

    coco_masks_tree(tmp_path / "coco")
    (tmp_path / "inst.toml").write_text(INST_TOML)

    out = run_cli("run", str(tmp_path / "inst.toml"))

    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["pipeline"]["task"]["metric"] == "mask_map"
    stages = manifest["stages"]
    # No INT8 drop gate: the INT8 fallback has nothing to recover, and QAD is off without [qad].
    assert {n: r["status"] for n, r in stages.items()} == {**{n: "ok" for n in
                                                          ("teacher", "distill", "prune", "onnx", "openvino", "tensorrt")},
                                                          "int8_fallback": "skipped", "qad": "skipped"}
    assert stages["distill"]["config"]["distill"]["init_student"] is True  # the task's default
    assert stages["distill"]["config"]["distill"]["student"] == "yolact_resnet18_fpn"
    measured = {a: m for r in stages.values() for a, m in r["metrics"].items() if "latency_p50_ms" in m}
    assert {"teacher", "student", "pruned", "onnx", "onnx_int8", "openvino_fp32", "openvino_int8", "trt_qdq"} <= set(measured)
    for name, m in measured.items():  # mask mAP on every runtime's own outputs
        assert 0 <= m["mask_map"] <= m["mask_map_50"] <= 1 and 0 <= m["map"] <= 1, name
    assert stages["onnx"]["metrics"]["onnx"]["parity_mask_agreement"] >= 0.99
    assert stages["openvino"]["metrics"]["openvino_fp32"]["parity_mask_agreement"] >= 0.99
    assert len(stages["distill"]["metrics"]["student"]["mgd_taps"]) == 4
    # The exported graph ends in fixed-shape raw tensors: no NMS, TopK or data-dependent ops.
    model = onnx.load(str(tmp_path / "run" / stages["onnx"]["outputs"]["onnx"]["path"]))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"NonMaxSuppression", "TopK", "NonZero", "RoiAlign", "Loop", "If"}, ops
    assert [o.name for o in model.graph.output] == ["cls_logits", "bbox_regression", "bbox_ctrness", "mask_coeffs", "protos"]
    # The pruned student kept the output channels a mask pairs: K coefficients and K prototypes.
    pruned = json.loads(json.dumps(stages["prune"]["metrics"]["pruned"]))
    assert pruned["params_ratio"] < 1
    assert (tmp_path / "run" / "report.html").read_text().count("mask mAP") > 2
