"""The terminal views of a manifest: `summary_table` (printed at the end of `run`) and
`status_view` (`python -m pipeline status RUN_DIR`). Every string from the manifest is
markup-escaped here (`rich.markup.escape`)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.manifest import Manifest
from pipeline.report.fmt import fmt_fixed, size_text
from pipeline.report.rows import (
    cached_state, delta_vs_teacher, gate_value, measured_artifacts, ordered_stages, ship_choices, task_of, teacher_row,
)

_STATUS_STYLE = {"ok": "green", "failed": "red", "gate_failed": "red", "skipped": "dim", "unavailable": "yellow"}


def summary_table(manifest: Manifest, stages: list[str] | None = None) -> Table:
    """One row per measured artifact (or per stage without artifacts): the task's metric,
    latency, size, speedup vs the teacher in torch eager, and gate verdicts."""
    task = task_of(manifest)
    table = Table(title=escape(f"{manifest.model.pipeline.get('name', 'pipeline')} — {manifest.workdir}"))
    for col in ("stage", "status", "artifact", task.label, "Δ vs teacher", "p50 ms", "p90 ms", "size", "speedup", "gates"):
        table.add_column(escape(col), justify="right" if col not in ("stage", "status", "artifact", "gates") else "left")
    measured = measured_artifacts(manifest)
    teacher = teacher_row(measured)
    for name, rec in ordered_stages(manifest):
        if stages is not None and name not in stages:
            continue
        style = _STATUS_STYLE.get(rec.status, "")
        status = f"[{style}]{escape(rec.status)}[/]"
        rows = [r for r in measured if r.stage == name and task.metric in r.metrics]
        if not rows:
            table.add_row(escape(name), status, "—", "", "", "", "", "", "", escape(rec.reason[:60]))
            continue
        for r in rows:
            m = r.metrics
            gate_txt = ", ".join(
                f"[{'green' if g.passed else 'red' if g.passed is False else 'yellow'}]{escape(g.gate)}"
                f" {'ok' if g.passed else 'FAIL' if g.passed is False else '?'}[/]"
                for g in r.gates
            ) or "—"
            delta = delta_vs_teacher(r, teacher, task.metric)
            table.add_row(
                escape(name), status, escape(f"{r.name} (ref)" if r.reference else r.name),
                fmt_fixed(m.get(task.metric), ".2%"), "—" if delta is None else f"{delta * 100:+.2f} pt",
                fmt_fixed(m.get("latency_p50_ms"), ".2f"), fmt_fixed(m.get("latency_p90_ms"), ".2f"),
                size_text(m.get("size_bytes")),
                fmt_fixed(m.get("speedup_vs_teacher"), ".2f") + ("×" if m.get("speedup_vs_teacher") else ""),
                gate_txt,
            )
    return table


def status_view(manifest: Manifest) -> Group:
    """The terminal view of a manifest for `python -m pipeline status`: every stage (status,
    cached, key prefix, ended, seconds, reason), unavailable parts, gate failures, warnings and
    the ship choice. All manifest text is markup-escaped."""
    p = manifest.model.pipeline
    stages = Table(title=escape(f"{p.get('name', 'pipeline')} — {manifest.workdir}"), title_justify="left")
    for col in ("stage", "status", "cached", "key", "ended", "seconds", "reason"):
        stages.add_column(col, justify="right" if col == "seconds" else "left",
                          overflow="fold", ratio=3 if col == "reason" else None)
    for name, rec in ordered_stages(manifest):
        style = _STATUS_STYLE.get(rec.status, "")
        stages.add_row(escape(name), f"[{style}]{escape(rec.status)}[/]",
                       cached_state(rec, str(p.get("updated", "")), p.get("last_run"), name),
                       escape(rec.key[:12]) or "—", escape(rec.ended) or "—",
                       f"{rec.seconds:.1f}" if rec.seconds else "—", escape(rec.reason))
    parts: list[Any] = [stages]
    if not manifest.stages:
        parts.append(Text("no stage recorded yet", style="dim"))
    unavailable = [(s, a, w) for s, rec in ordered_stages(manifest) for a, w in rec.unavailable.items()]
    if unavailable:
        t = Table(title="unavailable here", title_justify="left")
        for col in ("stage", "part", "why"):
            t.add_column(col, overflow="fold")
        for s, a, w in unavailable:
            t.add_row(escape(s), escape(a), escape(w))
        parts.append(t)
    failed = [(s, g) for s, rec in ordered_stages(manifest) for g in rec.gates if g.passed is False]
    if failed:
        t = Table(title="[red]gate failures[/]", title_justify="left")
        for col in ("stage", "gate", "artifact", "value", "budget", "message"):
            t.add_column(col, overflow="fold")
        for s, g in failed:
            t.add_row(escape(s), escape(g.gate), escape(g.artifact), gate_value(g), gate_value(g, "budget"),
                      escape(g.message))
        parts.append(t)
    for s, rec in ordered_stages(manifest):
        for w in rec.warnings:
            parts.append(Text.assemble(("warning", "yellow"), f" ({s}): {w}"))
    for target, d in ship_choices(manifest).items():
        parts.append(Text.assemble(("ship", "bold"), f" {target}: {d.get('artifact') or 'none'} — {d.get('reason') or ''}"))
    return Group(*parts)
