"""INT8 fallback: the search loop (with a fake evaluator), the sensitivity ranking on a model with a
deliberately broken layer, the stage on real builds, the ship choice and exit code, bad configs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from export.int8_search import fallback, sizes
from pipeline import gates, ship
from pipeline.config import GatesConfig
from pipeline.errors import ConfigError
from pipeline.manifest import ManifestModel, StageRecord
from pipeline.stage import roles
from tests.conftest import tiny_cfg, tiny_data

RANKED = [f"layer{i}" for i in range(20)]


def _fake(needed: set[str], fp32: float = 0.90, ptq: float = 0.80, log: list | None = None):
    """An evaluator whose metric recovers fully once every layer in `needed` is kept in FP,
    and partly for each one; latency grows with every layer kept in FP."""

    def build_and_eval(excluded: tuple[str, ...]) -> tuple[float, float]:
        if log is not None:
            log.append(excluded)
        got = len(needed & set(excluded))
        return ptq + (fp32 - ptq) * got / len(needed), 1.0 + 0.1 * len(excluded)

    return build_and_eval


def test_search_stops_at_the_gate_with_the_fewest_layers():
    calls: list = []
    found = fallback(RANKED, _fake({"layer0", "layer1", "layer2"}, log=calls), 0.90, 0.005, 8)
    assert found.chosen is not None and found.chosen.fp_layers == ("layer0", "layer1", "layer2")
    # Doubling 1, 2, 4 (passes), then bisection tries 3: the smallest passing prefix.
    assert [len(s.fp_layers) for s in found.steps] == [1, 2, 4, 3]
    assert [len(c) for c in calls] == [1, 2, 4, 3]  # every build is a recorded step, none repeated
    assert [s.passed for s in found.steps] == [False, False, True, True]
    first = found.steps[0].record()
    assert first["fp_layers"] == ["layer0"] and first["fp_layer_count"] == 1
    assert first["drop"] == pytest.approx(0.10 * 2 / 3) and first["latency_p50_ms"] == pytest.approx(1.1)
    assert "the gate" in found.stopped


def test_search_respects_the_limit_and_says_so():
    found = fallback(RANKED, _fake({"layer0", "layer19"}), 0.90, 0.005, 5)
    assert found.chosen is None
    assert max(len(s.fp_layers) for s in found.steps) == 5  # never more than max_fp_layers
    assert [len(s.fp_layers) for s in found.steps] == [1, 2, 4, 5]
    assert "the limit" in found.stopped and found.record()["chosen_fp_layers"] is None


def test_search_disabled_or_empty_builds_nothing():
    calls: list = []
    assert fallback(RANKED, _fake({"layer0"}, log=calls), 0.9, 0.0, 0).steps == []
    assert fallback([], _fake({"layer0"}, log=calls), 0.9, 0.0, 8).steps == []
    assert calls == []


def test_one_layer_enough_is_one_build():
    found = fallback(RANKED, _fake({"layer0"}), 0.90, 0.0, 8)
    assert len(found.steps) == 1 and found.chosen.fp_layers == ("layer0",)


def test_sizes_double_up_to_the_limit():
    assert sizes(1) == [1] and sizes(8) == [1, 2, 4, 8] and sizes(6) == [1, 2, 4, 6] and sizes(0) == []


# -- sensitivity on a real model: one layer made fragile on purpose ---------------------------


_cfg = tiny_cfg


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _broken_cnn(bundle) -> nn.Module:
    """A small CNN trained a few seconds, then made fragile under INT8 without changing its FP32
    function: channel 0 of the first block's output is scaled 1000x (BN scale and shift; ReLU is
    positively homogeneous) and the second conv reads it 1000x weaker. One per-tensor activation
    scale then spends its range on that channel, and the other channels round to zero."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(6):
        for x, y in bundle.loader("train", 64, seed=0):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        model[1].weight[0] *= 1000
        model[1].bias[0] *= 1000
        model[3].weight[:, 0] /= 1000
    return model


@pytest.fixture(scope="module")
def broken(tmp_path_factory, bundle) -> Path:
    path = tmp_path_factory.mktemp("broken") / "student.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_broken_cnn(bundle), torch.zeros(1, 3, 8, 8), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def test_sensitivity_ranks_the_broken_layer_first(broken, bundle, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    from export.onnx import quantize_int8
    from export.sensitivity import rank_layers, weighted_nodes

    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(broken), str(pre))
    q = tmp_path / "q.onnx"
    quantize_int8(pre, q, bundle.loader("calibration", 32), preprocess=False)
    images = [x.numpy() for x, _ in bundle.loader("calibration", 32)]
    ranking = rank_layers(pre, q, images)
    convs = [n.name for n in weighted_nodes(onnx.load(str(pre)))]
    assert len(ranking) == len(convs) == 4
    # The second conv reads the fragile activation: it adds by far the most error.
    assert ranking[0].name == convs[1], [e.record() for e in ranking]
    assert ranking[0].added_nmse > 10 * max(abs(e.added_nmse) for e in ranking[1:])


def test_stage_recovers_a_failing_ptq_build(broken, bundle, tmp_path):
    from export import int8_fallback
    from export import openvino as ov_stage
    from export.onnx import quantize_int8
    from pipeline.stage import StageContext

    workdir = tmp_path / "run"
    extra = "[gates]\nmax_int8_metric_drop = 0.03\n[int8_fallback]\nmax_fp_layers = 3\n"

    def ctx(name: str, inputs: dict) -> StageContext:
        c = StageContext(cfg=_cfg(workdir, extra), name=name, workdir=workdir, inputs=inputs,
                         device=torch.device("cpu"), key="test")
        c._data = bundle
        return c

    ov = ov_stage.run(ctx("openvino", {"onnx": broken}))
    int8 = workdir / "onnx" / "student_int8.onnx"
    int8.parent.mkdir(parents=True)
    quantize_int8(broken, int8, bundle.loader("calibration", 32))
    inputs = {"onnx": broken, "onnx_int8": int8, "openvino_fp32": ov.outputs["openvino_fp32"],
              "openvino_int8": ov.outputs["openvino_int8"]}
    result = int8_fallback.run(ctx("int8_fallback", inputs))
    for art, alt_of in (("onnx_int8_fallback", "onnx_int8"), ("openvino_int8_fallback", "openvino_int8")):
        rec = result.metrics[art]
        assert rec["ptq_drop"] > 0.03, rec  # the broken layer really costs PTQ accuracy
        assert rec["gate_reached"] and 1 <= rec["fp_layer_count"] <= 3, rec
        steps = rec["search"]["steps"]
        assert steps and steps[-1]["fp_layer_count"] <= 3
        assert all({"fp_layers", "metric", "drop", "latency_p50_ms", "passed"} <= set(s) for s in steps)
        assert any(s["passed"] and s["fp_layers"] == rec["fp_layers"] for s in steps)
        assert rec["alternative_of"] == alt_of and rec["recipe"] == "ptq+fallback"
        assert result.outputs[art].is_file() and art in result.measure


def test_stage_is_a_no_op_when_ptq_passes(broken, bundle, tmp_path):
    from export import int8_fallback
    from pipeline.stage import StageContext

    workdir = tmp_path / "run"
    c = StageContext(cfg=_cfg(workdir, "[gates]\nmax_int8_metric_drop = 1.0\n"), name="int8_fallback",
                     workdir=workdir, inputs={"onnx": broken, "onnx_int8": broken}, device=torch.device("cpu"),
                     key="test")
    c._data = bundle
    result = int8_fallback.run(c)
    assert result.outputs == {} and "no fallback" in result.metrics["search"]["note"]


# -- ship and exit code -----------------------------------------------------------------------

ROLES = roles()
TEACHER = {"accuracy": 0.95, "latency_p50_ms": 10.0}


def _run(fb_acc: float, fb_ms: float) -> ManifestModel:
    g = GatesConfig(max_int8_accuracy_drop=0.005)
    ov = StageRecord(status="ok", metrics={"openvino_fp32": {"accuracy": 0.94, "latency_p50_ms": 3.0},
                                           "openvino_int8": {"accuracy": 0.90, "latency_p50_ms": 1.0}})
    fb = StageRecord(status="ok", metrics={"openvino_int8_fallback": {"accuracy": fb_acc, "latency_p50_ms": fb_ms}})
    stages = {"openvino": ov, "int8_fallback": fb}
    measured = {a: m for r in stages.values() for a, m in r.metrics.items()}
    for rec in stages.values():
        rec.artifacts = {n: r for n, r in ROLES.items() if n in rec.metrics}
        rec.gates = gates.check_stage(rec, TEACHER, g, "accuracy", measured=measured)
        rec.status = "gate_failed" if any(x.passed is False for x in rec.gates) else "ok"
    return ManifestModel(stages=stages)


def test_ship_picks_the_fallback_when_it_passes_and_is_faster():
    m = _run(0.938, 1.2)
    d = ship.choose(m, "accuracy")["openvino"]
    assert d["artifact"] == "openvino_int8_fallback"
    assert "ptq+fallback" in d["reason"] and "2.50x faster" in d["reason"]
    assert "openvino_int8 (ptq) does not qualify" in d["reason"]
    # The PTQ failure stays recorded, but the fallback made it good: the run does not fail on it.
    assert m.stages["openvino"].status == "gate_failed"
    failed, notes = gates.blocking(m)
    assert failed == [] and "made good by openvino_int8_fallback" in notes[0]


def test_a_failing_fallback_makes_nothing_good():
    m = _run(0.92, 1.2)
    d = ship.choose(m, "accuracy")["openvino"]
    assert d["artifact"] == "openvino_fp32" and "openvino_int8_fallback (ptq+fallback) does not qualify" in d["reason"]
    failed, notes = gates.blocking(m)
    # The PTQ build's failure fails the run; the failing alternative's is recorded beside it.
    assert {g.artifact for g in failed} == {"openvino_int8"}
    assert len(notes) == 1 and "an alternative of openvino_int8" in notes[0]


def test_one_passing_alternative_is_enough_when_another_fails():
    m = _run(0.938, 1.2)
    g = GatesConfig(max_int8_accuracy_drop=0.005)
    qad = StageRecord(status="ok", metrics={"openvino_int8_qad": {"accuracy": 0.92, "latency_p50_ms": 1.1}})
    qad.artifacts = {"openvino_int8_qad": ROLES["openvino_int8_qad"]}
    measured = {a: x for r in m.stages.values() for a, x in r.metrics.items()}
    qad.gates = gates.check_stage(qad, TEACHER, g, "accuracy", measured={**measured, **qad.metrics})
    m.stages["qad"] = qad
    failed, notes = gates.blocking(m)
    assert failed == [] and len(notes) == 2
    d = ship.choose(m, "accuracy")["openvino"]
    assert d["artifact"] == "openvino_int8_fallback" and "openvino_int8_qad (qad) does not qualify" in d["reason"]


def test_ship_prefers_fp32_over_a_slower_fallback():
    d = ship.choose(_run(0.94, 3.5), "accuracy")["openvino"]
    assert d["artifact"] == "openvino_fp32" and "is slower" in d["reason"]


# -- bad configs ------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    ("[int8_fallback]\nmax_fp_layers = -1\n", "int8_fallback.max_fp_layers"),
    ("[int8_fallback]\nmax_layers = 3\n", "max_layers"),
    ("[int8_fallback]\nsensitivity_images = 0\n", "sensitivity_images"),
])
def test_bad_fallback_config_is_a_config_error(tmp_path, extra, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path / "run", extra)


def test_bad_fallback_config_exits_2(tiny_config, cli):
    r = cli("validate", str(tiny_config("[int8_fallback]\nmax_fp_layers = \"many\"\n")))
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "int8_fallback.max_fp_layers" in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr


def test_report_shows_the_recovery_steps(tmp_path):
    from export.int8_search import fallback as search
    from pipeline.manifest import Manifest
    from pipeline.report import build_sections, render_markdown

    m = _run(0.938, 1.2)
    found = search(RANKED, _fake({"layer0", "layer1"}), 0.94, 0.005, 8)
    m.stages["int8_fallback"].metrics["openvino_int8_fallback"].update(
        {"recipe": "ptq+fallback", "fp_layer_count": 2, "search": found.record(), "sensitivity_proxy": "output error"})
    manifest = Manifest(tmp_path, m)
    sec = next(s for s in build_sections(manifest) if s.id == "int8-recovery")
    text = render_markdown(manifest)
    assert "INT8 recovery" in text and "openvino_int8_fallback" in text
    steps = next(b for b in sec.blocks if getattr(b, "title", "").startswith("openvino_int8_fallback: search steps"))
    assert [r[0] for r in steps.rows] == [str(len(s.fp_layers)) for s in found.steps]
    assert "layer0, layer1" in [r[1] for r in steps.rows]
