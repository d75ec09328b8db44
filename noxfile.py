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
- `nox -s gpu_tests`: the suite's GPU and TensorRT tests (markers `gpu`, `tensorrt`) in the
  CUDA venv; `nox -s gpu_check`: `benchmarks/gpu_check.py`, the whole CUDA path (demo on CUDA,
  a 2-process torchrun, the engine and its latency), printing what it measured. Both need an
  NVIDIA GPU and fail, saying why, where CUDA or TensorRT do not work.

The CPU sessions share one virtual environment under `.nox/_env`, built once and rebuilt only
when pyproject.toml changes: the torch wheels alone are ~6 GB, so two copies would cost minutes
and disk for nothing. The CUDA sessions get `.nox/_env_cuda`: onnxruntime-gpu and TensorRT
there, because onnxruntime-gpu must not share a venv with onnxruntime. TensorRT's pip wheel
must be built for the CUDA major version of the torch in that venv (`tensorrt` alone resolves
to the newest release for the newest CUDA), so it is installed after torch, as
`tensorrt-cu<torch's CUDA major>` in :data:`TENSORRT_RANGE`; `TENSORRT_SPEC=...` overrides it
(e.g. `TENSORRT_SPEC='tensorrt-cu13>=11,<12'`). The pip wheels have no `trtexec` (see
docs/deployment.md). A Jetson uses the system's TensorRT instead: these sessions stop there and
say how (docs/deployment.md, "TensorRT on a Jetson").
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["tests"]


def _install_run(session: nox.Session, *args: str, **kwargs) -> str | None:
    """Run a command that builds an environment: also under `--install-only` (where `session.run`
    is skipped, so a stamp would be written into a venv that was never made)."""
    run = getattr(session, "run_install", None) or session.run_always  # run_install: nox >= 2023.04
    return run(*args, **kwargs)


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
        _install_run(session, sys.executable, "-m", "venv", "--clear", str(venv), external=True)
        _install_run(session, str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", external=True)
    else:  # Debian/Ubuntu without python3-venv: nox's own pip (./noxw makes one) installs pip there
        _install_run(session, sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv), external=True)
        _install_run(session, sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--upgrade", "pip",
                     external=True)
    _install_run(session, str(python), "-m", "pip", "install", "-q", "-e", f".[{extras}]", external=True)
    if swap:
        _install_run(session, str(python), "-m", "pip", "uninstall", "-y", "-q", swap[0], external=True)
        _install_run(session, str(python), "-m", "pip", "install", "-q", swap[1], external=True)
    stamp.write_text(want)
    return str(python)


# The TensorRT releases the CUDA venv gets, as `tensorrt-cu<N>` for torch's CUDA major N: the
# 10.x line, where the engine build, the calibration cache (removed in 11) and JetPack's
# TensorRT all meet. The code is written for 11.x too (TENSORRT_SPEC, see the top of this file).
TENSORRT_RANGE = ">=10.0,<11"
# What a TensorRT pip install leaves; another build is removed first (they share `import tensorrt`).
_TENSORRT_DISTS = ["tensorrt", *(f"tensorrt-cu{n}{part}" for n in (11, 12, 13) for part in ("", "-bindings", "-libs"))]

# device -> (pipeline --target, venv name, extras, package swap)
TARGETS = {
    "cpu-onnxruntime": ("onnxruntime", "_env", "test", None),
    "cpu-openvino": ("openvino", "_env", "test", None),
    "cuda-tensorrt": ("tensorrt", "_env_cuda", "test", ("onnxruntime", "onnxruntime-gpu")),  # see _cuda_env
}


def _need_gpu(session: nox.Session, what: str) -> None:
    """Stop with the reason where the CUDA sessions cannot work: no NVIDIA driver, or a Jetson."""
    if Path("/etc/nv_tegra_release").exists():
        session.error(f"{what}: this is a Jetson; pip's TensorRT and CUDA wheels are not for JetPack. Use the "
                      "system's TensorRT in a venv made with --system-site-packages (docs/deployment.md, "
                      "'TensorRT on a Jetson')")
    if shutil.which("nvidia-smi") is None:
        session.error(f"{what} needs an NVIDIA GPU and its driver (nvidia-smi not found); "
                      "run it on the target machine, e.g. a CUDA workstation")


def _driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA the installed driver supports (nvidia-smi's header), or None."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_env(session: nox.Session) -> str:
    """The CUDA venv: the project, onnxruntime-gpu, and the TensorRT wheel for torch's CUDA."""
    _, venv, extras, swap = TARGETS["cuda-tensorrt"]
    python = _env(session, venv, extras, swap)
    cuda = _install_run(session, python, "-c", "import torch; print(torch.version.cuda or '')", silent=True,
                        external=True).strip().splitlines()[-1:]
    torch_cuda = cuda[0] if cuda else ""
    if not torch_cuda:
        session.error(f"the torch in .nox/{venv} is a CPU-only build; install a CUDA build of torch there")
    major = int(torch_cuda.split(".")[0])
    driver = _driver_cuda()
    if driver is not None and driver[0] < major:
        session.error(f"torch in .nox/{venv} is built for CUDA {torch_cuda}, but the NVIDIA driver supports CUDA "
                      f"{driver[0]}.{driver[1]} at most (CUDA 13 needs an R580 or newer driver). Update the driver, "
                      f"or install a CUDA {driver[0]} torch and torchvision into .nox/{venv} from PyTorch's own "
                      "package index and run again")
    spec = os.environ.get("TENSORRT_SPEC") or f"tensorrt-cu{major}{TENSORRT_RANGE}"
    stamp = ROOT / ".nox" / venv / "tensorrt.spec"
    if not (stamp.exists() and stamp.read_text() == spec):
        if stamp.exists():  # another build (a torch of another CUDA was installed by hand)
            _install_run(session, python, "-m", "pip", "uninstall", "-y", "-q", *_TENSORRT_DISTS, external=True)
        session.log(f"installing {spec} (torch is built for CUDA {torch_cuda})")
        _install_run(session, python, "-m", "pip", "install", "-q", spec, external=True)
        stamp.write_text(spec)
    return python


# Run in the CUDA venv before the GPU sessions: fails with the reason rather than letting every
# GPU test skip.
_CUDA_WORKS = """
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
import tensorrt
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)} "
      f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}), TensorRT {tensorrt.__version__}")
"""


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Install everything, then run the test suite (arguments go to pytest; by default on every
    core, pytest-xdist, one thread per worker: see tests/conftest.py)."""
    python = _env(session)
    session.run(python, "-m", "pytest", *(session.posargs or ["-q", "-n", "auto", "--dist", "worksteal"]), external=True)


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
    if device.startswith("cuda"):
        _need_gpu(session, device)
        python = _cuda_env(session)
    else:
        python = _env(session, venv, extras, swap)
    session.run(python, "-m", "pipeline", "run", *(session.posargs or ["pipeline.toml"]),
                "--target", stage_target, external=True)


@nox.session(venv_backend="none")
def gpu_tests(session: nox.Session) -> None:
    """The suite's GPU and TensorRT tests in the CUDA venv (arguments go to pytest)."""
    _need_gpu(session, "gpu_tests")
    python = _cuda_env(session)
    session.run(python, "-c", _CUDA_WORKS, external=True)
    session.run(python, "-m", "pytest", "-m", "gpu or tensorrt", "-rs", *(session.posargs or ["-q"]), external=True)


@nox.session(venv_backend="none")
def gpu_check(session: nox.Session) -> None:
    """benchmarks/gpu_check.py in the CUDA venv: the whole CUDA path, printing what it measured."""
    _need_gpu(session, "gpu_check")
    python = _cuda_env(session)
    session.run(python, "-c", _CUDA_WORKS, external=True)
    session.run(python, "benchmarks/gpu_check.py", *session.posargs, external=True)


@nox.session(venv_backend="none")
def gate(session: nox.Session) -> None:
    """The CI gate: a small CPU run on OpenVINO whose gates are noise-robust ratios."""
    python = _env(session)
    session.run(python, "-m", "pipeline", "run", *(session.posargs or ["configs/ci-gate.toml"]),
                "--target", "openvino", external=True)
