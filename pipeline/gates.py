"""Gates: the user's budgets, checked against measured metrics after every stage.

- `max_accuracy_drop`: teacher accuracy minus artifact accuracy, per artifact, at most this.
- `min_speedup_vs_teacher`: teacher p50 / artifact p50 at batch 1, at least this (0 disables).
- `latency_ms.<artifact>`: the artifact's p90 at batch 1, at most this many milliseconds.
- `min_int8_speedup`: an INT8 build's p50 vs the FP32 build of the same runtime (same stage),
  at least this. A ratio measured back to back on one machine, so it does not flap on a
  shared CI runner the way absolute milliseconds do.
- `max_int8_accuracy_drop`: FP32 build accuracy minus INT8 build accuracy, at most this.

Artifacts a stage marks as references (the baseline student, the teacher's own builds) and the
teacher itself are not gated: they are what the others are compared with. A budget whose
metric was never measured (a stage that is unavailable here) is reported as `unmeasured`,
never as passed.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import GatesConfig
from pipeline.manifest import GateResult, StageRecord

# Builds measured here only as a stand-in for another device (the TensorRT Q/DQ model runs on
# ONNX Runtime CPU, where signed INT8 is slow): accuracy is gated, latency is not.
CPU_PROXIES = frozenset({"trt_qdq"})

# INT8 build -> the FP32 build on the same runtime it is compared with (both in one stage).
INT8_PAIRS = {"onnx_int8": "onnx", "openvino_int8": "openvino_fp32"}

# Tolerance for float round-off in comparisons that users expect to be exact (drop == budget).
_EPS = 1e-9


def speedup(teacher: dict[str, Any] | None, metrics: dict[str, Any]) -> float | None:
    """Teacher latency p50 / artifact latency p50, both at batch 1; None if either is missing."""
    if not teacher:
        return None
    t, a = teacher.get("latency_p50_ms"), metrics.get("latency_p50_ms")
    if not t or not a:
        return None
    return float(t) / float(a)


def check_stage(record: StageRecord, teacher: dict[str, Any] | None, gates: GatesConfig) -> list[GateResult]:
    """Evaluate every configured gate on one stage's metrics.

    `teacher` is the teacher's own metrics (accuracy and latency in torch eager), or None when
    the teacher has not been measured, in which case teacher-relative gates are `unmeasured`.
    """
    results: list[GateResult] = []
    for artifact, metrics in record.metrics.items():
        if not isinstance(metrics, dict) or artifact == "teacher" or artifact in record.reference:
            continue
        if gates.max_accuracy_drop is not None and "accuracy" in metrics:
            t_acc = teacher.get("accuracy") if teacher else None
            drop = None if t_acc is None else float(t_acc) - float(metrics["accuracy"])
            results.append(
                _verdict("max_accuracy_drop", artifact, "accuracy drop vs teacher", drop, gates.max_accuracy_drop, "<=")
            )
        if gates.min_speedup_vs_teacher > 0 and "latency_p50_ms" in metrics and artifact not in CPU_PROXIES:
            results.append(
                _verdict(
                    "min_speedup_vs_teacher",
                    artifact,
                    "speedup vs teacher (p50, batch 1)",
                    speedup(teacher, metrics),
                    gates.min_speedup_vs_teacher,
                    ">=",
                )
            )
    for int8, fp32 in INT8_PAIRS.items():
        q, f = record.metrics.get(int8), record.metrics.get(fp32)
        if not isinstance(q, dict):
            continue
        f = f if isinstance(f, dict) else {}
        if gates.min_int8_speedup > 0 and "latency_p50_ms" in q:
            ratio = f["latency_p50_ms"] / q["latency_p50_ms"] if f.get("latency_p50_ms") and q["latency_p50_ms"] else None
            results.append(_verdict("min_int8_speedup", int8, f"speedup vs {fp32} (p50, batch 1)", ratio,
                                    gates.min_int8_speedup, ">=", missing=f"{fp32} not measured"))
        if gates.max_int8_accuracy_drop is not None and "accuracy" in q:
            drop = float(f["accuracy"]) - float(q["accuracy"]) if "accuracy" in f else None
            results.append(_verdict("max_int8_accuracy_drop", int8, f"accuracy drop vs {fp32}", drop,
                                    gates.max_int8_accuracy_drop, "<=", missing=f"{fp32} not measured"))
    # Latency budgets are keyed by artifact name and apply to references too: a user who
    # budgets an artifact by name wants it checked whatever role it plays.
    for artifact, budget in gates.latency_ms.items():
        metrics = record.metrics.get(artifact)
        if isinstance(metrics, dict) and "latency_p90_ms" in metrics:
            results.append(
                _verdict("latency_ms", artifact, "p90 latency at batch 1 (ms)", metrics["latency_p90_ms"], budget, "<=")
            )
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
        message=f"{gate} {word} on {artifact}: {metric} = {value:.4g}, budget {op} {budget:.4g}",
    )


def unmeasured_budgets(gates: GatesConfig, measured: set[str]) -> list[str]:
    """Latency budgets naming artifacts that no stage of this run measured."""
    return sorted(name for name in gates.latency_ms if name not in measured)
