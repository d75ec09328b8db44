"""Instance segmentation on the task contract: the model's raw outputs (FCOS's own box outputs plus
coefficients and prototypes, fixed shapes, no NMS in the exported graph), the loss (torchvision's
FCOS assignment and losses plus YOLACT's mask loss), decode → NMS → mask assembly, COCO mask
mAP (crowds ignored as COCO does), mask parity, the authors' defaults, and the scene masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.config import ConfigError
from pipeline.tasks import get_task
from pipeline.tasks.common.coco_masks import decode as rle_decode, encode as rle_encode
from pipeline.tasks.common.detectors import build_det_model
from pipeline.tasks.instance_segmentation.loss import box_losses, mask_loss
from pipeline.tasks.instance_segmentation.models import INST_ARCHS, NUM_PROTOS, build_inst_model
from pipeline.tasks.instance_segmentation.post import decode_instances, input_masks, original_rles, paste_masks

S = 64
C = 3


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(**tables) -> config.Config:
    raw = {"pipeline": {"task": "instance_segmentation"}, "data": {"source": "scenes", "image_size": S}}
    for table, values in tables.items():
        raw.setdefault(table, {}).update(values)
    return config.from_dict(raw)


def _task():
    return get_task("instance_segmentation").bind(_cfg())


def _model(arch: str = "yolact_resnet18_fpn", fpn: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return build_inst_model(arch, C, image_size=S, fpn_channels=fpn)


def _targets() -> list[dict]:
    """Two images: two objects (a filled square and a ring), and a negative."""
    m1 = torch.zeros(S, S, dtype=torch.uint8)
    m1[8:30, 6:28] = 1
    m2 = torch.zeros(S, S, dtype=torch.uint8)
    m2[30:60, 32:62] = 1
    m2[38:52, 40:54] = 0
    return [
        {"boxes": torch.tensor([[6.0, 8.0, 28.0, 30.0], [32.0, 30.0, 62.0, 60.0]]), "labels": torch.tensor([0, 2]),
         "masks": torch.stack([m1, m2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, S, S)},
    ]


# -- Model --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", INST_ARCHS)
def test_every_arch_returns_fcos_outputs_plus_coefficients_and_prototypes(arch):
    model = build_inst_model(arch, C, image_size=S, fpn_channels=32).eval()
    with torch.no_grad():
        out = dict(zip(model.output_names, model(torch.randn(2, 3, S, S))))

    a = len(model.anchors)
    assert list(out) == ["cls_logits", "bbox_regression", "bbox_ctrness", "mask_coeffs", "protos"]
    assert out["cls_logits"].shape == (2, a, C) and out["bbox_regression"].shape == (2, a, 4)
    assert out["bbox_ctrness"].shape == (2, a, 1) and out["mask_coeffs"].shape == (2, a, NUM_PROTOS)
    assert out["protos"].shape == (2, NUM_PROTOS, S // 4, S // 4)
    assert out["mask_coeffs"].abs().max() <= 1 and out["protos"].min() >= 0  # tanh, ReLU
    assert all(not isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or type(m) is torch.nn.BatchNorm2d
               for m in model.modules())  # plain BatchNorm: Torch-Pruning can prune it
    assert all(p.requires_grad for p in model.parameters())


def test_the_box_outputs_are_the_fcos_detectors_own():
    inst = _model().eval()
    det = build_det_model("fcos_resnet18_fpn", C, image_size=S, fpn_channels=32).eval()
    missing, unexpected = det.load_state_dict(inst.state_dict(), strict=False)
    assert not missing and set(unexpected) == {k for k in inst.state_dict() if k.startswith(("proto.", "head.mask_coeff."))}
    x = torch.randn(2, 3, S, S)
    with torch.no_grad():
        got, want = inst(x)[:3], det(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_unknown_arch_suggests_the_close_names():
    with pytest.raises(ConfigError, match="did you mean yolact_resnet18_fpn"):
        build_inst_model("yolact_resnet81_fpn", C, image_size=S)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_inst_model("yolact_resnet18_fpn", C, image_size=48)


# -- Loss ---------------------------------------------------------------------------------------


def test_box_terms_and_assignment_are_torchvisions_fcos():
    from torchvision.models.detection import FCOS

    task = _task()
    model = _model().train()
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    head = dict(zip(model.output_names, model(x)))
    stand, detector = task._stand_in(C)
    anchors = torch.from_numpy(np.array(stand.anchors))
    boxes = [{"boxes": t["boxes"], "labels": t["labels"]} for t in _targets()]
    box_head = {k: head[k] for k in ("cls_logits", "bbox_regression", "bbox_ctrness")}

    ours, matched = box_losses(detector, boxes, box_head, anchors, list(stand.level_sizes))
    theirs = FCOS.compute_loss(detector, boxes, box_head, [anchors] * 2, list(stand.level_sizes))

    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (matched[0] >= 0).any() and set(matched[0][matched[0] >= 0].tolist()) <= {0, 1}
    assert (matched[1] == -1).all()  # the negative image: every location is background


def test_mask_loss_is_low_for_the_true_masks_and_trains_the_mask_branch():
    targets = _targets()
    a = 5
    protos = torch.zeros(1, 2, S // 4, S // 4)
    protos[0, 0] = torch.nn.functional.adaptive_avg_pool2d(targets[0]["masks"][:1].float(), S // 4)[0] * 20 - 10
    protos[0, 1] = torch.nn.functional.adaptive_avg_pool2d(targets[0]["masks"][1:].float(), S // 4)[0] * 20 - 10
    matched = [torch.tensor([0, 1, -1, 1, -1])]
    right = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    wrong = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])
    assert right.shape == (1, a, 2)

    low, high = mask_loss(right, protos, matched, targets[:1]), mask_loss(wrong, protos, matched, targets[:1])
    none = mask_loss(right, protos, [torch.full((a,), -1)], targets[:1])

    assert float(low.detach()) < 0.3 < 2.0 < float(high.detach())
    assert float(none) == 0.0 and none.requires_grad  # no positives: zero, still in the graph

    model = _model().train()
    out = model(torch.randn(2, 3, S, S))
    loss = _task().loss(out, _targets(), _cfg().teacher)
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("head.mask_coeff.weight", "proto.out.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


# -- Decode, masks, metric ----------------------------------------------------------------------


def _perfect_outputs(task, targets: list[dict]) -> dict[str, np.ndarray]:
    """Raw outputs that decode exactly to ``targets``: one confident location per object, its
    box regressed exactly, and a prototype per object that is its mask."""
    stand, _ = task._stand_in(C)
    anchors = np.asarray(stand.anchors)
    a, n = len(anchors), len(targets)
    cls = np.full((n, a, C), -20.0, np.float32)
    reg = np.zeros((n, a, 4), np.float32)
    ctr = np.full((n, a, 1), 20.0, np.float32)
    coeffs = np.zeros((n, a, NUM_PROTOS), np.float32)
    protos = np.zeros((n, NUM_PROTOS, S // 4, S // 4), np.float32)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    for i, t in enumerate(targets):
        for k, (box, label) in enumerate(zip(t["boxes"].numpy(), t["labels"].numpy())):
            centre = (box[:2] + box[2:]) / 2
            loc = int(np.argmin(((centres - centre) ** 2).sum(1) + 1e6 * (anchors[:, 2] - anchors[:, 0] != 8)))
            size = anchors[loc, 2] - anchors[loc, 0]
            cx, cy = centres[loc]
            reg[i, loc] = [(cx - box[0]) / size, (cy - box[1]) / size, (box[2] - cx) / size, (box[3] - cy) / size]
            cls[i, loc, label] = 20.0
            coeffs[i, loc, k] = 1.0
            proto = torch.nn.functional.adaptive_avg_pool2d(t["masks"][k : k + 1].float(), S // 4)[0].numpy()
            protos[i, k] = np.where(proto >= 0.5, 40.0, -40.0)
    return {"cls_logits": cls, "bbox_regression": reg, "bbox_ctrness": ctr, "mask_coeffs": coeffs, "protos": protos}


def _eval_targets() -> list[dict]:
    out = []
    for i, t in enumerate(_targets()[:1]):
        out.append({**t, "rles": [rle_encode(m.numpy()) for m in t["masks"]], "crowd_boxes": torch.zeros(0, 4),
                    "crowd_labels": torch.zeros(0, dtype=torch.int64), "crowd_rles": [], "image_id": i,
                    "orig_size": (S, S), "scale": 1.0, "pad": (0, 0)})
    return out


def test_decode_assembles_each_detections_mask_from_its_coefficients():
    task = _task()
    targets = _eval_targets()
    raw = _perfect_outputs(task, targets)

    det = task.postprocess(raw)[0]

    assert sorted(det["labels"].tolist()) == [0, 2]
    for k in range(2):
        j = int(np.where(det["labels"] == targets[0]["labels"][k].item())[0][0])
        np.testing.assert_allclose(det["boxes"][j], targets[0]["boxes"][k].numpy(), atol=1e-3)
        expected = raw["mask_coeffs"][0, det["index"][j]] @ raw["protos"][0].reshape(NUM_PROTOS, -1)
        np.testing.assert_allclose(det["proto_masks"][j].ravel(), 1 / (1 + np.exp(-expected)), rtol=1e-5)
        pasted = input_masks({**det, "proto_masks": det["proto_masks"][j : j + 1], "boxes": det["boxes"][j : j + 1]}, S)[0]
        gt = targets[0]["masks"][k].bool()
        assert (pasted & gt).sum() / (pasted | gt).sum() > 0.8


def test_paste_masks_zeroes_everything_outside_the_box():
    probs = paste_masks(np.ones((1, S // 4, S // 4), np.float32), np.array([[10.0, 20.0, 30.0, 40.0]]), S)[0]
    inside = probs.nonzero()
    assert probs.max() == 1
    assert inside[:, 1].min() == 10 and inside[:, 1].max() == 29 and inside[:, 0].min() == 20 and inside[:, 0].max() == 39


def test_evaluator_scores_perfect_masks_1_and_empty_masks_0():
    task = _task()
    targets = _eval_targets()
    raw = _perfect_outputs(task, targets)

    ev = task.evaluator(C)
    ev.update(raw, targets)
    good = ev.compute()
    blank = dict(raw, protos=np.full_like(raw["protos"], -40.0))  # right boxes, empty masks
    ev = task.evaluator(C)
    ev.update(blank, targets)
    bad = ev.compute()

    assert set(good) == {"map", "map_50", "mask_map", "mask_map_50"}
    assert good["map"] > 0.99 and good["mask_map_50"] > 0.99 and good["mask_map"] > 0.5
    assert bad["map"] > 0.99 and bad["mask_map"] == 0.0


def test_a_detection_on_a_crowd_region_is_not_a_false_positive():
    from pipeline.tasks.common.coco_eval import CocoMAP

    gt = np.zeros((S, S), np.uint8)
    gt[5:20, 5:20] = 1
    crowd = np.zeros((S, S), np.uint8)
    crowd[30:60, 30:60] = 1
    target = {"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([0]), "rles": [rle_encode(gt)],
              "crowd_boxes": torch.tensor([[30.0, 30.0, 60.0, 60.0]]), "crowd_labels": torch.tensor([0]),
              "crowd_rles": [rle_encode(crowd)], "orig_size": (S, S)}
    inside = np.zeros((S, S), np.uint8)
    inside[35:50, 35:50] = 1
    pred = {"boxes": np.array([[5.0, 5.0, 20.0, 20.0], [35.0, 35.0, 50.0, 50.0]]), "scores": np.array([0.9, 0.95]),
            "labels": np.array([0, 0]), "rles": [rle_encode(gt), rle_encode(inside)]}

    coco = CocoMAP(["a"], masks=True)
    coco.update([pred], [target])
    got = coco.compute()

    assert got["mask_map"] == pytest.approx(1.0) and got["map"] == pytest.approx(1.0)


def test_masks_map_back_through_the_letterbox():
    # A 64×32 image letterboxed to 64: scale 1, pad (16, 0); a mask in the canvas maps back shifted.
    det = {"boxes": np.array([[20.0, 10.0, 40.0, 30.0]], np.float32),
           "proto_masks": np.ones((1, S // 4, S // 4), np.float32)}
    rle = original_rles(det, {"orig_size": (64, 32), "scale": 1.0, "pad": (16, 0)}, S)[0]
    mask = rle_decode(rle)
    assert mask.shape == (64, 32)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (4, 23, 10, 29)


def test_mask_agreement_needs_the_same_masks_not_only_the_same_boxes():
    task = _task()
    targets = _eval_targets()
    raw = _perfect_outputs(task, targets)
    shifted = dict(raw, protos=np.roll(raw["protos"], 3, axis=-1))  # same boxes, masks moved 12 px

    assert task.parity(raw, raw).agreement == 1.0
    assert task.parity(raw, shifted).agreement == 0.0


# -- Config defaults ----------------------------------------------------------------------------


def test_the_authors_instance_settings_are_the_defaults_and_explicit_keys_win():
    cfg = _cfg()
    assert (cfg.teacher.arch, cfg.distill.student) == ("yolact_resnet34_fpn", "yolact_resnet18_fpn")
    assert cfg.distill.init_student is True and cfg.teacher.grad_clip == 35.0
    assert (cfg.distill.mgd.mask, cfg.distill.mgd.mask_ratio, cfg.distill.mgd.alpha) == ("pixel", 0.65, "auto")
    assert cfg.distill.mgd.teacher_layers == [f"fpn_taps.p{k}" for k in (3, 4, 5, 6)]
    assert (cfg.distill.optimizer, cfg.distill.grad_clip, cfg.data.batch_size) == ("adamw", 35.0, 8)

    explicit = _cfg(distill={"init_student": False, "mgd": {"alpha": 2e-5, "mask_ratio": 0.45}})
    assert explicit.distill.init_student is False
    assert (explicit.distill.mgd.alpha, explicit.distill.mgd.mask_ratio) == (2e-5, 0.45)
    assert config.from_dict({"pipeline": {"task": "detection"}}).distill.init_student is False


@pytest.mark.parametrize("raw, message", [
    ({"teacher": {"arch": "maskrcnn_resnet50_fpn"}}, "teacher.arch"),
    ({"data": {"source": "masks"}}, "data.source = 'masks' does not fit"),
    ({"data": {"source": "coco"}}, "data.train_images: source 'coco' needs"),
])
def test_instance_config_mistakes_are_one_line_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**raw)


# -- Scenes -------------------------------------------------------------------------------------


def test_scene_instances_are_the_visible_strokes_of_each_digit():
    from pipeline.tasks.common.scenes import SceneSpec, make_scenes, split_pools

    spec = SceneSpec(image_size=64, min_digits=2, max_digits=3, max_overlap=0.4)
    pool = split_pools(0)[0]
    plain = make_scenes(spec, 24, seed=3, pool=pool)
    inst = make_scenes(spec, 24, seed=3, pool=pool, instances=True)

    assert plain.instance_masks is None and torch.equal(plain.images, inst.images) and torch.equal(plain.masks, inst.masks)
    for masks, labels, semantic in zip(inst.instance_masks, inst.labels, inst.masks):
        assert masks.shape[0] == len(labels)
        assert (masks.sum(0) <= 1).all()  # a pixel belongs to one digit
        for m, label in zip(masks, labels):
            assert (semantic[m] == label + 1).all()  # the semantic mask gives those pixels that class
        fg = (semantic > 0) & (semantic != 255)
        assert torch.equal(masks.any(0), fg)  # and every stroke pixel belongs to some digit


def test_scene_items_carry_masks_their_rles_and_boxes_that_hold_them():
    cfg = _cfg(data={"scenes": {"train_images": 12, "val_images": 4, "min_digits": 2, "max_digits": 3}})
    bundle = _task().load_data(cfg.data, 0, cfg.resolve("."))
    x, target = bundle.val[0]

    assert x.shape == (3, S, S) and bundle.classes == [str(d) for d in range(10)]
    assert len(target["masks"]) == len(target["boxes"]) == len(target["rles"]) >= 1
    for mask, box, rle in zip(target["masks"], target["boxes"], target["rles"]):
        assert np.array_equal(rle_decode(rle), mask.numpy())
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] and xs.max() < box[2] and ys.min() >= box[1] and ys.max() < box[3]
