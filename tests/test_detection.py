"""Detection on the task contract: the bound task's loss (torchvision's, on raw outputs), decode +
COCO mAP, box parity, config defaults and mistakes, init_student, and the whole chain on a
user's COCO dataset through the CLI (every stage measures mAP on its own runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.config import ConfigError
from pipeline.tasks import get_task
from pipeline.tasks.common.coco_eval import CocoMAP, box_matches
from pipeline.tasks.common.detectors import build_det_model
from pipeline.tasks.common.box_decode import decode, torchvision_detector
from tests.conftest import run_cli
from tests.test_detpost import _confident_heads

S = 64  # input side
C = 3  # classes
# torchvision's detector defaults, written out: the task must decode with exactly these.
TV_POSTPROCESS = dict(score_thresh=0.05, nms_iou=0.5, topk_candidates=1000, max_detections=100)
KINDS = {"retinanet": "retinanet_resnet18_fpn", "fcos": "fcos_resnet18_fpn", "ssd": "ssdlite320_mobilenet_v3_large"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in test_detmodels: the machine is small and shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _det(**tables) -> config.Config:
    """A detection config (embedded scenes at 64 px); ``tables`` override keys table by table."""
    raw = {"pipeline": {"task": "detection"}, "data": {"source": "scenes", "image_size": S},
           "teacher": {"arch": "retinanet_resnet34_fpn"}, "distill": {"student": "retinanet_resnet18_fpn"}}
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    return config.from_dict(raw)


def _bound(arch: str, fpn_channels: int = 256):
    extra = {"fpn_channels": fpn_channels} if fpn_channels != 256 else {}
    cfg = _det(teacher={"arch": arch, **extra}, distill={"student": arch, **extra})
    return get_task("detection").bind(cfg), cfg


def _fpn(arch: str) -> int:
    return 256 if arch.startswith("ssdlite") else 32  # SSDlite has no FPN; FCOS's GroupNorm needs 32 | width


# -- Loss --------------------------------------------------------------------------------------


def _batch(seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Three images: two objects, one object, none (a negative)."""
    x = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(seed))
    targets = [
        {"boxes": torch.tensor([[5.0, 6.0, 30.0, 28.0], [30.0, 20.0, 60.0, 52.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return x, targets


@pytest.mark.parametrize("arch", list(KINDS.values()))
def test_loss_is_torchvisions_and_trains_the_head(arch):
    task, cfg = _bound(arch, _fpn(arch))
    torch.manual_seed(0)
    model = build_det_model(arch, C, image_size=S, fpn_channels=_fpn(arch)).train()
    x, targets = _batch()

    loss = task.loss(model(x), targets, cfg.teacher)
    loss.backward()

    assert torch.isfinite(loss) and loss.item() > 0
    # The same number as torchvision's own detector built on these modules, fed the same batch
    # (its transform is a no-op at this size; the BatchNorms see the same batch statistics).
    # torchvision's SSD counts the background as label 0: its object labels are ours + 1.
    shift = 1 if model.arch_kind == "ssd" else 0
    with torch.no_grad():
        reference = torchvision_detector(model).train()(
            list(x), [{"boxes": t["boxes"], "labels": t["labels"] + shift} for t in targets])
    assert loss.item() == pytest.approx(sum(reference.values()).item(), rel=1e-4)
    modules = dict(model.named_modules())
    grads = {name: modules[name].weight.grad for name in model.head_layers}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # Every class and box output conv of RetinaNet / FCOS; SSDlite has one per level, and its
    # hard-negative mining may leave a level's class conv without a gradient.
    for part in ("classification_head", "regression_head"):
        assert any(g.abs().sum() > 0 for name, g in grads.items() if part in name), part

    # Overfitting one fixed batch: the loss must fall.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        step = task.loss(model(x), targets, cfg.teacher)
        step.backward()
        opt.step()
        losses.append(step.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0], losses


def test_the_default_detection_recipe_trains_from_scratch_and_lowers_its_loss_without_a_nan(tmp_path):
    # No optimizer key at all: the task's recipe (AdamW, warm-up, clipping, batch 8) is what trains.
    from stages.training import fit

    cfg = _det(data={"scenes": {"train_images": 16, "val_images": 4, "min_digits": 1, "max_digits": 2},
                     "augment": False},
               teacher={"arch": "fcos_resnet18_fpn", "fpn_channels": 32, "epochs": 4},
               distill={"student": "fcos_resnet18_fpn", "fpn_channels": 32})
    assert (cfg.teacher.optimizer, cfg.teacher.grad_clip, cfg.data.batch_size) == ("adamw", 35.0, 8)
    task = get_task("detection").bind(cfg)
    data = task.load_data(cfg.data, 0, tmp_path)
    torch.manual_seed(0)
    model = build_det_model("fcos_resnet18_fpn", data.num_classes, image_size=S, fpn_channels=32)
    history = fit(model, train_loader=data.loader("train", cfg.data.batch_size, seed=0),
                  val_loader=data.loader("val", 4), optim=cfg.teacher, device=torch.device("cpu"),
                  checkpoint=tmp_path / "c.pt", key="k", desc="det", task=task, num_classes=data.num_classes)
    losses = [e["loss"] for e in history.epochs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(e["loss_task"] == pytest.approx(e["loss"]) for e in history.epochs)


def test_kd_loss_is_binary_cross_entropy_to_the_teachers_scores():
    task, cfg = _bound("retinanet_resnet18_fpn", 32)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 50, C, generator=g), torch.randn(2, 50, C, generator=g)
    box = torch.zeros(2, 50, 4)
    same = task.kd_loss((s, box), (s, box), cfg.distill.kd).item()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(s, t.sigmoid(), reduction="mean").item()
    entropy = torch.nn.functional.binary_cross_entropy_with_logits(s, s.sigmoid(), reduction="mean").item()
    # Binary cross-entropy to the teacher's scores, summed over classes, averaged over anchors (T = 1).
    assert task.kd_loss((s, box), (t, box), cfg.distill.kd).item() == pytest.approx(expected * C, rel=1e-5)
    assert same == pytest.approx(entropy * C, rel=1e-5)  # BCE's floor: the teacher's own entropy


# -- Evaluator = decode + COCO mAP -------------------------------------------------------------


def _letterboxed_targets(rng: np.random.Generator, detections: list[dict[str, np.ndarray]]) -> list[dict]:
    """Targets as the COCO loader gives them: half of the confident detections, jittered, as
    ground truth in a letterboxed frame (scale 0.5 of a 128×96 original, pad (0, 8)), plus a
    random box; the last image of a batch is a negative."""
    targets = []
    for i, det in enumerate(detections):
        keep = det["scores"] > 0.3
        boxes = det["boxes"][keep][::2] + rng.normal(0, 1.5, (int(keep.sum() + 1) // 2, 4)).astype(np.float32)
        labels = det["labels"][keep][::2]
        boxes = np.concatenate([boxes, [[10, 14, 30, 40]]]).clip(0, S).astype(np.float32)
        labels = np.concatenate([labels, [1]])
        if i == len(detections) - 1:
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels.astype(np.int64)),
                        "orig_size": (96, 128), "scale": 0.5, "pad": (0, 8)})
    return targets


@pytest.mark.parametrize("kind", list(KINDS))
def test_evaluator_is_decode_then_coco_map(kind):
    arch = KINDS[kind]
    task, _ = _bound(arch, _fpn(arch))
    # A different FPN width from the task's internal decoder model: anchors must not depend on it.
    torch.manual_seed(0)
    model = build_det_model(arch, C, image_size=S, fpn_channels=64 if kind != "ssd" else 256).eval()
    _confident_heads(model)
    rng = np.random.default_rng(0)
    evaluator = task.evaluator(C)
    reference = CocoMAP([f"class{c}" for c in range(C)])

    for batch in range(2):  # mAP is dataset-level: two batches
        x = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            raw = {n: t.numpy() for n, t in zip(model.output_names, model(x), strict=True)}
        detections = decode(raw, model.anchors, arch_kind=kind, image_size=S, level_sizes=model.level_sizes,
                            **TV_POSTPROCESS)
        targets = _letterboxed_targets(rng, detections)
        evaluator.update(raw, targets)
        reference.update(detections, targets)

    got, expected = evaluator.compute(), reference.compute()
    assert set(got) == {"map", "map_50"}
    assert 0 < expected["map"] < expected["map_50"] < 1  # a non-trivial score, so a wrong decode would show
    assert got == pytest.approx(expected, abs=1e-12)


def _pick_anchors(anchors: np.ndarray, count: int, max_side: float = S) -> list[int]:
    """``count`` anchors inside the image, no two overlapping by IoU ≥ 0.3 (NMS keeps them all)."""
    from torchvision.ops import box_iou

    inside = np.where((anchors[:, :2] >= 0).all(1) & (anchors[:, 2:] <= S).all(1)
                      & (anchors[:, 2] - anchors[:, 0] <= max_side))[0]
    order = np.random.default_rng(0).permutation(inside)
    picked: list[int] = []
    for i in order:
        if picked:
            iou = box_iou(torch.from_numpy(anchors[[i]]), torch.from_numpy(anchors[picked]))
            if iou.max() >= 0.3:
                continue
        picked.append(int(i))
        if len(picked) == count:
            return picked
    raise AssertionError(f"only {len(picked)} separate anchors")


def _raw_outputs(kind: str, anchors: np.ndarray, images: list[dict[int, tuple[int, float]]]) -> dict[str, np.ndarray]:
    """Raw outputs of ``kind`` that decode to exactly the anchor boxes asked for: per image,
    ``{anchor index: (label, score)}``; every other anchor scores ~0."""
    n, a = len(images), len(anchors)
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    if kind == "ssd":  # softmax over background + C: background wins everywhere else
        cls = np.zeros((n, a, C + 1), np.float32)
        cls[..., 0] = 20.0
        box = np.zeros((n, a, 4), np.float32)  # zero offsets: the anchor itself
    else:
        cls = np.full((n, a, C), -20.0, np.float32)
        # FCOS regresses (l, t, r, b) over the anchor size from its centre: 0.5 is the anchor box.
        box = np.full((n, a, 4), 0.5 if kind == "fcos" else 0.0, np.float32)
    for i, picks in enumerate(images):
        for index, (label, score) in picks.items():
            if kind == "ssd":  # softmax of (0, log(p / (1 - p))) over background and the class is p
                cls[i, index] = -20.0
                cls[i, index, 0] = 0.0
                cls[i, index, label + 1] = logit(score)
            elif kind == "fcos":  # score = sqrt(sigmoid(cls) · sigmoid(ctrness)): both at the score
                cls[i, index, label] = logit(score)
            else:
                cls[i, index, label] = logit(score)
    out = {"cls_logits": cls, "bbox_regression": box}
    if kind == "fcos":
        ctr = np.full((n, a, 1), -20.0, np.float32)
        for i, picks in enumerate(images):
            for index, (_label, score) in picks.items():
                ctr[i, index, 0] = logit(score)
        out["bbox_ctrness"] = ctr
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_raw_outputs_decoding_to_the_ground_truth_score_map_1(kind):
    task, _ = _bound(KINDS[kind], _fpn(KINDS[kind]))
    anchors = build_det_model(KINDS[kind], C, image_size=S, fpn_channels=_fpn(KINDS[kind])).anchors
    picks = _pick_anchors(anchors, 5)
    images = [{picks[0]: (0, 0.9), picks[1]: (2, 0.8)}, {picks[2]: (1, 0.95), picks[3]: (1, 0.7), picks[4]: (0, 0.6)}, {}]
    targets = [{"boxes": torch.from_numpy(anchors[list(im)].copy()), "labels": torch.tensor([lab for lab, _ in im.values()],
                dtype=torch.int64).reshape(-1), "orig_size": (S, S)} for im in images]
    raw = _raw_outputs(kind, anchors, images)

    detections = task.postprocess(raw)
    evaluator = task.evaluator(C)
    evaluator.update(raw, targets)

    for det, im, target in zip(detections, images, targets):
        assert len(det["boxes"]) == len(im)
        order = np.argsort(-np.array([score for _, score in im.values()]))  # detections come by score
        np.testing.assert_allclose(det["boxes"], target["boxes"].numpy()[order], atol=1e-3)
        np.testing.assert_array_equal(det["labels"], target["labels"].numpy()[order])
        np.testing.assert_allclose(det["scores"], np.array([s for _, s in im.values()])[order], atol=1e-4)
    assert evaluator.compute() == {"map": pytest.approx(1.0), "map_50": pytest.approx(1.0)}


# -- Parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_box_agreement_counts_confident_detections_found_again(kind):
    task, _ = _bound(KINDS[kind], _fpn(KINDS[kind]))
    anchors = build_det_model(KINDS[kind], C, image_size=S, fpn_channels=_fpn(KINDS[kind])).anchors
    p = _pick_anchors(anchors, 9)
    # Image 0: four confident detections. Image 1: three confident and one below the parity
    # threshold (0.3) but above the decode threshold (0.05).
    ref_images = [{p[0]: (0, 0.9), p[1]: (1, 0.9), p[2]: (2, 0.8), p[3]: (0, 0.6)},
                  {p[4]: (1, 0.9), p[5]: (2, 0.7), p[6]: (0, 0.5), p[7]: (1, 0.2)}]
    reference = _raw_outputs(kind, anchors, ref_images)

    same = task.parity(reference, {k: v.copy() for k, v in reference.items()})
    assert (same.agreement, same.max_abs_diff, same.count) == (1.0, 0.0, 2)

    # The candidate loses one confident detection of image 0 and the unconfident one of image 1
    # (which does not count), and finds an extra confident one in image 1.
    cand_images = [{p[0]: (0, 0.9), p[1]: (1, 0.9), p[3]: (0, 0.6)},
                   {p[4]: (1, 0.9), p[5]: (2, 0.7), p[6]: (0, 0.5), p[8]: (2, 0.9)}]
    candidate = _raw_outputs(kind, anchors, cand_images)
    got = task.parity(reference, candidate)
    # Found again: 3 of image 0's 4, 3 of image 1's; image 1 is counted over the candidate's 4.
    assert got.agreement == pytest.approx((3 + 3) / (4 + 4))
    assert got.max_abs_diff == pytest.approx(float(np.max([np.abs(reference[n] - candidate[n]).max() for n in reference])))
    assert got.max_abs_diff > 1

    # A class swap is a disagreement, even with the same box.
    swapped = _raw_outputs(kind, anchors, [{**ref_images[0], p[0]: (1, 0.9)}, ref_images[1]])
    assert task.parity(reference, swapped).agreement == pytest.approx(6 / 7)

    quiet = _raw_outputs(kind, anchors, [{p[0]: (0, 0.2)}, {}])  # decoded, but nothing confident
    assert task.parity(quiet, _raw_outputs(kind, anchors, [{}, {p[1]: (1, 0.25)}])).agreement == 1.0


def test_box_matches_is_one_to_one():
    ref = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5]], np.float32)  # both overlap the one candidate
    cand = np.array([[0, 0, 10, 10]], np.float32)
    assert box_matches(ref, np.array([1, 1]), cand, np.array([1]), 0.9) == 1
    assert box_matches(ref, np.array([1, 1]), np.concatenate([cand, cand]), np.array([1, 1]), 0.9) == 2
    assert box_matches(ref, np.array([1, 1]), cand, np.array([2]), 0.9) == 0  # another class
    assert box_matches(ref[:1], np.array([1]), np.array([[0, 0, 10, 12]], np.float32), np.array([1]), 0.9) == 0
    assert box_matches(ref[:0], np.array([], np.int64), cand, np.array([1]), 0.9) == 0


# -- Config ------------------------------------------------------------------------------------


def test_the_authors_detection_settings_are_the_defaults_and_explicit_keys_win():
    m = _det().distill.mgd
    levels = [f"fpn_taps.p{k}" for k in range(3, 8)]
    assert (m.alpha, m.mask_ratio, m.mask) == ("auto", 0.65, "pixel")
    assert m.teacher_layers == levels and m.student_layers == levels
    ssd = _det(teacher={"arch": "ssdlite320_mobilenet_v3_large"},
               distill={"student": "ssdlite320_mobilenet_v3_large"}).distill.mgd
    assert ssd.teacher_layers == ssd.student_layers == [f"fpn_taps.p{k}" for k in range(4, 10)]
    mine = _det(distill={"mgd": {"alpha": 1e-4, "mask": "channel", "teacher_layers": ["fpn_taps.p4"],
                                 "student_layers": ["fpn_taps.p4"]}}).distill.mgd
    assert (mine.alpha, mine.mask_ratio, mine.mask, mine.teacher_layers) == (1e-4, 0.65, "channel", ["fpn_taps.p4"])


@pytest.mark.parametrize("raw, message", [
    ({"data": {"source": "digits"}}, "data.source = 'digits' does not fit pipeline.task = 'detection'; allowed: scenes, coco"),
    ({"gates": {"max_accuracy_drop": 0.1}}, "gates.max_accuracy_drop is the classification spelling"),
    ({"gates": {"max_int8_accuracy_drop": 0.1}}, "gates.max_int8_accuracy_drop is the classification spelling"),
    ({"data": {"source": "coco", "train_images": "a", "val_images": "b", "val_annotations": "c.json"}},
     "data.train_annotations: source 'coco' needs"),
    ({"pipeline": {"task": "classification"}, "data": {"source": "digits"}, "teacher": {"arch": "resnet18", "fpn_channels": 64},
      "distill": {"student": "resnet18"}}, "teacher.fpn_channels = 64 is a detection / instance_segmentation setting"),
    ({"pipeline": {"task": "classification"}, "data": {"source": "digits"}, "teacher": {"arch": "resnet18"},
      "distill": {"student": "resnet18", "fpn_channels": 128}}, "distill.fpn_channels = 128 is a detection / instance_segmentation setting"),
    ({"pipeline": {"task": "segmentation"}, "teacher": {"arch": "fcn_resnet34"},
      "distill": {"student": "fcn_resnet18", "init_student": True}}, "distill.init_student is a detection / instance_segmentation setting"),
    # RetinaNet taps 5 FPN levels, SSDlite 6: the family is the mistake, not the tap lists' lengths.
    ({"distill": {"student": "ssdlite320_mobilenet_v3_large"}},
     "distill.student = 'ssdlite320_mobilenet_v3_large' is a ssd detector but teacher.arch = 'retinanet_resnet34_fpn'"),
    ({"distill": {"student": "retinanet_resnet81_fpn"}},  # a typo: its default taps cannot pair either
     "distill.student: arch = 'retinanet_resnet81_fpn': unknown detection architecture; did you mean retinanet_resnet18_fpn"),
    ({"teacher": {"arch": "fcos_resnet43_fpn"}}, "teacher.arch: arch = 'fcos_resnet43_fpn': unknown detection architecture"),
    ({"distill": {"mgd": {"teacher_layers": ["fpn_taps.p3", "fpn_taps.p4"]}}},
     "distill.mgd: teacher_layers has 2 entries but student_layers has 5; they are paired in order"),
])
def test_detection_config_mistakes_are_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        _det(**raw)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_teacher_and_student_of_different_families_fail_the_distill_preflight():
    from stages.distill import preflight

    cfg = _det(teacher={"arch": "retinanet_resnet34_fpn"}, distill={"student": "fcos_resnet18_fpn"})
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    message = str(info.value)
    assert message.startswith("distill.student = 'fcos_resnet18_fpn' is a fcos detector but teacher.arch = "
                              "'retinanet_resnet34_fpn' is a retinanet") and "\n" not in message
    preflight(_det(teacher={"fpn_channels": 32}, distill={"fpn_channels": 16}))  # one family, any widths: fine


def test_validate_refuses_an_image_size_off_the_32_grid_with_exit_2_and_one_line(tmp_path):
    (tmp_path / "det.toml").write_text(
        "[pipeline]\ntask = 'detection'\nworkdir = 'run'\ndevice = 'cpu'\n[data]\nsource = 'scenes'\nimage_size = 48\n"
        "[teacher]\narch = 'retinanet_resnet18_fpn'\n[distill]\nstudent = 'retinanet_resnet18_fpn'\n")
    out = run_cli("validate", str(tmp_path / "det.toml"))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error") and "data.image_size = 48" in lines[0], lines
    assert "multiple of 32" in lines[0]


# -- init_student ------------------------------------------------------------------------------


def _two(teacher_arch: str, student_arch: str, fpn: int = 32):
    torch.manual_seed(1)
    teacher = build_det_model(teacher_arch, C, image_size=S, fpn_channels=fpn)
    torch.manual_seed(2)
    student = build_det_model(student_arch, C, image_size=S, fpn_channels=fpn)
    return teacher, student


@pytest.mark.parametrize("teacher_arch, lateral_weights_fit", [
    # ResNet-34's C3-C5 are as wide as ResNet-18's (128, 256, 512): the whole FPN fits.
    ("retinanet_resnet34_fpn", True),
    # ResNet-50's are 512, 1024, 2048: the 1×1 laterals' (inner blocks') weights cannot be
    # copied; their biases (one per FPN channel) fit and are, tensor by tensor as mmcv's
    # non-strict loading in the authors' recipe.
    ("retinanet_resnet50_fpn", False),
])
def test_init_from_teacher_copies_the_neck_and_head_tensors_that_fit(teacher_arch, lateral_weights_fit):
    from stages.distill import init_from_teacher

    teacher, student = _two(teacher_arch, "retinanet_resnet18_fpn")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    prefixes = ("backbone.fpn.", "head.")

    copied = init_from_teacher(student, teacher, prefixes)

    own, theirs = student.state_dict(), teacher.state_dict()
    lateral_weights = [k for k in own if k.startswith("backbone.fpn.inner_blocks.") and k.endswith(".weight")]
    assert len(lateral_weights) == 3
    skipped = () if lateral_weights_fit else tuple(lateral_weights)
    expected = sorted(k for k in own if k.startswith(prefixes) and k not in skipped)
    assert copied == expected and any(k.startswith("head.classification_head.") for k in copied)
    assert any(k.startswith("backbone.fpn.layer_blocks.") for k in copied)
    assert any(k.startswith("backbone.fpn.extra_blocks.") for k in copied)  # P6/P7
    for k in own:
        if k in copied:
            assert torch.equal(own[k], theirs[k]), k
        else:  # the backbone body (and what does not fit) keeps its own init
            assert torch.equal(own[k], before[k]), k
            assert k.startswith("backbone.body.") or k in skipped, k


def test_distill_with_init_student_starts_the_mgd_student_from_the_teachers_head(tmp_path):
    from pipeline.runner import Runner, RunOptions

    (tmp_path / "det.toml").write_text(f"""
[pipeline]
task = "detection"
workdir = "run"
device = "cpu"
[data]
source = "scenes"
image_size = {S}
batch_size = 4
calibration_size = 2
[data.scenes]
train_images = 4
val_images = 2
[teacher]
arch = "retinanet_resnet34_fpn"
fpn_channels = 16
epochs = 0
[distill]
student = "retinanet_resnet18_fpn"
fpn_channels = 16
epochs = 0
init_student = true
[bench]
warmup = 0
runs = 3
batch_runs = 1
threads = 1
""")
    cfg = config.load(tmp_path / "det.toml")

    out = Runner(cfg, RunOptions(until_stage="distill")).run()

    assert out.code == 0, out.messages
    rec = out.manifest.stages["distill"]
    load = lambda name, stage="distill": torch.load(  # noqa: E731
        tmp_path / "run" / out.manifest.stages[stage].outputs[name].path, weights_only=True)
    teacher, student, baseline = load("teacher", "teacher"), load("student"), load("student_baseline")
    neck_head = [k for k in student if k.startswith(("backbone.fpn.", "head."))]
    assert neck_head and all(torch.equal(student[k], teacher[k]) for k in neck_head)  # epochs = 0: as initialised
    assert not any(torch.equal(baseline[k], teacher[k]) for k in neck_head if k.endswith(".weight"))
    body = [k for k in student if k.startswith("backbone.body.")]
    assert body and all(torch.equal(student[k], baseline[k]) for k in body)  # same seed: the pairing holds
    assert {"map", "map_50"} <= set(rec.metrics["student"]) and {"map", "map_50"} <= set(rec.metrics["student_baseline"])


# -- A user's COCO dataset through the CLI ----------------------------------------------------

SIZES = [(64, 48), (40, 64), (56, 56), (80, 40), (48, 72), (64, 64)]  # (width, height): several aspects
COLORS = {3: (230, 40, 40), 7: (40, 200, 60)}  # category id -> colour of its rectangles


def coco_tree(root: Path, *, n_train: int = 16, n_val: int = 6, bad_category: bool = False) -> dict[str, int]:
    """A user-style COCO dataset: PNGs of several sizes with coloured rectangles as objects,
    non-contiguous category ids 3 and 7 (listed out of order), one crowd annotation (train), one
    negative image per split. ``bad_category``: a val annotation names category 5 (returned as
    ``bad_id``)."""
    rng = np.random.default_rng(0)
    info: dict[str, int] = {}
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
            if i != 2:  # image 2 of each split is a negative
                for k, cid in enumerate((3, 7) if i % 3 else (7,)):
                    bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
                    x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                    pixels[y : y + bh, x : x + bw] = COLORS[cid]
                    aid += 1
                    crowd = int(split == "train" and i == 4 and k == 0)
                    anns.append({"id": aid, "image_id": iid, "category_id": cid, "bbox": [x, y, bw, bh],
                                 "area": bw * bh, "iscrowd": crowd})
            Image.fromarray(pixels).save(folder / f"im{i}.png")
        if bad_category and split == "val":
            anns[1]["category_id"] = 5
            info["bad_id"] = anns[1]["id"]
        categories = [{"id": 7, "name": "green"}, {"id": 3, "name": "red"}]
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return info


DET_TOML = """
[pipeline]
task = "detection"
workdir = "run"
device = "cpu"
[data]
source = "coco"
train_images = "coco/train"
train_annotations = "coco/train.json"
val_images = "coco/val"
val_annotations = "coco/val.json"
image_size = 64
batch_size = 8
calibration_size = 4
[teacher]
arch = "retinanet_resnet18_fpn"
fpn_channels = 32
epochs = 1
optimizer = "adamw"
lr = 0.001
[distill]
student = "retinanet_resnet18_fpn"
fpn_channels = 16
epochs = 1
optimizer = "adamw"
lr = 0.001
init_student = true
baseline = false
[prune]
enabled = true
ratio = 0.3
heal_epochs = 1
lr = 0.0005
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


def test_a_category_id_missing_from_categories_is_one_line_exit_2(tmp_path):
    bad = coco_tree(tmp_path / "coco", n_train=3, n_val=3, bad_category=True)["bad_id"]
    (tmp_path / "det.toml").write_text(DET_TOML)

    out = run_cli("run", str(tmp_path / "det.toml"))

    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error")]
    assert len(lines) == 1, out.stdout + out.stderr
    assert "val.json" in lines[0] and f"annotation id {bad}" in lines[0] and "category id 5" in lines[0]
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_detection_end_to_end_on_a_coco_dataset(tmp_path):
    coco_tree(tmp_path / "coco")
    (tmp_path / "det.toml").write_text(DET_TOML)

    out = run_cli("run", str(tmp_path / "det.toml"))

    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["pipeline"]["task"] == {"name": "detection", "metric": "map", "metrics": ["map", "map_50"],
                                            "labels": {"map": "mAP", "map_50": "mAP@50"},
                                            "axes": {"map": "mAP", "map_50": "mAP@50"}, "history": "map"}
    stages = manifest["stages"]
    # No INT8 drop gate: the INT8 fallback has nothing to recover, and QAD is off without [qad].
    assert {n: r["status"] for n, r in stages.items()} == {**{n: "ok" for n in
                                                          ("teacher", "distill", "prune", "onnx", "openvino", "tensorrt")},
                                                          "int8_fallback": "skipped", "qad": "skipped"}
    measured = {a: m for r in stages.values() for a, m in r["metrics"].items() if "latency_p50_ms" in m}
    assert {"teacher", "student", "pruned", "onnx", "onnx_int8", "openvino_fp32", "openvino_int8", "trt_qdq"} <= set(measured)
    for name, m in measured.items():  # mAP on every runtime's own outputs, never accuracy
        assert 0 <= m["map"] <= m["map_50"] <= 1 and "accuracy" not in m, name
    assert 0.99 <= stages["onnx"]["metrics"]["onnx"]["parity_box_agreement"] <= 1
    assert 0.99 <= stages["openvino"]["metrics"]["openvino_fp32"]["parity_box_agreement"] <= 1
    assert "map_before" in stages["prune"]["metrics"]["pruned"]
    assert "val_map" in stages["distill"]["history"]["student"][0]
    # Without TensorRT and CUDA the engine is recorded as unavailable and the stage is still ok.
    assert stages["tensorrt"]["unavailable"].get("trt_engine") or "trt_engine" in stages["tensorrt"]["metrics"]
    gates = [g for r in stages.values() for g in r["gates"]]
    assert gates and {g["gate"] for g in gates} == {"max_metric_drop"} and all("map" in g["metric"] for g in gates)
    assert (tmp_path / "run" / "report.html").read_text().count("mAP") > 3
