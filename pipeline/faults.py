"""Crash points for the kill-anywhere tests: `PIPELINE_CRASH_AT=<point>` SIGKILLs the process.

A test sets `PIPELINE_CRASH_AT` (and optionally `PIPELINE_CRASH_AFTER=N`, the Nth time the point
is reached) to kill a real `python -m pipeline run` at an exact place — mid-epoch, between
stages, mid-export, mid-calibration, between writing the manifest's temp file and renaming it —
then checks that the next run resumes exactly. SIGKILL, not an exception: nothing gets to clean
up, as with a power cut or the OOM killer. Without the variable every point is a dictionary
lookup and nothing else.

Points: `train-step` (after an optimizer step), `stage-recorded` (after a stage's manifest
record is saved), `onnx-export` (student file written, teacher not yet), `calibration` (an
INT8 calibration sample consumed), `manifest-write` (temp file written, not yet renamed).
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if `PIPELINE_CRASH_AT` names this point and its hit count is reached."""
    if os.environ.get("PIPELINE_CRASH_AT") != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(os.environ.get("PIPELINE_CRASH_AFTER", "1")):
        os.kill(os.getpid(), signal.SIGKILL)
