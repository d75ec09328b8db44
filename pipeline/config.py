"""Loading a `pipeline.toml`: tomllib, the pydantic schema (:mod:`pipeline.schema`), then the run's
task fills in what the config left out and checks what only it can.

Every key has a default; for the keys whose default is the task's (the data source, the model
pair, the training recipe, the MGD/KD settings) it comes from the task's declarations
(:class:`pipeline.tasks.base.Task`), filled in at load time. Checks that need the stage registry
(artifact names in `[gates.latency_ms]`) run right after, in :func:`from_dict`. A user mistake
becomes one :class:`ConfigError` line naming the TOML key path, the bad value and what is
allowed; never a traceback.

The schema's tables are re-exported here (``from pipeline.config import Config``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline import tasks
from pipeline.errors import ConfigError
from pipeline.schema import (
    BenchConfig,
    Config,
    DataConfig,
    DistillConfig,
    GatesConfig,
    Int8FallbackConfig,
    KDConfig,
    MGDConfig,
    OnnxConfig,
    OpenVINOConfig,
    OptimConfig,
    PipelineConfig,
    PruneConfig,
    QadConfig,
    ScenesConfig,
    TeacherConfig,
    TensorRTConfig,
)
from pipeline.stage import check_config
from pipeline.tasks.base import Task

__all__ = [
    "BenchConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "GatesConfig", "Int8FallbackConfig", "KDConfig", "MGDConfig",
    "OnnxConfig", "OpenVINOConfig", "OptimConfig", "PipelineConfig", "PruneConfig", "QadConfig", "ScenesConfig", "TeacherConfig",
    "TensorRTConfig", "from_dict", "load", "recipe_rows", "reference_rows", "source_rows", "task_rows",
]


def _did_you_mean(loc: tuple) -> str:
    """'did you mean X? ' for an unknown key: the closest allowed keys of its own table."""
    import difflib
    import typing

    model: Any = Config
    for part in loc[:-1]:  # walk down to the table holding the unknown key
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return "check the spelling; "
        model = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    allowed, name = list(getattr(model, "model_fields", {})), str(loc[-1])
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6) or [
        k for k in allowed if min(len(k), len(name)) >= 3 and (name.startswith(k) or k.startswith(name))]
    if close:
        return f"did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}? "
    return f"allowed here: {', '.join(allowed)}; " if allowed else "check the spelling; "


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
    msg = err["msg"].removeprefix("Value error, ")
    if loc and msg.startswith(loc + "."):
        return msg  # a cross-field check that already names its key
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key ({_did_you_mean(err['loc'])}see the config reference in docs/config.md)"
    if "input" in err and loc and not isinstance(err["input"], dict):  # no loc: a model check, input is the model
        return f"{loc} = {err['input']!r}: {msg}"
    return f"{loc}: {msg}" if loc else msg


def from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate a config dict; raise :class:`ConfigError` with one line per problem."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError("; ".join(lines)) from None
    cfg._base_dir = base_dir
    _apply_task_defaults(cfg)
    check_config(cfg)  # the stage registry knows every artifact name
    return cfg


def _apply_task_defaults(cfg: Config) -> None:
    """Fill in what the config left out from the task's declarations (the data source, the model
    pair, the recipe, the MGD/KD keys), then refuse what the task does not accept."""
    if cfg.pipeline.task is None:
        cfg.pipeline.task = tasks.DEFAULT_TASK
    task = tasks.get_task(cfg.pipeline.task)
    _check_source(cfg, task)
    if cfg.teacher.arch is None:
        cfg.teacher.arch = task.default_pair[0]
    if cfg.distill.student is None:
        cfg.distill.student = task.default_pair[1]
    _apply_recipe(cfg, task)
    if cfg.distill.init_student is None:
        cfg.distill.init_student = task.init_student_default
    layers = _default_layers(cfg, task)
    for table, defaults in ((cfg.distill.mgd, {**task.mgd_defaults, **layers}), (cfg.distill.kd, task.kd_defaults)):
        for key, value in defaults.items():
            if getattr(table, key) is None:
                try:
                    setattr(table, key, value)
                except ValidationError as exc:  # e.g. the default pairs badly with the user's other list
                    if key.endswith("_layers"):
                        # Default tap lists of different lengths (5 FPN levels, SSDlite's 6, an
                        # unknown arch's 1) come from an unknown arch or a cross-family pair: say that.
                        _check_archs(cfg, task)
                    raise ConfigError("; ".join(_format_error(e) for e in exc.errors())) from None
    _refuse_other_tasks_keys(cfg, task)
    task.check_config(cfg)


def _check_source(cfg: Config, task: Task) -> None:
    """The data source (the task's first when unset) is one of the task's, with the keys it needs."""
    if cfg.data.source is None:
        cfg.data.source = task.sources[0].name
    source = task.source(cfg.data.source)
    if source is None:
        raise ConfigError(f"data.source = {cfg.data.source!r} does not fit pipeline.task = {task.name!r}; "
                          f"allowed: {', '.join(s.name for s in task.sources)}")
    for key, hint in source.needs.items():
        if not getattr(cfg.data, key):
            raise ConfigError(f"data.{key}: source {source.name!r} needs {hint}")


def _refuse_other_tasks_keys(cfg: Config, task: Task) -> None:
    """A key only other tasks declare (a model option, init_student, a gate alias), set to
    anything but its default, is an error naming the tasks that take it."""
    others = [t for t in tasks.builtin_tasks() if t.name != task.name]

    def owners(has) -> str:
        return " / ".join(t.name for t in others if has(t)) or "another task's"

    for option in sorted({o for t in others for o in t.model_options} - set(task.model_options)):
        for table_name in ("teacher", "distill"):
            table = getattr(cfg, table_name)
            value, default = getattr(table, option), type(table).model_fields[option].default
            if value != default:
                raise ConfigError(f"{table_name}.{option} = {value!r} is a {owners(lambda t: option in t.model_options)} "
                                  f"setting; pipeline.task is {task.name!r}")
    if cfg.distill.init_student and not task.init_student_prefixes:
        raise ConfigError(f"distill.init_student is a {owners(lambda t: bool(t.init_student_prefixes))} setting; "
                          f"pipeline.task is {task.name!r}")
    for alias in sorted({a for t in others for a in t.gate_aliases} - set(task.gate_aliases)):
        if getattr(cfg.gates, alias) is not None:
            key = next(t.gate_aliases[alias] for t in others if alias in t.gate_aliases)
            raise ConfigError(f"gates.{alias} is the {owners(lambda t: alias in t.gate_aliases)} spelling; for task "
                              f"{task.name!r} use gates.{key} (it compares {task.metric})")


def _apply_recipe(cfg: Config, task: Task) -> None:
    """The task's training recipe for every recipe key the config left out: the optimizer keys
    of [teacher] and [distill], [data] batch_size and [prune] lr (healing). Explicit keys win."""
    recipe = task.recipe
    tables = ((cfg.teacher, recipe.get("optim", {})), (cfg.distill, recipe.get("optim", {})),
              (cfg.data, {k: recipe[k] for k in ("batch_size",) if k in recipe}),
              (cfg.prune, {"lr": recipe["heal_lr"]} if "heal_lr" in recipe else {}))
    for table, defaults in tables:
        for key, value in defaults.items():
            if key not in table.model_fields_set:
                setattr(table, key, value)


def _default_layers(cfg: Config, task: Task) -> dict[str, list[str]]:
    """The task's MGD taps (each model's last feature stage) for the layer lists left out.

    Finding them builds the model (abstractly): an unknown architecture or one without a
    feature map to tap is an error here only when MGD will tap it; otherwise the list stays unset.
    """
    uses_mgd = cfg.distill.method in ("mgd", "mgd+kd")
    out: dict[str, list[str]] = {}
    for key, arch_key, arch in (("teacher_layers", "teacher.arch", cfg.teacher.arch),
                                ("student_layers", "distill.student", cfg.distill.student)):
        if getattr(cfg.distill.mgd, key) is not None:
            continue
        where = arch_key
        try:
            task.check_arch(arch)
            where = f"distill.mgd.{key} (unset)"
            out[key] = task.default_layers(arch)
        except ConfigError as exc:
            if uses_mgd:
                raise ConfigError(f"{where}: {exc}") from None
    return out


def _check_archs(cfg: Config, task: Task) -> None:
    """A ConfigError naming the key for an unknown teacher or student arch, or a pair the task refuses."""
    for key, arch in (("teacher.arch", cfg.teacher.arch), ("distill.student", cfg.distill.student)):
        try:
            task.check_arch(arch)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    task.check_pair(cfg.teacher.arch, cfg.distill.student)


def load(path: str | Path) -> Config:
    """Read and validate a `pipeline.toml`.

    Raises :class:`ConfigError` for a missing file, malformed TOML (with line and column) or
    any schema violation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line L, column C)".
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    try:
        return from_dict(raw, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def reference_rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(TOML key path, default, description) for every key, for the README's config reference."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += reference_rows(ann, f"{path}.")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((path, json.dumps(default), field.description or ""))
    return rows


RECIPE_COLUMNS = ("optimizer", "lr", "weight_decay", "warmup_epochs", "grad_clip", "batch_size", "prune.lr",
                  "mgd.alpha", "mgd.mask_ratio", "mgd.mask")


def recipe_rows() -> list[tuple[str, ...]]:
    """(task, then each of :data:`RECIPE_COLUMNS` as shown in docs/config.md) for every task:
    what a config that leaves those keys out trains with."""
    def shown(v: Any) -> str:
        return f"`{v:g}`" if isinstance(v, float) else f"`{v}`"

    rows = []
    for task in tasks.builtin_tasks():
        name = task.name
        values = {**task.recipe.get("optim", {}), "batch_size": task.recipe.get("batch_size"),
                  "prune.lr": task.recipe.get("heal_lr"), **{f"mgd.{k}": v for k, v in task.mgd_defaults.items()}}
        rows.append((name, *(shown(values.get(c)) for c in RECIPE_COLUMNS)))
    return rows


def task_rows() -> list[tuple[str, ...]]:
    """(task, default teacher, default student, model options, init_student, gate aliases) for
    every built-in task, as docs/config.md lists them."""
    def keys(names) -> str:
        return ", ".join(f"`{n}`" for n in names) or "—"

    def init(t: Task) -> str:
        return f"yes (default {'on' if t.init_student_default else 'off'})" if t.init_student_prefixes else "—"

    return [(t.name, f"`{t.default_pair[0]}`", f"`{t.default_pair[1]}`", keys(t.model_options), init(t),
             keys(t.gate_aliases)) for t in tasks.builtin_tasks()]


def source_rows() -> list[tuple[str, str, str, str]]:
    """(task, `[data] source`, the `[data]` keys it needs, what it reads) for every built-in task's
    sources, as docs/config.md lists them; a task's first source is its default."""
    return [(task.name, f"`{s.name}`", ", ".join(f"`{k}`" for k in s.needs) or "—", s.about)
            for task in tasks.builtin_tasks() for s in task.sources]
