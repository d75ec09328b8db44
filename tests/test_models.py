"""Tests for pipeline.tasks.classification.models: names, small-input stem, state-dict loading (all offline)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.tasks.classification.models import build_model, check_arch, load_weights, small_input_enabled
from pipeline.taps import head_names

S = 16


def test_unknown_arch_suggests():
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        check_arch("resnet81")


def test_known_arch_passes():
    check_arch("mobilenet_v3_small")


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [("auto", 32, True), ("auto", 64, False), ("on", 224, True), ("off", 16, False)],
)
def test_small_input_enabled(mode, size, expected):
    assert small_input_enabled(mode, size) is expected


def test_resnet18_small_stem():
    torch.manual_seed(0)

    model = build_model("resnet18", 7, image_size=S).eval()
    out = model(torch.randn(2, 3, S, S))

    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert out.shape == (2, 7)
    assert head_names(model) == ["fc"]


def test_resnet18_no_small_stem_when_off():
    model = build_model("resnet18", 7, image_size=S, small_input="off")

    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)


def test_mobilenet_v3_small_stem():
    model = build_model("mobilenet_v3_small", 5, image_size=S).eval()

    out = model(torch.randn(1, 3, S, S))

    assert model.features[0][0].stride == (1, 1)
    assert out.shape == (1, 5)
    assert head_names(model) == ["classifier.3"]


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    a = build_model("resnet18", 4, image_size=S).eval()
    torch.save({"state_dict": a.state_dict()}, tmp_path / "a.pt")
    x = torch.randn(2, 3, S, S)

    torch.manual_seed(1)  # different random init: only the loaded weights can make outputs equal
    b = build_model("resnet18", 4, image_size=S, weights="a.pt", base_dir=tmp_path).eval()

    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_other_arch_checkpoint_rejected(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(build_model("resnet34", 4, image_size=S).state_dict(), path)

    with pytest.raises(ConfigError, match=r"does not fit resnet18: unexpected layer1\.2"):
        build_model("resnet18", 4, image_size=S, weights=str(path))


def test_head_mismatch_skips_head(tmp_path, caplog):
    torch.manual_seed(0)
    src = build_model("resnet18", 10, image_size=S)
    path = tmp_path / "ten.pt"
    torch.save(src.state_dict(), path)
    dst = build_model("resnet18", 3, image_size=S)

    load_weights(dst, path, arch="resnet18")

    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert dst.fc.weight.shape == (3, 512)
    assert "fc.weight" in caplog.text


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint at all")

    with pytest.raises(ConfigError, match="bad.pt"):
        build_model("resnet18", 4, image_size=S, weights=str(path))


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)

    with pytest.raises(ConfigError, match="not a state dict"):
        build_model("resnet18", 4, image_size=S, weights=str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        build_model("resnet18", 4, image_size=S, weights="nope.pt", base_dir=tmp_path)


def test_unknown_torchvision_weights_enum():
    # The enum is resolved before any download, so this needs no network.
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_model("resnet18", 4, image_size=S, weights="torchvision:NOPE")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_without_timm():
    with pytest.raises(ConfigError, match="pip install timm"):
        check_arch("timm:resnet18")


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mnasnet0_5"])
def test_slow_imagenet_batchnorm_momentum_is_raised_for_short_schedules(arch):
    # torchvision builds these with momentum 0.01 / 0.0003: a few hundred steps would leave the
    # running statistics at their initial values and the model in eval mode at chance.
    from pipeline.tasks.common.weights import MIN_BN_MOMENTUM
    from pipeline.tasks.classification.models import build_model

    model = build_model(arch, 5, image_size=32)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(m.momentum >= MIN_BN_MOMENTUM for m in bns)
    resnet = build_model("resnet18", 5, image_size=32)
    assert all(m.momentum == 0.1 for m in resnet.modules() if isinstance(m, torch.nn.BatchNorm2d))
