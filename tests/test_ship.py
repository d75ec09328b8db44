"""Which build ships per target: the fastest that passes the accuracy gates, never a slower INT8."""

from __future__ import annotations

from functools import partial

from pipeline import gates, ship
from pipeline.config import GatesConfig
from pipeline.manifest import ManifestModel, StageRecord
from pipeline.stage import roles

# A classification run: its primary metric is accuracy.
check_stage = partial(gates.check_stage, metric="accuracy")
choose = partial(ship.choose, metric="accuracy")

TEACHER = {"accuracy": 0.95, "latency_p50_ms": 10.0}
ROLES = roles()  # the roles the real stages declare


def _manifest(gates: GatesConfig | None = None, **stages: StageRecord) -> ManifestModel:
    for rec in stages.values():
        rec.artifacts = {n: r for n, r in ROLES.items() if n in rec.metrics or n in rec.unavailable}
        rec.gates = check_stage(rec, TEACHER, gates or GatesConfig())
    return ManifestModel(stages=stages)


def _ov(fp32_ms: float, int8_ms: float, int8_acc: float = 0.94) -> StageRecord:
    return StageRecord(status="ok", metrics={
        "openvino_fp32": {"accuracy": 0.94, "latency_p50_ms": fp32_ms},
        "openvino_int8": {"accuracy": int8_acc, "latency_p50_ms": int8_ms},
        "teacher_openvino_fp32": {"accuracy": 0.95, "latency_p50_ms": 0.01},
    }, reference=["teacher_openvino_fp32"])


def test_faster_int8_ships():
    d = choose(_manifest(openvino=_ov(3.0, 1.0)))["openvino"]
    assert d["artifact"] == "openvino_int8"
    assert "3.00x faster" in d["reason"]
    # The teacher's build is a reference, never a candidate, however fast.
    assert {c["artifact"] for c in d["candidates"]} == {"openvino_fp32", "openvino_int8"}


def test_slower_int8_is_not_shipped_and_says_so():
    d = choose(_manifest(openvino=_ov(1.0, 1.5)))["openvino"]
    assert d["artifact"] == "openvino_fp32"
    assert "INT8 is not faster" in d["reason"]


def test_int8_failing_accuracy_gate_ships_fp32():
    m = _manifest(GatesConfig(max_int8_accuracy_drop=0.01), openvino=_ov(3.0, 1.0, int8_acc=0.80))
    d = choose(m)["openvino"]
    assert d["artifact"] == "openvino_fp32"
    assert "does not qualify" in d["reason"] and "max_int8_accuracy_drop" in d["reason"]


def test_nothing_passing_ships_nothing():
    m = _manifest(GatesConfig(max_accuracy_drop=0.01), openvino=_ov(3.0, 1.0, int8_acc=0.5))
    m.stages["openvino"].metrics["openvino_fp32"]["accuracy"] = 0.5
    m.stages["openvino"].gates = check_stage(m.stages["openvino"], TEACHER, GatesConfig(max_accuracy_drop=0.01))
    d = choose(m)["openvino"]
    assert d["artifact"] is None and "no build passes" in d["reason"]


def test_unavailable_engine_gives_the_command():
    rec = StageRecord(status="ok", metrics={"trt_qdq": {"accuracy": 0.9, "latency_p50_ms": 9.0}},
                      unavailable={"trt_engine": "tensorrt is not installed"},
                      commands={"trt_engine": "trtexec --onnx=tensorrt/student_qdq.onnx"})
    d = choose(_manifest(tensorrt=rec))["tensorrt"]
    assert d["artifact"] is None
    assert "tensorrt is not installed" in d["reason"] and "trtexec --onnx" in d["reason"]


def test_torch_target_ships_the_pruned_student_when_pruning_ran():
    m = _manifest(distill=StageRecord(status="ok", metrics={"student": {"accuracy": 0.94, "latency_p50_ms": 1.0}}),
                  prune=StageRecord(status="ok", metrics={"pruned": {"accuracy": 0.94, "latency_p50_ms": 2.0}}))
    assert choose(m)["torch"]["artifact"] == "pruned"
