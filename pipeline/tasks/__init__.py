"""Tasks: what the pipeline learns and how it is judged.

A task package (``pipeline/tasks/<name>/``) defines one :class:`~pipeline.tasks.base.Task`
subclass and exposes an instance as ``TASK`` from its ``__init__``; its data sources, models,
metrics and post-processing live beside it, and what several tasks share lives in
``pipeline/tasks/common/``. The training loop, evaluation, the latency harness and every export
stage call the task; none of them tests for a task name.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache

from pipeline.errors import ConfigError
from pipeline.tasks.base import Evaluator, Parity, Task

__all__ = ["TASKS", "Evaluator", "Parity", "Task", "get_task"]

# Every value `[pipeline] task` accepts (the config schema's Literal mirrors this tuple).
TASKS = ("classification", "segmentation", "detection")


@lru_cache(maxsize=None)
def get_task(name: str) -> Task:
    """The task named by ``[pipeline] task``; a :class:`ConfigError` when it is unknown or missing here."""
    if name not in TASKS:
        raise ConfigError(f"pipeline.task = {name!r}: allowed {', '.join(TASKS)}")
    try:
        module = importlib.import_module(f"pipeline.tasks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"pipeline.tasks.{name}":
            raise
        raise ConfigError(f"pipeline.task = {name!r} is not available in this version; available: "
                          f"{', '.join(t for t in TASKS if _exists(t))}") from None
    return module.TASK


def _exists(name: str) -> bool:
    return importlib.util.find_spec(f"pipeline.tasks.{name}") is not None
