"""The prune stage's Torch-Pruning setup, shared by the stage and its latency-target probes
(:mod:`stages.prune_target`): importance, the layers kept whole (heads, `ignore_layers`, layers
too narrow for the ratio), and the pruner itself."""

from __future__ import annotations

import difflib
import logging
import math

import torch
from torch import nn

from pipeline.errors import ConfigError, LibraryError
from pipeline.schema import PruneConfig
from pipeline.tasks import Task

# The prune stage's logger: what is said here is said by that stage.
log = logging.getLogger("stages.prune")


def _importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise ConfigError(f"prune.importance = {name!r}: allowed magnitude, taylor, bn_scale")


def ignored_modules(model: nn.Module, cfg: PruneConfig, task: Task) -> list[nn.Module]:
    """The task's output heads plus every layer named in `prune.ignore_layers` (and its children).

    Raises :class:`ConfigError` naming an unknown layer, with the closest names.
    """
    named = dict(model.named_modules())
    ignored = [named[h] for h in task.prune_keep(model)]
    for name in cfg.ignore_layers:
        if name not in named:
            close = difflib.get_close_matches(name, [n for n in named if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"prune.ignore_layers: the student has no layer {name!r}{hint}")
        ignored.append(named[name])
    return ignored


def too_narrow(model: nn.Module, ignored: list[nn.Module], cfg: PruneConfig) -> list[tuple[str, int]]:
    """The prunable layers that `ratio` and `round_to` would empty, as `(name, channels)`.

    Torch-Pruning keeps `int(width * (1 - ratio))` channels of a layer and rounds that *down* to a
    multiple of `round_to`, so a layer narrower than `round_to / (1 - ratio)` would lose every
    channel, which breaks the network: at the defaults (0.5, 8) every layer under 16 channels,
    such as the 8-channel squeeze-excitation convs (`fc1`) of MobileNetV3 and EfficientNet.
    :func:`make_pruner` keeps these layers whole. Layers in `ignored` (the heads, the user's
    `ignore_layers`) are not listed. Raises :class:`ConfigError` when no prunable layer is left.
    """
    skip = {id(m) for root in ignored for m in root.modules()}
    narrow, prunable = [], 0
    for name, m in model.named_modules():
        if id(m) in skip or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        keep = int(width * (1 - cfg.ratio))
        keep -= keep % cfg.round_to
        prunable += 1
        if keep <= 0:
            narrow.append((name, width))
    if prunable and len(narrow) == prunable:
        widest = max(narrow, key=lambda nw: nw[1])
        raise ConfigError(
            f"prune.ratio = {cfg.ratio} with prune.round_to = {cfg.round_to} would remove every channel of every "
            f"prunable layer (the widest, {widest[0]!r}, has {widest[1]}; a layer needs at least "
            f"{math.ceil(cfg.round_to / (1 - cfg.ratio))}): lower the ratio or round_to, or disable [prune]"
        )
    return narrow


def _say_kept_whole(narrow: list[tuple[str, int]], cfg: PruneConfig, level: int) -> None:
    """One log line: which layers pruning leaves whole because it would empty them, and why."""
    if not narrow:
        return
    shown = ", ".join(f"{n} ({w})" for n, w in narrow[:12]) + (f" and {len(narrow) - 12} more" if len(narrow) > 12 else "")
    log.log(level, "prune: %d layer%s kept whole (at ratio %s with round_to %d a layer needs %d channels, or pruning "
            "would remove them all; typically squeeze-excitation convs): %s", len(narrow), "s" if len(narrow) > 1 else "",
            cfg.ratio, cfg.round_to, math.ceil(cfg.round_to / (1 - cfg.ratio)), shown)


def _failing_module(model: nn.Module, example: torch.Tensor) -> str | None:
    """Re-run the forward as Torch-Pruning does (gradients on) with hooks; if it raises, the name
    of the module that was running, else None (the failure was in Torch-Pruning's graph pass)."""
    running: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _i, n=n: running.append(n)) for n, m in model.named_modules() if n]
    # A forward hook that returns a value replaces the module's output: return None explicitly.
    hooks += [m.register_forward_hook(lambda _m, _i, _o: running.pop() and None) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            model(example)
        return None
    except Exception:
        return running[-1] if running else "<model>"
    finally:
        for h in hooks:
            h.remove()


def make_pruner(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, arch: str, task: Task,
                log_level: int = logging.INFO):
    """A Torch-Pruning `BasePruner` for `model`: the task's heads, the user's `ignore_layers` and
    the layers too narrow to prune at this ratio and round_to (:func:`too_narrow`, logged at
    `log_level`) are its ignored layers, so they keep every channel.

    Raises :class:`LibraryError` when Torch-Pruning cannot trace the model, naming the layer
    that was running (the model and Torch-Pruning disagree: not a mistake in the config).
    """
    import torch_pruning as tp

    ignored = ignored_modules(model, cfg, task)
    narrow = too_narrow(model, ignored, cfg)
    _say_kept_whole(narrow, cfg, log_level)
    named = dict(model.named_modules())
    ignored += [named[name] for name, _ in narrow]
    try:
        return tp.pruner.BasePruner(
            model, example, importance=_importance(cfg.importance), pruning_ratio=cfg.ratio,
            iterative_steps=cfg.steps, round_to=cfg.round_to, ignored_layers=ignored,
        )
    except Exception as exc:
        layer = _failing_module(model, example)
        where = f"layer {layer!r} fails under tracing" if layer else "its outputs or graph are not traceable"
        raise LibraryError(
            "Torch-Pruning",
            f"it cannot trace {arch}: {where} ({type(exc).__name__}: {exc}); "
            "list the layer in prune.ignore_layers, make the model return tensors, or disable [prune]",
        ) from None
