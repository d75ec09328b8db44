"""The report's content, format-neutral: `build_sections` lists every section in reading
order; this module holds the sections about the run itself (stage chain, ship decision, gates,
unavailable parts, commands, warnings, environment) and the headline. The sections about
measured figures are in `pipeline.report.measured`. Nothing here renders."""

from __future__ import annotations

import json
from typing import Any

from pipeline.gates import QUALITY_GATES
from pipeline.manifest import Manifest
from pipeline.report import measured
from pipeline.report.blocks import Para, Pre, Section, Tab
from pipeline.report.fmt import fmt_ms, fmt_pct
from pipeline.report.recovery import int8_recovery
from pipeline.report.rows import deploy_file, gate_value, measured_artifacts, ordered_stages, ship_choices, task_of

# CSS classes are chosen from this fixed map, never taken from the manifest.
_STATUS_CLASS = {"ok": "ok", "failed": "fail", "gate_failed": "fail", "skipped": "dim", "unavailable": "warn"}


def build_sections(manifest: Manifest) -> list[Section]:
    """The report's content, format-neutral: every section, in reading order."""
    rows = measured_artifacts(manifest)
    task = task_of(manifest)
    return [
        _stage_chain(manifest), measured.artifact_table(rows, task, manifest),
        measured.plot_section(rows, manifest, task), measured.mgd_gain(manifest, rows, task),
        measured.pruning(manifest, rows, task), measured.int8(rows, task), int8_recovery(manifest, rows, task),
        _ship(manifest), _gates(manifest), _unavailable(manifest), _commands(manifest), _warnings(manifest),
        _environment(manifest),
    ]


def headline(manifest: Manifest) -> str:
    """One sentence: stage counts by status, failed gate checks, what ships per target."""
    stages = ordered_stages(manifest)
    counts: dict[str, int] = {}
    for _, rec in stages:
        counts[rec.status] = counts.get(rec.status, 0) + 1
    parts = [", ".join(f"{n} {s}" for s, n in counts.items()) or "no stage recorded"]
    failed = sum(g.passed is False for _, rec in stages for g in rec.gates)
    if failed:
        parts.append(f"{failed} gate check(s) failed")
    ship = ship_choices(manifest)
    if ship:
        parts.append("ship: " + ", ".join(f"{t} → {d.get('artifact') or 'none'}" for t, d in ship.items()))
    return "; ".join(parts) + "."


def _stage_chain(manifest: Manifest) -> Section:
    sec = Section("stages", "Stage chain")
    stages = ordered_stages(manifest)
    if not stages:
        sec.blocks.append(Para("No stage has run yet.", "note"))
        return sec
    sec.blocks.append(Para(" → ".join(f"{n} ({r.status})" for n, r in stages)))
    rows, classes = [], []
    for name, rec in stages:
        why = rec.reason
        if rec.status == "ok" and rec.warnings:
            why = f"{len(rec.warnings)} warning(s), see Warnings"
        rows.append([name, rec.status, rec.started or "—", rec.ended or "—",
                     f"{rec.seconds:.1f}" if rec.seconds else "—", rec.key[:12] or "—", why or ""])
        classes.append(_STATUS_CLASS.get(rec.status, ""))
    sec.blocks.append(Tab(["stage", "status", "started", "ended", "seconds", "cache key", "reason"], rows,
                          row_classes=classes))
    return sec


def _ship(manifest: Manifest) -> Section:
    sec = Section("ship", "What to ship, per target")
    ship = ship_choices(manifest)
    if not ship:
        sec.blocks.append(Para("This manifest records no ship decision.", "note"))
        return sec
    task = task_of(manifest)
    chosen, candidates = [], []
    for target, d in ship.items():
        art = d.get("artifact")
        chosen.append([target, str(art) if art else "none", deploy_file(manifest, art) if art else "—",
                       str(d.get("reason") or "")])
        for c in d.get("candidates") or ():
            if not isinstance(c, dict):
                continue
            passes = c.get("passes")
            candidates.append([target, str(c.get("artifact", "—")), str(c.get("runtime", "—")), str(c.get("precision", "—")),
                               fmt_pct(c.get(task.metric)), fmt_ms(c.get("latency_p50_ms")),
                               "yes" if passes is True else "no" if passes is False else "—",
                               "shipped" if art and c.get("artifact") == art else "", str(c.get("why") or "")])
    sec.blocks.append(Tab(["target", "ship", "file to deploy (in the run directory)", "why"], chosen,
                          row_classes=["" if r[1] != "none" else "warn" for r in chosen]))
    if candidates:
        sec.blocks.append(Tab(["target", "candidate", "runtime", "precision", task.label, "p50 ms", "passes gates",
                               "chosen", "why"], candidates, title="candidates"))
    return sec


def _gates(manifest: Manifest) -> Section:
    sec = Section("gates", "Gates")
    rows, classes = [], []
    for stage, rec in ordered_stages(manifest):
        for g in rec.gates:
            verdict = "passed" if g.passed else "FAILED" if g.passed is False else "not measured"
            # The values in their unit (quality drops in points); the message only where it says why
            # nothing was measured (the recorded message repeats value and budget otherwise).
            rows.append([stage, g.gate, g.artifact, g.metric, gate_value(g), gate_value(g, "budget"), verdict,
                         g.message if g.passed is None else ""])
            classes.append("ok" if g.passed else "fail" if g.passed is False else "warn")
    if not rows:
        sec.blocks.append(Para("No gate is configured, or no gated artifact was measured.", "note"))
        return sec
    failed = sum(c == "fail" for c in classes)
    sec.blocks.append(Para(f"{failed} of {len(rows)} gate checks failed." if failed else f"All {len(rows)} gate checks "
                           "passed or could not be measured.", "fail" if failed else ""))
    sec.blocks.append(Tab(["stage", "gate", "artifact", "measured", "value", "budget", "verdict", "why not measured"],
                          rows, row_classes=classes))
    if any(g.gate in QUALITY_GATES for _, rec in ordered_stages(manifest) for g in rec.gates):
        sec.blocks.append(Para("Quality drops and their budgets are in percentage points, like every quality "
                               "difference in this report: a budget of 0.02 in the config is 2.00 pt.", "note"))
    return sec


def _unavailable(manifest: Manifest) -> Section:
    sec = Section("unavailable", "Unavailable here, and why")
    rows = []
    for stage, rec in ordered_stages(manifest):
        if rec.status == "unavailable":
            rows.append([stage, "(whole stage)", rec.reason])
        for art, why in rec.unavailable.items():
            rows.append([stage, art, why])
    if not rows:
        sec.blocks.append(Para("Everything configured could be built and measured on this machine.", "note"))
    else:
        sec.blocks.append(Tab(["stage", "part", "why"], rows))
    return sec


def _commands(manifest: Manifest) -> Section:
    sec = Section("reproduce", "Reproduce on the target")
    n = 0
    for stage, rec in ordered_stages(manifest):
        for name, cmd in rec.commands.items():
            sec.blocks.append(Pre(cmd, title=f"{stage}: {name}"))
            n += 1
    if not n:
        sec.blocks.append(Para("No stage recorded a command to reproduce (benchmark_app, trtexec).", "note"))
    return sec


def _warnings(manifest: Manifest) -> Section:
    sec = Section("warnings", "Warnings")
    rows = [[stage, w] for stage, rec in ordered_stages(manifest) for w in rec.warnings]
    sec.blocks.append(Tab(["stage", "warning"], rows) if rows else Para("None.", "note"))
    return sec


def config_toml(cfg: dict[str, Any]) -> str:
    """The config as run, TOML-style (unset values as comments; TOML has no null)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)

    def emit(prefix: str, table: dict[str, Any]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
        subtables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if prefix and (scalars or not subtables):
            lines.append(f"[{prefix}]")
        for k, v in scalars:
            lines.append(f"# {k} = (unset)" if v is None else f"{k} = {value(v)}")
        if scalars or (prefix and not subtables):
            lines.append("")
        for k, v in subtables:
            emit(f"{prefix}.{k}" if prefix else str(k), v)

    emit("", cfg if isinstance(cfg, dict) else {})
    return "\n".join(lines).rstrip() + "\n"


def _environment(manifest: Manifest) -> Section:
    sec = Section("environment", "Environment and config")
    p = manifest.model.pipeline
    cfg = p.get("config") if isinstance(p.get("config"), dict) else {}
    bench = cfg.get("bench", {}) if isinstance(cfg.get("bench"), dict) else {}
    facts = [["pipeline", str(p.get("name", "—"))], ["workdir", str(manifest.workdir)],
             ["device", str(p.get("device", "—"))], ["seed", str(p.get("seed", "—"))],
             ["last run started", str(p.get("updated", "—"))]]
    if "threads" in bench:
        facts.append(["bench threads", str(bench["threads"])])
    sec.blocks.append(Tab(["", ""], facts))
    versions = p.get("versions") if isinstance(p.get("versions"), dict) else {}
    if versions:
        sec.blocks.append(Tab(["package", "version"], [[str(k), str(v)] for k, v in versions.items()], title="versions"))
    if cfg:
        sec.blocks.append(Pre(config_toml(cfg), title="config as run"))
    return sec
