"""The report's "INT8 recovery" section: what was done for an INT8 build that failed its drop
gate. For each alternative build (declared `alternative_of` another, with its `recipe`): the
fallback search's steps (layers kept in floating point vs metric, drop and latency) and the
alternative's measured figures beside the PTQ build's and the FP32 build's. Nothing here renders."""

from __future__ import annotations

from pipeline.manifest import Manifest
from pipeline.report.blocks import Para, Section, Tab
from pipeline.report.fmt import fmt_ms, fmt_pct, fmt_pt
from pipeline.report.rows import ArtifactRow, RecordedTask


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def int8_recovery(manifest: Manifest, rows: list[ArtifactRow], task: RecordedTask) -> Section:
    sec = Section("int8-recovery", "INT8 recovery")
    by_name = {r.name: r for r in rows}
    alternatives = [r for r in rows if r.role is not None and r.role.alternative_of]
    decisions = [m["note"] for rec in manifest.model.stages.values() for k, m in rec.metrics.items()
                 if k == "search" and isinstance(m, dict) and m.get("note")]
    decisions += [m["decision"] for rec in manifest.model.stages.values() for k, m in rec.metrics.items()
                  if k == "qad" and isinstance(m, dict) and m.get("decision")]
    if not alternatives:
        text = "No INT8 build needed recovering" + (f" ({'; '.join(decisions)})." if decisions else ".")
        sec.blocks.append(Para(text, "note"))
        return sec
    table = []
    for alt in alternatives:
        ptq = by_name.get(alt.role.alternative_of)
        fp32 = by_name.get(alt.role.fp32) if alt.role.fp32 else None
        m = alt.metrics
        f_metric = fp32.metrics.get(task.metric) if fp32 else None
        drop = (f_metric - m[task.metric]) if _num(f_metric) is not None and _num(m.get(task.metric)) is not None else None
        table.append([alt.name, str(alt.role.recipe or "—"), alt.role.alternative_of,
                      str(m.get("fp_layer_count", "—")), fmt_pct(m.get(task.metric)),
                      fmt_pct(ptq.metrics.get(task.metric)) if ptq else "—", fmt_pct(f_metric),
                      fmt_pt(-drop + 0.0 if drop is not None else None),  # + 0.0: no "-0.00 pt"
                      "—" if alt.latency_note else fmt_ms(m.get("latency_p50_ms")),
                      fmt_ms(ptq.metrics.get("latency_p50_ms")) if ptq and not ptq.latency_note else "—",
                      fmt_ms(fp32.metrics.get("latency_p50_ms")) if fp32 and not alt.latency_note else "—"])
    label = task.label
    sec.blocks.append(Tab(["build", "recipe", "instead of", "layers in FP", label, f"PTQ {label}", f"FP32 {label}",
                           f"Δ {label} vs FP32", "p50 ms", "PTQ p50 ms", "FP32 p50 ms"], table))
    for alt in alternatives:
        search = alt.metrics.get("search")
        if isinstance(search, dict) and search.get("steps"):
            steps = [[str(s.get("fp_layer_count", len(s.get("fp_layers", [])))), ", ".join(s.get("fp_layers", [])),
                      fmt_pct(s.get("metric")), fmt_pt(-s["drop"] + 0.0 if _num(s.get("drop")) is not None else None),
                      fmt_ms(s.get("latency_p50_ms")), "passes" if s.get("passed") else "fails"]
                     for s in search["steps"]]
            sec.blocks.append(Tab(["layers in FP", "layers", label, f"Δ {label} vs FP32", "p50 ms", "gate"], steps,
                                  title=f"{alt.name}: search steps (stopped at {search.get('stopped', '?')})"))
        proxy = alt.metrics.get("sensitivity_proxy")
        if proxy:
            sec.blocks.append(Para(f"{alt.name}: layers ranked by {proxy}.", "note"))
        if alt.metrics.get("recipe") == "qad":
            info = [f"{k} = {alt.metrics[k]}" for k in ("method", "epochs", "steps", "lr") if k in alt.metrics]
            if _num(alt.metrics.get("wall_seconds")) is not None:
                info.append(f"wall time {alt.metrics['wall_seconds']:.0f} s")
            if info:
                sec.blocks.append(Para(f"{alt.name}: quantization-aware distillation, " + ", ".join(info) + "."))
    if decisions:
        sec.blocks.append(Para("; ".join(decisions) + ".", "note"))
    return sec
