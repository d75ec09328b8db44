"""Stage registry and the objects a stage sees and returns.

A stage is one module under `stages/` or `export/` with one public `run(ctx) -> StageResult`,
registered with :func:`register`. The runner knows stages only through :data:`REGISTRY`,
ordered by each stage's `order`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from pipeline.bench import Runtime
    from pipeline.config import Config
    from pipeline.data import DataBundle

class StageUnavailable(Exception):
    """Raised by a stage that cannot run on this machine (e.g. TensorRT not installed).

    The runner records the stage as `unavailable` with this message as the reason; it is not
    a failure of the run.
    """


@dataclass
class Measure:
    """An artifact the runner should measure with the shared harness after the stage."""

    runtime: "Runtime"
    model: "torch.nn.Module | None" = None  # for params/MACs when the artifact is a torch model
    path: Path | None = None  # for size_bytes
    reference: bool = False  # measured for comparison only (baseline student, teacher builds): no gates


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


@dataclass
class StageContext:
    """Everything a stage may use: config, where to write, its resolved inputs, the device."""

    cfg: "Config"
    name: str
    workdir: Path
    inputs: dict[str, Path]
    device: "torch.device"
    key: str
    _data: "DataBundle | None" = None

    @property
    def out_dir(self) -> Path:
        """`<workdir>/<stage>/`, created on first use."""
        d = self.workdir / self.name
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def data(self) -> "DataBundle":
        """The dataset, loaded once per run and shared by every stage."""
        if self._data is None:
            from pipeline.data import load_data

            self._data = load_data(self.cfg.data, self.cfg.pipeline.seed, base_dir=self.cfg.resolve("."))
        return self._data


@dataclass(frozen=True)
class Stage:
    """A registered stage: its name (= module = TOML table), order, inputs and outputs."""

    name: str
    order: int
    run: Callable[[StageContext], StageResult]
    # Each entry an artifact name, "a|b" (the first of them that exists), or "a?" (optional).
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config_keys: tuple[str, ...]  # config tables whose values go into the cache key
    enabled: Callable[["Config"], bool]


REGISTRY: dict[str, Stage] = {}


def register(
    name: str,
    *,
    order: int,
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...],
    config_keys: tuple[str, ...] = (),
    enabled: Callable[["Config"], bool] | None = None,
) -> Callable[[Callable[[StageContext], StageResult]], Callable[[StageContext], StageResult]]:
    """Decorator registering a stage's `run` function under `name`.

    `config_keys` lists the config tables the stage depends on (its own table is always
    included); changing any of them changes the stage's cache key.
    """

    def deco(fn: Callable[[StageContext], StageResult]) -> Callable[[StageContext], StageResult]:
        if name in REGISTRY and REGISTRY[name].run is not fn:
            raise ValueError(f"stage {name!r} registered twice")
        keys = (name,) + tuple(k for k in config_keys if k != name)
        REGISTRY[name] = Stage(
            name=name,
            order=order,
            run=fn,
            inputs=inputs,
            outputs=outputs,
            config_keys=keys,
            enabled=enabled or (lambda cfg: True),
        )
        return fn

    return deco


# Packages whose public modules are imported so their stages register: adding a stage is
# adding a file. Modules starting with "_" are helpers and are not imported here.
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
