"""nox sessions: `nox -s demo` runs the demo pipeline, `nox -s tests` runs the test suite.

Both share one virtual environment under `.nox/_env`, built once and rebuilt only when
pyproject.toml changes: the torch wheels alone are ~6 GB, so two copies would cost minutes
and disk for nothing. Target-device sessions (later) get environments of their own where
their packages conflict (onnxruntime-gpu must not share a venv with onnxruntime).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["tests"]


def _env(session: nox.Session, name: str = "_env", extras: str = "test") -> str:
    """Create (once) a venv with the project installed editable; return its python."""
    venv = ROOT / ".nox" / name
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = venv / "installed.sha256"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    session.log(f"building {venv} (first time, or pyproject.toml changed)")
    session.run(sys.executable, "-m", "venv", "--clear", str(venv), external=True)
    session.run(str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", external=True)
    session.run(str(python), "-m", "pip", "install", "-q", "-e", f".[{extras}]", external=True)
    stamp.write_text(want)
    return str(python)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Install everything, then run the test suite (arguments go to pytest)."""
    python = _env(session)
    session.run(python, "-m", "pytest", *(session.posargs or ["-q"]), external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Install everything, then run the demo pipeline (`pipeline.toml`, embedded digits data)."""
    python = _env(session)
    session.run(python, "-m", "pipeline", "run", *(session.posargs or ["pipeline.toml"]), external=True)
