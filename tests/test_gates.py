"""Gates: pass and fail for each budget; references and the teacher are not gated."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, GatesConfig, from_dict
from functools import partial

from pipeline import gates
from pipeline.gates import speedup, unmeasured_budgets
from pipeline.manifest import ArtifactRole, StageRecord
from pipeline.stage import roles

check_stage = partial(gates.check_stage, metric="accuracy")  # a classification run's primary metric

TEACHER = {"accuracy": 0.95, "latency_p50_ms": 10.0, "latency_p90_ms": 12.0}
ROLES = roles()  # the roles the real stages declare


def _record(**metrics):
    return StageRecord(status="ok", metrics=metrics, artifacts={n: ROLES[n] for n in metrics})


@pytest.mark.parametrize("acc, passed", [(0.94, True), (0.93, True), (0.92, False)])
def test_max_accuracy_drop(acc, passed):
    rec = _record(student={"accuracy": acc, "latency_p50_ms": 5.0})
    [g] = check_stage(rec, TEACHER, GatesConfig(max_accuracy_drop=0.02))
    assert g.gate == "max_accuracy_drop" and g.passed is passed
    assert g.value == pytest.approx(0.95 - acc)


def test_messages_give_values_and_budgets_in_their_units():
    rec = _record(student={"accuracy": 0.947222, "latency_p50_ms": 8.0, "latency_p90_ms": 9.0})
    drop, speed = check_stage(rec, TEACHER, GatesConfig(max_accuracy_drop=0.002, min_speedup_vs_teacher=1.5))
    # a quality drop in points like every other quality difference, never a fraction (0.002778)
    assert drop.message == "max_accuracy_drop FAILED on student: accuracy drop vs teacher = 0.28 pt, budget <= 0.20 pt"
    assert speed.message.endswith("= 1.25×, budget >= 1.50×")
    [lat] = check_stage(_record(openvino_int8={"latency_p90_ms": 4.2}), TEACHER, GatesConfig(latency_ms={"openvino_int8": 5.0}))
    assert lat.message.endswith("= 4.2 ms, budget <= 5 ms")


@pytest.mark.parametrize("p50, passed", [(2.0, True), (5.0, True), (6.0, False)])
def test_min_speedup(p50, passed):
    rec = _record(student={"accuracy": 0.9, "latency_p50_ms": p50})
    [g] = check_stage(rec, TEACHER, GatesConfig(min_speedup_vs_teacher=2.0))
    assert g.passed is passed and g.value == pytest.approx(10.0 / p50)


@pytest.mark.parametrize("p90, passed", [(4.9, True), (5.1, False)])
def test_latency_budget_uses_p90(p90, passed):
    rec = _record(openvino_int8={"accuracy": 0.9, "latency_p50_ms": 1.0, "latency_p90_ms": p90})
    [g] = check_stage(rec, TEACHER, GatesConfig(latency_ms={"openvino_int8": 5.0}))
    assert g.passed is passed and g.budget == 5.0 and "p90" in g.metric
    assert ("FAILED" in g.message) is (not passed)


def test_teacher_and_references_are_not_accuracy_gated():
    rec = _record(teacher={"accuracy": 0.1}, student_baseline={"accuracy": 0.1})
    assert check_stage(rec, TEACHER, GatesConfig(max_accuracy_drop=0.0, min_speedup_vs_teacher=1.0)) == []


def test_an_artifact_is_judged_by_its_role_not_its_name():
    """A build of any name with a student role is gated; a teacher-role build of a student-like name is not."""
    rec = StageRecord(status="ok", metrics={"my_build": {"accuracy": 0.5}, "student": {"accuracy": 0.1}},
                      artifacts={"my_build": ArtifactRole(runtime="openvino", precision="fp32"),
                                 "student": ArtifactRole(model="teacher", runtime="onnxruntime", precision="fp32")})
    [g] = check_stage(rec, TEACHER, GatesConfig(max_accuracy_drop=0.1))
    assert g.artifact == "my_build" and g.passed is False


def test_metric_drop_gates_the_tasks_primary_metric():
    rec = StageRecord(status="ok", metrics={"student": {"miou": 0.70, "accuracy": 0.0},
                                            "q": {"miou": 0.60}, "f": {"miou": 0.69}},
                      artifacts={"student": ArtifactRole(runtime="torch", precision="fp32"),
                                 "f": ArtifactRole(runtime="openvino", precision="fp32"),
                                 "q": ArtifactRole(runtime="openvino", precision="int8", fp32="f")})
    gates = GatesConfig(max_metric_drop=0.05, max_int8_metric_drop=0.05)
    results = {(g.gate, g.artifact): g for g in check_stage(rec, {"miou": 0.72}, gates, metric="miou")}
    assert results[("max_metric_drop", "student")].passed is True
    assert results[("max_metric_drop", "q")].passed is False
    assert results[("max_int8_metric_drop", "q")].value == pytest.approx(0.09)
    assert results[("max_int8_metric_drop", "q")].passed is False and "miou drop vs f" in results[("max_int8_metric_drop", "q")].metric


def test_a_latency_noted_build_is_never_latency_gated():
    rec = _record(onnx={"accuracy": 0.95, "latency_p50_ms": 1.0}, trt_qdq={"accuracy": 0.95, "latency_p50_ms": 9.0})
    results = check_stage(rec, TEACHER, GatesConfig(min_speedup_vs_teacher=2.0, min_int8_speedup=1.5))
    assert [(g.gate, g.artifact) for g in results] == [("min_speedup_vs_teacher", "onnx")]


def test_without_teacher_metrics_the_gate_is_unmeasured_not_passed():
    rec = _record(student={"accuracy": 0.9})
    [g] = check_stage(rec, None, GatesConfig(max_accuracy_drop=0.02))
    assert g.passed is None and g.value is None


def test_disabled_gates_produce_nothing():
    rec = _record(student={"accuracy": 0.1, "latency_p50_ms": 100.0, "latency_p90_ms": 100.0})
    assert check_stage(rec, TEACHER, GatesConfig()) == []


def test_speedup_and_unmeasured():
    assert speedup(TEACHER, {"latency_p50_ms": 2.5}) == pytest.approx(4.0)
    assert speedup(None, {"latency_p50_ms": 2.5}) is None
    assert unmeasured_budgets(GatesConfig(latency_ms={"trt_engine": 1.0, "teacher": 9.0}), {"teacher"}) == ["trt_engine"]


@pytest.mark.parametrize("int8_p50, passed", [(1.0, True), (2.0, True), (2.5, False)])
def test_min_int8_speedup_compares_with_fp32_on_the_same_runtime(int8_p50, passed):
    rec = _record(openvino_fp32={"accuracy": 0.9, "latency_p50_ms": 3.0},
                  openvino_int8={"accuracy": 0.9, "latency_p50_ms": int8_p50})
    [g] = check_stage(rec, TEACHER, GatesConfig(min_int8_speedup=1.5))
    assert g.gate == "min_int8_speedup" and g.artifact == "openvino_int8"
    assert g.passed is passed and g.value == pytest.approx(3.0 / int8_p50)


@pytest.mark.parametrize("int8_acc, passed", [(0.90, True), (0.89, True), (0.88, False)])
def test_max_int8_accuracy_drop(int8_acc, passed):
    rec = _record(onnx={"accuracy": 0.90, "latency_p50_ms": 3.0}, onnx_int8={"accuracy": int8_acc, "latency_p50_ms": 1.0})
    [g] = check_stage(rec, TEACHER, GatesConfig(max_int8_accuracy_drop=0.01))
    assert g.artifact == "onnx_int8" and g.passed is passed
    assert g.value == pytest.approx(0.90 - int8_acc)


def test_int8_gate_without_fp32_is_unmeasured():
    rec = _record(openvino_int8={"accuracy": 0.9, "latency_p50_ms": 1.0})
    gates = check_stage(rec, TEACHER, GatesConfig(min_int8_speedup=1.5, max_int8_accuracy_drop=0.01))
    assert [g.passed for g in gates] == [None, None]
    assert all("openvino_fp32 not measured" in g.message for g in gates)


def test_tensorrt_qdq_on_cpu_is_accuracy_gated_but_not_latency_gated():
    rec = _record(trt_qdq={"accuracy": 0.5, "latency_p50_ms": 100.0, "latency_p90_ms": 100.0})
    gates = check_stage(rec, TEACHER, GatesConfig(max_accuracy_drop=0.02, min_speedup_vs_teacher=2.0))
    assert [g.gate for g in gates] == ["max_accuracy_drop"] and gates[0].passed is False
    # Its role carries a latency note: a budget for it is refused when the config is read.
    with pytest.raises(ConfigError, match="trt_qdq: its measured latency is not its target's.*trt_engine"):
        from_dict({"gates": {"latency_ms": {"trt_qdq": 1.0}}})
