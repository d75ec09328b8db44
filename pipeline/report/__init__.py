"""Human-readable views of a manifest.

- `summary_table`: the rich table printed at the end of `run`;
- `status_view`: the rich view behind `python -m pipeline status RUN_DIR`;
- `render_html` / `render_markdown` / `write_report`: `report.html` (self-contained: plots are
  base64 PNG data URIs, styles inline, a Content-Security-Policy that forbids every network
  load) and `report.md`, written into the workdir by `python -m pipeline report RUN_DIR` and at
  the end of every `run`.

Both report formats render the same list of sections (`build_sections`), so they never
disagree. Everything is derived from the manifest alone: the task and its quality metric
(`pipeline["task"]`), the stage order (`pipeline["chain"]`) and each artifact's declared role
(model, runtime, precision, target, FP32 counterpart, latency caveat), never from artifact
names. Everything taken from the manifest (stage and artifact names, reasons, warnings,
commands, the config) is untrusted text: it is escaped once, at rendering, in one place per
format (`html._h`, `markdown._md`, `rich.markup.escape` in `terminal`).

Modules: `blocks` (the document model), `fmt` (formatters), `rows` (reading the manifest:
task, stage order, artifacts and their roles), `sections` and `measured` (what the report
says), `html`, `markdown`, `terminal` (how it is shown), `files` (loading a run, writing the
report). Computing never renders; rendering never computes.
"""

from __future__ import annotations

from pipeline.report.blocks import REPORT_HTML, REPORT_MD, Img, Para, Pre, Section, Tab
from pipeline.report.files import load_run, write_report
from pipeline.report.fmt import fmt_count, fmt_ms, fmt_pct, fmt_pt, fmt_ratio, fmt_size, metric_label
from pipeline.report.html import render_html
from pipeline.report.markdown import render_markdown
from pipeline.report.rows import (
    ArtifactRow, RecordedTask, int8_pairs, measured_artifacts, ordered_stages, same_runtime_teacher, ship_choices, task_of,
    teacher_row,
)
from pipeline.report.sections import build_sections, config_toml, headline
from pipeline.report.terminal import status_view, summary_table

__all__ = [
    "REPORT_HTML", "REPORT_MD", "ArtifactRow", "Img", "Para", "Pre", "Section", "Tab", "RecordedTask", "build_sections",
    "config_toml", "fmt_count", "fmt_ms", "fmt_pct", "fmt_pt", "fmt_ratio", "fmt_size", "headline", "int8_pairs",
    "load_run", "measured_artifacts", "metric_label", "ordered_stages", "render_html", "render_markdown",
    "same_runtime_teacher", "ship_choices", "status_view", "summary_table", "task_of", "teacher_row", "write_report",
]
