"""Pruning to a latency target: the ratio search (fake timings, so it is deterministic), the config's
refusals (exit 2 before training), the probe record that re-runs reuse, and one small real run whose
probe builds are real but whose timer is fake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import ConfigError
from pipeline.report import build_sections
from pipeline.manifest import Manifest
from stages import prune_target
from stages.ratio_search import TOLERANCE, TargetUnreachable, search


def quadratic(base: float = 10.0, floor: float = 1.0):
    """A latency that falls as (1 - r)^2 towards a fixed overhead, and the ratios it was asked for."""
    calls: list[float] = []

    def measure(r: float) -> float:
        calls.append(r)
        return floor + (base - floor) * (1 - r) ** 2

    return measure, calls


def bent(r: float) -> float:
    """Latency with a per-op floor and a curve search models do not assume ((1 - r)^1.3)."""
    return 3.0 + 7.0 * (1 - r) ** 1.3


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [3.0, 5.0, 7.0, 9.0])
def test_search_finds_a_ratio_within_tolerance_under_the_budget(target):
    measure, calls = quadratic()
    res = search(measure, target_ms=target, max_ratio=0.8, max_probes=6)
    assert target * (1 - TOLERANCE) <= res.latency_ms <= target
    assert len(calls) == len(res.points) <= 6 and len(set(calls)) == len(calls)  # never the same ratio twice
    assert calls[:2] == [0.0, 0.8]  # the bracket first
    assert res.ratio == pytest.approx(round(res.ratio, 2))  # probed ratios are multiples of 0.01


@pytest.mark.parametrize("target", [5.0, 7.0, 9.0])
def test_search_copes_with_a_curve_it_does_not_model(target):
    res = search(bent, target_ms=target, max_ratio=0.8, max_probes=6)
    assert res.latency_ms <= target and res.within_tolerance and len(res.points) <= 6


def test_the_answer_is_the_smallest_measured_ratio_that_meets_the_target():
    res = search(bent, target_ms=6.0, max_ratio=0.8, max_probes=6)
    meeting = [r for r, lat in res.points if lat <= 6.0]
    assert res.ratio == min(meeting)
    assert all(lat > 6.0 for r, lat in res.points if r < res.ratio)


def test_speedup_target_divides_the_unpruned_latency():
    measure, _ = quadratic(base=12.0)
    res = search(measure, speedup=2.0, max_ratio=0.8)
    assert res.target_ms == pytest.approx(6.0)
    assert res.latency_ms <= 6.0 and res.within_tolerance


@pytest.mark.parametrize("max_probes", [2, 3, 4])
def test_search_respects_max_probes(max_probes):
    calls = []

    def stubborn(r: float) -> float:  # a step: nothing between the ends lands within tolerance
        calls.append(r)
        return 10.0 if r < 0.55 else 2.0

    res = search(stubborn, target_ms=5.0, max_ratio=0.8, max_probes=max_probes)
    assert len(calls) == max_probes
    assert res.latency_ms <= 5.0 and "max_probes" in res.stop
    assert not res.within_tolerance


def test_a_bracket_one_step_wide_stops_the_search():
    def step(r: float) -> float:
        return 10.0 if r < 0.55 else 2.0

    res = search(step, target_ms=5.0, max_ratio=0.8, max_probes=20)
    assert res.ratio == 0.55 and "one step" in res.stop and len(res.points) <= 10


def test_unreachable_target_names_the_latencies():
    measure, calls = quadratic(base=10.0, floor=6.0)  # 6.16 ms at ratio 0.8
    with pytest.raises(TargetUnreachable, match=r"out of reach: even prune.max_ratio = 0.8 measures 6.16 ms "
                                                 r"\(unpruned 10 ms; the largest speedup within max_ratio is 1.62x\)"):
        search(measure, target_ms=5.0, max_ratio=0.8)
    assert calls == [0.0, 0.8]  # two probes, then the verdict


def test_an_unpruned_student_that_meets_the_target_is_not_pruned():
    measure, calls = quadratic()
    res = search(measure, target_ms=20.0)
    assert res.ratio == 0.0 and calls == [0.0] and "already meets" in res.stop


def test_search_is_deterministic():
    runs = [search(bent, target_ms=6.5, max_ratio=0.8, max_probes=6).points for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs, message", [
    ({"target_ms": 1.0, "speedup": 2.0}, "exactly one"), ({}, "exactly one"),
    ({"target_ms": 1.0, "max_probes": 1}, "max_probes"), ({"target_ms": 1.0, "max_ratio": 1.0}, "max_ratio"),
])
def test_search_refuses_arguments_it_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=message):
        search(bent, **kwargs)


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune, message", [
    ({"target_latency_ms": 5.0, "target_speedup": 2.0}, "set one of them, not both"),
    ({"target_latency_ms": 5.0, "ratio": 0.5}, "prune.ratio: with a target"),
    ({"target_build": "openvino_int8"}, "prune.target_build names the build a target is measured on"),
    ({"target_speedup": 1.0}, "prune.target_speedup = 1.0"),
    ({"target_latency_ms": 0}, "prune.target_latency_ms = 0"),
    ({"target_speedup": 2.0, "max_probes": 1}, "prune.max_probes = 1"),
    ({"target_speedup": 2.0, "max_ratio": 1.0}, "prune.max_ratio = 1.0"),
])
def test_bad_target_keys_name_the_key(prune, message):
    with pytest.raises(ConfigError) as exc:
        config.from_dict({"prune": {"enabled": True, **prune}})
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_ratio_without_a_target_works_as_before():
    cfg = config.from_dict({"prune": {"enabled": True, "ratio": 0.3}})
    assert cfg.prune.ratio == 0.3 and not cfg.prune.targeted


def test_the_default_build_is_the_openvino_int8_build_else_the_first_there_is():
    on = config.from_dict({"prune": {"enabled": True, "target_speedup": 2.0}})
    assert prune_target.resolve_build(on)[0] == "openvino_int8"
    off = config.from_dict({"prune": {"enabled": True, "target_speedup": 2.0}, "openvino": {"enabled": False}})
    assert prune_target.resolve_build(off)[0] == "onnx"


def test_a_target_adds_the_timed_builds_tables_to_the_prune_key():
    from pipeline.stage import load_stages

    prune = next(s for s in load_stages() if s.name == "prune")
    plain = config.from_dict({"prune": {"enabled": True}})
    aimed = config.from_dict({"prune": {"enabled": True, "target_speedup": 2.0, "target_build": "openvino_fp32"}})
    assert prune.reads_for(plain) == prune.reads
    assert set(prune.reads_for(aimed)) - set(prune.reads) == {"bench", "openvino", "onnx"}


TARGETED = """
[distill]
baseline = false
[prune]
enabled = true
heal_epochs = 1
{prune}
[onnx]
int8 = false
export_teacher = false
opset = 17
simplify = false
[openvino]
precisions = ["fp32"]
[tensorrt]
enabled = false
"""


def fake_timer(runtime, input_shape, bench, *, macs):
    """Latency from the probed network's MACs: deterministic, and it falls as pruning cuts MACs."""
    return 1.0 + macs / 1e6, 1.2 + macs / 1e6


def _main(*args: str) -> int:
    from pipeline.cli import main

    return main(list(args))


@pytest.mark.parametrize("prune, message", [
    ('target_speedup = 2.0\ntarget_build = "openvino_int9"',
     "prune.target_build = 'openvino_int9': no stage declares such a build; builds this config makes: onnx, openvino_fp32"),
    ('target_speedup = 2.0\ntarget_build = "openvino_int8"',
     "prune.target_build = 'openvino_int8': this config does not build it (enable [openvino]"),
    ('target_speedup = 2.0\ntarget_build = "onnx_int8"', "this config does not build it (enable [onnx]"),
])
def test_a_build_no_later_stage_makes_is_refused_before_training(tiny_config, capsys, prune, message):
    cfg = tiny_config(TARGETED.format(prune=prune))
    assert _main("run", str(cfg)) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (cfg.parent / "run" / "manifest.json").exists()


def test_a_tensorrt_target_without_tensorrt_is_refused_saying_so(tiny_config, capsys):
    from export.tensorrt import _tensorrt_missing

    why = _tensorrt_missing()
    if why is None:
        pytest.skip("TensorRT and CUDA are present here")
    cfg = tiny_config(TARGETED.format(prune='target_speedup = 2.0\ntarget_build = "trt_engine"')
                      .replace("[tensorrt]\nenabled = false", "[tensorrt]\nenabled = true"))
    assert _main("validate", str(cfg)) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "prune.target_build = 'trt_engine' cannot be built and timed on this machine:" in err
    assert why.split(" (")[0] in err


def test_an_unreachable_target_is_refused_before_training(tiny_config, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(prune_target, "time_build", lambda *a, macs: calls.append(macs) or (5.0, 6.0))
    cfg = tiny_config(TARGETED.format(prune='target_speedup = 1.5\ntarget_build = "onnx"'))
    assert _main("run", str(cfg)) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "prune.target_speedup: on onnx, measured before training on an untrained resnet18" in err
    assert "even prune.max_ratio = 0.8 measures 5 ms (unpruned 5 ms" in err
    assert len(calls) == 2  # the bracket only
    assert not (cfg.parent / "run" / "manifest.json").exists()


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def test_the_record_is_reused_under_the_same_key_only(tmp_path):
    probed = []

    def prober(r: float) -> dict:
        probed.append(r)
        return {"ratio": r, "latency_p50_ms": bent(r), "latency_p90_ms": bent(r) + 0.1, "macs": 1, "params": 1}

    path = tmp_path / prune_target.RECORD
    first = search(prune_target.Record(path, "k1").measure(prober, set()), target_ms=6.0)
    assert probed == [r for r, _ in first.points] and json.loads(path.read_text())["key"] == "k1"
    reused: set[float] = set()
    again = search(prune_target.Record(path, "k1").measure(prober, reused), target_ms=6.0)
    assert again.points == first.points and len(probed) == len(first.points)  # nothing timed again
    assert reused == {r for r, _ in first.points}
    # Another target re-uses the points it shares (a point's latency does not depend on the target).
    other = search(prune_target.Record(path, "k1").measure(prober, set()), target_ms=8.0)
    assert other.points[:2] == first.points[:2] and len(probed) < len(first.points) + len(other.points)
    n = len(probed)
    search(prune_target.Record(path, "k2").measure(prober, set()), target_ms=6.0)
    assert len(probed) > n  # another key (weights, build, machine, ...) measures afresh


# --------------------------------------------------------------------------------------------
# End to end: real pruning, exports and OpenVINO builds; a fake timer
# --------------------------------------------------------------------------------------------


@pytest.mark.openvino
def test_a_run_prunes_to_a_speedup_target_records_the_search_and_reuses_it(tiny_config, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(prune_target, "time_build", fake_timer)
    cfg = tiny_config(TARGETED.format(prune='target_speedup = 2.0\ntarget_build = "openvino_fp32"\nmax_probes = 4')
                      + "[teacher]\nepochs = 0\n[distill]\nepochs = 0\n[prune]\nheal_epochs = 0\n")
    assert _main("run", str(cfg), "--until", "prune") == 0
    workdir = cfg.parent / "run"
    manifest = json.loads((workdir / "manifest.json").read_text())
    rec = manifest["stages"]["prune"]
    m = rec["metrics"]["pruned"]
    s = m["latency_search"]
    assert s["build"] == "openvino_fp32" and s["runtime"] == "openvino" and s["precision"] == "fp32"
    assert 2 <= s["probes_used"] <= 4 and s["probes_timed_now"] == s["probes_used"]
    probes = {p["ratio"]: p for p in s["probes"]}
    base = probes[0.0]["latency_p50_ms"]
    assert s["target_ms"] == pytest.approx(base / 2)
    chosen = probes[s["chosen_ratio"]]
    assert chosen["latency_p50_ms"] <= s["target_ms"]
    assert all(p["latency_p50_ms"] > s["target_ms"] for r, p in probes.items() if r < s["chosen_ratio"])
    # The healed student is pruned at the chosen ratio: same network as its probe.
    assert m["ratio"] == s["chosen_ratio"] and m["macs"] == chosen["macs"] and m["params"] == chosen["params"]
    assert {"bench", "openvino", "onnx"} <= set(rec["config"])  # the key covers what the probes depend on
    # The report plots the search.
    sections = {sec.id: sec for sec in build_sections(Manifest.load(workdir))}
    assert any(getattr(b, "alt", "") == "latency vs pruning ratio" for b in sections["pruning"].blocks)
    # A forced re-run re-uses every probe of the search: nothing of it is timed again. (The preflight's
    # untrained bracket is timed again once: its record is kept only where the workdir already existed.)
    timed = []
    monkeypatch.setattr(prune_target, "time_build", lambda *a, macs: timed.append(macs) or fake_timer(*a, macs=macs))
    assert _main("run", str(cfg), "--until", "prune", "--force", "prune") == 0
    assert len(timed) == 2
    again = json.loads((workdir / "manifest.json").read_text())["stages"]["prune"]["metrics"]["pruned"]
    assert again["latency_search"]["probes_timed_now"] == 0
    assert again["latency_search"]["probes"] == [{**p, "reused": True} for p in s["probes"]]
    assert again["ratio"] == s["chosen_ratio"]
    # What preflight cannot know (here: preflight skipped, as if the untrained student had reached it)
    # the stage says: a failure naming the measured latencies, from the recorded bracket.
    monkeypatch.setattr(prune_target, "preflight", lambda cfg, student: None)
    cfg.write_text(cfg.read_text().replace("target_speedup = 2.0", "target_speedup = 40.0"))
    assert _main("run", str(cfg), "--until", "prune") == 1
    failed = json.loads((workdir / "manifest.json").read_text())["stages"]["prune"]
    assert failed["status"] == "failed"
    assert failed["reason"].startswith("TargetUnreachable: the target ") and "even prune.max_ratio = 0.8 measures" in failed["reason"]
