"""Tasks: what the pipeline learns and how it is judged.

A task package (``pipeline/tasks/<name>/``) defines one :class:`~pipeline.tasks.base.Task`
subclass and exposes an instance as ``TASK`` from its ``__init__``; its data sources, models,
metrics and post-processing live beside it, and what several tasks share lives in
``pipeline/tasks/common/``. The built-in tasks are the packages found here. A task outside this
folder is any importable module that defines ``TASK``, named by its dotted path in
``[pipeline] task``. The training loop, evaluation, the latency harness and every export stage
call the task; none of them tests for a task name.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.tasks.base import Evaluator, Metric, Parity, Source, Task

if TYPE_CHECKING:
    from pipeline.schema import Config

__all__ = ["DEFAULT_TASK", "TASKS", "Evaluator", "Metric", "Parity", "Source", "Task", "builtin_tasks", "get_task",
           "known_metrics", "task_for"]

# Folders here that hold no task.
_NOT_TASKS = frozenset({"common"})
# Every built-in task: the packages in this folder, in name order.
TASKS: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and m.name not in _NOT_TASKS))
# The task of a config that names none, and of artifacts and manifests written before tasks were recorded.
DEFAULT_TASK = "classification"
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@lru_cache(maxsize=None)
def get_task(name: str) -> Task:
    """The task named by ``[pipeline] task``: a built-in task's name, or the dotted path of an
    importable module that defines ``TASK``; a :class:`ConfigError` when there is none."""
    if name in TASKS:
        return importlib.import_module(f"{__name__}.{name}").TASK
    allowed = f"allowed: {', '.join(TASKS)}, or the dotted path of an importable module that defines TASK"
    if not _MODULE_PATH.fullmatch(name) or importlib.util.find_spec(name.split(".")[0]) is None:
        raise ConfigError(f"pipeline.task = {name!r}: {allowed}")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"pipeline.task = {name!r}: cannot import it ({exc}); {allowed}") from None
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task):
        raise ConfigError(f"pipeline.task = {name!r}: the module defines no TASK (an instance of "
                          "pipeline.tasks.base.Task)")
    return task


def task_for(cfg: "Config") -> Task:
    """The task of a run: ``[pipeline] task``, bound to the run's config (see ``Task.bind``).

    A stage's scoped view of the config (``pipeline.stage.ScopedConfig``) is bound through the
    whole config it wraps (``unscoped``): what binding reads (the models' family and input size)
    is covered by every stage's key through its input artifacts."""
    whole = getattr(cfg, "unscoped", cfg)
    return get_task(whole.pipeline.task or DEFAULT_TASK).bind(whole)


def builtin_tasks() -> list[Task]:
    """Every built-in task, in :data:`TASKS` order."""
    return [get_task(name) for name in TASKS]


@lru_cache(maxsize=1)  # the built-in declarations do not change: read once (callers only read it)
def known_metrics() -> dict[str, Metric]:
    """Every quality metric the built-in tasks declare, by name (and by each task's history
    name, e.g. ``acc``, for the primary metric): how to show a metric a manifest recorded."""
    out: dict[str, Metric] = {}
    for task in builtin_tasks():
        for metric in task.quality:
            out.setdefault(metric.name, metric)
        out.setdefault(task.history_metric, task.quality[0])
    return out
