"""Prune stage: Torch-Pruning channel pruning, MGD healing, pickle-free artifact, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError, PruneConfig, from_dict
from pipeline.evaluate import count_params
from pipeline.tasks.classification.models import build_model
from pipeline.stage import StageContext
from pipeline.errors import LibraryError
from pipeline.models import pruned_payload, rebuild_pruned
from pipeline.tasks import get_task
from stages.prune import ignored_modules, make_pruner, prune_model, too_narrow

TASK = get_task("classification")

PRUNE_ONLY = """
[distill]
baseline = false
[prune]
enabled = true
ratio = 0.5
heal_epochs = 1
[onnx]
enabled = false
[openvino]
enabled = false
[tensorrt]
enabled = false
"""


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """One tiny teacher → distill → prune run shared by the end-to-end checks."""
    from tests.conftest import TINY_TOML, merge_toml, run_cli

    d = tmp_path_factory.mktemp("prune")
    cfg = d / "pipeline.toml"
    cfg.write_text(merge_toml(TINY_TOML + PRUNE_ONLY))
    proc = run_cli("run", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, d / "run", json.loads((d / "run" / "manifest.json").read_text())


def _ctx(tmp_path: Path, **prune) -> StageContext:
    cfg = from_dict({"data": {"image_size": 8, "batch_size": 16, "train_fraction": 0.25, "calibration_size": 32},
                     "prune": {"enabled": True, **prune}, "pipeline": {"workdir": str(tmp_path)}}, tmp_path)
    return StageContext(cfg=cfg, name="prune", workdir=tmp_path, inputs={}, device=torch.device("cpu"), key="k")


def test_stage_records_before_and_after(pruned_run):
    _, _, manifest = pruned_run
    rec = manifest["stages"]["prune"]
    assert rec["status"] == "ok"
    m = rec["metrics"]["pruned"]
    # Measured by the shared harness after healing...
    for key in ("accuracy", "latency_p50_ms", "throughput_ips", "params", "macs", "size_bytes"):
        assert key in m, key
    # ...and before pruning / before healing by the stage itself.
    for key in ("accuracy_before", "accuracy_before_heal", "params_before", "macs_before", "size_bytes_before",
                "latency_p50_ms_before", "batch_latency_p50_ms_before", "latency_speedup", "macs_ratio"):
        assert key in m, key
    # 50% of the channels of every pruned layer: about a quarter of the MACs and params remain.
    assert m["params"] < 0.35 * m["params_before"]
    assert m["macs"] < 0.35 * m["macs_before"]
    assert m["size_bytes"] < 0.35 * m["size_bytes_before"]
    assert m["macs_ratio"] == pytest.approx(m["macs"] / m["macs_before"], rel=1e-6)
    assert len(rec["history"]["pruned"]) == 1  # one healing epoch recorded
    assert m["kept_whole"] == []  # ResNet-18 has no layer under 16 channels
    # The digits are in memory: "auto" loads them in the training process, and the records say so.
    assert m["data_workers"] == 0 and manifest["stages"]["teacher"]["metrics"]["teacher"]["data_workers"] == 0
    assert manifest["stages"]["distill"]["metrics"]["student"]["data_workers"] == 0
    # Both sides of the back-to-back latency measurement, so the speedup can be shown with its own figures.
    for key in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "batch_latency_p50_ms", "throughput_ips"):
        assert f"{key}_before" in m and f"{key}_after" in m, key
    assert m["latency_speedup"] == pytest.approx(m["latency_p50_ms_before"] / m["latency_p50_ms_after"])
    assert m["batch_latency_speedup"] == pytest.approx(m["batch_latency_p50_ms_before"] / m["batch_latency_p50_ms_after"])
    # The runner records the validation set size with every measured artifact: the figures' resolution.
    counts = {a: mm.get("val_images") for st in manifest["stages"].values() for a, mm in st["metrics"].items()}
    assert len(set(counts.values())) == 1 and isinstance(counts["pruned"], int) and counts["pruned"] > 0, counts
    assert manifest["metric_units"]["accuracy"]["unit"] == "fraction of images"


def test_artifact_rebuilds_without_pickle(pruned_run):
    _, workdir, manifest = pruned_run
    path = workdir / manifest["stages"]["prune"]["outputs"]["pruned"]["path"]
    payload = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    model = rebuild_pruned(payload)
    assert count_params(model) == manifest["stages"]["prune"]["metrics"]["pruned"]["params"]
    # Channel counts are multiples of round_to (8) everywhere except the untouched head.
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)


def test_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=16, small_input="auto").eval()
    pruner = make_pruner(model, torch.zeros(1, 3, 16, 16), PruneConfig(ratio=0.4, steps=2), "resnet18", TASK)
    pruner.step()
    pruner.step()
    payload = pruned_payload(model, pruner.pruning_history(), arch="resnet18", num_classes=10, image_size=16,
                             task="classification", options={"small_input": "auto"})
    rebuilt = rebuild_pruned(payload).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert count_params(rebuilt) == count_params(model) < count_params(build_model("resnet18", 10, image_size=16))


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "bn_scale"])
def test_each_importance_prunes(tmp_path, importance):
    ctx = _ctx(tmp_path, importance=importance, ratio=0.5)
    torch.manual_seed(0)
    model = build_model("resnet18", ctx.data.num_classes, image_size=8, small_input="auto")
    before = count_params(model)
    history = prune_model(model, ctx, ctx.cfg.prune, "resnet18")
    assert history and count_params(model) < 0.35 * before
    assert model.fc.out_features == ctx.data.num_classes  # the head keeps its classes
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 8, 8)).shape == (2, ctx.data.num_classes)


def test_taylor_and_magnitude_choose_different_channels(tmp_path):
    kept = {}
    for importance in ("magnitude", "taylor"):
        ctx = _ctx(tmp_path, importance=importance, ratio=0.5)
        torch.manual_seed(0)
        model = build_model("resnet18", 10, image_size=8, small_input="auto")
        kept[importance] = prune_model(model, ctx, ctx.cfg.prune, "resnet18")
    assert kept["magnitude"] != kept["taylor"]


def test_ignored_layers_keep_their_channels(tmp_path):
    ctx = _ctx(tmp_path, ignore_layers=["layer1"], ratio=0.5)
    torch.manual_seed(0)
    model = build_model("resnet18", 10, image_size=8, small_input="auto")
    prune_model(model, ctx, ctx.cfg.prune, "resnet18")
    assert model.layer1[0].conv1.out_channels == 64
    assert model.layer2[0].conv1.out_channels == 64  # 128 halved


def test_unknown_ignored_layer_is_named_with_suggestion():
    model = build_model("resnet18", 10, image_size=8)
    with pytest.raises(ConfigError, match=r"no layer 'layer5'.*did you mean"):
        ignored_modules(model, PruneConfig(ignore_layers=["layer5"]), TASK)


def test_layers_too_narrow_for_the_ratio_are_listed_not_refused():
    # At 0.9 a 64-channel layer keeps int(6.4) = 6 channels, rounded down to 0: kept whole instead.
    model = build_model("resnet18", 10, image_size=8)
    cfg = PruneConfig(ratio=0.9, round_to=8)
    narrow = dict(too_narrow(model, ignored_modules(model, cfg, TASK), cfg))
    assert narrow["conv1"] == 64 and narrow["layer1.0.conv2"] == 64
    assert "layer2.0.conv1" not in narrow  # 128 channels keep 8


def test_ratio_that_would_empty_every_layer_is_a_config_error():
    model = build_model("resnet18", 10, image_size=8)
    cfg = PruneConfig(ratio=0.9, round_to=64)
    with pytest.raises(ConfigError, match=r"every channel of every prunable layer \(the widest, 'layer4.0.conv1', has 512"):
        too_narrow(model, ignored_modules(model, cfg, TASK), cfg)


def test_mobilenet_v3_prunes_around_its_squeeze_excitation_layers(caplog):
    # The 8-channel SE squeeze conv of features.1 would be emptied at ratio 0.5 / round_to 8:
    # pruning keeps it whole and says so, and prunes the rest.
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 10, image_size=16).eval()
    before = count_params(model)
    with caplog.at_level("INFO", logger="stages.prune"):
        pruner = make_pruner(model, torch.zeros(1, 3, 16, 16), PruneConfig(ratio=0.5, round_to=8),
                             "mobilenet_v3_small", TASK)
    pruner.step()
    se = model.features[1].block[1]
    assert se.fc1.out_channels == 8 and se.fc2.in_channels == 8  # kept whole
    assert count_params(model) < 0.35 * before
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    lines = [r.getMessage() for r in caplog.records if "kept whole" in r.getMessage()]
    assert len(lines) == 1 and "features.1.block.1.fc1 (8)" in lines[0] and "16 channels" in lines[0], lines


def test_a_listed_layer_is_the_users_not_reported_as_too_narrow():
    model = build_model("mobilenet_v3_small", 10, image_size=16)
    cfg = PruneConfig(ratio=0.5, round_to=8, ignore_layers=["features.1"])
    assert too_narrow(model, ignored_modules(model, cfg, TASK), cfg) == []


class _InPlaceScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.g.mul_(1.0)  # updates its own parameter in place: fine in eval, fails when autograd records
        return x * self.g


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.scale = _InPlaceScale()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.scale(self.conv(x)).mean((2, 3)))


def test_untraceable_model_names_the_layer():
    # Not the user's config: Torch-Pruning's own limitation, named as such.
    with pytest.raises(LibraryError, match=r"^Torch-Pruning failed: it cannot trace toy: layer 'scale' fails") as exc:
        make_pruner(_Untraceable(), torch.zeros(1, 3, 8, 8), PruneConfig(), "toy", TASK)
    assert not isinstance(exc.value, ConfigError) and exc.value.library == "Torch-Pruning"


@pytest.mark.parametrize("extra, message", [
    ("[prune]\nenabled = true\nratio = 0.9\nround_to = 64", "would remove every channel of every prunable layer"),
    ("[prune]\nenabled = true\nignore_layers = ['layer9']", "no layer 'layer9'"),
    ("[prune]\nenabled = true\nratio = 1.0", "prune.ratio"),
    ("[prune]\nenabled = true\nratio = 0", "prune.ratio"),
])
def test_bad_prune_config_fails_before_training(tiny_config, cli, extra, message):
    cfg = tiny_config(extra)
    proc = cli("run", str(cfg))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (cfg.parent / "run" / "manifest.json").exists()  # nothing ran, nothing written
