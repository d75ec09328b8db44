"""Segmentation on the task contract: metrics, KD term, config defaults, and the whole chain on
a user's mask folders through the CLI (every stage measures mIoU on its own runtime)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.config import ConfigError, KDConfig
from pipeline.tasks import get_task
from tests.conftest import run_cli

TASK = get_task("segmentation")


def _iou_reference(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """mIoU written out class by class: ignore 255, skip classes absent from both."""
    keep = truth != 255
    p, t = pred[keep], truth[keep]
    ious = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_task_metrics_from_raw_logits_match_an_independent_computation():
    rng = np.random.default_rng(0)
    evaluator = TASK.evaluator(6)
    preds, truths = [], []
    for _ in range(3):  # several batches: the confusion matrix is dataset-level
        logits = rng.standard_normal((2, 6, 5, 7)).astype(np.float32)
        logits[:, 5] -= 100  # class 5 is never predicted ...
        truth = rng.integers(0, 5, (2, 5, 7))  # ... nor present: excluded from the mean
        truth[:, 0, :3] = 255
        evaluator.update({"logits": logits}, torch.from_numpy(truth))
        preds.append(logits.argmax(1))
        truths.append(truth)
    got = evaluator.compute()
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    assert got["miou"] == pytest.approx(_iou_reference(pred, truth, 6), abs=1e-12)
    keep = truth != 255
    assert got["pixel_accuracy"] == pytest.approx(float(np.mean(pred[keep] == truth[keep])), abs=1e-12)


def test_channel_wise_kd_matches_the_written_out_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    temperature = 4.0
    expected = 0.0
    for n in range(2):
        for c in range(3):  # per (image, class) map: a distribution over the H·W positions
            p_t = torch.softmax(t[n, c].flatten() / temperature, 0)
            log_p_s = torch.log_softmax(s[n, c].flatten() / temperature, 0)
            expected += float((p_t * (p_t.log() - log_p_s)).sum())
    expected *= temperature**2 / (3 * 2)
    got = TASK.kd_loss(s, t, KDConfig(temperature=temperature, weight=3.0))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert TASK.kd_loss(t, t, KDConfig(temperature=temperature)).item() == pytest.approx(0.0, abs=1e-6)


def test_pixel_agreement_parity():
    ref = np.zeros((2, 3, 4, 4), np.float32)
    ref[:, 1] = 1.0
    other = ref.copy()
    other[0, 2, 0, :] = 5.0  # 4 of 32 pixels change class
    p = TASK.parity({"logits": ref}, {"logits": other})
    assert p.agreement == pytest.approx(28 / 32) and p.max_abs_diff == pytest.approx(5.0) and p.count == 2


def _seg(**tables):
    raw = {"pipeline": {"task": "segmentation"}, "data": {"source": "scenes", "image_size": 32},
           "teacher": {"arch": "deeplabv3_resnet34"}, "distill": {"student": "deeplabv3_mobilenet_v3_large"}}
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    return config.from_dict(raw)


def test_the_authors_segmentation_settings_are_the_defaults_and_explicit_keys_win():
    m = _seg().distill.mgd
    assert (m.alpha, m.mask_ratio, m.mask) == ("auto", 0.75, "pixel")
    assert m.teacher_layers == ["backbone.layer4"] and m.student_layers == ["backbone.16"]
    assert (_seg().distill.kd.temperature, _seg().distill.kd.weight) == (4.0, 3.0)
    mine = _seg(distill={"student": "deeplabv3_resnet18", "mgd": {"alpha": 1e-4, "mask_ratio": 0.5}}).distill.mgd
    assert (mine.alpha, mine.mask_ratio, mine.mask) == (1e-4, 0.5, "pixel")


def test_a_deeplabv3_teacher_and_an_lraspp_student_pair_with_the_default_taps():
    # LRASPP's high branch is at stride 16 where the dilated DeepLabV3 is at 8: the student's
    # aligned map is resampled to the teacher's before the mask and the generation block.
    from stages.mgd import MGDHead
    from pipeline.models import build_student, build_teacher

    cfg = _seg(data={"image_size": 64}, distill={"student": "lraspp_mobilenet_v3_large"})
    m = cfg.distill.mgd  # the distill preflight builds this same head: it used to refuse the pair
    head = MGDHead(build_student(cfg, 4, weights=""), build_teacher(cfg, 4, weights=""), m.student_layers,
                   m.teacher_layers, (3, 64, 64), alpha=m.alpha, mask_ratio=m.mask_ratio, mask=m.mask)
    (tap,) = head.describe()
    assert (tap["student"], tap["teacher"]) == ("backbone.16", "backbone.layer4")
    assert tap["student_shape"] == [960, 4, 4] and tap["teacher_shape"] == [512, 8, 8]
    assert tap["resample"] == "student 4×4 → 8×8" and tap["align"]
    s, t = torch.randn(2, 960, 4, 4, requires_grad=True), torch.randn(2, 512, 8, 8)
    head.calibrate([s], [t], torch.tensor(1.0))
    head([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("raw, message", [
    ({"data": {"source": "digits"}}, "data.source = 'digits' does not fit pipeline.task = 'segmentation'"),
    ({"gates": {"max_accuracy_drop": 0.1}}, "gates.max_accuracy_drop is the classification spelling"),
    ({"data": {"source": "masks", "root": "x"}}, "data.num_classes"),
])
def test_segmentation_config_mistakes(raw, message):
    with pytest.raises(ConfigError, match=message):
        _seg(**raw)


def _mask_tree(root, *, bad_value: int | None = None):
    """A tiny VOC-style tree: squares of class 1 or 2 on background, images of two sizes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 10), ("val", 4)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            h, w = (20, 28) if i % 2 else (24, 24)
            mask = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
            mask[y : y + 8, x : x + 8] = 1 + i % 2
            mask[0, 0] = 255
            if bad_value is not None and split == "val" and i == 3:
                mask[5, 5] = bad_value
            m = (mask % 255).astype(np.int32)  # the ignore pixel drawn as background
            image = np.stack([m * 100, m * 60, 255 - m * 80], -1).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"im{i}.jpg")
            Image.fromarray(mask).save(root / split / "masks" / f"im{i}.png")


SEG_TOML = """
[pipeline]
task = "segmentation"
workdir = "run"
device = "cpu"
[data]
source = "masks"
root = "masks"
num_classes = 3
class_names = ["background", "square", "other"]
image_size = 32
batch_size = 4
calibration_size = 4
[teacher]
arch = "fcn_resnet34"
epochs = 1
[distill]
student = "fcn_resnet18"
method = "mgd+kd"
epochs = 1
[prune]
enabled = true
ratio = 0.25
heal_epochs = 1
[bench]
warmup = 1
runs = 3
batch_runs = 1
threads = 1
[gates]
max_metric_drop = 1.0
"""


def test_a_mask_value_beyond_num_classes_is_one_line_exit_2(tmp_path):
    _mask_tree(tmp_path / "masks", bad_value=7)
    (tmp_path / "seg.toml").write_text(SEG_TOML)
    out = run_cli("run", str(tmp_path / "seg.toml"))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "im3.png" in lines[0] and "7" in lines[0]
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_segmentation_end_to_end_on_mask_folders(tmp_path):
    _mask_tree(tmp_path / "masks")
    (tmp_path / "seg.toml").write_text(SEG_TOML)
    out = run_cli("run", str(tmp_path / "seg.toml"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    labels = {"miou": "mIoU", "pixel_accuracy": "pixel accuracy"}
    assert manifest["pipeline"]["task"] == {"name": "segmentation", "metric": "miou", "metrics": ["miou", "pixel_accuracy"],
                                            "labels": labels, "axes": labels, "history": "miou"}
    stages = manifest["stages"]
    # No INT8 drop gate: the INT8 fallback has nothing to recover, and QAD is off without [qad].
    assert {n: r["status"] for n, r in stages.items()} == {**{n: "ok" for n in
                                                          ("teacher", "distill", "prune", "onnx", "openvino", "tensorrt")},
                                                          "int8_fallback": "skipped", "qad": "skipped"}
    measured = {a: m for r in stages.values() for a, m in r["metrics"].items() if "latency_p50_ms" in m}
    assert {"teacher", "student", "student_baseline", "pruned", "onnx", "onnx_int8", "openvino_fp32",
            "openvino_int8", "trt_qdq"} <= set(measured)
    for name, m in measured.items():  # mIoU on every runtime's own outputs, never accuracy
        assert 0 <= m["miou"] <= 1 and 0 <= m["pixel_accuracy"] <= 1 and "accuracy" not in m, name
    assert stages["onnx"]["metrics"]["onnx"]["parity_pixel_agreement"] >= 0.99
    assert stages["openvino"]["metrics"]["openvino_fp32"]["parity_pixel_agreement"] >= 0.99
    assert "miou_before" in stages["prune"]["metrics"]["pruned"]
    assert "val_miou" in stages["distill"]["history"]["student"][0]
    gates = [g for r in stages.values() for g in r["gates"]]
    assert gates and {g["gate"] for g in gates} == {"max_metric_drop"} and all("miou" in g["metric"] for g in gates)
    assert set(manifest["ship"]) == {"torch", "onnxruntime", "openvino", "tensorrt"}
    assert (tmp_path / "run" / "report.html").read_text().count("mIoU") > 3


def test_an_unknown_task_is_a_config_error_naming_the_choices():
    import pipeline.tasks as tasks

    with pytest.raises(ConfigError, match="pipeline.task = 'tracking': allowed: classification, detection, "
                                          "instance_segmentation, segmentation, "
                                          "or the dotted path of an importable module that defines TASK"):
        tasks.get_task("tracking")
    with pytest.raises(ConfigError, match="the module defines no TASK"):
        tasks.get_task("json")  # importable, but not a task