"""Initial weights every task's models share: state-dict files read with ``weights_only=True``,
torchvision's pretrained enums, how a checkpoint fails to fit a model, and BatchNorm momentum
fit for short schedules.

A file that does not fit is a :class:`ConfigError` naming the offending keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

TORCHVISION_WEIGHTS_PREFIX = "torchvision:"


def as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside a loaded checkpoint, or None if it is not one."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            sd = dict(obj)
            # Checkpoints saved from DDP / torch.compile wrappers carry a prefix on every key.
            for prefix in ("module.", "_orig_mod."):
                if all(k.startswith(prefix) for k in sd):
                    sd = {k[len(prefix) :]: v for k, v in sd.items()}
            return sd
    return None


def state_dict_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], *,
                        may_miss: tuple[str, ...] = (), may_differ=lambda key: False) -> tuple[list[str], list[str]]:
    """How a checkpoint ``sd`` fails to fit a model's state dict ``own``: ``(problems, skippable)``.

    ``problems`` names keys missing from ``sd`` (except under the ``may_miss`` prefixes),
    unexpected keys and keys of another shape; ``skippable`` holds the shape-mismatched keys for
    which ``may_differ(key)`` is true (they keep their initialisation instead of failing).
    """
    missing = [k for k in own if k not in sd and not k.startswith(may_miss)]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    skippable = [k for k in shape if may_differ(k)]
    problems = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
                + [f"shape {k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shape if k not in skippable])
    return problems, skippable


def describe_mismatch(problems: list[str]) -> str:
    """The first few problems of :func:`state_dict_mismatch`, for a one-line error."""
    more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
    return ", ".join(problems[:4]) + more


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state-dict file, loaded with ``weights_only=True``: a plain state dict or one under
    ``"state_dict"`` / ``"model"``. A missing, unreadable or non-state-dict file is a one-line
    :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights = '{path}': file not found; give a state-dict path, 'torchvision:DEFAULT' or ''")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt zip, pickle refused by weights_only, truncated file...
        text = str(exc).strip()
        if "Weights only load failed" in text:
            # torch's own advice (weights_only=False) would unpickle arbitrary code: do not echo it.
            reason = "corrupt, or holds pickled objects beyond tensors, which weights_only loading refuses"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise ConfigError(f"weights = '{path}': cannot read it as a torch state dict ({reason})") from None
    sd = as_state_dict(obj)
    if sd is None:
        raise ConfigError(
            f"weights = '{path}': not a state dict (expected a dict of tensors, or one under 'state_dict'/'model')"
        )
    return sd


def torchvision_state_dict(name: str, spec: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The state dict of ``torchvision:<ENUM_NAME>`` weights for torchvision model ``name``, and the
    weights enum it came from. The enum is resolved before any download, so a typo fails fast and
    offline; the download itself needs a network. Raises :class:`ConfigError`."""
    import torchvision.models

    enum_name = spec[len(TORCHVISION_WEIGHTS_PREFIX) :]
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"weights = {spec!r}: torchvision has no pretrained weights for {name}") from None
    try:
        weights = enum[enum_name]
    except KeyError:
        available = ["DEFAULT", *(w.name for w in enum)]
        raise ConfigError(
            f"weights = {spec!r}: unknown weights for {name}; available: "
            + ", ".join(TORCHVISION_WEIGHTS_PREFIX + n for n in available)
        ) from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True), weights
    except Exception as exc:  # noqa: BLE001 - URLError, HTTP errors, corrupt cache...
        raise ConfigError(
            f"weights = {spec!r}: could not download {weights} ({exc}); this needs a network, "
            "or save the state dict to a file and give its path"
        ) from None


# BatchNorm's running statistics must follow the weights within the short schedules of a
# from-scratch or fine-tuning run: torchvision's MobileNetV3 (0.01), MNASNet (0.0003) and other
# ImageNet recipes set a far slower momentum, tuned for hundreds of epochs. With a few hundred
# steps their running statistics stay near their initial values and the model in eval mode
# predicts one class, however well it trains (seen: MobileNetV3-Small at 87% train, 20% val).
MIN_BN_MOMENTUM = 0.1  # PyTorch's default


def standard_bn_momentum(model: nn.Module, arch: str) -> nn.Module:
    """Raise every BatchNorm's momentum to at least :data:`MIN_BN_MOMENTUM` (see there); logged."""
    raised = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None and m.momentum < MIN_BN_MOMENTUM:
            m.momentum = MIN_BN_MOMENTUM
            raised += 1
    if raised:
        log.info("%s: BatchNorm momentum raised to %g in %d layers (its ImageNet recipe's is for hundreds of "
                 "epochs; running statistics must keep up with a short schedule)", arch, MIN_BN_MOMENTUM, raised)
    return model
