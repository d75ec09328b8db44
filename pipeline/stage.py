"""Stage registry: what each stage declares, and the objects a stage sees and returns.

A stage is one module under `stages/` or `export/` with one public `run(ctx) -> StageResult`,
registered with :func:`register`. The registration declares everything the core needs:

- `reads`: the config tables the stage reads (its own always included). They, the seed, the
  task and the input hashes make the cache key; the stage's `ctx.cfg` refuses any other table,
  so a stage cannot depend on a setting its key does not cover;
- `inputs`: artifacts it needs (`"a|b"`: the first that exists, `"a?"`: optional);
- `artifacts`: what it writes, each with its role (:class:`~pipeline.manifest.ArtifactRole`:
  runtime, precision, deployment target, FP32 counterpart, reference builds);
- `preflight`: checks of the user's input run before anything trains;
- `commands`: extra CLI commands it adds (e.g. `build-engine`);
- `probes`: how to make a quick build of an artifact from a torch model, for timing only
  (:class:`Probe`; the prune stage's latency search times the target build this way, without
  knowing any runtime);
- `extra_reads`: config tables the stage reads only under some configs (a function of the config).

Gates, the ship choice, `--target` selection, the report and the config's artifact-name checks
are derived from these declarations; the runner knows stages only through :data:`REGISTRY`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.errors import ConfigError
from pipeline.manifest import ArtifactRole

if TYPE_CHECKING:
    import torch

    from pipeline.bench import Runtime
    from pipeline.schema import Config
    from pipeline.data import DataBundle
    from pipeline.tasks import Task

# Tables every stage may read: `[pipeline]` (seed and task are in every key) and `[bench]`
# (how the runner measures, which never changes an artifact).
ALWAYS_READABLE = frozenset({"pipeline", "bench"})


class StageUnavailable(Exception):
    """Raised by a stage that cannot run on this machine (e.g. TensorRT not installed).

    The runner records the stage as `unavailable` with this message as the reason; it is not
    a failure of the run.
    """


class UndeclaredRead(RuntimeError):
    """A stage read a config table it did not declare in `reads` (a bug in the stage)."""


@dataclass
class Measure:
    """An artifact the runner should measure with the shared harness after the stage."""

    runtime: "Runtime"
    model: "torch.nn.Module | None" = None  # for params/MACs when the artifact is a torch model
    path: Path | None = None  # for size_bytes


@dataclass
class StageResult:
    """What a stage returns: its output files, extra metrics, and what to measure."""

    outputs: dict[str, Path]
    measure: dict[str, Measure] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # stage-specific, nested per artifact
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # per-epoch curves per artifact
    warnings: list[str] = field(default_factory=list)
    # Parts of the stage that cannot run on this machine (e.g. the TensorRT engine without a
    # GPU): artifact name -> why. The stage itself is still ok.
    unavailable: dict[str, str] = field(default_factory=dict)
    # Commands a user runs to reproduce or finish a result elsewhere (benchmark_app, trtexec).
    commands: dict[str, str] = field(default_factory=dict)


class ScopedConfig:
    """A read-only view of the config that allows only the tables a stage declared."""

    def __init__(self, cfg: "Config", stage: str, reads: tuple[str, ...]):
        self._cfg = cfg
        self._stage = stage
        self._allowed = frozenset(reads) | ALWAYS_READABLE

    @property
    def unscoped(self) -> "Config":
        """The whole config (for binding the run's task; see ``pipeline.tasks.task_for``)."""
        return self._cfg

    def __getattr__(self, name: str) -> Any:
        from pipeline.schema import Config

        if name in Config.model_fields and name not in self._allowed:
            raise UndeclaredRead(f"stage {self._stage!r} reads [{name}] but does not declare it in `reads`, so its "
                                 "cache key would not cover it; add it to the stage's registration")
        return getattr(self._cfg, name)


@dataclass
class StageContext:
    """Everything a stage may use: config (scoped to its declared tables), where to write,
    its resolved inputs, the device, the task."""

    cfg: Any  # a ScopedConfig (or the Config itself in tests and tools)
    name: str
    workdir: Path
    inputs: dict[str, Path]
    device: "torch.device"
    key: str
    _data: "DataBundle | None" = None
    # What the runner measured of the stage's input artifacts (their metrics, by artifact name):
    # a stage that needs an input's quality reads it here instead of evaluating it again.
    measured: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Resume files handed out by `resume_file`: the runner deletes them once the stage's record
    # is in the manifest (unless `[pipeline] keep_checkpoints`).
    resume_files: list[Path] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        """`<workdir>/<stage>/`, created on first use."""
        d = self.workdir / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def resume_file(self, name: str) -> Path:
        """`<workdir>/<stage>/<name>` for state that lets an interrupted stage resume (per-epoch
        checkpoints): needed until the stage finishes, then deleted by the runner once the
        stage is recorded as finished, so they never outlive it on disk."""
        path = self.out_dir / name
        self.resume_files.append(path)
        return path

    @property
    def task(self) -> "Task":
        """The run's task (`[pipeline] task`), bound to the run's config (see ``Task.bind``).

        Binding reads the whole config, not the stage's scoped view: what it reads (the models'
        family and input size) is covered by every stage's key through its input artifacts.
        """
        from pipeline.tasks import task_for

        return task_for(self.cfg)

    @property
    def data(self) -> "DataBundle":
        """The dataset, loaded once per run and shared by every stage (reading it reads `[data]`)."""
        data_cfg = self.cfg.data
        if self._data is None:
            from pipeline.data import load_bundle

            self._data = load_bundle(self.task, data_cfg, self.cfg.pipeline.seed, self.cfg.resolve("."))
        return self._data


@dataclass(frozen=True)
class Command:
    """A CLI command a stage adds: `python -m pipeline <name> RUN_DIR`; `run` returns a line to print."""

    name: str
    help: str
    run: Callable[[Path], str]


@dataclass(frozen=True)
class ProbeSpec:
    """What a quick probe build gets: the per-image input shape, the thread count to fix, a scratch
    folder, a few calibration batches (`(images,)` tensors of one image each; INT8 builds calibrate
    on them), the run's task and the config (a probe reads its own stage's tables)."""

    input_shape: tuple[int, int, int]
    threads: int
    work_dir: Path
    calibration: list
    task: "Task"
    cfg: Any


@dataclass(frozen=True)
class Probe:
    """A quick build of one declared artifact from a torch model, made only to be timed.

    `build(model, spec)` returns a :class:`~pipeline.bench.Runtime` of the model built the way the
    stage builds the artifact (same runtime, precision, export settings), but without the stage's
    checks and with only a few calibration images. `built(cfg)`: whether this config makes the
    artifact at all. `unavailable(cfg)`: why it cannot be built or run on this machine, or None.
    `reads`: the config tables the build depends on (they join the cache key of a stage timing it).
    `default`: the build a latency target is timed on when the config names none.
    """

    build: Callable[[Any, ProbeSpec], "Runtime"]
    reads: tuple[str, ...] = ()
    default: bool = False
    built: Callable[["Config"], bool] = lambda cfg: True
    unavailable: Callable[["Config"], str | None] = lambda cfg: None


@dataclass(frozen=True)
class Stage:
    """A registered stage and its declarations."""

    name: str
    order: int
    run: Callable[[StageContext], StageResult]
    inputs: tuple[str, ...]
    artifacts: dict[str, ArtifactRole]
    reads: tuple[str, ...]
    enabled: Callable[["Config"], bool]
    preflight: Callable[["Config"], None] | None = None
    commands: tuple[Command, ...] = ()
    probes: dict[str, Probe] = field(default_factory=dict)
    extra_reads: Callable[["Config"], tuple[str, ...]] | None = None
    off_reason: Callable[["Config"], str] | None = None  # why `enabled` is false, for the record

    def reads_for(self, cfg: "Config") -> tuple[str, ...]:
        """The tables the stage reads under `cfg`: its declared `reads`, plus `extra_reads(cfg)`."""
        extra = self.extra_reads(cfg) if self.extra_reads is not None else ()
        return self.reads + tuple(dict.fromkeys(k for k in extra if k not in self.reads))

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the artifacts this stage may write."""
        return tuple(self.artifacts)

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The config tables in the cache key (same as `reads`)."""
        return self.reads


REGISTRY: dict[str, Stage] = {}


def register(
    name: str,
    *,
    order: int,
    artifacts: dict[str, ArtifactRole],
    inputs: tuple[str, ...] = (),
    reads: tuple[str, ...] = (),
    enabled: Callable[["Config"], bool] | None = None,
    preflight: Callable[["Config"], None] | None = None,
    commands: tuple[Command, ...] = (),
    probes: dict[str, Probe] | None = None,
    extra_reads: Callable[["Config"], tuple[str, ...]] | None = None,
    off_reason: Callable[["Config"], str] | None = None,
) -> Callable[[Callable[[StageContext], StageResult]], Callable[[StageContext], StageResult]]:
    """Decorator registering a stage's `run` function under `name` (= its module = its TOML table)."""

    def deco(fn: Callable[[StageContext], StageResult]) -> Callable[[StageContext], StageResult]:
        if name in REGISTRY and REGISTRY[name].run is not fn:
            raise ValueError(f"stage {name!r} registered twice")
        REGISTRY[name] = Stage(
            name=name, order=order, run=fn, inputs=inputs, artifacts=dict(artifacts),
            reads=(name,) + tuple(k for k in reads if k != name), enabled=enabled or (lambda cfg: True),
            preflight=preflight, commands=commands, probes=dict(probes or {}), extra_reads=extra_reads,
            off_reason=off_reason,
        )
        unknown = set(probes or {}) - set(artifacts)
        if unknown:
            raise ValueError(f"stage {name!r} declares probes for undeclared artifacts {sorted(unknown)}")
        return fn

    return deco


# Packages whose public modules are imported so their stages register: adding a stage is
# adding a file. Modules starting with "_" are private to their package and not imported here.
STAGE_PACKAGES = ("stages", "export")


def load_stages() -> list[Stage]:
    """Import every stage module so it registers, and return the stages in chain order."""
    import importlib
    import pkgutil

    for pkg_name in STAGE_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")
    return sorted(REGISTRY.values(), key=lambda s: s.order)


def roles(stages: list[Stage] | None = None) -> dict[str, ArtifactRole]:
    """Every declared artifact's role, by artifact name (of `stages`, default: the registry)."""
    return {name: role for stage in (stages or load_stages()) for name, role in stage.artifacts.items()}


def targets(stages: list[Stage] | None = None) -> list[str]:
    """Every deployment target some artifact ships to, in chain order."""
    out: list[str] = []
    for role in roles(stages).values():
        if role.target and role.target not in out:
            out.append(role.target)
    return out


def probe_builds(cfg: "Config", stages: list[Stage] | None = None) -> dict[str, tuple[Stage, Probe]]:
    """Every artifact an enabled stage builds under `cfg` and can probe, in chain order:
    artifact name -> (its stage, its probe)."""
    return {art: (s, p) for s in (stages or load_stages()) if s.enabled(cfg)
            for art, p in s.probes.items() if p.built(cfg)}


def stages_for_target(target: str, stages: list[Stage] | None = None) -> set[str]:
    """The stages a deployment target needs: those shipping to it, and what they need, transitively."""
    by_name = {s.name: s for s in (stages or load_stages())}
    made_by = {art: s.name for s in by_name.values() for art in s.artifacts}
    need = {s.name for s in by_name.values() if any(r.target == target for r in s.artifacts.values())}
    todo = list(need)
    while todo:
        for spec in by_name[todo.pop()].inputs:
            if spec.endswith("?"):
                continue  # optional: used when produced anyway
            for art in spec.split("|"):
                producer = made_by.get(art)
                if producer is not None and producer not in need:
                    need.add(producer)
                    todo.append(producer)
    return need


def check_config(cfg: "Config") -> None:
    """Config checks that need the declarations: every `[gates.latency_ms]` key names a declared,
    latency-gated artifact."""
    known = roles()
    for name in cfg.gates.latency_ms:
        role = known.get(name)
        if role is None:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"gates.latency_ms: unknown artifact {name!r}; {hint}allowed: {', '.join(known)}")
        if role.latency_note:
            raise ConfigError(f"gates.latency_ms.{name}: its measured latency is not its target's, so it cannot be "
                              f"budgeted ({role.latency_note})")
        if role.runtime is None:
            raise ConfigError(f"gates.latency_ms.{name}: {name} is a file, not a model; it has no latency")
