"""Feature stages of a model: the named layers whose outputs are N×C×H×W feature maps.

MGD taps feature maps. Which layers give them is found by a dry forward with a hook on every
module, not from a table of architecture names, so torchvision, timm and custom models are
handled alike. A *stage* is a layer that owns parameters, is not part of an output head and
outputs a square map (inputs are square, so a channels-last N×H×W×C tensor, as in Swin, is not
one). Containers that are never called as a whole (``nn.ModuleList``) or that return a dict (a
segmentation backbone) are looked into; a lone stage (MobileNet's ``features``) is listed with
its children, so error messages can offer the blocks inside it.

The *last feature stage* (the default MGD tap) is the stage whose forward finishes last, unless
a parameterised layer that does not keep the map form runs after it (a ViT encoder after its
patch embedding): then a model has no default tap and the user names one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


# Root-level children that are output heads by name (classifiers, auxiliary classifiers).
HEAD_NAMES = frozenset({"fc", "classifier", "aux_classifier", "head", "heads", "AuxLogits", "aux1", "aux2",
                        "aux_logits", "head_drop"})
PROBE_SIZE = 224  # the dry forward's input side: the stages' names do not depend on it


@dataclass(frozen=True)
class FeatureStage:
    """A layer whose output is a feature map: its name and output shape (C, H, W)."""

    name: str
    shape: tuple[int, int, int]

    def describe(self) -> str:
        """``name C×H×W``, as error messages list stages."""
        return f"{self.name} {'×'.join(str(d) for d in self.shape)}"


@dataclass
class _Run:
    order: int  # when the module's (last) forward finished
    output: Any


def _is_map(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[-1] == x.shape[-2]


def _owns_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def head_names(model: nn.Module) -> list[str]:
    """Module-name prefixes of the classifier head (e.g. ``["fc"]``, ``["classifier.3"]``).

    The head is the last ``nn.Linear``; auxiliary classifiers (GoogLeNet/Inception ``aux*``
    Linear layers with the same output size) are included, since they change with the label
    set too. Models without a Linear layer (SqueezeNet) fall back to the last module that owns
    parameters. Parameter names of the head start with ``prefix + "."``.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        last_name, last = linears[-1]
        aux = [
            n for n, m in linears[:-1] if "aux" in n.lower() and m.out_features == last.out_features
        ]
        return [*aux, last_name]
    owners = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    return owners[-1:]


def _heads(model: nn.Module, exclude: tuple[str, ...]) -> list[str]:
    named = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    return [*exclude, *named, *head_names(model)]


@torch.no_grad()
def _dry_forward(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, _Run]:
    """Every submodule's output on one zero image (eval mode; the model's modes are restored)."""
    runs: dict[str, _Run] = {}
    counter = itertools.count()

    def record(name: str):
        def hook(_module, _inputs, output):
            runs[name] = _Run(next(counter), output)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return runs


def _walk(module: nn.Module, prefix: str, runs: dict[str, _Run], heads: list[str],
          stages: list[tuple[int, FeatureStage]], blockers: list[int], head_side: bool = False) -> None:
    level: list[tuple[int, FeatureStage, nn.Module]] = []
    for child_name, child in module.named_children():
        name = prefix + child_name
        if (not prefix and child_name in HEAD_NAMES) or any(name == h or name.startswith(h + ".") for h in heads):
            continue  # an output head
        # A container holding the head (MobileNet's `classifier` MLP, a wrapped model): its other
        # layers may be stages, but what it computes on the way to the head is no "blocker".
        holds_head = head_side or any(h.startswith(name + ".") for h in heads)
        run = runs.get(name)
        if holds_head or run is None or not isinstance(run.output, torch.Tensor):
            # Also: never called as a whole (ModuleList), or returns a dict/tuple (a backbone).
            _walk(child, name + ".", runs, heads, stages, blockers, holds_head)
        elif not _owns_params(child):
            continue  # pooling, activations, dropout, reshapes
        elif _is_map(run.output):
            level.append((run.order, FeatureStage(name, tuple(int(d) for d in run.output.shape[1:])), child))
        elif not head_side:
            blockers.append(run.order)  # e.g. a transformer encoder on tokens
    stages.extend((order, stage) for order, stage, _ in level)
    if len(level) == 1:  # a lone stage (MobileNet's `features`): its blocks are stages too
        _, stage, child = level[0]
        _walk(child, stage.name + ".", runs, heads, stages, blockers, head_side)


def analyse(model: nn.Module, input_shape: tuple[int, ...], *,
            exclude: tuple[str, ...] = ()) -> tuple[list[FeatureStage], FeatureStage | None]:
    """``(feature_stages(...), last_feature_stage(...))`` from one dry forward."""
    runs = _dry_forward(model, input_shape)
    found: list[tuple[int, FeatureStage]] = []
    blockers: list[int] = []
    _walk(model, "", runs, _heads(model, exclude), found, blockers)
    found.sort(key=lambda item: item[0])
    last = found[-1] if found else None
    if last is not None and any(b > last[0] for b in blockers):
        last = None  # the features leave the map form before the head: no stage is "the last"
    return [s for _, s in found], (last[1] if last else None)


def feature_stages(model: nn.Module, input_shape: tuple[int, ...], *, exclude: tuple[str, ...] = ()) -> list[FeatureStage]:
    """The model's feature stages in the order their forwards finish, with their (C, H, W) at
    ``input_shape`` (one dry forward of a zero image, in eval mode, on the model's device).
    ``exclude``: names of output heads beyond the ones found by name and by :func:`head_names`."""
    return analyse(model, input_shape, exclude=exclude)[0]


def last_feature_stage(model: nn.Module, input_shape: tuple[int, ...], *, exclude: tuple[str, ...] = ()) -> FeatureStage | None:
    """The deepest feature stage before the head (see the module docstring), or None."""
    return analyse(model, input_shape, exclude=exclude)[1]
