"""Model construction: torchvision classifiers by name (or ``timm:<name>``), a small-input stem,
and initial weights from a state-dict file or torchvision's pretrained enums.

Checkpoints are plain state dicts loaded with ``torch.load(..., weights_only=True)``; a file
that does not fit the architecture is a :class:`ConfigError` naming the offending keys.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
TORCHVISION_WEIGHTS_PREFIX = "torchvision:"
SMALL_INPUT_THRESHOLD = 64  # "auto" turns the stride-1 stem on below this side length


# --------------------------------------------------------------------------------------------
# Architecture names
# --------------------------------------------------------------------------------------------


def _torchvision_classifiers() -> list[str]:
    import torchvision.models

    # module=torchvision.models restricts to classification models (no detection/segmentation).
    return list(torchvision.models.list_models(module=torchvision.models))


def _timm_or_error(arch: str) -> Any:
    try:
        import timm  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError:
        raise ConfigError(
            f"arch = {arch!r}: timm is not installed; `pip install timm` (or install the timm extra) "
            "or use a torchvision model name"
        ) from None
    return timm


def check_arch(arch: str) -> None:
    """Raise :class:`ConfigError` unless ``arch`` names a buildable classifier.

    Accepts any torchvision classification model name, or ``timm:<name>`` when timm is
    installed. Unknown names get close-match suggestions.
    """
    if arch.startswith(TIMM_PREFIX):
        timm = _timm_or_error(arch)
        name = arch[len(TIMM_PREFIX) :]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else "see timm.list_models()"
            raise ConfigError(f"arch = {arch!r}: unknown timm model; {hint}")
        return
    names = _torchvision_classifiers()
    if arch in names:
        return
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
    close += [lower[m] for m in difflib.get_close_matches(arch.lower(), list(lower), n=3, cutoff=0.6)]
    close = list(dict.fromkeys(close))[:3]
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "use a torchvision classification model name (torchvision.models.list_models()) or timm:<name>"
    )
    raise ConfigError(f"arch = {arch!r}: unknown architecture; {hint}")


# --------------------------------------------------------------------------------------------
# Small-input stem
# --------------------------------------------------------------------------------------------


def small_input_enabled(small_input: str, image_size: int) -> bool:
    """Whether to use the stride-1 stem: ``"on"``, ``"off"``, or ``"auto"`` (on below 64 px)."""
    if small_input == "on":
        return True
    if small_input == "off":
        return False
    if small_input == "auto":
        return image_size < SMALL_INPUT_THRESHOLD
    raise ConfigError(f"small_input = {small_input!r}: allowed values are auto, on, off")


def _apply_small_stem(model: nn.Module, arch: str) -> None:
    """Keep spatial resolution in the stem so tiny inputs still reach the last stage as a map.

    ResNet-style (``conv1`` + ``maxpool``): the CIFAR stem, 3×3 stride-1 conv and no max-pool.
    Otherwise the first strided convolution gets stride 1 (MobileNet, EfficientNet, ...).
    """
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        log.info("%s: small-input stem: conv1 -> 3x3 stride 1, maxpool removed", arch)
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            old = module.stride
            module.stride = (1, 1)
            log.info("%s: small-input stem: %s stride %s -> (1, 1)", arch, name, tuple(old))
            return
    log.warning("%s: small-input stem requested but no strided convolution found; model unchanged", arch)


# --------------------------------------------------------------------------------------------
# Classifier head
# --------------------------------------------------------------------------------------------


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


def _in_head(key: str, heads: list[str]) -> bool:
    return any(key.startswith(h + ".") for h in heads)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


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


def _fit_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str, arch: str, skip_any_shape: bool
) -> None:
    """Load ``sd`` strictly, except for shape-mismatched keys that may be skipped (with a warning).

    ``skip_any_shape=False``: only head keys may differ in shape (a checkpoint trained on another
    label set). ``True``: any shape-mismatched key is skipped (pretrained weights on a model whose
    head and stem were changed). Missing or unexpected keys are always an error.
    """
    heads = head_names(model)
    problems, skippable = state_dict_mismatch(model.state_dict(), sd,
                                              may_differ=lambda k: skip_any_shape or _in_head(k, heads))
    if problems:
        raise ConfigError(
            f"checkpoint {source} does not fit {arch}: {describe_mismatch(problems)}; "
            "is it for another architecture or another small_input setting?"
        )
    if skippable:
        log.warning(
            "%s: kept random init for %d key(s) whose shape differs from %s: %s",
            arch,
            len(skippable),
            source,
            ", ".join(skippable[:6]) + (" ..." if len(skippable) > 6 else ""),
        )
    filtered = {k: v for k, v in sd.items() if k not in skippable}
    model.load_state_dict(filtered, strict=not skippable)


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


def load_weights(model: nn.Module, path: Path, *, arch: str) -> None:
    """Load a state-dict file into ``model`` (``torch.load(..., weights_only=True)``).

    Accepts a plain state dict or a dict holding one under ``"state_dict"`` or ``"model"``.
    Strict, except classifier-head keys whose shape differs, which keep their random init
    (fine-tuning a checkpoint from another label set). Raises :class:`ConfigError` for a
    missing, unreadable or non-state-dict file, and for a checkpoint of another architecture.
    """
    path = Path(path)
    sd = read_state_dict(path)
    _fit_state_dict(model, sd, source=str(path), arch=arch, skip_any_shape=False)
    log.info("%s: loaded weights from %s", arch, path)


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


def _load_torchvision_weights(model: nn.Module, arch: str, spec: str) -> None:
    """Load ``torchvision:<ENUM_NAME>`` pretrained weights (downloads; needs a network)."""
    sd, weights = torchvision_state_dict(arch, spec)
    # Head (label set) and the small-input conv1 legitimately differ in shape: skip those.
    _fit_state_dict(model, sd, source=str(weights), arch=arch, skip_any_shape=True)
    log.info("%s: loaded pretrained %s", arch, weights)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


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


def build_model(
    arch: str,
    num_classes: int,
    *,
    image_size: int,
    small_input: str = "auto",
    weights: str = "",
    base_dir: Path = Path("."),
) -> nn.Module:
    """Build a classifier with ``num_classes`` outputs for ``image_size``² RGB inputs.

    ``arch``: a torchvision classification model name or ``timm:<name>``. ``small_input``:
    ``auto`` | ``on`` | ``off`` (see :func:`small_input_enabled`). ``weights``: ``""`` (random
    init; the caller seeds torch), a state-dict path (relative to ``base_dir``), or
    ``torchvision:DEFAULT`` / ``torchvision:<ENUM_NAME>``. Raises :class:`ConfigError` for user
    mistakes.
    """
    check_arch(arch)
    if arch.startswith(TIMM_PREFIX):
        timm = _timm_or_error(arch)
        model = timm.create_model(arch[len(TIMM_PREFIX) :], pretrained=False, num_classes=num_classes)
    else:
        import torchvision.models

        kwargs: dict[str, Any] = {}
        if arch.startswith("vit_"):
            kwargs["image_size"] = image_size  # ViT's position embedding is sized for its input
        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ConfigError(f"arch = {arch!r}: cannot build it for {num_classes} classes at {image_size} px ({exc})") from None
    if small_input_enabled(small_input, image_size):
        if arch.startswith("vit_"):
            # A stride-1 patch embedding would break ViT's fixed position embedding; ViT is
            # already sized for image_size above.
            log.info("%s: small-input stem not applied to a ViT", arch)
        else:
            _apply_small_stem(model, arch)
    if weights.startswith(TORCHVISION_WEIGHTS_PREFIX):
        if arch.startswith(TIMM_PREFIX):
            raise ConfigError(f"weights = {weights!r}: torchvision weights do not apply to {arch}")
        _load_torchvision_weights(model, arch, weights)
    elif weights:
        p = Path(weights).expanduser()
        load_weights(model, p if p.is_absolute() else Path(base_dir) / p, arch=arch)
    return standard_bn_momentum(model, arch)
