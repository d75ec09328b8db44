"""Classification models: torchvision classifiers by name (or ``timm:<name>``), a small-input
stem, initial weights (a state-dict file or torchvision's pretrained enums), and the model's
default MGD tap (its last feature stage).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.taps import PROBE_SIZE, head_names, last_feature_stage
from pipeline.tasks.common.weights import (
    TORCHVISION_WEIGHTS_PREFIX,
    describe_mismatch,
    read_state_dict,
    standard_bn_momentum,
    state_dict_mismatch,
    torchvision_state_dict,
)

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
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


def _in_head(key: str, heads: list[str]) -> bool:
    return any(key.startswith(h + ".") for h in heads)




# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


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


def _load_torchvision_weights(model: nn.Module, arch: str, spec: str) -> None:
    """Load ``torchvision:<ENUM_NAME>`` pretrained weights (downloads; needs a network)."""
    sd, weights = torchvision_state_dict(arch, spec)
    # Head (label set) and the small-input conv1 legitimately differ in shape: skip those.
    _fit_state_dict(model, sd, source=str(weights), arch=arch, skip_any_shape=True)
    log.info("%s: loaded pretrained %s", arch, weights)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The default MGD tap
# --------------------------------------------------------------------------------------------


def _abstract_model(arch: str) -> nn.Module:
    """``arch`` without real weights: built on the meta device (no memory, no time), or on the
    CPU and moved there when its builder needs real tensors (RegNet computes widths with them).
    The run's random stream is left where it was."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return build_model(arch, 10, image_size=PROBE_SIZE, small_input="off")
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - a builder that cannot run on meta tensors
            return build_model(arch, 10, image_size=PROBE_SIZE, small_input="off").to("meta")


@lru_cache(maxsize=64)
def default_tap(arch: str) -> str:
    """The last feature stage of the classifier ``arch`` (a torchvision name or ``timm:<name>``):
    what MGD taps when the config names no layer. A :class:`ConfigError` for an unknown
    architecture or one without a feature-map stage before its head (a ViT)."""
    check_arch(arch)
    model = _abstract_model(arch)
    info = getattr(model, "feature_info", None) if arch.startswith(TIMM_PREFIX) else None
    if info:  # timm's own list of feature stages; its last entry is the deepest
        try:
            return str(info[-1]["module"])
        except (KeyError, IndexError, TypeError):
            pass
    shape = (3, PROBE_SIZE, PROBE_SIZE)
    try:
        last = last_feature_stage(model, shape)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: a real dry forward on the CPU
        with torch.random.fork_rng(devices=[]):
            model = build_model(arch, 10, image_size=PROBE_SIZE, small_input="off")
        last = last_feature_stage(model, shape)
    if last is None:
        raise ConfigError(f"{arch} has no layer that outputs an N×C×H×W feature map before its head, so MGD has "
                          "no default tap; name the layers to tap, or use method = \"kd\"")
    return last.name
