"""Tests for pipeline.tasks.common.detectors: every arch at 64 px (and 128), anchors, feature taps, weights
(offline) and structured pruning; decode and export are in test_detpost.py."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.tasks.common.detectors import (
    DET_ARCHS,
    DetRaw,
    anchor_size_range,
    build_det_model,
    check_det_arch,
    det_arch_kind,
    retinanet_anchor_sizes,
)
from pipeline.tasks.common.box_decode import OUTPUT_NAMES, decode
from pipeline.errors import ConfigError

C = 10  # classes
S = 64  # input side


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, OpenMP's spinning threads made these
    tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(n: int = 2, size: int = S, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _build(arch: str, seed: int = 0, size: int = S, **kwargs) -> DetRaw:
    torch.manual_seed(seed)
    return build_det_model(arch, C, image_size=size, **kwargs).eval()


def _raw(model: DetRaw, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {name: t.numpy() for name, t in zip(model.output_names, model(x), strict=True)}


def _outputs_of(model: nn.Module, names, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of modules `names` on `x`, caught by forward hooks."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: seen.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[n] for n in names]


# -- Names and settings ----------------------------------------------------------------------


def test_arch_list_and_kinds():
    assert len(DET_ARCHS) == 9
    assert {det_arch_kind(a) for a in DET_ARCHS} == {"retinanet", "fcos", "ssd"}
    assert det_arch_kind("fcos_mobilenet_v3_large_fpn") == "fcos"
    assert det_arch_kind("ssdlite320_mobilenet_v3_large") == "ssd"


def test_unknown_arch_suggests_and_lists_allowed():
    expected = r"arch = 'retinanet_resnet81_fpn'.*did you mean retinanet_resnet18_fpn.*allowed: "
    with pytest.raises(ConfigError, match=expected):
        check_det_arch("retinanet_resnet81_fpn")
    with pytest.raises(ConfigError, match="unknown detection architecture") as info:
        build_det_model("fasterrcnn_resnet50_fpn", C, image_size=S)  # torchvision has it, this pipeline does not
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("n", "size", "key"), [
    (C, 100, "image_size = 100"), (C, 16, "image_size = 16"), (0, S, "num_classes = 0"),
])
def test_bad_settings_are_one_line_config_errors(n, size, key):
    with pytest.raises(ConfigError, match=key) as info:
        build_det_model("fcos_resnet18_fpn", n, image_size=size)
    assert "\n" not in str(info.value)


# -- Every arch ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", DET_ARCHS)
def test_every_arch_returns_the_documented_raw_tuple(arch):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _build(arch)
    out = _raw(model, _x())

    kind = det_arch_kind(arch)
    a = len(model.anchors)
    columns = {"cls_logits": C + (kind == "ssd"), "bbox_regression": 4, "bbox_ctrness": 1}
    assert model.output_names == OUTPUT_NAMES[kind] and tuple(out) == model.output_names
    assert all(out[n].shape == (2, a, columns[n]) for n in model.output_names)
    assert model.anchors.shape == (a, 4) and model.anchors.dtype == np.float32 and sum(model.level_sizes) == a
    assert not model.anchors.flags.writeable
    assert {"backbone", "head"} <= {n for n, _ in model.named_children()}
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.parameters())
    # Computing the anchors ran a dummy batch in eval mode: no running statistics were touched.
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    modules = dict(model.named_modules())
    assert all(isinstance(modules[h], nn.Conv2d) for h in model.head_layers)


@pytest.mark.parametrize("arch", DET_ARCHS)
def test_feature_layers_are_one_4d_map_per_level(arch):
    model = _build(arch)
    features = _outputs_of(model, model.feature_layers, _x())

    assert len(features) == len(model.level_sizes)
    assert all(isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[0] == 2 for f in features)
    per_location = model.anchor_generator.num_anchors_per_location()
    assert [f.shape[-2] * f.shape[-1] * k for f, k in zip(features, per_location)] == list(model.level_sizes)


@pytest.mark.parametrize("family", ["retinanet", "fcos"])
def test_teacher_and_student_of_a_family_share_the_levels(family):
    archs = [a for a in DET_ARCHS if a.startswith(family + "_")]
    models = [_build(a) for a in archs]

    assert len(archs) == 4
    assert {m.feature_layers for m in models} == {tuple(f"fpn_taps.p{i}" for i in range(3, 8))}
    assert {m.level_sizes for m in models} == {models[0].level_sizes}
    assert all(np.array_equal(m.anchors, models[0].anchors) for m in models)


def test_head_layers_per_family():
    retina, fcos = _build("retinanet_resnet18_fpn"), _build("fcos_resnet18_fpn")
    ssd = _build("ssdlite320_mobilenet_v3_large")

    def out_channels(model):
        return [dict(model.named_modules())[h].out_channels for h in model.head_layers]

    assert retina.head_layers == ("head.classification_head.cls_logits", "head.regression_head.bbox_reg")
    assert fcos.head_layers == (*retina.head_layers, "head.regression_head.bbox_ctrness")
    assert out_channels(retina) == [9 * C, 9 * 4] and out_channels(fcos) == [C, 4, 1]
    assert len(ssd.head_layers) == 12 and ssd.head_layers[0] == "head.classification_head.module_list.0.1"


# -- Anchors ---------------------------------------------------------------------------------


def test_retinanet_anchor_rule():
    from torchvision.models.detection.retinanet import _default_anchorgen

    small = [s for level in retinanet_anchor_sizes(64) for s in level]
    assert anchor_size_range(64) == (8.0, 64.0) and anchor_size_range(800) == (32.0, 800.0)
    assert small[0] == pytest.approx(8.0) and small[-1] == pytest.approx(64.0) and small == sorted(small)
    # At torchvision's own input size the rule is torchvision's anchors, to within 2 %.
    theirs = [s for level in _default_anchorgen().sizes for s in level]
    ours = [s for level in retinanet_anchor_sizes(800) for s in level]
    assert np.allclose(ours, theirs, rtol=0.02)


@pytest.mark.parametrize("size", [64, 128])
def test_anchors_span_small_objects_to_the_image(size):
    retina = _build("retinanet_resnet18_fpn", size=size).anchors
    ssd = _build("ssdlite320_mobilenet_v3_large", size=size).anchors
    fcos = _build("fcos_resnet18_fpn", size=size)

    for anchors in (retina, ssd):
        side = np.sqrt((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1]))
        assert side.min() <= 10 and side.max() >= 0.9 * size
    # FCOS: one point per location, its box as large as the level's nominal stride (8 ... 128).
    sides = np.unique(fcos.anchors[:, 2] - fcos.anchors[:, 0])
    assert list(sides) == [8, 16, 32, 64, 128] and fcos.level_sizes[0] == (size // 8) ** 2


# -- Weights ---------------------------------------------------------------------------------


def _frozen_bn_v1(sd: dict) -> dict:
    """As torchvision's COCO RetinaNet checkpoint: FrozenBatchNorm (no num_batches_tracked) and
    the v1 head layout (conv.0, conv.2, ...), which torchvision converts on load; so do we."""
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    for key in [k for k in sd if ".conv." in k and k.startswith("head.")]:
        head, rest = key.split(".conv.")
        i, _, param = rest.split(".")
        sd[f"{head}.conv.{2 * int(i)}.{param}"] = sd.pop(key)
    return sd


@pytest.mark.parametrize("convert", [dict, _frozen_bn_v1])
def test_state_dict_round_trip(tmp_path, convert):
    src = _build("retinanet_resnet18_fpn", seed=0)
    torch.save(convert(src.state_dict()), tmp_path / "w.pt")

    dst = _build("retinanet_resnet18_fpn", seed=1, weights="w.pt", base_dir=tmp_path)

    assert all(np.array_equal(a, b) for a, b in zip(_raw(src, _x()).values(), _raw(dst, _x()).values()))


def test_plain_torchvision_detector_state_dict_loads(tmp_path):
    """The torchvision builder's own model (keys, BatchNorm eps/momentum and all) fits as is."""
    from torchvision.models import detection as det

    torch.manual_seed(0)
    theirs = det.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=C + 1).eval()
    torch.save(theirs.state_dict(), tmp_path / "tv.pt")

    ours = _build("ssdlite320_mobilenet_v3_large", seed=1, weights=str(tmp_path / "tv.pt"))

    with torch.no_grad():
        features = list(theirs.backbone(_x()).values())
        expected = theirs.head(features)
    assert all(np.array_equal(_raw(ours, _x())[n], expected[n].numpy()) for n in ours.output_names)


@pytest.mark.parametrize(("arch", "skipped"), [
    ("fcos_resnet18_fpn", "head.classification_head.cls_logits.weight"),
    ("ssdlite320_mobilenet_v3_large", "head.classification_head.module_list.0.1.weight"),
])
def test_head_of_another_class_count_is_skipped(tmp_path, caplog, arch, skipped):
    torch.manual_seed(0)
    src = build_det_model(arch, 5, image_size=S)
    torch.save(src.state_dict(), tmp_path / "five.pt")

    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.common.detectors"):
        dst = _build(arch, seed=1, weights=str(tmp_path / "five.pt"))

    assert "another class count" in caplog.text and skipped in caplog.text
    box = "head.regression_head." + ("bbox_reg.weight" if arch.startswith("fcos") else "module_list.0.1.weight")
    assert torch.equal(dst.state_dict()[box], src.state_dict()[box])
    assert _raw(dst, _x())["cls_logits"].shape[-1] == C + arch.startswith("ssd")


def test_checkpoint_of_another_arch_is_a_one_line_config_error(tmp_path):
    torch.save(_build("fcos_resnet18_fpn").state_dict(), tmp_path / "fcos.pt")

    with pytest.raises(ConfigError, match=r"fcos\.pt' does not fit retinanet_resnet18_fpn: missing head\.") as info:
        _build("retinanet_resnet18_fpn", weights=str(tmp_path / "fcos.pt"))
    assert "\n" not in str(info.value)


def test_missing_or_unreadable_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        _build("fcos_resnet18_fpn", weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read it as a torch state dict"):
        _build("fcos_resnet18_fpn", weights=str(tmp_path / "junk.pt"))


def test_torchvision_weights_typo_fails_before_any_download():
    with pytest.raises(ConfigError, match="unknown weights for retinanet_resnet50_fpn; available: torchvision:DEFAULT"):
        _build("retinanet_resnet50_fpn", weights="torchvision:COCO")
    with pytest.raises(ConfigError, match="unknown weights for resnet18; available: torchvision:DEFAULT"):
        _build("retinanet_resnet18_fpn", weights="torchvision:COCO_V1")


@pytest.mark.parametrize(("arch", "classifier", "prefix"), [
    ("retinanet_resnet18_fpn", "resnet18", ""), ("fcos_mobilenet_v3_large_fpn", "mobilenet_v3_large", "features."),
])
def test_torchvision_weights_composed_arch_gets_the_imagenet_backbone(monkeypatch, arch, classifier, prefix):
    """Offline: the download is replaced by a fresh ImageNet classifier's state dict."""
    import torchvision.models
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(3)
    imagenet = getattr(torchvision.models, classifier)().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: imagenet)

    model = _build(arch, weights="torchvision:DEFAULT")

    own = model.state_dict()
    backbone = {k: v for k, v in imagenet.items() if k.startswith(prefix) and not k.startswith(("fc.", "classifier."))}
    assert backbone and all(torch.equal(own["backbone.body." + k[len(prefix):]], v) for k, v in backbone.items())


def test_torchvision_weights_shipped_arch_skips_the_coco_class_head(monkeypatch, caplog):
    from torchvision.models import detection as det
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(3)
    coco = det.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: coco)

    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.common.detectors"):
        model = _build("ssdlite320_mobilenet_v3_large", weights="torchvision:DEFAULT")

    assert "head.classification_head.module_list.5.1.bias" in caplog.text
    key = "head.regression_head.module_list.0.1.weight"
    assert torch.equal(model.state_dict()[key], coco[key])


# -- Pruning ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["retinanet_resnet18_fpn", "fcos_resnet18_fpn", "ssdlite320_mobilenet_v3_large"])
def test_torch_pruning_keeps_the_head_and_output_shapes(arch):
    tp = pytest.importorskip("torch_pruning")
    model = _build(arch)
    modules = dict(model.named_modules())
    heads = [modules[h] for h in model.head_layers]
    head_channels = [h.out_channels for h in heads]
    shapes = {n: a.shape for n, a in _raw(model, _x()).items()}
    channels = [f.shape[1] for f in _outputs_of(model, model.feature_layers, _x())]
    params = sum(p.numel() for p in model.parameters())

    pruner = tp.pruner.BasePruner(
        model, _x(), importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=heads
    )
    pruner.step()

    out = _raw(model, _x())
    assert {n: a.shape for n, a in out.items()} == shapes  # A and C unchanged
    assert [h.out_channels for h in heads] == head_channels
    assert sum(p.numel() for p in model.parameters()) < 0.5 * params
    pruned = [f.shape[1] for f in _outputs_of(model, model.feature_layers, _x())]
    assert all(p < c for p, c in zip(pruned, channels, strict=True))
    decode(out, model.anchors, arch_kind=model.arch_kind, image_size=S, level_sizes=model.level_sizes)
