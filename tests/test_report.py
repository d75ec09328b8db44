"""The run report (`python -m pipeline report RUN_DIR`, written at the end of `run`) and the
terminal view (`python -m pipeline status RUN_DIR`).

Most tests render a hand-built manifest of a full run (every stage, reference builds, a
TensorRT engine that could not be built here, a failed stage, a ship decision), so they check
exact numbers without training anything; one test renders the report of a real tiny run.
The report derives everything from what the manifest declares (each artifact's role, the
stage chain, the task and its metric), never from artifact names: `declare` adds those to a
hand-built manifest the way the runner records them.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline import cli, plots
from pipeline.manifest import Manifest, ManifestModel
from pipeline.report import (
    build_sections, config_toml, load_run, measured_artifacts, render_html, render_markdown, same_runtime_teacher,
    status_view, summary_table, write_report,
)
from tests.conftest import run_cli

EVIL = "<script>alert(1)</script>"
PNG = plots.PNG_SIGNATURE


VAL_IMAGES = 360  # the validation split every figure of the hand-built manifest is measured on


def _m(acc, p50, *, size, params, macs, batch_ms=None, **extra):
    """Metrics of one artifact as the runner records them (batch 32, 1 thread, 360 validation images)."""
    return {
        "accuracy": acc, "latency_p50_ms": p50, "latency_p90_ms": p50 * 1.1, "latency_p99_ms": p50 * 1.3,
        "batch_latency_p50_ms": batch_ms if batch_ms is not None else p50 * 8, "batch_size": 32, "threads": 1,
        "throughput_ips": 32 / ((batch_ms if batch_ms is not None else p50 * 8) / 1000),
        "params": params, "macs": macs, "size_bytes": size, "val_images": VAL_IMAGES, **extra,
    }


# What the prune stage records itself: the unpruned and the pruned student timed back to back
# (`*_before`, `*_after`, the speedups), next to the runner's later measurement of `pruned`
# (p50 2.2 ms in `_m`): the report must show the back-to-back figures, never mix the two. The
# p99 got slower: a figure the report must word as "slower".
PRUNE_B2B = {
    "latency_p50_ms_before": 4.38, "latency_p50_ms_after": 2.0, "latency_speedup": 4.38 / 2.0,
    "latency_p90_ms_before": 4.8, "latency_p90_ms_after": 2.4,
    "latency_p99_ms_before": 5.0, "latency_p99_ms_after": 8.0,
    "batch_latency_p50_ms_before": 35.0, "batch_latency_p50_ms_after": 16.0, "batch_latency_speedup": 35.0 / 16.0,
    "throughput_ips_before": 914.3, "throughput_ips_after": 2000.0,
}


def _hist(n, start_loss, end_acc):
    return [{"epoch": float(e), "loss": start_loss / e, "train_acc": end_acc * e / n - 0.02, "val_acc": end_acc * e / n,
             "lr": 0.02, "seconds": 1.5} for e in range(1, n + 1)]


def _stage(status="ok", **kw):
    base = {"status": status, "key": kw.pop("key", "ab" * 32), "reason": "", "config": {}, "inputs": {},
            "outputs": {}, "metrics": {}, "reference": [], "history": {}, "warnings": [], "unavailable": {},
            "commands": {}, "gates": [], "started": "2026-11-24T10:00:00+00:00", "ended": "2026-11-24T10:01:00+00:00",
            "seconds": 60.0, "seed": 0, "device": "cpu", "versions": {"torch": "2.14.1"}}
    base.update(kw)
    return base


def _gate(gate, artifact, metric, value, budget, passed):
    return {"gate": gate, "artifact": artifact, "metric": metric, "value": value, "budget": budget, "passed": passed,
            "message": f"{gate} {'passed' if passed else 'FAILED' if passed is False else 'not measured'} on {artifact}: "
                       f"{value} (budget {budget})"}


CHAIN = ["teacher", "distill", "prune", "onnx", "openvino", "tensorrt"]
CLASSIFICATION = {"name": "classification", "metric": "accuracy", "metrics": ["accuracy"]}
SEGMENTATION = {"name": "segmentation", "metric": "miou", "metrics": ["miou", "pixel_accuracy"]}
TRT_NOTE = "TensorRT Q/DQ model timed on ONNX Runtime CPU: signed INT8 is slow there, the engine's latency is not this"


def _role(model="student", runtime=None, precision=None, **kw):
    return {"model": model, "runtime": runtime, "precision": precision, **kw}


# The roles the classification demo's stages declare (pipeline/manifest.py ArtifactRole).
ROLES = {
    "teacher": {"teacher": _role("teacher", "torch", "fp32")},
    "distill": {"student": _role("student", "torch", "fp32", target="torch"),
                "student_baseline": _role("baseline", "torch", "fp32")},
    "prune": {"pruned": _role("student", "torch", "fp32", target="torch", supersedes="student")},
    "onnx": {"onnx": _role("student", "onnxruntime", "fp32", target="onnxruntime"),
             "onnx_int8": _role("student", "onnxruntime", "int8", target="onnxruntime", fp32="onnx"),
             "teacher_onnx": _role("teacher", "onnxruntime", "fp32")},
    "openvino": {"openvino_fp32": _role("student", "openvino", "fp32", target="openvino"),
                 "openvino_int8": _role("student", "openvino", "int8", target="openvino", fp32="openvino_fp32"),
                 "teacher_openvino_fp32": _role("teacher", "openvino", "fp32")},
    "tensorrt": {"trt_qdq": _role("student", "onnxruntime", "int8", fp32="onnx", latency_note=TRT_NOTE),
                 "trt_calib_cache": _role("none"),
                 "trt_engine": _role("student", "tensorrt", "int8", target="tensorrt")},
}


def declare(data: dict, roles: dict = ROLES, chain: list = CHAIN, task: dict = CLASSIFICATION) -> dict:
    """Add what the runner records next to the metrics: every stage's artifact roles, the
    stage chain and the task. Returns `data`, changed in place."""
    for stage, arts in roles.items():
        if stage in data["stages"]:
            data["stages"][stage]["artifacts"] = {**data["stages"][stage].get("artifacts", {}), **arts}
    data.setdefault("pipeline", {}).update({"chain": list(chain), "task": dict(task)})
    return data


SHIP = {
    "torch": {"artifact": "pruned", "reason": "the fastest torch build within the accuracy gate", "candidates": [
        {"artifact": "student", "runtime": "torch eager", "precision": "fp32", "accuracy": 0.955, "latency_p50_ms": 4.1,
         "passes": True, "why": "within the gate, slower"},
        {"artifact": "pruned", "runtime": "torch eager", "precision": "fp32", "accuracy": 0.948, "latency_p50_ms": 2.2,
         "passes": True, "why": "fastest passing"}]},
    "onnxruntime": {"artifact": "onnx_int8", "reason": "INT8 is 1.8x faster than FP32 at p50 and within the accuracy gate",
                    "candidates": [
                        {"artifact": "onnx", "runtime": "onnxruntime", "precision": "fp32", "accuracy": 0.948,
                         "latency_p50_ms": 0.9, "passes": True, "why": "slower"},
                        {"artifact": "onnx_int8", "runtime": "onnxruntime", "precision": "int8", "accuracy": 0.945,
                         "latency_p50_ms": 0.5, "passes": True, "why": "fastest passing"}]},
    "openvino": {"artifact": "openvino_int8",
                 "reason": "INT8 is 2.6x faster than FP32 at p50 and within the accuracy gate", "candidates": [
                     {"artifact": "openvino_fp32", "runtime": "openvino", "precision": "fp32", "accuracy": 0.948,
                      "latency_p50_ms": 0.52, "passes": True, "why": "slower"},
                     {"artifact": "openvino_int8", "runtime": "openvino", "precision": "int8", "accuracy": 0.944,
                      "latency_p50_ms": 0.2, "passes": True, "why": "fastest passing"}]},
    "tensorrt": {"artifact": None, "reason": "no engine was built here: TensorRT not installed", "candidates": []},
}


def manifest_dict(evil: bool = False) -> dict:
    """A realistic manifest of a full run; `evil` puts a <script> into names, reasons and config."""
    t_hist, s_hist = _hist(4, 2.2, 0.96), _hist(3, 3.3, 0.955)
    stages = {
        "teacher": _stage(
            outputs={"teacher": {"path": "teacher/teacher.pt", "sha256": "0" * 64, "bytes": 85262731}},
            metrics={"teacher": _m(0.9625, 9.1, size=85262731, params=21289802, macs=1_160_000_000, train_seconds=50.0)},
            history={"teacher": t_hist}, seconds=61.2,  # from an earlier run: re-used from the cache
            started="2026-11-23T08:00:00+00:00", ended="2026-11-23T08:01:01+00:00"),
        "distill": _stage(
            config={"distill": {"method": "mgd", "student": "resnet18", "baseline": True}},
            metrics={
                "student": _m(0.955, 4.1, size=44770315, params=11173962, macs=557_000_000, speedup_vs_teacher=9.1 / 4.1),
                "student_baseline": _m(0.9425, 4.0, size=44770315, params=11173962, macs=557_000_000),
                "student_kd": _m(0.9375, 4.05, size=44770315, params=11173962, macs=557_000_000),
            },
            reference=["student_baseline"],
            history={"student": s_hist, "student_baseline": _hist(3, 3.0, 0.9425), "student_kd": _hist(3, 3.1, 0.9375)},
            warnings=["the teacher (96.25%) beats the baseline by only 2.00 pt"], seconds=181.5),
        "prune": _stage(
            metrics={"pruned": _m(0.948, 2.2, size=11249611, params=2797610, macs=140_000_000,
                                  accuracy_before=0.955, accuracy_before_heal=0.71, params_before=11173962,
                                  macs_before=557_000_000, size_bytes_before=44770315, **PRUNE_B2B,
                                  ratio=0.5, importance="magnitude", heal_epochs=3, heal_method="mgd")},
            outputs={"pruned": {"path": "prune/pruned.pt", "sha256": "3" * 64, "bytes": 11249611}},
            history={"pruned": _hist(3, 1.2, 0.948)}, seconds=33.0),
        "onnx": _stage(
            metrics={"onnx": _m(0.948, 0.9, size=11200000, params=2797610, macs=140_000_000),
                     "onnx_int8": _m(0.945, 0.5, size=2900000, params=2797610, macs=140_000_000),
                     "teacher_onnx": _m(0.9625, 2.7, size=85200000, params=21289802, macs=1_160_000_000)},
            reference=["teacher_onnx"],
            outputs={"onnx": {"path": "onnx/onnx.onnx", "sha256": "4" * 64, "bytes": 11200000},
                     "onnx_int8": {"path": "onnx/onnx_int8.onnx", "sha256": "5" * 64, "bytes": 2900000}},
            gates=[_gate("max_accuracy_drop", "onnx_int8", "accuracy drop vs teacher", 0.0175, 0.02, True)]),
        "openvino": _stage(
            metrics={"openvino_fp32": _m(0.948, 0.52, size=11300000, params=2797610, macs=140_000_000),
                     "openvino_int8": _m(0.944, 0.2, size=3100000, params=2797610, macs=140_000_000),
                     "teacher_openvino_fp32": _m(0.9625, 1.3, size=85300000, params=21289802, macs=1_160_000_000)},
            reference=["teacher_openvino_fp32"],
            outputs={"openvino_int8": {"path": "openvino/openvino_int8.xml", "sha256": "6" * 64, "bytes": 3100000}},
            commands={"openvino_int8": "benchmark_app -m openvino/openvino_int8.xml -d CPU -hint latency -shape [1,3,32,32]"},
            gates=[_gate("latency_ms", "openvino_int8", "latency p90", 0.22, 5.0, True),
                   _gate("max_accuracy_drop", "openvino_int8", "accuracy drop vs teacher", 0.0185, 0.02, True)]),
        "tensorrt": _stage(
            metrics={"trt_qdq": _m(0.946, 0.8, size=11300000, params=2797610, macs=140_000_000)},
            outputs={"trt_qdq": {"path": "tensorrt/trt_qdq.onnx", "sha256": "1" * 64, "bytes": 11300000},
                     "trt_calib_cache": {"path": "tensorrt/calib.cache", "sha256": "2" * 64, "bytes": 4200}},
            unavailable={"trt_engine": "TensorRT not installed (pip install tensorrt needs an NVIDIA driver)"},
            commands={"trt_engine": "trtexec --onnx=tensorrt/trt_qdq.onnx --int8 --calib=tensorrt/calib.cache "
                                    "--saveEngine=trt_engine.plan"},
            gates=[_gate("latency_ms", "trt_engine", "latency p90", None, 2.0, None)]),
        "export_tflite": _stage("failed", reason="RuntimeError: tflite converter crashed (exit 134)", seconds=1.0),
    }
    config = {"pipeline": {"name": "digits-r34-to-r18", "workdir": "runs/digits", "seed": 0, "device": "cpu"},
              "distill": {"student": "resnet18", "method": "mgd", "mgd": {"alpha": 7e-5, "teacher_layers": ["layer4"]}},
              "gates": {"max_accuracy_drop": 0.02, "latency_ms": {"openvino_int8": 5.0}, "max_int8_accuracy_drop": None},
              "bench": {"threads": 1}}
    data = {
        "format": 1,
        "pipeline": {"name": "digits-r34-to-r18", "config": config, "seed": 0, "device": "cpu",
                     "versions": {"torch": "2.14.1", "openvino": "2026.4.1", "tensorrt": "absent"},
                     "updated": "2026-11-24T09:59:00+00:00"},
        "stages": stages,
        "ship": SHIP,
    }
    # student_kd gets no role: an artifact a manifest does not describe (an older manifest).
    declare(data)
    if evil:
        stages[EVIL] = _stage("unavailable", reason=f"missing {EVIL} & friends [/bold] | pipe")
        stages["prune"]["warnings"] = [f"class {EVIL} has no images"]
        stages["distill"]["metrics"][EVIL] = _m(0.5, 1.0, size=1, params=1, macs=1)
        stages["openvino"]["commands"][EVIL] = f"echo {EVIL}"
        config["data"] = {"classes": [EVIL, "dog"]}
        data["pipeline"]["name"] = f"run {EVIL}"
        data["ship"] = {**SHIP, "openvino": {**SHIP["openvino"], "reason": f"because {EVIL}"}}
    return data


def write_manifest(workdir: Path, data: dict) -> Manifest:
    """Write `data` as workdir/manifest.json and load it back through the real loader.

    The `ship` section is being added to the manifest schema; until ManifestModel knows it,
    it is attached after loading, exactly where the report reads it (`manifest.model.ship`).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(data))
    ship = data.pop("ship", None) if "ship" not in ManifestModel.model_fields else None
    (workdir / "manifest.json").write_text(json.dumps(data, indent=1))
    manifest = load_run(workdir)
    if ship is not None:
        object.__setattr__(manifest.model, "ship", ship)
    return manifest


@pytest.fixture
def manifest(tmp_path) -> Manifest:
    return write_manifest(tmp_path / "run", manifest_dict())


class _Parse(HTMLParser):
    """Collects tags with their attributes and the visible text of an HTML page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Parse:
    p = _Parse()
    p.feed(page)
    return p


# -- content -------------------------------------------------------------------------------


def test_html_report_has_every_section_with_numbers(manifest):
    page = render_html(manifest)
    text = " ".join(_parse(page).text)

    for title in ("Stage chain", "Artifacts", "Plots", "Distillation gain (MGD)", "Pruning before / after",
                  "INT8 vs FP32 per target", "What to ship, per target", "Gates", "Unavailable here, and why",
                  "Reproduce on the target", "Warnings", "Environment and config"):
        assert f"<h2>{title}</h2>" in page, title
    # stage chain: every stage, its status and time, the failure's reason
    assert "teacher (ok) → distill (ok) → prune (ok) → onnx (ok) → openvino (ok) → tensorrt (ok) → export_tflite (failed)" in text
    assert "RuntimeError: tflite converter crashed (exit 134)" in text and "61.2" in text and "181.5" in text
    # artifact table: accuracy, delta vs teacher, latencies, size, params, MACs, speedups
    assert "96.25%" in text and "94.40%" in text and "-1.85 pt" in text  # openvino_int8 vs teacher
    assert "9.10" in text and "0.20" in text and "0.22" in text  # p50 teacher, p50 / p90 openvino_int8
    assert "72.8 (N=32)" in text  # teacher batch-32 latency p50
    assert "81.3 MiB" in text and "21.3 M" in text and "1.16 G" in text and "140 M" in text and "557 M" in text
    assert "45.50×" in text  # openvino_int8 vs the teacher in torch eager: 9.1 / 0.2
    assert "6.50× vs teacher_openvino_fp32" in text  # vs the teacher on OpenVINO: 1.3 / 0.2
    assert "5.40× vs teacher_onnx" in text  # onnx_int8: 2.7 / 0.5
    assert "2.22× vs teacher" in text  # student in torch eager: the teacher is its same-runtime build
    assert "student_baseline (reference)" in text and "not gated (reference)" in text
    assert "max_accuracy_drop ok, latency_ms ok" not in text and "latency_ms ok, max_accuracy_drop ok" in text
    assert "not measured" in text and "latency_ms FAILED" not in text  # trt_engine's budget: never measured here
    # MGD gain vs the baseline and vs KD
    assert "+1.25 pt" in text and "-0.50 pt" in text  # student, student_kd vs student_baseline
    assert "This run's MGD gain over the student trained alone: +1.25 pt" in text
    # pruning before/after (latency: the stage's back-to-back figures, 4.38 -> 2.00 ms)
    assert "accuracy right after pruning, before healing" in text and "71.00%" in text
    assert "11.2 M" in text and "2.80 M" in text and "2.19× faster" in text
    assert "ratio = 0.5" in text and "heal_method = mgd" in text
    # the validation set, and so the resolution of every accuracy figure: 1/360 = 0.28 pt
    assert "Quality is measured on 360 validation images: one image is 0.28 pt of accuracy" in text
    # INT8 vs FP32 on each runtime
    assert "2.60×" in text and "-0.40 pt" in text  # openvino: 0.52 / 0.2, 94.4 vs 94.8
    assert "1.80×" in text and "-0.30 pt" in text  # onnxruntime: 0.9 / 0.5
    # ship choice per target, the file to deploy, and why
    assert "openvino_int8" in text and "INT8 is 2.6x faster than FP32 at p50 and within the accuracy gate" in text
    assert "openvino/openvino_int8.xml (+ openvino_int8.bin)" in text and "prune/pruned.pt" in text
    assert "no engine was built here: TensorRT not installed" in text
    assert "ship: torch → pruned, onnxruntime → onnx_int8, openvino → openvino_int8, tensorrt → none" in text
    # reproduce commands and unavailable parts with their reason
    assert "benchmark_app -m openvino/openvino_int8.xml -d CPU" in text and "trtexec --onnx=tensorrt/trt_qdq.onnx" in text
    assert "TensorRT not installed (pip install tensorrt needs an NVIDIA driver)" in text
    # environment: versions, device, seed, the config
    assert "2026.4.1" in text and "teacher_layers = [\"layer4\"]" in text and "[distill.mgd]" in text
    assert "# max_int8_accuracy_drop = (unset)" in text
    assert "the teacher (96.25%) beats the baseline by only 2.00 pt" in text


def test_a_fixed_batch_build_is_reported_at_its_own_batch(tmp_path):
    # An `[onnx] dynamic_batch = false` export: the runner timed it at its batch of 1, not N=32.
    data = manifest_dict()
    fixed = _m(0.948, 0.52, size=11300000, params=2797610, macs=140_000_000, batch_ms=0.55)
    fixed.update(batch_size=1, batch_fixed=True, throughput_ips=1 / 0.00055)
    data["stages"]["openvino"]["metrics"]["openvino_fp32"] = fixed
    text = " ".join(_parse(render_html(write_manifest(tmp_path / "run", data))).text)
    assert "0.55 (N=1, fixed)" in text and "72.8 (N=32)" in text
    assert "Fixed batch: openvino_fp32 runs only batch 1 (exported with onnx.dynamic_batch = false)" in text
    assert "Fixed batch:" not in " ".join(_parse(render_html(write_manifest(tmp_path / "other", manifest_dict()))).text)


def test_same_runtime_teacher_needs_the_teacher_build(manifest):
    rows = {r.name: r for r in measured_artifacts(manifest)}
    assert same_runtime_teacher("openvino_int8", rows) == "teacher_openvino_fp32"
    assert same_runtime_teacher("onnx", rows) == "teacher_onnx"
    assert same_runtime_teacher("student", rows) == "teacher"  # torch eager: the teacher itself
    assert same_runtime_teacher("trt_qdq", rows) is None  # its latency is not its target's (latency_note)
    assert same_runtime_teacher("student_kd", rows) is None  # no role recorded: no runtime to match
    assert same_runtime_teacher("teacher_onnx", rows) is None
    del rows["teacher_onnx"]
    assert same_runtime_teacher("onnx_int8", rows) is None


def test_markdown_has_the_tables(manifest):
    md = render_markdown(manifest)
    assert md.startswith("# digits-r34-to-r18 — pipeline report")
    for title in ("## Stage chain", "## Artifacts", "## Distillation gain (MGD)", "## Pruning before / after",
                  "## INT8 vs FP32 per target", "## What to ship, per target", "## Reproduce on the target"):
        assert title in md, title
    header = next(line for line in md.splitlines() if line.startswith("| stage | artifact |"))
    cols = header.count("|") - 1
    row = next(line for line in md.splitlines() if line.startswith("| openvino | openvino_int8 |"))
    assert row.count("|") - row.count("\\|") - 1 == cols  # same column count as the header
    assert "| 94.40% |" in row and "6.50× vs teacher_openvino_fp32" in row
    assert re.search(r"^\| --- \|", md, re.M)
    assert "```\ntrtexec --onnx=tensorrt/trt_qdq.onnx" in md
    assert "| openvino | openvino_int8 | openvino/openvino_int8.xml (+ openvino_int8.bin) | INT8 is 2.6x faster" in md
    assert "see the plot in report.html" in md


def test_plots_are_valid_pngs_and_missing_data_is_a_note(manifest):
    imgs = [b for s in build_sections(manifest) for b in s.blocks if type(b).__name__ == "Img"]
    assert len(imgs) == 3
    for img in imgs:
        assert img.png.startswith(PNG) and img.png[12:16] == b"IHDR" and img.png.rstrip().endswith(b"IEND\xaeB`\x82")
        w, h = int.from_bytes(img.png[16:20], "big"), int.from_bytes(img.png[20:24], "big")
        assert w > 300 and h > 200
    with pytest.raises(plots.PlotDataMissing):
        plots.accuracy_vs_latency([plots.Point("x", None, 0.5)])
    with pytest.raises(plots.PlotDataMissing):
        plots.training_curves({"teacher": []})
    with pytest.raises(plots.PlotDataMissing):
        plots.stage_bars([("a", None, None)])

    empty = write_manifest(manifest.workdir.parent / "empty", {"stages": {"teacher": _stage("failed", reason="boom")}})
    page = render_html(empty)
    assert "<img" not in page
    assert "accuracy vs latency p50 (Pareto view): omitted, no artifact has both an accuracy and a latency p50 yet." in page
    assert "training curves: omitted, no stage recorded a per-epoch training history." in page


def test_pareto_front():
    pts = [plots.Point("slow_best", 10.0, 0.97), plots.Point("fast", 0.2, 0.94), plots.Point("mid", 1.0, 0.96),
           plots.Point("dominated", 2.0, 0.95), plots.Point("tie", 0.2, 0.93)]
    assert [p.label for p in plots.pareto_front(pts)] == ["fast", "mid", "slow_best"]


def test_config_toml_round_trips_through_tomllib():
    import tomllib

    cfg = {"pipeline": {"name": "a \"quoted\" name", "seed": 0}, "gates": {"max_accuracy_drop": None,
           "latency_ms": {"openvino_int8": 5.0}}, "distill": {"mgd": {"alpha": 7e-5, "layers": ["layer4"]}}}
    parsed = tomllib.loads(config_toml(cfg))
    assert parsed["pipeline"] == cfg["pipeline"]
    assert parsed["gates"] == {"latency_ms": {"openvino_int8": 5.0}}  # unset values are comments
    assert parsed["distill"]["mgd"] == cfg["distill"]["mgd"]


# -- derived from roles, chain and task, never from names -----------------------------------


def _md_row(md: str, start: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(start))


def _seg_m(miou, pix, p50, *, size=30_000_000, params=7_500_000, macs=2_000_000_000):
    """Metrics of a segmentation artifact: mIoU and pixel accuracy, no accuracy."""
    m = {k: v for k, v in _m(0.0, p50, size=size, params=params, macs=macs).items() if k != "accuracy"}
    return {**m, "miou": miou, "pixel_accuracy": pix}


def _seg_hist(n, end_miou):
    return [{"epoch": float(e), "loss": 1.0 / e, "val_miou": end_miou * e / n, "lr": 0.01, "seconds": 2.0}
            for e in range(1, n + 1)]


def segmentation_dict() -> dict:
    """A segmentation run: mIoU is the task's metric, no artifact records an accuracy, and the
    teacher's and students' builds have names that say nothing about what they are."""
    stages = {
        "teacher": _stage(metrics={"segformer_b2": _seg_m(0.712, 0.931, 20.0, size=110_000_000, params=27_000_000)},
                          history={"segformer_b2": _seg_hist(3, 0.712)}),
        "distill": _stage(config={"distill": {"method": "mgd+kd", "student": "segformer_b0", "baseline": True}},
                          metrics={"b0_distilled": _seg_m(0.695, 0.924, 9.0), "b0_alone": _seg_m(0.680, 0.917, 9.0)},
                          reference=["b0_alone"],
                          history={"b0_distilled": _seg_hist(3, 0.695), "b0_alone": _seg_hist(3, 0.680)}),
        "onnx": _stage(metrics={"onnx": _seg_m(0.694, 0.924, 4.0), "onnx_int8": _seg_m(0.688, 0.921, 2.5),
                                "ref_onnx": _seg_m(0.712, 0.931, 10.0)},
                       reference=["ref_onnx"],
                       gates=[_gate("max_metric_drop", "onnx_int8", "mIoU drop vs teacher", 0.024, 0.03, True),
                              _gate("max_int8_metric_drop", "onnx_int8", "mIoU drop vs onnx", 0.006, 0.01, True)]),
    }
    roles = {
        "teacher": {"segformer_b2": _role("teacher", "torch", "fp32")},
        "distill": {"b0_distilled": _role("student", "torch", "fp32", target="torch"),
                    "b0_alone": _role("baseline", "torch", "fp32")},
        "onnx": {"onnx": _role("student", "onnxruntime", "fp32", target="onnxruntime"),
                 "onnx_int8": _role("student", "onnxruntime", "int8", target="onnxruntime", fp32="onnx"),
                 "ref_onnx": _role("teacher", "onnxruntime", "fp32")},
    }
    data = {"format": 1, "pipeline": {"name": "seg-b2-to-b0", "seed": 0, "device": "cpu"}, "stages": stages}
    return declare(data, roles, chain=["teacher", "distill", "onnx"], task=SEGMENTATION)


DETECTION = {"name": "detection", "metric": "map", "metrics": ["map", "map_50"]}


def detection_dict() -> dict:
    """The segmentation run recast as detection: mAP and mAP@50 in place of mIoU and pixel accuracy."""
    names = {"miou": "map", "pixel_accuracy": "map_50", "val_miou": "val_map"}
    data = json.loads(json.dumps(segmentation_dict()))
    for rec in data["stages"].values():
        rec["metrics"] = {a: {names.get(k, k): v for k, v in m.items()} for a, m in rec["metrics"].items()}
        rec["history"] = {a: [{names.get(k, k): v for k, v in e.items()} for e in h] for a, h in rec["history"].items()}
    data["pipeline"]["task"] = dict(DETECTION)
    return data


def test_detection_report_is_driven_by_the_recorded_metric(tmp_path):
    md = render_markdown(write_manifest(tmp_path / "run", detection_dict()))
    assert "| mAP | Δ vs teacher | mAP@50 |" in _md_row(md, "| stage | artifact |")
    assert "Quality (mAP) is measured on 360 validation images." in md and "pt of mAP" not in md
    assert "| onnxruntime | onnx_int8 | onnx | 2.50 | 4.00 | 1.60× | 68.80% | 69.40% | -0.60 pt |" in md
    assert "accuracy" not in md.split("## Environment", 1)[0]


def test_segmentation_report_shows_miou_everywhere(tmp_path, monkeypatch):
    seen = {}
    for fn in ("accuracy_vs_latency", "stage_bars", "training_curves"):
        real = getattr(plots, fn)

        def spy(*args, _real=real, _fn=fn, **kw):
            seen[_fn] = (args, kw)
            return _real(*args, **kw)

        monkeypatch.setattr(plots, fn, spy)
    m = write_manifest(tmp_path / "run", segmentation_dict())
    md = render_markdown(m)

    # artifact table: mIoU (the primary metric), its delta vs the teacher found by role, pixel accuracy
    header = _md_row(md, "| stage | artifact |")
    assert "| mIoU | Δ vs teacher | pixel accuracy |" in header and "| accuracy |" not in header
    student = _md_row(md, "| distill | b0_distilled |")
    assert student.startswith("| distill | b0_distilled | torch eager | fp32 | 69.50% | -1.70 pt | 92.40% | 9.00 |")
    assert "| 9.00 | 2.22× vs segformer_b2 | 2.22× |" in student  # 20 / 9: vs the teacher, whatever its name
    assert "4.00× vs ref_onnx" in _md_row(md, "| onnx | onnx_int8 |")  # the teacher's ONNX build: 10 / 2.5
    assert "max_metric_drop ok, max_int8_metric_drop ok" in _md_row(md, "| onnx | onnx_int8 |")
    assert "| onnx | ref_onnx (reference) | onnxruntime | fp32 |" in md
    assert "| teacher | segformer_b2 | torch eager | fp32 | 71.20% | — |" in md  # the teacher is no reference row

    # the image count, but no per-image resolution: mIoU pools pixels over the set
    assert "Quality (mIoU) is measured on 360 validation images." in md and "pt of mIoU" not in md

    # MGD gain in mIoU points
    assert "| student | distillation | mIoU | Δ vs baseline | Δ vs teacher |" in md
    assert "| b0_distilled | mgd+kd | 69.50% | +1.50 pt | -1.70 pt |" in md  # the method from the distill config
    assert "| b0_alone | none (task loss only) | 68.00% | — | -3.20 pt |" in md
    assert "This run's MGD+KD gain over the student trained alone: +1.50 pt mIoU" in md

    # INT8 vs FP32 in mIoU
    assert "| INT8 mIoU | FP32 mIoU | Δ mIoU |" in md
    assert "| onnxruntime | onnx_int8 | onnx | 2.50 | 4.00 | 1.60× | 68.80% | 69.40% | -0.60 pt |" in md

    # plots: drawn from mIoU and labelled with it; the val_miou curves are plotted
    imgs = [b for s in build_sections(m) for b in s.blocks if type(b).__name__ == "Img"]
    assert [i.alt for i in imgs] == ["mIoU vs latency p50 (Pareto view)", "mIoU and latency per artifact", "training curves"]
    points = seen["accuracy_vs_latency"][0][0]
    assert {p.label: p.accuracy for p in points}["b0_distilled"] == 0.695
    assert seen["accuracy_vs_latency"][1] == {"metric": "mIoU", "axis": "mIoU"}
    assert seen["stage_bars"][1] == {"metric": "mIoU", "axis": "mIoU"}
    assert seen["training_curves"][1]["metric_names"]["miou"] == "mIoU"

    # the terminal summary too
    from rich.console import Console

    con = Console(record=True, width=200, color_system=None)
    con.print(summary_table(m))
    out = con.export_text()
    assert "mIoU" in out and "accuracy" not in out
    assert "69.50%" in next(line for line in out.splitlines() if "│ b0_distilled " in line)


def test_training_curves_plot_any_val_or_train_metric():
    names = {"miou": "mIoU", "map": "mAP", "map_50": "mAP@50"}
    png = plots.training_curves({"student": _seg_hist(3, 0.7), "map": [{"epoch": 1, "val_map": 0.4, "val_map_50": 0.6}]},
                                metric_names=names)
    assert png.startswith(PNG)
    # a val_<metric> alone is enough to plot, and it is drawn (the figure differs without it)
    only_metric = plots.training_curves({"det": [{"epoch": 1, "val_map": 0.4}, {"epoch": 2, "val_map": 0.5}]}, names)
    assert only_metric.startswith(PNG)
    loss_only = [{k: v for k, v in e.items() if k != "val_miou"} for e in _seg_hist(3, 0.7)]
    assert plots.training_curves({"student": _seg_hist(3, 0.7)}, names) != plots.training_curves({"student": loss_only}, names)
    with pytest.raises(plots.PlotDataMissing):  # no loss and no train_/val_ metric: nothing to plot
        plots.training_curves({"student": [{"epoch": 1, "lr": 0.1, "seconds": 1.0}]})


def test_training_curves_draw_each_loss_term_apart():
    hist = [{"epoch": e, "loss": 3.0 - e, "loss_task": 2.0 - e / 2, "loss_mgd": 1.0 - e / 2, "val_acc": 0.5}
            for e in (1, 2)]
    seen = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("label"))
        return original(self, *args, **kwargs)

    matplotlib.axes.Axes.plot = spy
    try:
        plots.training_curves({"student": hist, "teacher": [{k: v for k, v in e.items() if k != "loss_mgd"}
                                                            for e in hist]})
    finally:
        matplotlib.axes.Axes.plot = original
    assert "student: task" in seen and "student: mgd" in seen
    assert not any(str(label).startswith("teacher:") for label in seen)  # one term: the loss itself


def test_runtime_and_comparisons_come_from_roles_not_names(tmp_path):
    data = manifest_dict()
    ov = data["stages"]["openvino"]
    size = dict(size=11_000_000, params=2797610, macs=140_000_000)
    ov["metrics"].update({"foo_build": _m(0.947, 0.4, **size), "onnx_lookalike": _m(0.944, 0.25, **size),
                          "openvino_mystery": _m(0.94, 0.3, **size)})
    ov["artifacts"].update({
        "foo_build": _role("student", "openvino", "fp32"),
        # named like an ONNX build, declared as an OpenVINO INT8 build of foo_build
        "onnx_lookalike": _role("student", "openvino", "int8", fp32="foo_build"),
    })  # openvino_mystery: no role recorded, so nothing is guessed from its name
    m = write_manifest(tmp_path / "run", data)
    md = render_markdown(m)

    foo = _md_row(md, "| openvino | foo_build |")
    assert foo.startswith("| openvino | foo_build | openvino | fp32 | 94.70% | -1.55 pt |")
    assert "3.25× vs teacher_openvino_fp32" in foo  # 1.3 / 0.4: the teacher's OpenVINO build
    look = _md_row(md, "| openvino | onnx_lookalike |")
    assert look.startswith("| openvino | onnx_lookalike | openvino | int8 |") and "5.20× vs teacher_openvino_fp32" in look
    mystery = _md_row(md, "| openvino | openvino_mystery |")
    assert mystery.startswith("| openvino | openvino_mystery | — | — | 94.00% |") and "vs teacher_" not in mystery
    assert "| openvino | onnx_lookalike | foo_build | 0.25 | 0.40 | 1.60× | 94.40% | 94.70% | -0.30 pt |" in md

    rows = {r.name: r for r in measured_artifacts(m)}
    assert same_runtime_teacher("foo_build", rows) == "teacher_openvino_fp32"
    assert same_runtime_teacher("openvino_mystery", rows) is None
    assert rows["openvino_mystery"].runtime == "—" and rows["foo_build"].runtime == "openvino"


def _section(md: str, title: str) -> str:
    return md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_int8_table_shows_the_latency_note(manifest):
    md = render_markdown(manifest)
    int8_md = _section(md, "INT8 vs FP32 per target")
    assert _md_row(int8_md, "| runtime | INT8 | FP32 |").endswith("| size INT8/FP32 |")  # no caveat column far right
    # the role's fp32 counterpart; its CPU latency marked, no INT8 speedup claimed from it
    row = _md_row(int8_md, "| onnxruntime | trt_qdq | onnx |")
    assert row.startswith("| onnxruntime | trt_qdq | onnx | 0.80† | 0.90 | —† | 94.60% | 94.80% | -0.20 pt |")
    assert f"† Latency caveat, trt_qdq: {TRT_NOTE}" in int8_md  # right under the table
    assert _md_row(int8_md, "| openvino | openvino_int8 | openvino_fp32 |").endswith("| 0.27× |")
    artifacts = _section(md, "Artifacts")
    assert f"† Latency caveat, trt_qdq: {TRT_NOTE}" in artifacts
    assert "| 0.80† | — | —† |" in _md_row(artifacts, "| tensorrt | trt_qdq |")  # no speedup vs the teacher either
    # no note anywhere: no mark, the INT8 speedup is shown
    data = manifest_dict()
    del data["stages"]["tensorrt"]["artifacts"]["trt_qdq"]["latency_note"]
    plain_md = render_markdown(write_manifest(manifest.workdir.parent / "plain", data))
    assert "latency caveat" not in plain_md.lower() and "†" not in plain_md
    assert "| onnxruntime | trt_qdq | onnx | 0.80 | 0.90 | 1.12× |" in plain_md


def _prune_rows(md: str) -> dict[str, list[str]]:
    """The pruning table's rows by metric name: [before, after, change]."""
    out = {}
    for line in _section(md, "Pruning before / after").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("metric", "---"):
            out[cells[0]] = cells[1:]
    return out


def test_pruning_speedup_is_the_manifests_back_to_back_figure(manifest, tmp_path):
    from pipeline.report.fmt import fmt_ms, fmt_speed

    m = manifest.stages["prune"].metrics["pruned"]
    md = render_markdown(manifest)
    rows = _prune_rows(md)
    # one figure per claim: before, after and speedup all from the back-to-back measurement
    p50 = rows["latency p50 ms (batch 1)"]
    assert p50 == [fmt_ms(m["latency_p50_ms_before"]), fmt_ms(m["latency_p50_ms_after"]), fmt_speed(m["latency_speedup"])]
    assert p50 == ["4.38", "2.00", "2.19× faster"]
    assert rows["latency p50 ms (batch N)"][2] == fmt_speed(m["batch_latency_speedup"]) == "2.19× faster"
    assert rows["latency p99 ms (batch 1)"] == ["5.00", "8.00", "1.60× slower"]  # slower is worded slower
    assert rows["throughput img/s (batch N)"] == ["914", "2,000", "2.19× faster"]
    section = _section(md, "Pruning before / after")
    assert "pruned: 2.19× faster at batch 1 (latency p50 4.38 → 2.00 ms, measured back to back in torch eager)" in section
    assert "2.20" not in section  # the runner's later measurement of pruned is not mixed in
    assert not re.search(r"\b0\.\d+× faster", md)  # nowhere "0.64× faster"

    # an older manifest: the speedup but no after figures; the after is before / speedup
    data = manifest_dict()
    pm = data["stages"]["prune"]["metrics"]["pruned"]
    for k in [k for k in pm if k.endswith("_after")]:
        del pm[k]
    rows = _prune_rows(render_markdown(write_manifest(tmp_path / "older", data)))
    assert rows["latency p50 ms (batch 1)"] == ["4.38", "2.00", "2.19× faster"]
    assert "latency p99 ms (batch 1)" not in rows  # no back-to-back after: no row, never the mixed one
    # no back-to-back figure at all: no speedup claimed
    for k in [k for k in pm if k.startswith(("latency_", "batch_latency_", "throughput_"))]:
        del pm[k]
    md = render_markdown(write_manifest(tmp_path / "oldest", data))
    assert not any(k.startswith("latency") for k in _prune_rows(md))
    assert "no pruning speedup is claimed" in _section(md, "Pruning before / after")


def test_fmt_speed_words_the_direction():
    from pipeline.report.fmt import fmt_speed

    assert fmt_speed(2.19) == "2.19× faster" and fmt_speed(0.64) == "1.56× slower"
    assert fmt_speed(1.001) == "same speed (1.00×)" and fmt_speed(None) == "—" and fmt_speed(0) == "—"


def test_gates_are_in_points_and_the_warning_sits_with_the_gain(manifest):
    md = render_markdown(manifest)
    gates = _section(md, "Gates")
    assert "| onnx | max_accuracy_drop | onnx_int8 | accuracy drop vs teacher | 1.75 pt | 2.00 pt | passed |" in gates
    assert "| openvino | latency_ms | openvino_int8 | latency p90 | 0.22 ms | 5 ms | passed |" in gates
    assert "0.0175" not in md and "0.02 " not in gates.split("Quality drops")[0]
    # the distill stage's warning (a weak teacher) is read where the gain is
    mgd = _section(md, "Distillation gain (MGD)")
    assert "Warning: the teacher (96.25%) beats the baseline by only 2.00 pt" in mgd
    assert mgd.index("Warning:") < mgd.index("| student |")
    assert "4 of 360 validation images" in mgd


def test_markdown_is_readable_raw_and_inert_rendered(tmp_path):
    from markdown_it import MarkdownIt

    md = render_markdown(write_manifest(tmp_path / "run", manifest_dict(evil=True)))
    assert "&lt;" not in md and "&gt;" not in md and "&amp;" not in md  # no entities in the raw file
    html_out = MarkdownIt("commonmark").enable("table").render(md)
    assert "<script" not in html_out.lower()  # rendered, a manifest's markup stays text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_out
    # a real gate message with its budget: `<=` as written
    from pipeline.config import GatesConfig
    from pipeline.gates import check_stage
    from pipeline.manifest import ArtifactRole, StageRecord

    [g] = check_stage(StageRecord(status="ok", metrics={"s": {"accuracy": 0.9}}, artifacts={"s": ArtifactRole()}),
                      {"accuracy": 0.95}, GatesConfig(max_accuracy_drop=0.02), metric="accuracy")
    data = manifest_dict()
    data["ship"] = {"torch": {"artifact": None, "reason": f"no build passes the quality gates: s: {g.message}",
                              "candidates": []}}
    md = render_markdown(write_manifest(tmp_path / "gate", data))
    assert "accuracy drop vs teacher = 5.00 pt, budget <= 2.00 pt" in md and "&lt;=" not in md


def test_pareto_front_leaves_out_references_and_labels_never_overprint(manifest):
    import itertools
    import io

    rows = [r for r in measured_artifacts(manifest) if not r.latency_note]
    points = [plots.Point(r.name, r.metrics["latency_p50_ms"], r.metrics["accuracy"], r.reference or r.is_teacher,
                          r.runtime) for r in rows]
    fig, labels = plots.pareto_figure(points)
    fig.savefig(io.BytesIO(), format="png")  # the final layout
    ax = fig.axes[0]
    # the front is drawn through candidates only: teacher_openvino_fp32 (1.3 ms, 96.25%) would be on it
    [front] = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert list(front.get_xdata()) == [0.2, 0.5, 0.52, 4.1]  # openvino_int8, onnx_int8, openvino_fp32, student
    # one colour per runtime, named in the legend
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"torch eager", "onnxruntime", "openvino"} <= set(legend) and "reference build (not a candidate)" in legend
    colours = {}
    for coll, p in zip(ax.collections, points):
        colours.setdefault(p.runtime, set()).add(tuple(coll.get_edgecolor()[0]) if p.reference else tuple(coll.get_facecolor()[0]))
    assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == len(colours)
    # every point labelled, no two labels overlap, none covers a point, all inside the axes
    renderer = fig.canvas.get_renderer()
    boxes = {t.get_text(): plots._text_box(t, renderer) for t in labels}
    assert set(boxes) == {p.label for p in points}
    for (a, ba), (b, bb) in itertools.combinations(boxes.items(), 2):
        assert not ba.overlaps(bb), (a, b)
    frame = ax.get_window_extent(renderer)
    for p in points:
        x, y = ax.transData.transform((p.latency_ms, p.accuracy * 100))
        assert frame.x0 <= x <= frame.x1
        for name, box in boxes.items():
            assert not box.contains(x, y), (name, p.label)
        assert frame.contains(boxes[p.label].x0, boxes[p.label].y0) and frame.contains(boxes[p.label].x1, boxes[p.label].y1)


def test_stages_follow_the_recorded_chain(tmp_path):
    data = manifest_dict()
    data["stages"] = dict(reversed(list(data["stages"].items())))  # recorded in the wrong order
    text = " ".join(_parse(render_html(write_manifest(tmp_path / "run", data))).text)
    assert "teacher (ok) → distill (ok) → prune (ok) → onnx (ok) → openvino (ok) → tensorrt (ok) → export_tflite (failed)" in text
    assert "ship: torch → pruned, onnxruntime → onnx_int8, openvino → openvino_int8, tensorrt → none" in text
    del data["pipeline"]["chain"]  # an older manifest: the recorded order
    text = " ".join(_parse(render_html(write_manifest(tmp_path / "old", data))).text)
    assert "export_tflite (failed) → tensorrt (ok) → openvino (ok)" in text


def test_manifest_without_task_or_roles_is_classification_with_unknown_runtimes(tmp_path):
    data = manifest_dict()
    del data["pipeline"]["task"], data["pipeline"]["chain"]
    for rec in data["stages"].values():
        rec.pop("artifacts", None)
    m = write_manifest(tmp_path / "run", data)
    md = render_markdown(m)
    assert "| accuracy | Δ vs teacher |" in _md_row(md, "| stage | artifact |")
    # no role: no teacher to compare with, no runtime, no INT8 pair; nothing guessed from the names
    assert _md_row(md, "| openvino | openvino_int8 |").startswith("| openvino | openvino_int8 | — | — | 94.40% | — |")
    assert "No INT8 build was measured next to its FP32 build" in md


# -- safety --------------------------------------------------------------------------------


def test_every_manifest_string_is_escaped(tmp_path):
    m = write_manifest(tmp_path / "run", manifest_dict(evil=True))
    page = render_html(m)
    assert EVIL not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = _parse(page)
    assert not [t for t, _ in parsed.tags if t == "script"]
    text = " ".join(parsed.text)
    for needle in (f"run {EVIL}", f"missing {EVIL} & friends [/bold] | pipe", f"class {EVIL} has no images",
                   f"echo {EVIL}", f"because {EVIL}"):
        assert needle in text, needle  # shown to the reader as text
    md = render_markdown(m)
    outside_code = re.sub(r"^(`{3,})\n.*?^\1$", "", md, flags=re.M | re.S)
    assert "```" in md and EVIL not in outside_code  # raw only inside fenced code blocks, shown verbatim
    assert "missing \\<script>alert(1)\\</script> & friends [/bold] \\| pipe" in md  # backslashes, no entities


def test_no_network_resources(manifest, tmp_path):
    html_path, _ = write_report(manifest)
    page = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"url\(|@import", page, re.I)
    parsed = _parse(page)
    for tag, attrs in parsed.tags:
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith(("data:image/png;base64,", "#")), (tag, attrs)
        assert tag not in ("link", "script", "iframe", "object", "embed")
    assert "default-src 'none'" in page  # the CSP forbids any load the page did not embed
    assert sum(1 for t, _ in parsed.tags if t == "img") == 3


# -- command line --------------------------------------------------------------------------


def test_report_command_writes_both_files(tmp_path, capsys):
    write_manifest(tmp_path / "run", manifest_dict())
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    assert "report.html" in capsys.readouterr().err
    assert (tmp_path / "run" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "## Artifacts" in (tmp_path / "run" / "report.md").read_text()
    assert not list((tmp_path / "run").glob(".*.tmp"))  # atomic writes leave no temp file


@pytest.mark.parametrize("case", ["missing_dir", "no_manifest", "corrupt", "wrong_schema"])
def test_report_and_status_bad_run_dir_exit_2_one_line(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "missing_dir":
        run.mkdir()
    if case == "corrupt":
        (run / "manifest.json").write_text("{not json")
    if case == "wrong_schema":
        (run / "manifest.json").write_text(json.dumps({"stages": {"teacher": {"status": "great"}}}))
    for command in ("report", "status"):
        code = cli.main([command, str(run)])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err, err
        assert str(run) in err
        assert not (run / "report.html").exists()


def test_status_lists_every_stage_and_reason(tmp_path):
    m = write_manifest(tmp_path / "run", manifest_dict(evil=True))
    from rich.console import Console

    con = Console(record=True, width=220, color_system=None)
    con.print(status_view(m))
    out = con.export_text()
    for stage in ("teacher", "distill", "prune", "onnx", "openvino", "tensorrt", "export_tflite", EVIL):
        assert stage in out, stage
    assert "RuntimeError: tflite converter crashed (exit 134)" in out
    assert f"missing {EVIL} & friends [/bold] | pipe" in out  # rich markup in a reason is text, not markup
    assert "trt_engine" in out and "TensorRT not installed" in out
    assert "abababababab" in out  # key prefix
    teacher_line = next(line for line in out.splitlines() if "│ teacher " in line)
    assert "│ yes " in teacher_line and "61.2" in teacher_line  # recorded before the last run started: cached
    assert "│ no " in next(line for line in out.splitlines() if "│ distill " in line)


def test_status_command_exit_0(tmp_path):
    write_manifest(tmp_path / "run", {**manifest_dict(), "ship": {}})
    result = run_cli("status", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    for stage in ("teacher", "distill", "prune", "onnx", "openvino", "tensorrt", "export_tflite"):
        assert stage in result.stdout  # the command's product goes to stdout (pipeable)
    assert "tflite converter crashed" in result.stdout and "TensorRT not installed" in result.stdout


@pytest.mark.parametrize("ending", ["ok", "stage_failed", "gate_failed", "interrupted"])
def test_run_writes_the_report_whatever_the_exit_code(ending, tmp_path, tiny_config, monkeypatch, capsys):
    from pipeline.runner import Runner, RunOutcome

    path = tiny_config()
    workdir = tmp_path / "run"
    manifest = write_manifest(workdir, manifest_dict())
    code = {"ok": 0, "stage_failed": 1, "gate_failed": 3}.get(ending)

    def fake_run(self):
        if code is None:
            raise KeyboardInterrupt  # the manifest on disk holds what finished
        return RunOutcome(code=code, manifest=manifest, visited=list(manifest.stages), messages=[f"ended {ending}"])

    monkeypatch.setattr(Runner, "run", fake_run)
    assert cli.main(["run", str(path)]) == (130 if code is None else code)
    assert "report:" in capsys.readouterr().err
    assert "openvino_int8" in (workdir / "report.html").read_text()
    assert "## Artifacts" in (workdir / "report.md").read_text()


@pytest.mark.slow
def test_real_tiny_run_writes_the_report(tmp_path, tiny_config, cli):
    path = tiny_config(extra="[onnx]\nenabled = false\n[openvino]\nenabled = false\n[tensorrt]\nenabled = false\n"
                             "[distill]\nbaseline = false\n[prune]\nenabled = true\nheal_epochs = 1\n")
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert "report.html" in result.stderr
    page = (run / "report.html").read_text()
    md = (run / "report.md").read_text()
    text = " ".join(_parse(page).text)
    assert "teacher (ok) → distill (ok) → prune (ok) → onnx (skipped)" in text
    assert "disabled in the config ([onnx] enabled = false)" in text
    assert "accuracy right after pruning, before healing" in text
    assert "measured back to back in torch eager" in text  # the stage's own before/after figures
    assert re.search(r"Quality is measured on \d+ validation images: one image is \d\.\d\d pt of accuracy", text)
    assert "No baseline student in this run" in text
    assert sum(1 for t, _ in _parse(page).tags if t == "img") == 3  # Pareto, bars, training curves
    assert "| tiny | prune |" not in md and "| prune | pruned |" in md

    status = cli("status", str(run))
    assert status.returncode == 0 and "prune" in status.stdout + status.stderr

    # A gate that cannot pass (everything else cached): exit 3, and the report says so.
    (run / "report.html").unlink()
    gated = tiny_config(extra="[onnx]\nenabled = false\n[openvino]\nenabled = false\n[tensorrt]\nenabled = false\n"
                              "[distill]\nbaseline = false\n[prune]\nenabled = true\nheal_epochs = 1\n"
                              "[gates.latency_ms]\nteacher = 0.0001\n", name="gated.toml")
    failed = cli("run", str(gated))
    assert failed.returncode == 3, failed.stderr[-2000:]
    text = " ".join(_parse((run / "report.html").read_text()).text)
    assert re.search(r"latency_ms\s+teacher\s+.*FAILED", text) and "1 of 1 gate checks failed." in text


# -- a real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(manifest, tmp_path):
    html_path, _ = write_report(manifest)
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _parse(dom.stdout)
    tags = [t for t, _ in parsed.tags]
    assert tags.count("table") >= 10 and tags.count("img") == 3
    assert all(a["src"].startswith("data:image/png;base64,") for t, a in parsed.tags if t == "img")
    text = " ".join(parsed.text)
    assert "6.50× vs teacher_openvino_fp32" in text and "INT8 is 2.6x faster" in text

    # At 1,400 px nothing scrolls sideways: every table fits, and the figures the report calls the
    # ones that matter (the same-runtime speedup, the gates) are in view.
    for name, data in (("classification", manifest_dict()), ("segmentation", segmentation_dict()),
                       ("detection", detection_dict())):
        layout = _layout_at(write_manifest(tmp_path / name, data), 1400, base, tmp_path / f"{name}.html")
        assert layout["page"] <= layout["view"], (name, layout["page"])
        for t in layout["tables"]:
            assert t["scroll"] <= t["client"], (name, t["section"], t["heads"])
        heads = dict(next(t["heads"] for t in layout["tables"] if t["section"] == "artifacts"))
        assert heads["speedup vs teacher, same runtime"] <= layout["view"] and heads["gates"] <= layout["view"], heads

    shot = tmp_path / "report.png"
    r = subprocess.run(base + ["--hide-scrollbars", "--window-size=1400,3000", f"--screenshot={shot}", html_path.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.read_bytes().startswith(PNG), r.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a rendered page of tables and plots, not a blank one


# A page that frames the report at a given width and writes what it measures into its own DOM,
# for `--dump-dom` to print (the report itself runs no script: its CSP forbids them).
_MEASURE = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">
<iframe id="f" src="REPORT" style="width:WIDTHpx;height:2000px;border:0"></iframe><pre id="out">pending</pre>
<script>
function measure() {
  const d = document.getElementById("f").contentDocument;
  const tables = Array.from(d.querySelectorAll("table")).map(t => ({
    section: t.closest("section") ? t.closest("section").id : "",
    scroll: t.parentElement.scrollWidth, client: t.parentElement.clientWidth,
    heads: Array.from(t.querySelectorAll("th")).map(h => [h.textContent, h.getBoundingClientRect().right])}));
  document.getElementById("out").textContent = JSON.stringify(
    {page: d.documentElement.scrollWidth, view: d.documentElement.clientWidth, tables: tables});
}
const f = document.getElementById("f");
if (f.contentDocument && f.contentDocument.readyState === "complete" && f.contentDocument.querySelector("table")) measure();
else f.addEventListener("load", measure);
</script></body></html>
"""


def _layout_at(manifest: Manifest, width: int, chromium: list[str], page: Path) -> dict:
    """The report of `manifest` laid out by Chromium in a frame `width` px wide: the page's
    scroll and view widths, and per table its container's scroll and client widths and where
    each header cell ends."""
    html_path, _ = write_report(manifest)
    page.write_text(_MEASURE.replace("REPORT", html_path.as_uri()).replace("WIDTH", str(width)))
    dom = subprocess.run(chromium + ["--allow-file-access-from-files", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="out">(.*?)</pre>', dom.stdout, re.S)
    assert found and found.group(1) != "pending", dom.stdout[-2000:]
    return json.loads(html.unescape(found.group(1)))
