"""nox sessions. Run them with `./noxw` (nox from its own small venv, `.nox/_nox`; works on a stock
Debian/Ubuntu Python) or with any nox: `./noxw -s demo`, `./noxw -l`.

- `nox -s demo`: the demo pipeline; `nox -s tests`: the test suite.
- `nox -s "target(device='cpu-openvino')"`, `"target(device='cpu-onnxruntime')"`,
  `"target(device='cuda-tensorrt')"`: run the pipeline for one deployment target (only the
  stages it needs) and enforce its gates (the session fails on exit code 3). Arguments after
  `--` replace the config path.
- `nox -s gate`: the CI gate: `configs/ci-gate.toml` on the OpenVINO target, whose gates are
  ratios measured back to back (INT8 vs FP32 speedup and accuracy drop), so a shared, noisy
  CI machine does not make them flap the way absolute milliseconds would.

The CPU sessions share one virtual environment under `.nox/_env`, built once and rebuilt only
when pyproject.toml changes: the torch wheels alone are ~6 GB, so two copies would cost minutes
and disk for nothing. The CUDA target gets `.nox/_env_cuda`: onnxruntime-gpu and TensorRT
there, because onnxruntime-gpu must not share a venv with onnxruntime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["tests"]


def _env(session: nox.Session, name: str = "_env", extras: str = "test", swap: tuple[str, str] | None = None) -> str:
    """Create (once) a venv with the project installed editable; return its python.

    `swap = (old, new)` uninstalls package `old` and installs `new` afterwards (onnxruntime ->
    onnxruntime-gpu on CUDA machines).
    """
    venv = ROOT / ".nox" / name
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode() + repr(swap).encode()).hexdigest()
    stamp = venv / "installed.sha256"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    session.log(f"building {venv} (first time, or pyproject.toml changed)")
    if importlib.util.find_spec("ensurepip") is not None and not os.environ.get("NOXW_NO_ENSUREPIP"):
        session.run(sys.executable, "-m", "venv", "--clear", str(venv), external=True)
        session.run(str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", external=True)
    else:  # Debian/Ubuntu without python3-venv: nox's own pip (./noxw makes one) installs pip there
        session.run(sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv), external=True)
        session.run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--upgrade", "pip",
                    external=True)
    session.run(str(python), "-m", "pip", "install", "-q", "-e", f".[{extras}]", external=True)
    if swap:
        session.run(str(python), "-m", "pip", "uninstall", "-y", "-q", swap[0], external=True)
        session.run(str(python), "-m", "pip", "install", "-q", swap[1], external=True)
    stamp.write_text(want)
    return str(python)


# device -> (pipeline --target, venv name, extras, package swap)
TARGETS = {
    "cpu-onnxruntime": ("onnxruntime", "_env", "test", None),
    "cpu-openvino": ("openvino", "_env", "test", None),
    "cuda-tensorrt": ("tensorrt", "_env_cuda", "test,tensorrt", ("onnxruntime", "onnxruntime-gpu")),
}


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


@nox.session(venv_backend="none")
@nox.parametrize("device", list(TARGETS))
def target(session: nox.Session, device: str) -> None:
    """Run the pipeline for one deployment target and enforce its gates."""
    stage_target, venv, extras, swap = TARGETS[device]
    if device.startswith("cuda") and shutil.which("nvidia-smi") is None:
        session.error(f"{device} needs an NVIDIA GPU and its driver (nvidia-smi not found); "
                      "run it on the target machine, e.g. a Jetson or a CUDA workstation")
    python = _env(session, venv, extras, swap)
    session.run(python, "-m", "pipeline", "run", *(session.posargs or ["pipeline.toml"]),
                "--target", stage_target, external=True)


@nox.session(venv_backend="none")
def gate(session: nox.Session) -> None:
    """The CI gate: a small CPU run on OpenVINO whose gates are noise-robust ratios."""
    python = _env(session)
    session.run(python, "-m", "pipeline", "run", *(session.posargs or ["configs/ci-gate.toml"]),
                "--target", "openvino", external=True)
