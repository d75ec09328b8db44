"""Config schema: defaults, the shipped configs, and one clear line per user mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_cover_every_table():
    cfg = config.from_dict({})
    assert cfg.distill.mgd.alpha == "auto" and cfg.distill.mgd.mask_ratio == 0.15 and cfg.distill.mgd.mask == "channel"
    assert cfg.distill.mgd.teacher_layers == ["layer4"]
    assert cfg.tensorrt.calibration == "entropy" and cfg.onnx.opset == 18
    assert cfg.openvino.precisions == ["fp32", "int8"]


@pytest.mark.parametrize("task, optimizer, lr, clip, batch", [
    ("classification", "sgd", 0.02, 0.0, 64), ("segmentation", "adamw", 2e-3, 35.0, 16),
    ("detection", "adamw", 1e-3, 35.0, 8)])
def test_each_task_declares_its_recipe_and_explicit_keys_win(task, optimizer, lr, clip, batch):
    source = {"classification": "digits"}.get(task, "scenes")
    arch = {"segmentation": ("deeplabv3_resnet34", "deeplabv3_resnet18"),
            "detection": ("retinanet_resnet34_fpn", "retinanet_resnet18_fpn")}.get(task, ("resnet34", "resnet18"))
    raw = {"pipeline": {"task": task}, "data": {"source": source}, "teacher": {"arch": arch[0]},
           "distill": {"student": arch[1]}}
    cfg = config.from_dict(raw)
    for table in (cfg.teacher, cfg.distill):
        assert (table.optimizer, table.lr, table.grad_clip, table.warmup_epochs) == (optimizer, lr, clip, 1)
    assert cfg.data.batch_size == batch
    # What was used is what the config holds, so the manifest's config-as-run records it.
    assert cfg.model_dump()["teacher"]["optimizer"] == optimizer
    mine = config.from_dict({**raw, "data": {"source": source, "batch_size": 3},
                             "teacher": {"arch": arch[0], "lr": 0.5, "optimizer": "sgd"},
                             "distill": {"student": arch[1], "grad_clip": 0}, "prune": {"lr": 0.1}})
    assert (mine.teacher.lr, mine.teacher.optimizer, mine.data.batch_size) == (0.5, "sgd", 3)
    assert mine.distill.grad_clip == 0 and mine.prune.lr == 0.1 and mine.distill.lr == lr


@pytest.mark.parametrize("path", sorted([ROOT / "pipeline.toml", *(ROOT / "configs").glob("*.toml")]), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = config.load(path)
    assert cfg.pipeline.name


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"teacher": {"epochs": "x"}}, "teacher.epochs = 'x'"),
        ({"teacher": {"epochs": -1}}, "teacher.epochs = -1"),
        ({"distill": {"mgd": {"mask_ratio": 1.0}}}, "distill.mgd.mask_ratio = 1.0"),
        ({"distill": {"mgd": {"alpha": 0}}}, "distill.mgd.alpha = 0"),
        ({"distill": {"mgd": {"alpha": "big"}}}, "distill.mgd.alpha"),
        ({"distill": {"mgd": {"resample": "nearest"}}}, "distill.mgd.resample = 'nearest'"),
        ({"distill": {"mgd": {"bogus": 1}}}, "distill.mgd.bogus: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"data": {"source": "mnist"}}, "data.source = 'mnist' does not fit pipeline.task = 'classification'; allowed: digits, imagefolder, torchvision"),
        ({"data": {"source": "imagefolder"}}, "data.root"),
        ({"data": {"source": "torchvision"}}, "data.name"),
        ({"prune": {"ratio": 0}}, "prune.ratio = 0"),
        ({"prune": {"ratio": 1.5}}, "prune.ratio = 1.5"),
        ({"pipeline": {"device": "gpu"}}, "pipeline.device = 'gpu'"),
        ({"gates": {"latency_ms": {"openvino_int9": 3.0}}}, "unknown artifact 'openvino_int9'"),
        ({"gates": {"latency_ms": {"openvino_int8": 0}}}, "must be > 0"),
        ({"distill": {"mgd": {"teacher_layers": ["layer3", "layer4"]}}}, "paired in order"),
        ({"openvino": {"precisions": ["fp16"]}}, "openvino.precisions.0 = 'fp16'"),
    ],
)
def test_bad_values_name_key_and_value(raw, expected):
    with pytest.raises(ConfigError) as exc:
        config.from_dict(raw)
    msg = str(exc.value)
    assert expected in msg
    assert "\n" not in msg and "Traceback" not in msg


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"distill": {"mgd": {"alpah": 1e-5}}}, "distill.mgd.alpah: unknown key (did you mean alpha?"),
        ({"teacher": {"architecture": "resnet18"}}, "teacher.architecture: unknown key (did you mean arch?"),
        ({"pipline": {"seed": 1}}, "pipline: unknown key (did you mean pipeline?"),
        ({"data": {"scenes": {"clutterr": 1}}}, "data.scenes.clutterr: unknown key (did you mean clutter?"),
        ({"bench": {"zzz": 1}}, "bench.zzz: unknown key (allowed here: warmup, runs, batch_runs, threads;"),
    ],
)
def test_unknown_key_suggests_the_closest_keys_of_its_table(raw, expected):
    with pytest.raises(ConfigError) as exc:
        config.from_dict(raw)
    assert expected in str(exc.value)


def test_malformed_toml_gives_line_and_column(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[pipeline]\nname = "x"\nseed = = 3\n')
    with pytest.raises(ConfigError, match=r"malformed TOML.*line 3, column"):
        config.load(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_config_dir(tmp_path):
    sub = tmp_path / "cfgs"
    sub.mkdir()
    (sub / "p.toml").write_text('[pipeline]\nworkdir = "runs/x"\n')
    cfg = config.load(sub / "p.toml")
    assert cfg.workdir == sub / "runs" / "x"


def test_base_dir_is_not_a_config_key():
    with pytest.raises(ConfigError, match="unknown key"):
        config.from_dict({"base_dir": "/"})
