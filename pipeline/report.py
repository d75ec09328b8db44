"""Human-readable views of a manifest. For now: the summary table printed at the end of `run`."""

from __future__ import annotations

from rich.table import Table

from pipeline.manifest import Manifest

_STATUS_STYLE = {"ok": "green", "failed": "red", "gate_failed": "red", "skipped": "dim", "unavailable": "yellow"}


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_table(manifest: Manifest, stages: list[str] | None = None) -> Table:
    """One row per measured artifact (or per stage without artifacts): accuracy, latency, size,
    speedup vs the teacher in torch eager, and gate verdicts."""
    table = Table(title=f"{manifest.model.pipeline.get('name', 'pipeline')} — {manifest.workdir}")
    for col in ("stage", "status", "artifact", "accuracy", "Δ vs teacher", "p50 ms", "p90 ms", "size", "speedup", "gates"):
        table.add_column(col, justify="right" if col not in ("stage", "status", "artifact", "gates") else "left")
    teacher_rec = manifest.stages.get("teacher")
    t_acc = (teacher_rec.metrics.get("teacher") or {}).get("accuracy") if teacher_rec else None
    for name, rec in manifest.stages.items():
        if stages is not None and name not in stages:
            continue
        style = _STATUS_STYLE.get(rec.status, "")
        status = f"[{style}]{rec.status}[/]"
        rows = [(a, m) for a, m in rec.metrics.items() if isinstance(m, dict) and "accuracy" in m]
        if not rows:
            table.add_row(name, status, "—", "", "", "", "", "", "", rec.reason[:60])
            continue
        for art, m in rows:
            verdicts = [g for g in rec.gates if g.artifact == art]
            gate_txt = ", ".join(
                f"[{'green' if g.passed else 'red' if g.passed is False else 'yellow'}]{g.gate}"
                f" {'ok' if g.passed else 'FAIL' if g.passed is False else '?'}[/]"
                for g in verdicts
            ) or "—"
            delta = None if t_acc is None or art == "teacher" else m["accuracy"] - t_acc
            label = f"{art} (ref)" if art in rec.reference else art
            table.add_row(
                name, status, label, _fmt(m.get("accuracy"), ".2%", 1.0),
                "—" if delta is None else f"{delta * 100:+.2f} pt",
                _fmt(m.get("latency_p50_ms"), ".2f"), _fmt(m.get("latency_p90_ms"), ".2f"),
                _size(m.get("size_bytes")), _fmt(m.get("speedup_vs_teacher"), ".2f") + ("×" if m.get("speedup_vs_teacher") else ""),
                gate_txt,
            )
    return table
