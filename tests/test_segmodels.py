"""Tests for pipeline.tasks.segmentation.models: every arch at 64 px, output strides, weights (offline), ONNX
export and structured pruning."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.tasks.segmentation.models import (
    SEG_ARCHS,
    build_seg_model,
    check_seg_arch,
    default_output_stride,
    seg_feature_layer,
    seg_head_layers,
)

C = 11  # classes
S = 64  # input side


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, OpenMP's spinning threads made these
    tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(0))


def _build(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_seg_model(arch, C, **kwargs).eval()


def _output_of(model: nn.Module, name: str) -> torch.Tensor:
    """The output of module `name` on a 2×3×64×64 input, caught by a forward hook."""
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda _m, _i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(_x())
    finally:
        handle.remove()
    return seen[0]


def _conv_settings(model: nn.Module) -> list[tuple]:
    return [(n, m.stride, m.dilation, m.padding) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def test_arch_list():
    assert len(SEG_ARCHS) == 9 and "deeplabv3_resnet18" in SEG_ARCHS and "lraspp_mobilenet_v3_large" in SEG_ARCHS


def test_unknown_arch_suggests_and_lists_allowed():
    with pytest.raises(ConfigError, match=r"arch = 'deeplabv3_resnet81'.*did you mean deeplabv3_resnet18.*allowed: "):
        check_seg_arch("deeplabv3_resnet81")
    with pytest.raises(ConfigError, match="unknown segmentation architecture"):
        build_seg_model("deeplabv3_resnet101", C)  # torchvision has it, this pipeline does not list it


@pytest.mark.parametrize(("kwargs", "key"), [({"output_stride": 4}, "output_stride = 4"), ({}, "num_classes = 0")])
def test_bad_settings_are_one_line_config_errors(kwargs, key):
    n = 0 if "num_classes" in key else C
    with pytest.raises(ConfigError, match=key) as info:
        build_seg_model("fcn_resnet18", n, **kwargs)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Every arch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SEG_ARCHS)
def test_every_arch_builds_and_returns_logits_at_input_size(arch):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _build(arch)
    with torch.no_grad():
        out = model(_x())

    assert isinstance(out, torch.Tensor) and out.shape == (2, C, S, S)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert {"backbone", "classifier"} <= {n for n, _ in model.named_children()}
    feature = _output_of(model, seg_feature_layer(model, arch))
    assert isinstance(feature, torch.Tensor) and feature.dim() == 4
    assert feature.shape[-2:] == (S // default_output_stride(arch),) * 2
    heads = dict(model.named_modules())
    assert all(isinstance(heads[h], nn.Conv2d) and heads[h].out_channels == C for h in seg_head_layers(model))


def test_default_output_strides_are_torchvisions():
    assert [default_output_stride(a) for a in ("fcn_resnet18", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large")] == [
        8, 8, 16,
    ]


# ResNet-50 and deeplabv3_mobilenet_v3_large share these archs' stride code and are checked
# against torchvision below; the every-arch test covers their default stride.
@pytest.mark.parametrize(
    "arch", ["deeplabv3_resnet18", "fcn_resnet18", "deeplabv3_resnet34", "fcn_resnet34",
             "fcn_mobilenet_v3_large", "lraspp_mobilenet_v3_large"],
)
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_output_stride_at_the_feature_layer(arch, stride):
    model = _build(arch, output_stride=stride)

    feature = _output_of(model, seg_feature_layer(model, arch))

    assert feature.shape[-2:] == (S // stride, S // stride)
    with torch.no_grad():
        assert model(_x()).shape == (2, C, S, S)


def test_dilated_basic_block_follows_the_a_trous_rule():
    """ResNet-18 at stride 8: the conv that carried a stage's stride keeps the previous
    dilation, every later 3×3 conv of the stage gets the doubled one."""
    bb = _build("deeplabv3_resnet18").backbone
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer3] == [(1, 2), (2, 2)]
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in bb.layer4] == [(2, 4), (4, 4)]
    assert all(c.padding == c.dilation for b in [*bb.layer3, *bb.layer4] for c in (b.conv1, b.conv2))
    assert bb.layer3[0].downsample[0].stride == (1, 1) and bb.layer2[0].conv1.stride == (2, 2)


def test_stride_setters_reproduce_torchvision():
    """At the default stride, the torchvision-built models are left exactly as torchvision built
    them; at stride 32, a composed ResNet-18 is the plain torchvision ResNet-18."""
    import torchvision.models
    from torchvision.models import segmentation as seg

    for arch in ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"):
        theirs = getattr(seg, arch)(weights=None, weights_backbone=None, num_classes=C)
        assert _conv_settings(_build(arch)) == _conv_settings(theirs), arch
    ours = _build("fcn_resnet18", output_stride=32).backbone
    plain = {n: s for n, *s in _conv_settings(torchvision.models.resnet18())}
    assert all(plain[n] == s for n, *s in _conv_settings(ours))


def test_aspp_rates_scale_with_the_output_stride():
    def rates(model):
        return [branch[0].dilation[0] for branch in model.classifier[0].convs[1:4]]

    assert rates(_build("deeplabv3_resnet18")) == [12, 24, 36]
    assert rates(_build("deeplabv3_resnet18", output_stride=16)) == [6, 12, 18]
    assert rates(_build("deeplabv3_mobilenet_v3_large")) == [12, 24, 36]  # torchvision's, at stride 16


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    src = _build("deeplabv3_resnet18", seed=0)
    torch.save(src.state_dict(), tmp_path / "w.pt")

    dst = _build("deeplabv3_resnet18", seed=1, weights="w.pt", base_dir=tmp_path)

    with torch.no_grad():
        assert torch.equal(src(_x()), dst(_x()))


def test_plain_torchvision_state_dict_loads_and_aux_is_skipped(tmp_path, caplog):
    from torchvision.models import segmentation as seg

    torch.manual_seed(0)
    theirs = seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=C, aux_loss=True)
    theirs.eval()
    torch.save(theirs.state_dict(), tmp_path / "tv.pt")

    with caplog.at_level(logging.INFO, logger="pipeline.tasks.segmentation.models"):
        ours = _build("deeplabv3_mobilenet_v3_large", seed=1, weights=str(tmp_path / "tv.pt"))

    assert "auxiliary-classifier" in caplog.text
    with torch.no_grad():
        assert torch.equal(ours(_x()), theirs(_x())["out"])


def test_head_of_another_class_count_is_skipped(tmp_path, caplog):
    torch.manual_seed(0)
    src = build_seg_model("fcn_resnet18", 5).eval()
    torch.save(src.state_dict(), tmp_path / "five.pt")

    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.segmentation.models"):
        dst = _build("fcn_resnet18", seed=1, weights=str(tmp_path / "five.pt"))

    assert "another class count" in caplog.text and "classifier.4.weight" in caplog.text
    assert torch.equal(dst.classifier[0].weight, src.classifier[0].weight)
    assert torch.equal(dst.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)
    assert dst.classifier[4].out_channels == C


def test_checkpoint_of_another_arch_is_a_one_line_config_error(tmp_path):
    torch.save(_build("fcn_resnet18").state_dict(), tmp_path / "fcn.pt")

    with pytest.raises(ConfigError, match=r"fcn\.pt' does not fit deeplabv3_resnet18: missing classifier\.0\.") as info:
        _build("deeplabv3_resnet18", weights=str(tmp_path / "fcn.pt"))
    assert "\n" not in str(info.value)


def test_missing_or_unreadable_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        _build("fcn_resnet18", weights=str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read it as a torch state dict"):
        _build("fcn_resnet18", weights=str(tmp_path / "junk.pt"))


def test_torchvision_weights_typo_fails_before_any_download():
    with pytest.raises(ConfigError, match="unknown weights for resnet18; available: torchvision:DEFAULT"):
        _build("deeplabv3_resnet18", weights="torchvision:IMAGENET")


@pytest.mark.parametrize(("arch", "classifier", "prefix"), [
    ("deeplabv3_resnet18", "resnet18", ""), ("fcn_mobilenet_v3_large", "mobilenet_v3_large", "features."),
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
    assert backbone and all(torch.equal(own["backbone." + k[len(prefix) :]], v) for k, v in backbone.items())


def test_torchvision_weights_shipped_arch_skips_voc_head(monkeypatch, caplog):
    from torchvision.models import segmentation as seg
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(3)
    voc = seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: voc)

    with caplog.at_level(logging.WARNING, logger="pipeline.tasks.segmentation.models"):
        model = _build("lraspp_mobilenet_v3_large", weights="torchvision:COCO_WITH_VOC_LABELS_V1")

    assert "classifier.low_classifier.weight" in caplog.text
    assert torch.equal(model.state_dict()["backbone.16.0.weight"], voc["backbone.16.0.weight"])


# --------------------------------------------------------------------------------------------
# Export and pruning
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deeplabv3_resnet18_onnx_matches_torch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _build("deeplabv3_resnet18")
    file = tmp_path / "seg.onnx"
    common = dict(input_names=["input"], output_names=["logits"], opset_version=18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (_x(),), str(file), dynamo=True, external_data=False, verbose=False, **common)
        except Exception:  # noqa: BLE001 - the TorchScript exporter is the pipeline's fallback too
            torch.onnx.export(model, (_x(),), str(file), dynamo=False, **common)

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": _x().numpy()})
    with torch.no_grad():
        ref = model(_x())

    assert out.shape == (2, C, S, S)
    assert (torch.from_numpy(out) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["deeplabv3_resnet18", "fcn_resnet18", "lraspp_mobilenet_v3_large"])
def test_torch_pruning_keeps_the_head(arch):
    tp = pytest.importorskip("torch_pruning")
    model = _build(arch)
    modules = dict(model.named_modules())
    heads = [modules[h] for h in seg_head_layers(model)]
    feature = seg_feature_layer(model, arch)
    channels_before = _output_of(model, feature).shape[1]

    pruner = tp.pruner.BasePruner(
        model, _x(), importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=heads
    )
    pruner.step()

    with torch.no_grad():
        assert model(_x()).shape == (2, C, S, S)
    assert all(h.out_channels == C for h in heads)
    assert _output_of(model, feature).shape[1] < channels_before
