"""Pick the build to ship per target: the fastest one that passes the quality gates.

For each deployment target (torch eager, ONNX Runtime, OpenVINO, TensorRT: whatever targets the
stages' declared artifact roles name) the candidates are the builds of the final student that
ship to it. A candidate qualifies when none of its quality gates (`max_metric_drop` vs the
teacher, `max_int8_metric_drop` vs the FP32 build, or their accuracy aliases) failed; among
those, the lowest p50 latency at batch 1 wins. When an INT8 build is not
faster than FP32 on a target, or fails an accuracy gate, the FP32 build ships and the reason
says so: a slower INT8 build is never shipped silently. An INT8 build made in place of a failing
one (PTQ with layers kept in floating point, QAD: `recipe` and `alternative_of` in its role) is a
candidate like any other; the reason then names each INT8 build and why it lost.
"""

from __future__ import annotations

from typing import Any

from pipeline.gates import QUALITY_GATES
from pipeline.manifest import ArtifactRole, ManifestModel


def _index(model: ManifestModel) -> tuple[dict[str, dict], dict[str, ArtifactRole], dict[str, list], dict[str, str], dict[str, str]]:
    metrics: dict[str, dict] = {}
    roles: dict[str, ArtifactRole] = {}
    gates: dict[str, list] = {}
    unavailable: dict[str, str] = {}
    commands: dict[str, str] = {}
    for rec in model.stages.values():
        if rec.status not in ("ok", "gate_failed", "unavailable"):
            continue
        roles.update(rec.artifacts)
        unavailable.update(rec.unavailable)
        commands.update(rec.commands)
        if rec.status == "unavailable":
            continue
        for art, m in rec.metrics.items():
            role = rec.artifacts.get(art)
            if isinstance(m, dict) and role is not None and not role.reference:
                metrics[art] = m
        for g in rec.gates:
            gates.setdefault(g.artifact, []).append(g)
    return metrics, roles, gates, unavailable, commands


def _fmt_ms(v: float) -> str:
    return f"{v:.3g} ms"


def choose(model: ManifestModel, metric: str) -> dict[str, dict[str, Any]]:
    """The ship decision for every target that has a measured or pending build, judged on the
    task's primary quality ``metric``.

    Candidates are the artifacts whose declared role ships to the target (an artifact that
    `supersedes` another, e.g. the pruned student over the unpruned one, replaces it). Returns
    ``{target: {"artifact": name | None, "reason": str, "candidates": [...]}}`` where each
    candidate is ``{"artifact", "runtime", "precision", <metric>, "latency_p50_ms", "passes", "why"}``.
    """
    metrics, roles, gates, unavailable, commands = _index(model)
    superseded = {r.supersedes for a, r in roles.items() if r.supersedes and a in metrics}
    targets: dict[str, list[str]] = {}
    for art, role in roles.items():
        if role.target and art not in superseded:
            targets.setdefault(role.target, []).append(art)
    decisions: dict[str, dict[str, Any]] = {}
    for target, options in targets.items():
        candidates = []
        for art in options:
            if art not in metrics:
                continue
            m, role = metrics[art], roles[art]
            failed = [g for g in gates.get(art, []) if g.gate in QUALITY_GATES and g.passed is False]
            has_latency = m.get("latency_p50_ms") is not None
            why = "; ".join(g.message for g in failed) if failed else ("" if has_latency else "latency not measured")
            candidates.append({
                "artifact": art, "runtime": role.runtime, "precision": role.precision, "recipe": _recipe(role),
                "alternative_of": role.alternative_of, metric: m.get(metric),
                "latency_p50_ms": m.get("latency_p50_ms"), "passes": not failed and has_latency, "why": why,
            })
        pending = [a for a in options if a in unavailable]
        if not candidates and not pending:
            continue
        decisions[target] = _decide(target, candidates, pending, unavailable, commands)
    return decisions


def _decide(target: str, candidates: list[dict], pending: list[str], unavailable: dict[str, str],
            commands: dict[str, str]) -> dict[str, Any]:
    ok = [c for c in candidates if c["passes"]]
    if not ok:
        if pending:
            art = pending[0]
            reason = f"{art} could not be built here: {unavailable[art]}"
            if art in commands:
                reason += f"; build it on the target with: {commands[art]}"
        elif candidates:
            reason = "no build passes the quality gates: " + "; ".join(f"{c['artifact']}: {c['why']}" for c in candidates)
        else:
            reason = "nothing measured"
        return {"artifact": None, "reason": reason, "candidates": candidates}
    best = min(ok, key=lambda c: c["latency_p50_ms"])
    fp32 = next((c for c in candidates if c["precision"] == "fp32"), None)
    int8s = [c for c in candidates if c["precision"] == "int8"]
    int8 = int8s[0] if int8s else None
    alternatives = any(c["alternative_of"] for c in int8s)
    if best["precision"] == "int8" and fp32 is not None and fp32["passes"]:
        what = f"{best['artifact']} ({best['recipe']})" if alternatives else "INT8"
        reason = (f"{what} is {fp32['latency_p50_ms'] / best['latency_p50_ms']:.2f}x faster than FP32 at p50 "
                  f"({_fmt_ms(best['latency_p50_ms'])} vs {_fmt_ms(fp32['latency_p50_ms'])}) and passes the quality gates")
        if alternatives:
            rest = [_why_not(c, best) for c in int8s if c is not best]
            reason += "; " + "; ".join(rest) if rest else ""
    elif best["precision"] == "fp32" and int8 is not None:
        if len(int8s) > 1:
            reason = "shipping FP32: " + "; ".join(_why_not(c, best) for c in int8s)
        elif not int8["passes"]:
            reason = f"shipping FP32: the INT8 build does not qualify ({int8['why']})"
        else:
            reason = (f"shipping FP32: INT8 is not faster on {target} "
                      f"({_fmt_ms(int8['latency_p50_ms'])} vs {_fmt_ms(best['latency_p50_ms'])} at p50)")
    else:
        reason = f"the only qualifying build on {target} ({_fmt_ms(best['latency_p50_ms'])} at p50)"
    return {"artifact": best["artifact"], "reason": reason, "candidates": candidates}


def _recipe(role: ArtifactRole) -> str | None:
    """How a build was made: its declared recipe, `ptq` for a plain INT8 build, None for FP32."""
    return role.recipe or ("ptq" if role.precision == "int8" else None)


def _why_not(c: dict[str, Any], best: dict[str, Any]) -> str:
    """Why candidate `c` is not the one shipped (`best`), in a few words."""
    name = f"{c['artifact']} ({c['recipe']})"
    if not c["passes"]:
        return f"{name} does not qualify ({c['why']})"
    return f"{name} is slower ({_fmt_ms(c['latency_p50_ms'])} vs {_fmt_ms(best['latency_p50_ms'])} at p50)"
