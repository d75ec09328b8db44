"""Paired-seed distillation gains measured by `benchmarks/mgd_gain.py --record`, and how a run
finds the one measured for its own setting.

A record is a small JSON file under `benchmarks/results/`: the setting (the distill stage's
configuration less what varies between the compared students), the command that measured it,
the seeds, and per method its mean, std and paired gain over the baseline. The report of a run
whose setting matches shows that figure beside the run's single-seed gain; a run on another
setting is told the command that would measure it. Nothing here runs a model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FORMAT = 1

# What varies between the students one benchmark compares, or does not change what they learn:
# left out of the setting, so every method of a record shares one.
_VARYING = {"distill": ("method", "unlabeled", "baseline", "amp", "init_student"),
            "teacher": ("amp",), "data": ("num_workers", "root", "train_images", "train_annotations",
                                          "val_images", "val_annotations", "download")}


def setting(task: str, stage_config: dict[str, Any]) -> dict[str, Any]:
    """The distill stage's configuration (its `data`, `teacher`, `distill` tables) as a setting."""
    out = {"task": task}
    for table in ("data", "teacher", "distill"):
        part = copy.deepcopy(stage_config.get(table) or {})
        for key in _VARYING.get(table, ()):
            part.pop(key, None)
        out[table] = part
    return out


def setting_id(task: str, stage_config: dict[str, Any]) -> str:
    text = json.dumps(setting(task, stage_config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def method_label(method: str, unlabeled: str, init_student: bool = False) -> str:
    """'mgd+kd' for the labelled batches alone, 'mgd+kd+u' with the unlabelled stream, 'mgd+init'
    with `init_student` (detection)."""
    return method + ("+init" if init_student else "") + ("+u" if unlabeled else "")


def write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, **record}, indent=1, sort_keys=True) + "\n")


def load_all(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every readable record in `folder` (default: `benchmarks/results/`); a malformed file is
    skipped with a log line."""
    folder = folder or RESULTS
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = json.loads(path.read_text())
            if rec.get("format") == FORMAT and isinstance(rec.get("methods"), dict):
                records.append({**rec, "file": path.name})
        except (OSError, ValueError) as e:
            log.warning("benchmark record %s skipped: %s", path.name, e)
    return records


def find(task: str, stage_config: dict[str, Any], folder: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The record measured on this setting and its entry for this run's method, or None."""
    distill = stage_config.get("distill") or {}
    label = method_label(str(distill.get("method", "")), str(distill.get("unlabeled", "")),
                         bool(distill.get("init_student")))
    sid = setting_id(task, stage_config)
    for rec in load_all(folder):
        entry = rec["methods"].get(label)
        if rec.get("setting_id") == sid and entry and entry.get("unlabeled", "") == distill.get("unlabeled", ""):
            return rec, entry
    return None
