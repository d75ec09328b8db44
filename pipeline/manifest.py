"""The run manifest: `<workdir>/manifest.json`, one record per stage.

Written atomically (temp file + fsync + rename, then fsync of the directory) so a crash at
any moment leaves either the old or the new manifest, never half of one. Artifacts are
recorded as `{path, sha256, bytes}` with paths relative to the workdir; on resume every
recorded artifact is re-hashed and a mismatch means the stage re-runs, never that a tampered
file is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import faults
from pipeline.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1

Status = Literal["ok", "failed", "skipped", "gate_failed", "unavailable"]

# Unit and direction of every metric name the pipeline records besides the task's quality metrics
# (names fixed: tests and users rely on them; a task declares its own, see `Task.quality`). Stored
# in the manifest so a reader never has to guess whether bigger is better.
METRIC_UNITS: dict[str, dict[str, str]] = {
    "latency_p50_ms": {"unit": "ms", "better": "lower"},
    "latency_p90_ms": {"unit": "ms", "better": "lower"},
    "latency_p99_ms": {"unit": "ms", "better": "lower"},
    "batch_latency_p50_ms": {"unit": "ms", "better": "lower"},
    "throughput_ips": {"unit": "images/s", "better": "higher"},
    "batch_size": {"unit": "images", "better": "none"},
    "batch_fixed": {"unit": "flag", "better": "none"},  # true: the build accepts only batch_size (its own)
    "threads": {"unit": "threads", "better": "none"},
    "params": {"unit": "count", "better": "lower"},
    "macs": {"unit": "multiply-accumulates per image", "better": "lower"},
    "size_bytes": {"unit": "bytes", "better": "lower"},
    "speedup_vs_teacher": {"unit": "ratio", "better": "higher"},
    "train_seconds": {"unit": "s", "better": "lower"},
    "data_workers": {"unit": "processes", "better": "none"},
    "val_images": {"unit": "images", "better": "none"},
}


REBUILD_HINT = (
    "run again with --rebuild-manifest to set it aside and start a fresh one "
    "(stages re-run; training resumes from its per-epoch checkpoints)"
)


class ManifestError(UserError):
    """The manifest on disk cannot be trusted or read (exit code 2: the user decides what to do).

    Not a config error: the message says how to set the manifest aside and start again.
    """


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Path relative to the workdir.")
    sha256: str = Field(description="Hex SHA-256 of the file's bytes (an OpenVINO .xml, then its .bin).")
    bytes: int = Field(ge=0, description="Size in bytes (.xml + .bin for OpenVINO).")


class GateResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gate: str = Field(description="max_accuracy_drop | min_speedup_vs_teacher | latency_ms | min_int8_speedup | max_int8_accuracy_drop")
    artifact: str
    metric: str
    value: float | None = Field(description="Measured value; None when it could not be measured.")
    budget: float
    passed: bool | None = Field(description="None when the value was not measured.")
    message: str = ""


class ArtifactRole(BaseModel):
    """What an artifact is, as its stage declares it: the runner, gates, ship choice, `--target`
    and the report derive everything from these fields, never from artifact names."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: Literal["teacher", "student", "baseline", "none"] = Field(
        "student",
        description="Whose build this is: the teacher's and the baseline student's are references (never gated "
                    "or shipped); 'none' is a file that is not a model (a calibration cache).",
    )
    runtime: str | None = Field(None, description="Where it runs and is measured: torch | onnxruntime | openvino | tensorrt.")
    precision: str | None = Field(None, description="fp32 | int8")
    target: str | None = Field(None, description="The deployment target it ships to; None: never shipped.")
    fp32: str | None = Field(None, description="An INT8 build's FP32 counterpart on the same runtime.")
    supersedes: str | None = Field(None, description="An artifact this one replaces as ship candidate when both exist.")
    alternative_of: str | None = Field(
        None, description="An INT8 build made in place of another that failed a gate (the fallback and QAD "
                          "builds of a PTQ build): the alternative's passing gates make good the other's failure.",
    )
    recipe: str | None = Field(None, description="How an INT8 build was made: ptq | ptq+fallback | qad.")
    made_for: str | None = Field(None, description="The gate an alternative build was made to pass (e.g. max_int8_metric_drop).")
    latency_note: str | None = Field(
        None, description="Set when the measured latency is not the target's (e.g. a TensorRT model timed on "
                          "ONNX Runtime CPU): the build is never latency-gated and the note is shown with its figures.",
    )

    @property
    def reference(self) -> bool:
        """Measured for comparison only: the teacher's builds and the baseline student."""
        return self.model in ("teacher", "baseline")


class StageRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Status
    key: str = ""
    reason: str = ""
    config: dict[str, Any] = {}
    inputs: dict[str, Artifact] = {}
    outputs: dict[str, Artifact] = {}
    metrics: dict[str, Any] = {}
    reference: list[str] = Field([], description="Metric entries measured for comparison only; gates skip them.")
    artifacts: dict[str, ArtifactRole] = Field({}, description="Each declared artifact's role (runtime, precision, target, ...).")
    history: dict[str, list[dict[str, float]]] = Field({}, description="Per-epoch training curves per artifact.")
    warnings: list[str] = []
    unavailable: dict[str, str] = Field({}, description="Artifacts this machine could not build or measure, and why.")
    commands: dict[str, str] = Field({}, description="Commands to reproduce a figure or finish a build on the target.")
    gates: list[GateResult] = []
    started: str = ""
    ended: str = ""
    seconds: float = 0.0
    seed: int = 0
    device: str = ""
    versions: dict[str, str] = {}


class ManifestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT_VERSION
    pipeline: dict[str, Any] = {}
    metric_units: dict[str, dict[str, str]] = Field(default_factory=lambda: dict(METRIC_UNITS))
    stages: dict[str, StageRecord] = {}
    ship: dict[str, dict[str, Any]] = Field(
        {}, description="Per target: the build to ship (fastest passing the quality gates), why, and the candidates."
    )


def artifact_files(path: Path) -> list[Path]:
    """The files one artifact consists of: the file itself, plus the weights `.bin` of an
    OpenVINO `.xml` (the IR is a pair; editing either must invalidate the artifact)."""
    path = Path(path)
    files = [path]
    if path.suffix.lower() == ".xml" and path.with_suffix(".bin").is_file():
        files.append(path.with_suffix(".bin"))
    return files


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of an artifact's bytes (an OpenVINO `.xml` then its `.bin`), streamed so
    large models do not fill memory."""
    h = hashlib.sha256()
    for file in artifact_files(path):
        with open(file, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in artifact_files(path))


def artifact_record(path: Path, workdir: Path) -> Artifact:
    """Hash a finished artifact and describe it relative to the workdir."""
    path = Path(path)
    return Artifact(path=os.path.relpath(path, workdir), sha256=sha256_file(path), bytes=_artifact_bytes(path))


def verify_artifact(art: Artifact, workdir: Path) -> str | None:
    """Re-hash a recorded artifact. Returns None when intact, else why it cannot be trusted."""
    path = workdir / art.path
    if not path.is_file():
        return f"{art.path} is missing"
    if path.suffix.lower() == ".xml" and not path.with_suffix(".bin").is_file():
        return f"{path.with_suffix('.bin').name} (the weights of {art.path}) is missing"
    size = _artifact_bytes(path)
    if size != art.bytes:
        return f"{art.path} changed size ({art.bytes} -> {size} bytes)"
    if sha256_file(path) != art.sha256:
        return f"{art.path} content changed (sha256 mismatch)"
    return None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux exposes it (no race with
    other threads creating files); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, *, check: Callable[[Path], None] | None = None,
                       crash_point: str | None = None) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.

    `check(temp_path)` runs on the written temp file before the rename: if it raises, the
    file never appears under its final name. `crash_point` names a :mod:`pipeline.faults`
    point hit between the write and the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode `open()` would (0666 less the umask), so a
        # web server, a container build or a colleague can read the artifacts and the report.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(Path(tmp))
        if crash_point:
            faults.point(crash_point)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # fsync the directory so the rename itself survives a power loss.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class Manifest:
    """In-memory manifest bound to a workdir; every `save` is atomic."""

    def __init__(self, workdir: Path, model: ManifestModel | None = None):
        self.workdir = Path(workdir)
        self.model = model or ManifestModel()

    @property
    def path(self) -> Path:
        return self.workdir / MANIFEST_NAME

    @property
    def stages(self) -> dict[str, StageRecord]:
        return self.model.stages

    @classmethod
    def load(cls, workdir: Path) -> "Manifest":
        """Load `<workdir>/manifest.json`, or an empty manifest when there is none yet.

        A manifest that is not valid JSON or does not match the schema raises
        :class:`ManifestError` naming the file and what is wrong.
        """
        workdir = Path(workdir)
        path = workdir / MANIFEST_NAME
        if not path.exists():
            return cls(workdir)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is corrupt ({exc}); {REBUILD_HINT}") from None
        try:
            model = ManifestModel.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(
                f"{path} does not match the manifest format at {where}: {first['msg']}; {REBUILD_HINT}"
            ) from None
        return cls(workdir, model)

    def save(self) -> None:
        """Write the manifest atomically."""
        data = json.dumps(self.model.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
        atomic_write_bytes(self.path, data.encode("utf-8"), crash_point="manifest-write")

    def artifact_index(self) -> dict[str, tuple[str, Artifact]]:
        """Map every recorded output artifact name to (producing stage, record)."""
        index: dict[str, tuple[str, Artifact]] = {}
        for stage, rec in self.stages.items():
            if rec.status in ("ok", "gate_failed"):
                for name, art in rec.outputs.items():
                    index[name] = (stage, art)
        return index
