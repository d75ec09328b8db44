"""Human-readable views of a manifest.

- `summary_table`: the rich table printed at the end of `run`;
- `status_view`: the rich view behind `python -m pipeline status RUN_DIR`;
- `render_html` / `render_markdown` / `write_report`: `report.html` (self-contained: plots are
  base64 PNG data URIs, styles inline, a Content-Security-Policy that forbids every network
  load) and `report.md`, written into the workdir by `python -m pipeline report RUN_DIR` and at
  the end of every `run`.

Both report formats render the same list of sections (`build_sections`), so they never
disagree. Everything taken from the manifest (stage and artifact names, reasons, warnings,
commands, the config) is untrusted text: it is escaped once, at rendering, in one place per
format (`_h` for HTML, `_md` for Markdown, `rich.markup.escape` for the terminal).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.manifest import MANIFEST_NAME, GateResult, Manifest, ManifestError, StageRecord, atomic_write_bytes

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
REPORT_MD = "report.md"

_STATUS_STYLE = {"ok": "green", "failed": "red", "gate_failed": "red", "skipped": "dim", "unavailable": "yellow"}
# CSS classes are chosen from this fixed map, never taken from the manifest.
_STATUS_CLASS = {"ok": "ok", "failed": "fail", "gate_failed": "fail", "skipped": "dim", "unavailable": "warn"}
_STAGE_ORDER = ("teacher", "distill", "prune", "onnx", "openvino", "tensorrt")
_SHIP_TARGETS = ("torch", "onnxruntime", "openvino", "tensorrt")

# Runtime and precision of every artifact the pipeline names (DESIGN.md), so rows from
# different runtimes are never compared without saying so. A `runtime`/`precision` entry in
# the artifact's metrics wins over this table.
_RUNTIME: dict[str, tuple[str, str]] = {
    "teacher": ("torch eager", "fp32"),
    "student": ("torch eager", "fp32"),
    "student_baseline": ("torch eager", "fp32"),
    "student_kd": ("torch eager", "fp32"),
    "pruned": ("torch eager", "fp32"),
    "onnx": ("onnxruntime", "fp32"),
    "onnx_int8": ("onnxruntime", "int8"),
    "teacher_onnx": ("onnxruntime", "fp32"),
    "openvino_fp32": ("openvino", "fp32"),
    "openvino_int8": ("openvino", "int8"),
    "teacher_openvino_fp32": ("openvino", "fp32"),
    "trt_qdq": ("onnxruntime (Q/DQ)", "int8"),
    "trt_engine": ("tensorrt", "int8"),
}
# The teacher's own build on the same runtime: only against it does a speedup say what
# compression bought (torch eager at small inputs is dominated by per-op overhead).
_SAME_RUNTIME_TEACHER = {
    "student": "teacher", "student_baseline": "teacher", "student_kd": "teacher", "pruned": "teacher",
    "onnx": "teacher_onnx", "onnx_int8": "teacher_onnx",
    "openvino_fp32": "teacher_openvino_fp32", "openvino_int8": "teacher_openvino_fp32",
}
# INT8 build → its FP32 counterpart on the same runtime.
# The gated pairs (pipeline.gates), plus the TensorRT Q/DQ model, which also runs on ONNX Runtime here.
_INT8_PAIRS = (("onnx_int8", "onnx"), ("openvino_int8", "openvino_fp32"), ("trt_qdq", "onnx"))


# -- formatting --------------------------------------------------------------------------


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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


def fmt_pct(x: Any) -> str:
    """0.9375 → '93.75%'; '—' when not measured."""
    return f"{x * 100:.2f}%" if _num(x) else "—"


def fmt_pt(x: Any) -> str:
    """A difference of two fractions in percentage points: 0.0125 → '+1.25 pt'."""
    return f"{x * 100:+.2f} pt" if _num(x) else "—"


def fmt_ms(x: Any) -> str:
    """Milliseconds with about three significant digits: 0.0412, 0.44, 6.85, 23.8, 412."""
    if not _num(x):
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.4f}"


def fmt_count(x: Any) -> str:
    """11173962 → '11.17 M', 1.16e9 → '1.16 G'."""
    if not _num(x):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.{2 if abs(v) < 10 else 1 if abs(v) < 100 else 0}f} {unit}"
    return f"{x:.0f}"


def fmt_ratio(x: Any) -> str:
    """2.6 → '2.60×'."""
    return f"{x:.2f}×" if _num(x) else "—"


def fmt_size(x: Any) -> str:
    """Bytes in binary units: 44770315 → '42.7 MiB'."""
    return _size(int(x)) if _num(x) else "—"


def _ratio(num: Any, den: Any) -> float | None:
    return float(num) / float(den) if _num(num) and _num(den) and den else None


def _diff(a: Any, b: Any) -> float | None:
    return float(a) - float(b) if _num(a) and _num(b) else None


# -- reading the manifest ------------------------------------------------------------------


def load_run(run_dir: Path) -> Manifest:
    """Load the manifest of a run directory for viewing.

    Unlike `Manifest.load` (which starts an empty manifest for a new run), a missing
    directory or manifest is an error here: :class:`ManifestError`, exit code 2 in the CLI.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ManifestError(f"{run_dir}: no such run directory")
    path = run_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{run_dir}: no {MANIFEST_NAME} here (run `python -m pipeline run CONFIG` first)")
    try:
        return Manifest.load(run_dir)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _plain(x: Any) -> Any:
    """A pydantic model (or containers of them) as plain dicts and lists."""
    if hasattr(x, "model_dump"):
        return _plain(x.model_dump(mode="json"))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def ship_choices(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The build chosen to ship per target (`manifest.model.ship`), as plain dicts; {} when this
    manifest has no such section (written before the ship step existed)."""
    ship = _plain(getattr(manifest.model, "ship", None) or {})
    if not isinstance(ship, dict):
        return {}
    order = {t: i for i, t in enumerate(_SHIP_TARGETS)}
    items = sorted(((str(k), v) for k, v in ship.items() if isinstance(v, dict)),
                   key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    return dict(items)


def ordered_stages(manifest: Manifest) -> list[tuple[str, StageRecord]]:
    """Stages in pipeline order (teacher → … → tensorrt), unknown ones after, as recorded."""
    order = {s: i for i, s in enumerate(_STAGE_ORDER)}
    names = list(manifest.stages)
    return [(n, manifest.stages[n]) for n in sorted(names, key=lambda n: (order.get(n, len(order)), names.index(n)))]


@dataclass
class ArtifactRow:
    """One measured artifact: where it came from and what was measured."""

    stage: str
    name: str
    status: str
    reference: bool
    metrics: dict[str, Any]
    gates: list[GateResult] = field(default_factory=list)

    @property
    def runtime(self) -> str:
        """Where it was measured: torch eager, onnxruntime, openvino, tensorrt."""
        return str(self.metrics.get("runtime") or _infer_runtime(self.name)[0])

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8."""
        return str(self.metrics.get("precision") or _infer_runtime(self.name)[1])


def _infer_runtime(name: str) -> tuple[str, str]:
    if name in _RUNTIME:
        return _RUNTIME[name]
    precision = "int8" if "int8" in name else "fp16" if "fp16" in name else "fp32"
    for prefix, runtime in (("teacher_openvino", "openvino"), ("teacher_onnx", "onnxruntime"), ("teacher_trt", "tensorrt"),
                            ("openvino", "openvino"), ("onnx", "onnxruntime"), ("trt", "tensorrt")):
        if name.startswith(prefix):
            return runtime, precision
    return "torch eager", precision


def measured_artifacts(manifest: Manifest) -> list[ArtifactRow]:
    """Every artifact with measured metrics, in pipeline order."""
    rows = []
    for stage, rec in ordered_stages(manifest):
        for name, m in rec.metrics.items():
            if isinstance(m, dict) and ("accuracy" in m or "latency_p50_ms" in m):
                rows.append(ArtifactRow(stage, name, rec.status, name in rec.reference, m,
                                        [g for g in rec.gates if g.artifact == name]))
    return rows


def _teacher_metrics(rows: list[ArtifactRow]) -> dict[str, Any]:
    for r in rows:
        if r.name == "teacher":
            return r.metrics
    return {}


def same_runtime_teacher(name: str, by_name: dict[str, ArtifactRow]) -> str | None:
    """Name of the teacher's own build on `name`'s runtime, when that build was measured."""
    if name == "teacher" or name.startswith("teacher_"):
        return None
    ref = _SAME_RUNTIME_TEACHER.get(name)
    if ref is None and name in by_name:  # an artifact this table does not know: match by runtime
        row = by_name[name]
        ref = next((n for n, r in by_name.items() if n.startswith("teacher") and r.precision == "fp32"
                    and r.runtime == row.runtime), None)
    return ref if ref in by_name else None


def _gate_text(g: GateResult) -> str:
    verdict = "ok" if g.passed else "FAIL" if g.passed is False else "not measured"
    return f"{g.gate} {verdict}"


# -- the document model: sections of blocks, rendered to HTML and to Markdown --------------


@dataclass
class Para:
    """A paragraph of plain text."""

    text: str
    cls: str = ""  # one of the fixed CSS classes: "", "note", "warn", "fail"


@dataclass
class Tab:
    """A table of plain-text cells."""

    headers: list[str]
    rows: list[list[str]]
    title: str = ""
    row_classes: list[str] = field(default_factory=list)  # fixed CSS classes, one per row


@dataclass
class Pre:
    """Preformatted text: a command or the config."""

    text: str
    title: str = ""


@dataclass
class Img:
    """A PNG plot."""

    png: bytes
    alt: str


@dataclass
class Section:
    """One titled part of the report."""

    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)


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


def _artifact_table(rows: list[ArtifactRow]) -> Section:
    sec = Section("artifacts", "Artifacts")
    if not rows:
        sec.blocks.append(Para("No artifact has been measured yet.", "note"))
        return sec
    teacher = _teacher_metrics(rows)
    by_name = {r.name: r for r in rows}
    out, classes = [], []
    for r in rows:
        m = r.metrics
        delta = None if r.name == "teacher" else _diff(m.get("accuracy"), teacher.get("accuracy"))
        speedup = m.get("speedup_vs_teacher")
        if not _num(speedup) and r.name != "teacher":
            speedup = _ratio(teacher.get("latency_p50_ms"), m.get("latency_p50_ms"))
        ref = same_runtime_teacher(r.name, by_name)
        same = None
        if ref is not None:
            same = _ratio(by_name[ref].metrics.get("latency_p50_ms"), m.get("latency_p50_ms"))
        batch = m.get("batch_size")
        batch_ms = fmt_ms(m.get("batch_latency_p50_ms"))
        if batch_ms != "—" and _num(batch):
            batch_ms += f" (N={int(batch)})"
        gates = ", ".join(_gate_text(g) for g in r.gates) or ("not gated (reference)" if r.reference else "—")
        out.append([
            r.stage, r.name + (" (reference)" if r.reference else ""), r.runtime, r.precision,
            fmt_pct(m.get("accuracy")), fmt_pt(delta),
            fmt_ms(m.get("latency_p50_ms")), fmt_ms(m.get("latency_p90_ms")), fmt_ms(m.get("latency_p99_ms")),
            batch_ms, f"{m['throughput_ips']:,.0f}" if _num(m.get("throughput_ips")) else "—",
            fmt_size(m.get("size_bytes")), fmt_count(m.get("params")), fmt_count(m.get("macs")),
            fmt_ratio(speedup) if r.name != "teacher" else "1.00× (baseline)",
            f"{fmt_ratio(same)} vs {ref}" if same is not None else "—",
            gates,
        ])
        classes.append("fail" if any(g.passed is False for g in r.gates) else "dim" if r.reference else "")
    sec.blocks.append(Tab(
        ["stage", "artifact", "runtime", "precision", "accuracy", "Δ vs teacher", "p50 ms", "p90 ms", "p99 ms",
         "batch p50 ms", "throughput img/s", "size", "params", "MACs", "speedup vs teacher (torch eager)",
         "speedup vs teacher, same runtime", "gates"],
        out, row_classes=classes,
    ))
    sec.blocks.append(Para(
        "Latency p50/p90/p99 at batch 1; batch p50 and throughput at the configured batch N. Speedup vs "
        "teacher = teacher p50 in torch eager / artifact p50; the same-runtime speedup divides by the "
        "teacher's own build on that runtime, the only figure that says what compression bought.", "note"))
    return sec


def _plots(rows: list[ArtifactRow], manifest: Manifest) -> Section:
    from pipeline import plots

    sec = Section("plots", "Plots")
    histories: dict[str, list] = {}
    for stage, rec in ordered_stages(manifest):
        for art, epochs in rec.history.items():
            label = f"{art} (healing)" if stage == "prune" else art
            histories[label if label not in histories else f"{label} ({stage})"] = epochs
    jobs = [
        ("accuracy vs latency p50 (Pareto view)", lambda: plots.accuracy_vs_latency([
            plots.Point(r.name, r.metrics.get("latency_p50_ms"), r.metrics.get("accuracy"), r.reference) for r in rows])),
        ("accuracy and latency per artifact", lambda: plots.stage_bars([
            (r.name, r.metrics.get("accuracy"), r.metrics.get("latency_p50_ms")) for r in rows])),
        ("training curves", lambda: plots.training_curves(histories)),
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


def _mgd_gain(manifest: Manifest, rows: list[ArtifactRow]) -> Section:
    sec = Section("mgd", "Distillation gain (MGD)")
    rec = manifest.stages.get("distill")
    students = [r for r in rows if r.stage == "distill"]
    if rec is None or not students:
        why = f" (distill {rec.status}: {rec.reason})" if rec is not None and rec.reason else ""
        sec.blocks.append(Para(f"No distilled student was measured{why}.", "note"))
        return sec
    cfg = rec.config.get("distill", rec.config) if isinstance(rec.config, dict) else {}
    method = str(cfg.get("method", "mgd")) if isinstance(cfg, dict) else "mgd"
    teacher = _teacher_metrics(rows)
    by_name = {r.name: r for r in students}
    base = by_name.get("student_baseline")
    base_acc = base.metrics.get("accuracy") if base else None
    training = {"student": method, "student_baseline": "none (task loss only)", "student_kd": "kd (logits)"}
    table = []
    for r in students:
        acc = r.metrics.get("accuracy")
        table.append([r.name, training.get(r.name, "—"), fmt_pct(acc),
                      "—" if r.name == "student_baseline" else fmt_pt(_diff(acc, base_acc)),
                      fmt_pt(_diff(acc, teacher.get("accuracy")))])
    sec.blocks.append(Tab(["student", "distillation", "accuracy", "Δ vs baseline", "Δ vs teacher"], table))
    student = by_name.get("student")
    gain = _diff(student.metrics.get("accuracy"), base_acc) if student else None
    if gain is not None:
        sec.blocks.append(Para(
            f"{method.upper()} gain over the student trained alone: {fmt_pt(gain)} (same budget, seed "
            f"{rec.seed}). One seed: seed-to-seed spread is often larger than the gain, so compare methods "
            "paired over several seeds before concluding."))
    else:
        sec.blocks.append(Para("No baseline student in this run ([distill] baseline = false): the gain cannot be "
                               "measured here.", "note"))
    return sec


def _pruning(manifest: Manifest, rows: list[ArtifactRow]) -> Section:
    sec = Section("pruning", "Pruning before / after")
    rec = manifest.stages.get("prune")
    pruned = [r for r in rows if r.stage == "prune" and any(k.endswith("_before") or k.endswith("_before_heal")
                                                              for k in r.metrics)]
    if not pruned:
        why = f"prune {rec.status}" + (f": {rec.reason}" if rec.reason else "") if rec is not None else "the prune stage has not run"
        sec.blocks.append(Para(f"No pruning measured ({why}).", "note"))
        return sec
    for r in pruned:
        m = r.metrics
        table = []
        specs = [
            ("accuracy", "accuracy", fmt_pct, "pt"), ("params", "params", fmt_count, "ratio"),
            ("macs", "MACs per image", fmt_count, "ratio"), ("size_bytes", "size", fmt_size, "ratio"),
            ("latency_p50_ms", "latency p50 ms (batch 1)", fmt_ms, "speedup"),
            ("latency_p90_ms", "latency p90 ms (batch 1)", fmt_ms, "speedup"),
            ("latency_p99_ms", "latency p99 ms (batch 1)", fmt_ms, "speedup"),
            ("batch_latency_p50_ms", "latency p50 ms (batch N)", fmt_ms, "speedup"),
            ("throughput_ips", "throughput img/s", fmt_count, "ratio"),
        ]
        for key, label, fmt, how in specs:
            before, after = m.get(f"{key}_before"), m.get(key)
            if before is None and after is None:
                continue
            if how == "pt":
                change = fmt_pt(_diff(after, before))
            elif how == "speedup":
                s = _ratio(before, after)
                change = f"{fmt_ratio(s)} faster" if s is not None else "—"
            else:
                change = f"{fmt_ratio(_ratio(after, before))} of before" if _ratio(after, before) is not None else "—"
            table.append([label, fmt(before), fmt(after), change])
        if "accuracy_before_heal" in m:
            table.insert(1, ["accuracy right after pruning, before healing", fmt_pct(m.get("accuracy_before")),
                             fmt_pct(m["accuracy_before_heal"]), fmt_pt(_diff(m["accuracy_before_heal"], m.get("accuracy_before")))])
        sec.blocks.append(Tab(["metric", "before", "after", "change"], table, title=r.name))
        settings = [f"{k} = {m[k]}" for k in ("ratio", "importance", "steps", "round_to", "heal_epochs", "heal_method") if k in m]
        if settings:
            sec.blocks.append(Para("Settings: " + ", ".join(settings) + "."))
    return sec


def _int8(rows: list[ArtifactRow]) -> Section:
    sec = Section("int8", "INT8 vs FP32 per target")
    by_name = {r.name: r for r in rows}
    table = []
    for int8, fp32 in _INT8_PAIRS:
        if int8 not in by_name or fp32 not in by_name:
            continue
        a, b = by_name[int8].metrics, by_name[fp32].metrics
        speed = _ratio(b.get("latency_p50_ms"), a.get("latency_p50_ms"))
        table.append([by_name[int8].runtime, int8, fp32, fmt_ms(a.get("latency_p50_ms")), fmt_ms(b.get("latency_p50_ms")),
                      fmt_ratio(speed), fmt_pct(a.get("accuracy")), fmt_pct(b.get("accuracy")),
                      fmt_pt(_diff(a.get("accuracy"), b.get("accuracy"))),
                      fmt_ratio(_ratio(a.get("size_bytes"), b.get("size_bytes")))])
    if not table:
        sec.blocks.append(Para("No INT8 build was measured next to its FP32 build on the same runtime.", "note"))
        return sec
    sec.blocks.append(Tab(["runtime", "INT8", "FP32", "INT8 p50 ms", "FP32 p50 ms", "INT8 speedup (FP32 p50 / INT8 p50)",
                           "INT8 accuracy", "FP32 accuracy", "Δ accuracy", "size INT8/FP32"], table))
    return sec


def _ship(manifest: Manifest) -> Section:
    sec = Section("ship", "What to ship, per target")
    ship = ship_choices(manifest)
    if not ship:
        sec.blocks.append(Para("This manifest records no ship decision.", "note"))
        return sec
    chosen, candidates = [], []
    for target, d in ship.items():
        art = d.get("artifact")
        chosen.append([target, str(art) if art else "none", str(d.get("reason") or "")])
        for c in d.get("candidates") or ():
            if not isinstance(c, dict):
                continue
            passes = c.get("passes")
            candidates.append([target, str(c.get("artifact", "—")), str(c.get("runtime", "—")), str(c.get("precision", "—")),
                               fmt_pct(c.get("accuracy")), fmt_ms(c.get("latency_p50_ms")),
                               "yes" if passes is True else "no" if passes is False else "—",
                               "shipped" if art and c.get("artifact") == art else "", str(c.get("why") or "")])
    sec.blocks.append(Tab(["target", "ship", "why"], chosen,
                          row_classes=["" if r[1] != "none" else "warn" for r in chosen]))
    if candidates:
        sec.blocks.append(Tab(["target", "candidate", "runtime", "precision", "accuracy", "p50 ms", "passes gates",
                               "chosen", "why"], candidates, title="candidates"))
    return sec


def _gates(manifest: Manifest) -> Section:
    sec = Section("gates", "Gates")
    rows, classes = [], []
    for stage, rec in ordered_stages(manifest):
        for g in rec.gates:
            verdict = "passed" if g.passed else "FAILED" if g.passed is False else "not measured"
            rows.append([stage, g.gate, g.artifact, g.metric, "—" if g.value is None else f"{g.value:.4g}",
                         f"{g.budget:.4g}", verdict, g.message])
            classes.append("ok" if g.passed else "fail" if g.passed is False else "warn")
    if not rows:
        sec.blocks.append(Para("No gate is configured, or no gated artifact was measured.", "note"))
        return sec
    failed = sum(c == "fail" for c in classes)
    sec.blocks.append(Para(f"{failed} of {len(rows)} gate checks failed." if failed else f"All {len(rows)} gate checks "
                           "passed or could not be measured.", "fail" if failed else ""))
    sec.blocks.append(Tab(["stage", "gate", "artifact", "metric", "value", "budget", "verdict", "message"], rows,
                          row_classes=classes))
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


def build_sections(manifest: Manifest) -> list[Section]:
    """The report's content, format-neutral: every section, in reading order."""
    rows = measured_artifacts(manifest)
    return [
        _stage_chain(manifest), _artifact_table(rows), _plots(rows, manifest), _mgd_gain(manifest, rows),
        _pruning(manifest, rows), _int8(rows), _ship(manifest), _gates(manifest), _unavailable(manifest),
        _commands(manifest), _warnings(manifest), _environment(manifest),
    ]


def _headline(manifest: Manifest) -> str:
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


# -- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav a{margin-right:1em}.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f4f4f4}
caption{text-align:left;font-weight:600;padding:.3em 0}
td{white-space:nowrap}td.wrap{white-space:normal;min-width:16em}tr.fail{background:#fdecec}tr.warn{background:#fff8e1}tr.dim{color:#777}
p.note{color:#666}p.warn{color:#8a6100}p.fail{color:#b00020;font-weight:600}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
img{max-width:100%;height:auto;display:block;margin:.6em 0}
"""
# No network, no scripts, no frames: the report stays inert whatever a manifest contains.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_CLASSES = {"", "ok", "fail", "warn", "dim", "note"}


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _cls(c: str) -> str:
    return f' class="{c}"' if c in _CLASSES and c else ""


def _html_block(b: Any) -> str:
    if isinstance(b, Para):
        return f"<p{_cls(b.cls)}>{_h(b.text)}</p>"
    if isinstance(b, Pre):
        title = f"<h3>{_h(b.title)}</h3>" if b.title else ""
        return f"{title}<pre><code>{_h(b.text)}</code></pre>"
    if isinstance(b, Img):
        data = base64.b64encode(b.png).decode("ascii")
        return f'<figure><img alt="{_h(b.alt)}" src="data:image/png;base64,{data}"><figcaption>{_h(b.alt)}</figcaption></figure>'
    if isinstance(b, Tab):
        out = ['<div class="scroll"><table>']
        if b.title:
            out.append(f"<caption>{_h(b.title)}</caption>")
        out.append("<thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in b.headers) + "</tr></thead><tbody>")
        for i, row in enumerate(b.rows):
            cls = b.row_classes[i] if i < len(b.row_classes) else ""
            # Numbers never break across lines; long prose (reasons, messages) may.
            out.append(f"<tr{_cls(cls)}>" + "".join(
                f'<td class="wrap">{_h(c)}</td>' if len(str(c)) > 40 else f"<td>{_h(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody></table></div>")
        return "".join(out)
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_html(manifest: Manifest, sections: list[Section] | None = None) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 PNG plots, no scripts,
    no network): every string from the manifest is escaped."""
    sections = build_sections(manifest) if sections is None else sections
    name = manifest.model.pipeline.get("name", "pipeline")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(name)} — pipeline report</title><style>{_CSS}</style></head><body>",
        f"<h1>{_h(name)} — pipeline report</h1>",
        f"<p>{_h(_headline(manifest))}</p>",
        "<nav>" + "".join(f'<a href="#{s.id}">{_h(s.title)}</a>' for s in sections) + "</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{_h(s.id)}"><h2>{_h(s.title)}</h2>')
        parts.extend(_html_block(b) for b in s.blocks)
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# -- Markdown ------------------------------------------------------------------------------


def _md(s: Any) -> str:
    """Escape text for a Markdown paragraph or table cell: HTML is shown, never interpreted,
    and a `|` or a newline cannot break a table row. (`_` is left alone: inside names such as
    `openvino_int8` it never makes emphasis, and escaping it would clutter the raw file.)"""
    s = html.escape(str(s), quote=False)
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("*", "\\*")
    return re.sub(r"[\r\n]+", " ", s)


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside, so the content can never close it.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}\n{text.rstrip()}\n{ticks}"


def _md_block(b: Any) -> str:
    if isinstance(b, Para):
        return _md(b.text)
    if isinstance(b, Pre):
        return (f"**{_md(b.title)}**\n\n" if b.title else "") + _fence(b.text)
    if isinstance(b, Img):
        return f"_{_md(b.alt)}: see the plot in {REPORT_HTML}._"
    if isinstance(b, Tab):
        head = [f"**{_md(b.title)}**", ""] if b.title else []
        headers = [_md(h) or " " for h in b.headers]
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in b.rows]
        return "\n".join(head + lines)
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_markdown(manifest: Manifest, sections: list[Section] | None = None) -> str:
    """The report as Markdown (tables; plots are in report.html)."""
    sections = build_sections(manifest) if sections is None else sections
    name = manifest.model.pipeline.get("name", "pipeline")
    parts = [f"# {_md(name)} — pipeline report", "", _md(_headline(manifest))]
    for s in sections:
        parts += ["", f"## {_md(s.title)}", ""]
        parts.append("\n\n".join(_md_block(b) for b in s.blocks))
    return "\n".join(parts) + "\n"


def write_report(manifest: Manifest, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` (atomically) into the workdir; return their paths."""
    out_dir = Path(out_dir) if out_dir is not None else manifest.workdir
    sections = build_sections(manifest)
    html_path, md_path = out_dir / REPORT_HTML, out_dir / REPORT_MD
    atomic_write_bytes(html_path, render_html(manifest, sections).encode("utf-8"))
    atomic_write_bytes(md_path, render_markdown(manifest, sections).encode("utf-8"))
    log.debug("report written: %s, %s", html_path, md_path)
    return html_path, md_path


# -- terminal ------------------------------------------------------------------------------


def summary_table(manifest: Manifest, stages: list[str] | None = None) -> Table:
    """One row per measured artifact (or per stage without artifacts): accuracy, latency, size,
    speedup vs the teacher in torch eager, and gate verdicts."""
    table = Table(title=escape(f"{manifest.model.pipeline.get('name', 'pipeline')} — {manifest.workdir}"))
    for col in ("stage", "status", "artifact", "accuracy", "Δ vs teacher", "p50 ms", "p90 ms", "size", "speedup", "gates"):
        table.add_column(col, justify="right" if col not in ("stage", "status", "artifact", "gates") else "left")
    teacher_rec = manifest.stages.get("teacher")
    t_acc = (teacher_rec.metrics.get("teacher") or {}).get("accuracy") if teacher_rec else None
    for name, rec in manifest.stages.items():
        if stages is not None and name not in stages:
            continue
        style = _STATUS_STYLE.get(rec.status, "")
        status = f"[{style}]{escape(rec.status)}[/]"
        rows = [(a, m) for a, m in rec.metrics.items() if isinstance(m, dict) and "accuracy" in m]
        if not rows:
            table.add_row(escape(name), status, "—", "", "", "", "", "", "", escape(rec.reason[:60]))
            continue
        for art, m in rows:
            verdicts = [g for g in rec.gates if g.artifact == art]
            gate_txt = ", ".join(
                f"[{'green' if g.passed else 'red' if g.passed is False else 'yellow'}]{escape(g.gate)}"
                f" {'ok' if g.passed else 'FAIL' if g.passed is False else '?'}[/]"
                for g in verdicts
            ) or "—"
            delta = None if t_acc is None or art == "teacher" else m["accuracy"] - t_acc
            label = f"{art} (ref)" if art in rec.reference else art
            table.add_row(
                escape(name), status, escape(label), _fmt(m.get("accuracy"), ".2%", 1.0),
                "—" if delta is None else f"{delta * 100:+.2f} pt",
                _fmt(m.get("latency_p50_ms"), ".2f"), _fmt(m.get("latency_p90_ms"), ".2f"),
                _size(m.get("size_bytes")), _fmt(m.get("speedup_vs_teacher"), ".2f") + ("×" if m.get("speedup_vs_teacher") else ""),
                gate_txt,
            )
    return table


def _cached(rec: StageRecord, run_started: str, last_run: dict | None = None, name: str = "") -> str:
    """Whether the last run re-used this stage from the cache: from the runner's `last_run`
    record ('yes', 'no', or 'not run' for a stage the last run did not visit); manifests
    written before that record existed fall back to comparing timestamps. Only records the
    cache can re-use (ok, gate_failed, unavailable) can be cached."""
    if rec.status not in ("ok", "gate_failed", "unavailable"):
        return "—"
    if isinstance(last_run, dict) and name:
        if name in last_run.get("cached", []):
            return "yes"
        return "no" if name in last_run.get("visited", []) else "not run"
    try:
        ended, started = datetime.fromisoformat(rec.ended), datetime.fromisoformat(run_started)
    except (TypeError, ValueError):
        return "?"
    return "yes" if ended < started else "no"


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
        stages.add_row(escape(name), f"[{style}]{escape(rec.status)}[/]", _cached(rec, str(p.get("updated", "")), p.get("last_run"), name),
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
            t.add_row(escape(s), escape(g.gate), escape(g.artifact), "—" if g.value is None else f"{g.value:.4g}",
                      f"{g.budget:.4g}", escape(g.message))
        parts.append(t)
    for s, rec in ordered_stages(manifest):
        for w in rec.warnings:
            parts.append(Text.assemble(("warning", "yellow"), f" ({s}): {w}"))
    for target, d in ship_choices(manifest).items():
        parts.append(Text.assemble(("ship", "bold"), f" {target}: {d.get('artifact') or 'none'} — {d.get('reason') or ''}"))
    return Group(*parts)

