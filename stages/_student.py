"""How a student artifact is stored and rebuilt, plain or pruned, without unpickling a module.

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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models import build_model

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.stage import StageContext

PRUNED_FORMAT = "edge-mgd-pruned"
PRUNED_VERSION = 1


def pruned_payload(model: nn.Module, history: list, *, arch: str, num_classes: int, image_size: int,
                   small_input: str) -> dict[str, Any]:
    """The plain-data record of a pruned model (see the module docstring)."""
    return {
        "format": PRUNED_FORMAT,
        "version": PRUNED_VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "small_input": small_input,
        # Lists of plain Python values: loadable with weights_only=True.
        "history": [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in history],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def is_pruned_payload(obj: Any) -> bool:
    """True for a dict written by :func:`pruned_payload`."""
    return isinstance(obj, dict) and obj.get("format") == PRUNED_FORMAT


def rebuild_pruned(payload: dict[str, Any]) -> nn.Module:
    """Rebuild a pruned model: original architecture → replayed pruning history → weights."""
    import torch_pruning as tp

    if payload.get("version") != PRUNED_VERSION:
        raise ConfigError(f"pruned artifact version {payload.get('version')!r} is not supported (expected {PRUNED_VERSION})")
    model = build_model(payload["arch"], payload["num_classes"], image_size=payload["image_size"],
                        small_input=payload["small_input"])
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
        model = build_model(cfg.distill.student, num_classes, image_size=cfg.data.image_size,
                            small_input=cfg.distill.small_input)
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
