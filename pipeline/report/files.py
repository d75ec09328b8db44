"""Reading a run directory for viewing, and writing its report files."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.manifest import MANIFEST_NAME, Manifest, ManifestError, atomic_write_bytes
from pipeline.report.blocks import REPORT_HTML, REPORT_MD
from pipeline.report.html import render_html
from pipeline.report.markdown import render_markdown
from pipeline.report.sections import build_sections

log = logging.getLogger(__name__)


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


def write_report(manifest: Manifest, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write `report.html` and `report.md` (atomically) into the workdir; return their paths."""
    out_dir = Path(out_dir) if out_dir is not None else manifest.workdir
    sections = build_sections(manifest)
    html_path, md_path = out_dir / REPORT_HTML, out_dir / REPORT_MD
    atomic_write_bytes(html_path, render_html(manifest, sections).encode("utf-8"))
    atomic_write_bytes(md_path, render_markdown(manifest, sections).encode("utf-8"))
    log.debug("report written: %s, %s", html_path, md_path)
    return html_path, md_path
