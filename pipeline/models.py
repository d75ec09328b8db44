"""The models of a run: the teacher and student built from the config, and how a student
artifact is stored and rebuilt, plain or pruned, without unpickling a module.

Every stage builds its models here (through the task), so the teacher and the student are
built one way wherever they are needed.

- A plain student (`student`, `student_baseline`) is the state dict of the configured
  `[distill] student` architecture.
- A pruned student (`pruned`) is a dict of plain data: the architecture, its build options,
  Torch-Pruning's *pruning history* (`[layer name, is_out_channel, [channel indices]]` per
  step) and the pruned state dict. Rebuilding builds the original architecture, replays the
  history with `DependencyGraph.load_pruning_history` (which removes exactly the same channels
  through every coupled layer) and loads the weights strictly.

Both load with `torch.load(..., weights_only=True)`: no module object is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.tasks import DEFAULT_TASK, get_task, task_for

if TYPE_CHECKING:
    from pipeline.schema import Config
    from pipeline.stage import StageContext

PRUNED_FORMAT = "edge-mgd-pruned"
PRUNED_VERSION = 1


def build_teacher(cfg: "Config", num_classes: int, weights: str | None = None) -> nn.Module:
    """The `[teacher]` architecture for this run's task and data (configured or given weights)."""
    return _build(cfg, cfg.teacher, cfg.teacher.arch, num_classes, weights)


def build_student(cfg: "Config", num_classes: int, weights: str | None = None) -> nn.Module:
    """The `[distill] student` architecture for this run's task and data (configured or given weights)."""
    return _build(cfg, cfg.distill, cfg.distill.student, num_classes, weights)


def _build(cfg: "Config", table: Any, arch: str, num_classes: int, weights: str | None) -> nn.Module:
    task = task_for(cfg)
    return task.build_model(arch, num_classes, image_size=cfg.data.image_size,
                            weights=table.weights if weights is None else weights, base_dir=cfg.resolve("."),
                            **task.options_of(table))


def check_weights_file(cfg: "Config", table: str, build: Callable[["Config", int], nn.Module]) -> None:
    """Build the model of `[<table>]` with its `weights` file loaded, now, in preflight: a
    checkpoint for another architecture fails here, in one line, instead of after the teacher
    trained for an hour. The data is read (for its class count) at most once per config."""
    weights = getattr(cfg, table).weights
    path = cfg.resolve(weights)
    if not path.is_file():
        raise ConfigError(f"{table}.weights = {weights!r}: file not found ({path})")
    global _CLASS_COUNT
    if _CLASS_COUNT is None or _CLASS_COUNT[0] is not cfg:
        data = task_for(cfg).load_data(cfg.data, cfg.pipeline.seed, cfg.resolve("."))
        _CLASS_COUNT = (cfg, data.num_classes)
    build(cfg, _CLASS_COUNT[1])


_CLASS_COUNT: "tuple[Config, int] | None" = None  # (the config it was read for, its class count)


def load_frozen_teacher(ctx: "StageContext") -> nn.Module:
    """The trained teacher (the stage's `teacher` input) on the stage's device: eval mode, no gradients."""
    teacher = build_teacher(ctx.cfg, ctx.data.num_classes, weights=str(ctx.inputs["teacher"]))
    teacher.to(ctx.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def pruned_payload(model: nn.Module, history: list, *, arch: str, num_classes: int, image_size: int,
                   task: str, options: dict[str, Any]) -> dict[str, Any]:
    """The plain-data record of a pruned model (see the module docstring); ``options``: the
    task's model options it was built with (plain values), ``task``: its `[pipeline] task`."""
    payload = {
        "format": PRUNED_FORMAT,
        "version": PRUNED_VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        **options,
        # Lists of plain Python values: loadable with weights_only=True.
        "history": [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in history],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if task != DEFAULT_TASK:  # absent: the default task (artifacts written before tasks existed)
        payload["task"] = task
    return payload


def is_pruned_payload(obj: Any) -> bool:
    """True for a dict written by :func:`pruned_payload`."""
    return isinstance(obj, dict) and obj.get("format") == PRUNED_FORMAT


def rebuild_pruned(payload: dict[str, Any]) -> nn.Module:
    """Rebuild a pruned model: original architecture → replayed pruning history → weights."""
    import torch_pruning as tp

    if payload.get("version") != PRUNED_VERSION:
        raise ConfigError(f"pruned artifact version {payload.get('version')!r} is not supported (expected {PRUNED_VERSION})")
    task = get_task(payload.get("task", DEFAULT_TASK))
    options = {k: payload[k] for k in task.model_options if k in payload}
    model = task.build_model(payload["arch"], payload["num_classes"], image_size=payload["image_size"], **options)
    model.eval()
    example = torch.zeros(1, 3, payload["image_size"], payload["image_size"])
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    dg.load_pruning_history([tuple(h) for h in payload["history"]])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model


def load_student(path: Path, cfg: "Config", num_classes: int) -> nn.Module:
    """Load a `student`/`student_baseline` state dict (architecture from `cfg.distill`) or a
    `pruned` artifact (self-describing) as a torch module (CPU, eval)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if is_pruned_payload(obj):
        model = rebuild_pruned(obj)
    else:
        model = build_student(cfg, num_classes, weights="")
        model.load_state_dict(obj, strict=True)
    return model.eval()


def load_student_file(path: Path, ctx: "StageContext") -> nn.Module:
    """:func:`load_student` with the stage's config and class count."""
    return load_student(path, ctx.cfg, ctx.data.num_classes)


def load_final_student(ctx: "StageContext") -> tuple[str, nn.Module]:
    """The student a deployment stage starts from: `pruned` when pruning ran, else `student`.

    Returns `(artifact name, module)`; the stage must declare the input as ``"pruned|student"``.
    """
    for name in ("pruned", "student"):
        if name in ctx.inputs:
            return name, load_student_file(ctx.inputs[name], ctx)
    raise ConfigError("no student artifact among the stage's inputs: run the distill stage first")
