"""Default MGD taps: each model's last feature stage, whatever its architecture, and tap errors
that offer feature stages, never the classifier."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline import config, runner
from pipeline.config import ConfigError
from pipeline.taps import analyse, feature_stages
from pipeline.tasks.classification.models import default_tap
from stages.mgd import FeatureTap

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch, expected", [
    ("resnet18", "layer4"),
    ("mobilenet_v3_small", "features"),
    ("efficientnet_b0", "features"),
    ("regnet_x_400mf", "trunk_output"),  # a builder that cannot run on the meta device
])
def test_default_tap_is_the_last_feature_stage(arch, expected):
    default_tap.cache_clear()
    assert default_tap(arch) == expected


def test_default_tap_of_a_timm_model():
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (optional dependency)")
    import timm

    expected = timm.create_model("resnet18", pretrained=False).feature_info[-1]["module"]
    assert default_tap("timm:resnet18") == expected == "layer4"


def test_default_tap_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    default_tap.cache_clear()
    default_tap("mobilenet_v3_small")
    assert torch.equal(torch.rand(3), expected)


def test_stages_of_a_custom_model(tiny_model):
    stages, last = analyse(tiny_model, (3, 8, 8))
    # Conv, BN and conv own parameters and give maps; ReLU, pooling, flatten and the Linear head do not count.
    assert [(s.name, s.shape) for s in stages] == [("0", (8, 8, 8)), ("1", (8, 8, 8)), ("3", (8, 8, 8))]
    assert last.name == "3"
    assert tiny_model.training  # the dry forward restores the mode


def test_a_lone_stage_lists_its_blocks_and_no_head():
    names = [s.name for s in feature_stages(torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32))]
    assert names[-1] == "features" and "features.12" in names
    assert not any(n.startswith(("classifier", "avgpool")) for n in names)


def test_vit_has_no_default_tap_only_when_mgd_needs_one():
    default_tap.cache_clear()
    with pytest.raises(ConfigError, match="no layer that outputs an N×C×H×W feature map"):
        default_tap("vit_b_16")
    with pytest.raises(ConfigError, match=r"^distill.mgd.student_layers \(unset\): vit_b_16 has no layer"):
        config.from_dict({"distill": {"student": "vit_b_16"}})
    cfg = config.from_dict({"distill": {"student": "vit_b_16", "method": "kd"}})  # no taps needed
    assert cfg.distill.mgd.student_layers is None and cfg.distill.mgd.teacher_layers == ["layer4"]


def test_unknown_arch_names_its_key():
    with pytest.raises(ConfigError, match=r"^distill.student: arch = 'mobilenet_v9'.*did you mean"):
        config.from_dict({"distill": {"student": "mobilenet_v9"}})


def test_user_layers_win_over_defaults():
    cfg = config.from_dict({"distill": {"student": "mobilenet_v3_small", "mgd": {"student_layers": ["features.8"]}}})
    assert cfg.distill.mgd.student_layers == ["features.8"] and cfg.distill.mgd.teacher_layers == ["layer4"]


@pytest.mark.parametrize("arch, typo, expected", [
    ("mobilenet_v3_small", "layer4", "features"),  # the ResNet name on a MobileNet
    ("mobilenet_v3_small", "classifer", "features"),
    ("resnet18", "layer5", "layer4"),
    ("resnet18", "fc1", "conv1"),  # close to a stage by spelling, never to the head `fc`
])
def test_misspelled_tap_suggests_feature_stages_never_the_head(arch, typo, expected):
    model = torchvision.models.get_model(arch, num_classes=10)
    with pytest.raises(ConfigError) as exc:
        FeatureTap(model, [typo], role="student", input_shape=(3, 32, 32))
    msg = str(exc.value)
    suggested = re.search(r"did you mean ([^?]*)\?", msg).group(1).split(", ")
    assert expected in suggested, msg
    listed = re.search(r"feature stages, C×H×W at 32×32 px: ([^;]*);", msg).group(1)
    assert f"{expected} " in listed and "\n" not in msg
    for head in ("classifier", "fc", "avgpool"):
        assert head not in suggested and not re.search(rf"\b{head}\b", listed), msg


def _demo(**changes) -> dict:
    """The shipped demo config (pipeline.toml) with a ResNet-18 teacher and a MobileNetV3-Small
    student, `[distill.mgd]` giving only the mask, as a new user would write it."""
    raw = tomllib.loads((ROOT / "pipeline.toml").read_text())
    raw["teacher"]["arch"] = "resnet18"
    raw["distill"]["student"] = "mobilenet_v3_small"
    raw["distill"]["mgd"] = {"mask": "channel"}
    for table, values in changes.items():
        raw[table].update(values)
    return raw


def test_resnet18_to_mobilenet_v3_small_works_out_of_the_box(tmp_path):
    # Pruning stays on: at the demo's ratio and round_to MobileNet's 8-channel SE convs are kept
    # whole rather than refused (tests/test_prune.py checks the pruned model).
    raw = _demo(pipeline={"workdir": str(tmp_path / "run")})
    cfg = config.from_dict(raw, base_dir=ROOT)
    assert cfg.distill.mgd.teacher_layers == ["layer4"] and cfg.distill.mgd.student_layers == ["features"]
    runner.preflight(cfg)  # what `validate` and `run` check first: the taps pair up at the demo's input size


def test_taps_of_different_map_sizes_are_paired_and_too_far_apart_refused(tmp_path):
    # With both stems in stride-1 "small input" mode the two last stages differ: 4×4 vs 2×2 at
    # 32 px. That pair is resampled; a pair 16-fold apart is refused, naming both models' stages.
    raw = _demo(pipeline={"workdir": str(tmp_path / "run")}, data={"image_size": 32}, teacher={"small_input": "on"},
                distill={"small_input": "on"}, prune={"enabled": False})
    runner.preflight(config.from_dict(raw, base_dir=ROOT), create=False)
    raw["distill"]["mgd"] = {**raw["distill"].get("mgd", {}), "teacher_layers": ["layer1"], "student_layers": ["features"]}
    with pytest.raises(ConfigError) as exc:
        runner.preflight(config.from_dict(raw, base_dir=ROOT), create=False)
    msg = str(exc.value)
    assert "the student's features map (576×2×2) and the teacher's layer1 map (64×32×32) differ 16-fold" in msg
    assert "features.4" in msg and "layer4 512×4×4" in msg and "small_input" in msg