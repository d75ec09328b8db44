"""Gates: the user's budgets, checked against measured metrics after every stage.

- `max_metric_drop` (classification alias `max_accuracy_drop`): the teacher's primary metric
  (accuracy, miou, map) minus the artifact's, per artifact, at most this.
- `min_speedup_vs_teacher`: teacher p50 / artifact p50 at batch 1, at least this (0 disables).
- `latency_ms.<artifact>`: the artifact's p90 at batch 1, at most this many milliseconds.
- `min_int8_speedup`: an INT8 build's p50 vs its FP32 counterpart on the same runtime (same
  stage), at least this. A ratio measured back to back on one machine, so it does not flap on
  a shared CI runner the way absolute milliseconds do.
- `max_int8_metric_drop` (alias `max_int8_accuracy_drop`): the FP32 build's primary metric
  minus the INT8 build's, at most this.

Which artifact is what comes from the roles the stages declare (recorded in each stage's
record): reference builds (the teacher's, the baseline student) are not gated, they are what
the others are compared with; a build whose latency is not its target's (a TensorRT model
timed on ONNX Runtime CPU) is never latency-gated. A budget whose metric was never measured
(a stage that is unavailable here) is reported as `unmeasured`, never as passed.
"""

from __future__ import annotations

from typing import Any

from pipeline.schema import GatesConfig
from pipeline.manifest import ArtifactRole, GateResult, ManifestModel, StageRecord

# Tolerance for float round-off in comparisons that users expect to be exact (drop == budget).
_EPS = 1e-9

# Gate names that judge quality (the ship choice drops a build that fails one).
QUALITY_GATES = frozenset({"max_metric_drop", "max_accuracy_drop", "max_int8_metric_drop", "max_int8_accuracy_drop"})
# Gates whose value is a ratio of latencies; `latency_ms` is in milliseconds; quality gates are
# drops of a fraction, shown in percentage points like every other quality difference.
_RATIO_GATES = frozenset({"min_speedup_vs_teacher", "min_int8_speedup"})


def gate_value_text(gate: str, value: float | None) -> str:
    """A gate's value or budget in its unit: a quality drop in points (0.002778 → '0.28 pt'),
    a speedup as a ratio ('1.52×'), a latency in ms ('4.2 ms'); '—' when not measured."""
    if value is None:
        return "—"
    if gate in QUALITY_GATES:
        return f"{value * 100:.2f} pt"
    if gate in _RATIO_GATES:
        return f"{value:.2f}×"
    return f"{value:.4g} ms" if gate == "latency_ms" else f"{value:.4g}"


def speedup(teacher: dict[str, Any] | None, metrics: dict[str, Any]) -> float | None:
    """Teacher latency p50 / artifact latency p50, both at batch 1; None if either is missing."""
    if not teacher:
        return None
    t, a = teacher.get("latency_p50_ms"), metrics.get("latency_p50_ms")
    if not t or not a:
        return None
    return float(t) / float(a)


def check_stage(record: StageRecord, teacher: dict[str, Any] | None, gates: GatesConfig,
                metric: str, measured: dict[str, dict] | None = None) -> list[GateResult]:
    """Evaluate every configured gate on one stage's metrics.

    `teacher` is the teacher's own metrics (quality and latency in torch eager), or None when
    the teacher has not been measured, in which case teacher-relative gates are `unmeasured`.
    `metric` is the task's primary quality metric. `measured` holds every artifact's metrics in
    the run, where an INT8 build's FP32 counterpart from an earlier stage is found (default:
    this record's).
    """
    results: list[GateResult] = []
    roles = record.artifacts
    drop = gates.metric_drop()
    for artifact, metrics in record.metrics.items():
        role = roles.get(artifact)
        if not isinstance(metrics, dict) or role is None or role.reference or role.model == "none":
            continue
        if drop is not None and metric in metrics:
            t = teacher.get(metric) if teacher else None
            value = None if t is None else float(t) - float(metrics[metric])
            results.append(_verdict(drop[0], artifact, f"{metric} drop vs teacher", value, drop[1], "<="))
        if gates.min_speedup_vs_teacher > 0 and "latency_p50_ms" in metrics and not role.latency_note:
            results.append(_verdict("min_speedup_vs_teacher", artifact, "speedup vs teacher (p50, batch 1)",
                                    speedup(teacher, metrics), gates.min_speedup_vs_teacher, ">="))
    results += _int8_gates(record, roles, gates, metric, record.metrics if measured is None else measured)
    # Latency budgets are keyed by artifact name and apply to references too: a user who
    # budgets an artifact by name wants it checked whatever role it plays.
    for artifact, budget in gates.latency_ms.items():
        metrics = record.metrics.get(artifact)
        if isinstance(metrics, dict) and "latency_p90_ms" in metrics:
            results.append(
                _verdict("latency_ms", artifact, "p90 latency at batch 1 (ms)", metrics["latency_p90_ms"], budget, "<=")
            )
    return results


def _int8_gates(record: StageRecord, roles: dict[str, ArtifactRole], gates: GatesConfig, metric: str,
                measured: dict[str, dict]) -> list[GateResult]:
    """INT8 builds of this stage vs their FP32 counterparts on the same runtime."""
    results: list[GateResult] = []
    drop = gates.int8_metric_drop()
    for int8, role in roles.items():
        q = record.metrics.get(int8)
        if role.fp32 is None or not isinstance(q, dict):
            continue
        fp32 = role.fp32
        f = measured.get(fp32)
        f = f if isinstance(f, dict) else {}
        if gates.min_int8_speedup > 0 and "latency_p50_ms" in q and not role.latency_note:
            ratio = f["latency_p50_ms"] / q["latency_p50_ms"] if f.get("latency_p50_ms") and q["latency_p50_ms"] else None
            results.append(_verdict("min_int8_speedup", int8, f"speedup vs {fp32} (p50, batch 1)", ratio,
                                    gates.min_int8_speedup, ">=", missing=f"{fp32} not measured"))
        if drop is not None and metric in q:
            value = float(f[metric]) - float(q[metric]) if metric in f else None
            results.append(_verdict(drop[0], int8, f"{metric} drop vs {fp32}", value, drop[1], "<=",
                                    missing=f"{fp32} not measured"))
    return results


def _verdict(gate: str, artifact: str, metric: str, value: float | None, budget: float, op: str,
             missing: str = "teacher metrics missing") -> GateResult:
    if value is None:
        return GateResult(
            gate=gate, artifact=artifact, metric=metric, value=None, budget=budget, passed=None,
            message=f"{gate} on {artifact}: not measured ({missing})",
        )
    passed = value <= budget + _EPS if op == "<=" else value >= budget - _EPS
    word = "passed" if passed else "FAILED"
    return GateResult(
        gate=gate, artifact=artifact, metric=metric, value=float(value), budget=budget, passed=passed,
        message=f"{gate} {word} on {artifact}: {metric} = {gate_value_text(gate, value)}, "
                f"budget {op} {gate_value_text(gate, budget)}",
    )


def unmeasured_budgets(gates: GatesConfig, measured: set[str]) -> list[str]:
    """Latency budgets naming artifacts that no stage of this run measured."""
    return sorted(name for name in gates.latency_ms if name not in measured)


def made_good(model: ManifestModel) -> dict[str, str]:
    """INT8 builds that failed a quality gate, each with an alternative build made in its place
    (`alternative_of`: its fallback or QAD build) that was measured and passes every quality gate
    it has, at least one. Their failed quality gates stay in the record and the report; the run
    does not exit on them, since the alternative is what ships."""
    roles: dict[str, ArtifactRole] = {}
    by_artifact: dict[str, list[GateResult]] = {}
    for rec in model.stages.values():
        if rec.status not in ("ok", "gate_failed"):
            continue
        roles.update(rec.artifacts)
        for g in rec.gates:
            by_artifact.setdefault(g.artifact, []).append(g)
    out: dict[str, str] = {}
    for alt, role in roles.items():
        quality = [g for g in by_artifact.get(alt, []) if g.gate in QUALITY_GATES]
        if role.alternative_of is None or not quality or not all(g.passed is True for g in quality):
            continue
        if any(g.gate in QUALITY_GATES and g.passed is False for g in by_artifact.get(role.alternative_of, [])):
            out.setdefault(role.alternative_of, alt)
    return out


def blocking(model: ManifestModel) -> tuple[list[GateResult], list[str]]:
    """The failed gates that fail the run, and a line for each failure that does not.

    A quality failure of a build that an alternative made good does not fail the run; nor does
    a quality failure of an alternative build itself: the run is judged on the build it stands
    in for, whose failure fails the run unless some alternative made it good."""
    good = made_good(model)
    alternatives = {a: r.alternative_of for rec in model.stages.values() for a, r in rec.artifacts.items()
                    if r.alternative_of}
    failed, notes = [], []
    for rec in model.stages.values():
        for g in rec.gates:
            if g.passed is not False:
                continue
            if g.gate in QUALITY_GATES and g.artifact in good:
                notes.append(f"{g.message}; made good by {good[g.artifact]}, which passes it")
            elif g.gate in QUALITY_GATES and g.artifact in alternatives:
                notes.append(f"{g.message} (an alternative of {alternatives[g.artifact]}: the run is judged on that build)")
            else:
                failed.append(g)
    return failed, notes
