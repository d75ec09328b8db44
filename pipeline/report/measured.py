"""The report's sections about measured figures: the artifact table, the plots, the
distillation gain, pruning before/after, and INT8 vs FP32. They compute cells of plain text;
rendering is elsewhere."""

from __future__ import annotations

import logging

from pipeline import plots
from pipeline.manifest import Manifest
from pipeline.report.blocks import Img, Para, Section, Tab
from pipeline.report.fmt import (
    axis_label, diff, fmt_count, fmt_ms, fmt_pct, fmt_pt, fmt_ratio, fmt_size, is_num, metric_label, ratio,
)
from pipeline.report.rows import (
    ArtifactRow, Task, delta_vs_teacher, gate_text, int8_pairs, ordered_stages, same_runtime_teacher,
    teacher_row, training_method,
)

log = logging.getLogger(__name__)


def artifact_table(rows: list[ArtifactRow], task: Task) -> Section:
    sec = Section("artifacts", "Artifacts")
    if not rows:
        sec.blocks.append(Para("No artifact has been measured yet.", "note"))
        return sec
    teacher = teacher_row(rows)
    t = teacher.metrics if teacher else {}
    by_name = {r.name: r for r in rows}
    out, classes = [], []
    for r in rows:
        m = r.metrics
        speedup = m.get("speedup_vs_teacher")
        if not is_num(speedup) and r is not teacher:
            speedup = ratio(t.get("latency_p50_ms"), m.get("latency_p50_ms"))
        ref = same_runtime_teacher(r.name, by_name)
        same = None if ref is None else ratio(by_name[ref].metrics.get("latency_p50_ms"), m.get("latency_p50_ms"))
        batch = m.get("batch_size")
        batch_ms = fmt_ms(m.get("batch_latency_p50_ms"))
        if batch_ms != "—" and is_num(batch):
            batch_ms += f" (N={int(batch)})"
        gates = ", ".join(gate_text(g) for g in r.gates) or ("not gated (reference)" if r.reference else "—")
        out.append([
            r.stage, r.name + (" (reference)" if r.reference else ""), r.runtime, r.precision,
            fmt_pct(m.get(task.metric)), fmt_pt(delta_vs_teacher(r, teacher, task.metric)),
            *(fmt_pct(m.get(k)) for k in task.others),
            fmt_ms(m.get("latency_p50_ms")), fmt_ms(m.get("latency_p90_ms")), fmt_ms(m.get("latency_p99_ms")),
            batch_ms, f"{m['throughput_ips']:,.0f}" if is_num(m.get("throughput_ips")) else "—",
            fmt_size(m.get("size_bytes")), fmt_count(m.get("params")), fmt_count(m.get("macs")),
            fmt_ratio(speedup) if r is not teacher else "1.00× (baseline)",
            f"{fmt_ratio(same)} vs {ref}" if same is not None else "—",
            gates,
        ])
        classes.append("fail" if any(g.passed is False for g in r.gates) else "dim" if r.reference else "")
    sec.blocks.append(Tab(
        ["stage", "artifact", "runtime", "precision", task.label, "Δ vs teacher", *map(metric_label, task.others),
         "p50 ms", "p90 ms", "p99 ms", "batch p50 ms", "throughput img/s", "size", "params", "MACs",
         "speedup vs teacher (torch eager)", "speedup vs teacher, same runtime", "gates"],
        out, row_classes=classes,
    ))
    sec.blocks.append(Para(
        "Latency p50/p90/p99 at batch 1; batch p50 and throughput at the configured batch N. Speedup vs "
        "teacher = teacher p50 in torch eager / artifact p50; the same-runtime speedup divides by the "
        "teacher's own build on that runtime, the only figure that says what compression bought.", "note"))
    for r in rows:
        if r.latency_note:
            sec.blocks.append(Para(f"Latency caveat, {r.name}: {r.latency_note}", "note"))
    return sec


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def plot_section(rows: list[ArtifactRow], manifest: Manifest, task: Task) -> Section:
    sec = Section("plots", "Plots")
    histories: dict[str, list] = {}
    for stage, rec in ordered_stages(manifest):
        for art, epochs in rec.history.items():
            label = f"{art} (healing)" if stage == "prune" else art
            histories[label if label not in histories else f"{label} ({stage})"] = epochs
    name, axis = task.label, axis_label(task.metric)
    curve_names = {k: axis_label(k) for k in task.metrics}
    jobs = [
        (f"{name} vs latency p50 (Pareto view)", lambda: plots.accuracy_vs_latency([
            plots.Point(r.name, r.metrics.get("latency_p50_ms"), r.metrics.get(task.metric), r.reference) for r in rows],
            metric=name, axis=axis)),
        (f"{name} and latency per artifact", lambda: plots.stage_bars([
            (r.name, r.metrics.get(task.metric), r.metrics.get("latency_p50_ms")) for r in rows], metric=name, axis=axis)),
        ("training curves", lambda: plots.training_curves(histories, metric_names=curve_names)),
    ]
    for title, draw in jobs:
        try:
            sec.blocks.append(Img(draw(), title))
        except plots.PlotDataMissing as exc:
            sec.blocks.append(Para(f"{title}: omitted, {exc}.", "note"))
        except Exception as exc:  # a plot must never cost the user the rest of the report
            log.warning("report: plot %r failed: %s", title, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            sec.blocks.append(Para(f"{title}: omitted, drawing it failed ({type(exc).__name__}: {exc}).", "warn"))
    return sec


def mgd_gain(manifest: Manifest, rows: list[ArtifactRow], task: Task) -> Section:
    sec = Section("mgd", "Distillation gain (MGD)")
    rec = manifest.stages.get("distill")
    students = [r for r in rows if r.stage == "distill" and r.model != "teacher"]
    if rec is None or not students:
        why = f" (distill {rec.status}: {rec.reason})" if rec is not None and rec.reason else ""
        sec.blocks.append(Para(f"No distilled student was measured{why}.", "note"))
        return sec
    cfg = rec.config.get("distill", rec.config) if isinstance(rec.config, dict) else {}
    method = str(cfg.get("method", "mgd")) if isinstance(cfg, dict) else "mgd"
    teacher = teacher_row(rows)
    base = next((r for r in students if r.model == "baseline"), None)
    student = next((r for r in students if r.model == "student"), None)
    base_val = base.metrics.get(task.metric) if base else None
    table = []
    for r in students:
        val = r.metrics.get(task.metric)
        table.append([r.name, training_method(r, method), fmt_pct(val),
                      "—" if r.model == "baseline" else fmt_pt(diff(val, base_val)),
                      fmt_pt(delta_vs_teacher(r, teacher, task.metric))])
    sec.blocks.append(Tab(["student", "distillation", task.label, "Δ vs baseline", "Δ vs teacher"], table))
    gain = diff(student.metrics.get(task.metric), base_val) if student else None
    if gain is not None:
        unit = "" if task.metric == "accuracy" else f" {task.label}"
        sec.blocks.append(Para(
            f"{method.upper()} gain over the student trained alone: {fmt_pt(gain)}{unit} (same budget, seed "
            f"{rec.seed}). One seed: seed-to-seed spread is often larger than the gain, so compare methods "
            "paired over several seeds before concluding."))
    else:
        sec.blocks.append(Para("No baseline student in this run ([distill] baseline = false): the gain cannot be "
                               "measured here.", "note"))
    return sec


def pruning(manifest: Manifest, rows: list[ArtifactRow], task: Task) -> Section:
    sec = Section("pruning", "Pruning before / after")
    rec = manifest.stages.get("prune")
    pruned = [r for r in rows if r.stage == "prune" and any(k.endswith("_before") or k.endswith("_before_heal")
                                                              for k in r.metrics)]
    if not pruned:
        why = f"prune {rec.status}" + (f": {rec.reason}" if rec.reason else "") if rec is not None else "the prune stage has not run"
        sec.blocks.append(Para(f"No pruning measured ({why}).", "note"))
        return sec
    specs = [(k, metric_label(k), fmt_pct, "pt") for k in task.metrics] + [
        ("params", "params", fmt_count, "ratio"), ("macs", "MACs per image", fmt_count, "ratio"),
        ("size_bytes", "size", fmt_size, "ratio"),
        ("latency_p50_ms", "latency p50 ms (batch 1)", fmt_ms, "speedup"),
        ("latency_p90_ms", "latency p90 ms (batch 1)", fmt_ms, "speedup"),
        ("latency_p99_ms", "latency p99 ms (batch 1)", fmt_ms, "speedup"),
        ("batch_latency_p50_ms", "latency p50 ms (batch N)", fmt_ms, "speedup"),
        ("throughput_ips", "throughput img/s", fmt_count, "ratio"),
    ]
    for r in pruned:
        m = r.metrics
        table = []
        for key, label, fmt, how in specs:
            before, after = m.get(f"{key}_before"), m.get(key)
            if before is None and after is None:
                continue
            if how == "pt":
                change = fmt_pt(diff(after, before))
            elif how == "speedup":
                s = ratio(before, after)
                change = f"{fmt_ratio(s)} faster" if s is not None else "—"
            else:
                change = f"{fmt_ratio(ratio(after, before))} of before" if ratio(after, before) is not None else "—"
            table.append([label, fmt(before), fmt(after), change])
        before_heal = m.get(f"{task.metric}_before_heal")
        if f"{task.metric}_before_heal" in m:
            before = m.get(f"{task.metric}_before")
            table.insert(1, [f"{task.label} right after pruning, before healing", fmt_pct(before), fmt_pct(before_heal),
                             fmt_pt(diff(before_heal, before))])
        sec.blocks.append(Tab(["metric", "before", "after", "change"], table, title=r.name))
        settings = [f"{k} = {m[k]}" for k in ("ratio", "importance", "steps", "round_to", "heal_epochs", "heal_method") if k in m]
        if settings:
            sec.blocks.append(Para("Settings: " + ", ".join(settings) + "."))
    return sec


def int8(rows: list[ArtifactRow], task: Task) -> Section:
    sec = Section("int8", "INT8 vs FP32 per target")
    pairs = int8_pairs(rows)
    if not pairs:
        sec.blocks.append(Para("No INT8 build was measured next to its FP32 build on the same runtime.", "note"))
        return sec
    caveats = any(q.latency_note for q, _ in pairs)
    table = []
    for q, f in pairs:
        a, b = q.metrics, f.metrics
        row = [q.runtime, q.name, f.name, fmt_ms(a.get("latency_p50_ms")), fmt_ms(b.get("latency_p50_ms")),
               fmt_ratio(ratio(b.get("latency_p50_ms"), a.get("latency_p50_ms"))),
               fmt_pct(a.get(task.metric)), fmt_pct(b.get(task.metric)), fmt_pt(diff(a.get(task.metric), b.get(task.metric))),
               fmt_ratio(ratio(a.get("size_bytes"), b.get("size_bytes")))]
        table.append(row + ([q.latency_note or ""] if caveats else []))
    label = task.label
    sec.blocks.append(Tab(["runtime", "INT8", "FP32", "INT8 p50 ms", "FP32 p50 ms", "INT8 speedup (FP32 p50 / INT8 p50)",
                           f"INT8 {label}", f"FP32 {label}", f"Δ {label}", "size INT8/FP32"]
                          + (["latency caveat"] if caveats else []), table))
    return sec
