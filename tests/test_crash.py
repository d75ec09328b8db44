"""Kill anywhere, resume exactly: SIGKILL a real run at named points, re-run, compare.

A chain of runs kills `python -m pipeline run` with SIGKILL at one point after another
(pipeline/faults.py), each in the run resumed from the kill before, then lets it finish, and
checks that every stage finished before a kill was not re-done (same start time and key) and
that the final manifest equals the one of an uninterrupted run apart from timings (same
statuses, keys, artifact hashes and accuracies). Ctrl-C stops a run cleanly and it resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_TOML, merge_toml

pytestmark = pytest.mark.slow

CHAIN = """
[teacher]
epochs = 2
[distill]
baseline = false
[prune]
enabled = true
heal_epochs = 1
[onnx]
int8 = false
export_teacher = false
[tensorrt]
enabled = false
"""


def _write(d: Path, extra: str = "") -> Path:
    cfg = d / "pipeline.toml"
    cfg.write_text(merge_toml(TINY_TOML + CHAIN + extra))
    return cfg


def _run(cfg: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200", **env})


def _manifest(cfg: Path) -> dict:
    path = cfg.parent / "run" / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _comparable(manifest: dict) -> dict:
    """What must not depend on having been interrupted: everything but timings."""
    out = {}
    for name, rec in manifest["stages"].items():
        out[name] = {
            "status": rec["status"], "key": rec["key"],
            "outputs": {a: v["sha256"] for a, v in rec["outputs"].items()},
            "accuracy": {a: m.get("accuracy") for a, m in rec["metrics"].items() if isinstance(m, dict)},
        }
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = _write(tmp_path_factory.mktemp("reference"))
    proc = _run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _comparable(_manifest(cfg))


# The kills, in the order one run meets them: (point, the process's hit at which to die, where
# that is). Each kill lands in the run resumed from the one before, so one chain of runs checks
# every point (and resuming a resumed run) for about the work of one run.
POINTS = [
    ("train-step", "14", "teacher, epoch 2, second batch (12 batches per epoch)"),
    ("manifest-write", "3", "third manifest write of the resumed run: temp file written, not renamed"),
    ("stage-recorded", "1", "right after the resumed run records its first stage"),
    ("onnx-export", "1", "student ONNX written, stage not yet recorded"),
    ("calibration", "5", "OpenVINO INT8 calibration, fifth image"),
]


def test_a_run_killed_anywhere_resumes_exactly(tmp_path, reference):
    cfg = _write(tmp_path)
    done: dict[str, tuple[str, str]] = {}  # stages finished before some kill: (started, key)
    for i, (point, after, where) in enumerate(POINTS):
        crashed = _run(cfg, PIPELINE_CRASH_AT=point, PIPELINE_CRASH_AFTER=after)
        assert crashed.returncode == -signal.SIGKILL, f"{where}: expected SIGKILL, got {crashed.returncode}: " \
                                                      f"{crashed.stderr[-2000:]}"
        if i == 1:  # the first resumed run took the teacher up at the epoch after its checkpoint
            assert "resuming teacher from epoch 2" in crashed.stderr, crashed.stderr[-2000:]
        stages = _manifest(cfg)["stages"]  # a valid manifest (or none): never half-written
        for name, (started, key) in done.items():  # finished work is never redone
            assert (stages[name]["started"], stages[name]["key"]) == (started, key), f"{name} re-run before {where}"
        done.update({n: (r["started"], r["key"]) for n, r in stages.items() if r["status"] == "ok"})

    resumed = _run(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after_run = _manifest(cfg)
    for name, (started, key) in done.items():
        rec = after_run["stages"][name]
        assert (rec["started"], rec["key"]) == (started, key), f"{name} was re-run after the last kill"
    assert _comparable(after_run) == reference
    history = after_run["stages"]["teacher"]["history"]["teacher"]
    assert [e["epoch"] for e in history] == [1, 2]  # the killed epoch trained once, in the resumed run
    assert not list((cfg.parent / "run").glob(".manifest.json.*.tmp"))  # the temp file of a killed write is swept
    assert not (cfg.parent / "run" / ".pipeline.lock").exists()


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    cfg = _write(tmp_path, "[teacher]\nepochs = 12\n")  # long enough to be interrupted mid-teacher, even on a loaded machine
    # A shell's background job starts with SIGINT ignored, and Python keeps it so: give the child the
    # disposition a terminal's Ctrl-C meets, whoever launched the tests.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = cfg.parent / "run" / "teacher" / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the teacher never finished an epoch"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (cfg.parent / "run" / ".pipeline.lock").exists()  # released on the way out
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--until", "teacher"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming teacher from epoch" in resumed.stderr, resumed.stderr[-2000:]
    history = _manifest(cfg)["stages"]["teacher"]["history"]["teacher"]
    assert [e["epoch"] for e in history] == list(range(1, 13))  # every epoch once: none lost, none repeated
