"""Semantic segmentation models by torchvision name: DeepLabV3, FCN and LR-ASPP heads on ResNet
and MobileNetV3-Large backbones, each returning one logits tensor at the input resolution.

torchvision's own builders are used where they exist (``deeplabv3_resnet50``, ``fcn_resnet50``,
``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``); the ResNet-18/34 variants and
``fcn_mobilenet_v3_large``, which torchvision does not ship, are composed from its building
blocks. Every backbone's output stride is set after building by :func:`_set_resnet_output_stride`
/ :func:`_set_mobilenet_output_stride` (torchvision's ``BasicBlock`` refuses dilation, and its
builders only offer their one default).

Every model is a :class:`SegLogits`. Its state-dict keys are torchvision's own (``backbone.*``,
``classifier.*``): the wrapper adds no prefix, so a torchvision segmentation model's state dict
loads as is (its ``aux_classifier.*`` keys, used only for an auxiliary training loss, are
skipped).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.tasks.common.weights import (
    TORCHVISION_WEIGHTS_PREFIX,
    standard_bn_momentum,
    read_state_dict,
    describe_mismatch,
    state_dict_mismatch,
    torchvision_state_dict,
)

log = logging.getLogger(__name__)

_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
SEG_ARCHS: tuple[str, ...] = (
    *(f"deeplabv3_{b}" for b in _BACKBONES),
    *(f"fcn_{b}" for b in _BACKBONES),
    "lraspp_mobilenet_v3_large",
)
# Built by torchvision itself; the others (ResNet-18/34, FCN on MobileNetV3) are composed here.
_TORCHVISION_BUILT = (
    "deeplabv3_resnet50", "fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
)
OUTPUT_STRIDES = (8, 16, 32)
ASPP_RATES = (12, 24, 36)  # torchvision's DeepLabHead rates, at the arch's default output stride


# Each backbone's facts, as timm keeps them with a model: its last feature stage (the MGD tap,
# where the authors tap segmentation models) under the segmentation model's `backbone`.
BACKBONE_LAST_STAGE = {"resnet18": "backbone.layer4", "resnet34": "backbone.layer4", "resnet50": "backbone.layer4",
                       "mobilenet_v3_large": "backbone.16"}


def _backbone_of(arch: str) -> str:
    return arch.split("_", 1)[1]


def last_backbone_stage(arch: str) -> str:
    """The last feature stage of ``arch``'s backbone (``backbone.layer4``, MobileNetV3's ``backbone.16``)."""
    return BACKBONE_LAST_STAGE.get(_backbone_of(arch), "backbone.layer4")  # an unknown arch fails in check_arch


def default_output_stride(arch: str) -> int:
    """The output stride torchvision builds ``arch`` with: 8 for ResNets, 16 for MobileNetV3."""
    return 8 if _backbone_of(arch).startswith("resnet") else 16


def check_seg_arch(arch: str) -> None:
    """Raise :class:`ConfigError` unless ``arch`` is one of :data:`SEG_ARCHS` (with suggestions)."""
    if arch in SEG_ARCHS:
        return
    close = difflib.get_close_matches(str(arch).lower(), SEG_ARCHS, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"arch = {arch!r}: unknown segmentation architecture; {hint}allowed: {', '.join(SEG_ARCHS)}"
    )


# --------------------------------------------------------------------------------------------
# The model: one logits tensor
# --------------------------------------------------------------------------------------------


class SegLogits(nn.Module):
    """A torchvision segmentation model that returns logits ``N×C×H×W`` at the input resolution.

    torchvision's models return ``{"out": ...}`` (plus ``"aux"``); exporters, runtimes and
    Torch-Pruning want one tensor. The torchvision ``backbone`` and ``classifier`` become this
    module's own children, so module and state-dict names are torchvision's (no prefix); the
    auxiliary classifier is dropped.
    """

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        from torchvision.models.segmentation.lraspp import LRASPPHead

        self.backbone = net.backbone
        self.classifier = net.classifier
        self.num_classes = num_classes
        # LR-ASPP's head reads both the "low" and "high" features; DeepLabV3/FCN heads read "out".
        self._head_reads_dict = isinstance(net.classifier, LRASPPHead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        out = self.classifier(features if self._head_reads_dict else features["out"])
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def seg_feature_layer(model: nn.Module, arch: str) -> str:
    """Module name of the last backbone stage, the feature map MGD distils for segmentation.

    ``backbone.layer4`` for ResNets; the last feature block (``backbone.16``) for MobileNetV3.
    """
    check_seg_arch(arch)
    if _backbone_of(arch).startswith("resnet"):
        name = "backbone.layer4"
    else:
        name = "backbone." + list(model.backbone.named_children())[-1][0]
    if name not in dict(model.named_modules()):
        raise TypeError(f"{type(model).__name__} has no module {name!r}: not a {arch} from build_seg_model")
    return name


def seg_head_layers(model: nn.Module) -> list[str]:
    """Module names of the final classifier convs that output ``num_classes`` channels.

    Structured pruning must keep these intact: ``classifier.4`` for DeepLabV3/FCN,
    ``classifier.low_classifier`` and ``classifier.high_classifier`` for LR-ASPP.
    """
    from torchvision.models.segmentation.lraspp import LRASPPHead

    head = model.classifier
    if isinstance(head, LRASPPHead):
        return ["classifier.low_classifier", "classifier.high_classifier"]
    if isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Conv2d):
        return [f"classifier.{len(head) - 1}"]
    raise TypeError(f"unrecognised segmentation head {type(head).__name__}")


# --------------------------------------------------------------------------------------------
# Output stride
# --------------------------------------------------------------------------------------------


def _set_conv(conv: nn.Conv2d, *, stride: int | None = None, dilation: int) -> None:
    # Conv2d.forward reads these attributes on every call, so changing them after building is
    # the same as building with them; the weights do not depend on stride or dilation.
    if stride is not None:
        conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = ((conv.kernel_size[0] - 1) // 2 * dilation, (conv.kernel_size[1] - 1) // 2 * dilation)


def _set_resnet_output_stride(backbone: nn.Module, output_stride: int) -> None:
    """Give a (torchvision) ResNet the ``output_stride`` at ``layer4`` by dilating the last stages.

    The "à trous" rule of torchvision's ``replace_stride_with_dilation``, also for BasicBlock
    (ResNet-18/34), whose constructor refuses dilation: in a stage whose stride 2 is replaced,
    the conv that carried the stride keeps the previous dilation at stride 1, and every later
    3×3 conv of the stage gets the doubled dilation, so each conv sees the context it saw in the
    undilated network. Settings are absolute: applying it again with another stride is fine.
    """
    stride_here = 4  # after the stem (conv1 stride 2, maxpool stride 2)
    dilation = 1
    for name in ("layer2", "layer3", "layer4"):
        previous = dilation
        if stride_here < output_stride:
            stride_here, stride = stride_here * 2, 2
        else:
            dilation, stride = dilation * 2, 1
        for i, block in enumerate(getattr(backbone, name)):
            # BasicBlock: conv1, conv2 (3×3); Bottleneck: conv2 is the 3×3 conv, and the strided one.
            convs = [m for m in (block.conv1, block.conv2) if m.kernel_size != (1, 1)]
            for j, conv in enumerate(convs):
                first = i == 0 and j == 0
                _set_conv(conv, stride=stride if first else 1, dilation=previous if first else dilation)
            if i == 0 and block.downsample is not None:
                block.downsample[0].stride = (stride, stride)


def _set_mobilenet_output_stride(backbone: nn.Module, output_stride: int) -> None:
    """Give a (torchvision) MobileNetV3 feature stack the ``output_stride`` at its last block.

    torchvision's ``dilated=True`` rule: a stage whose stride 2 is replaced gets stride 1 and a
    doubled dilation in all its depthwise convs, the formerly strided block included.
    """
    stride_here = 2  # after the stem conv
    dilation = 1
    for block in backbone.children():
        if not hasattr(block, "_is_cn"):  # the stem and the last 1×1 conv: nothing to change
            continue
        stride = None
        if block._is_cn:  # the first block of a stage that halves the resolution
            if stride_here < output_stride:
                stride_here, stride = stride_here * 2, 2
            else:
                dilation, stride = dilation * 2, 1
        depthwise = next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
        _set_conv(depthwise, stride=stride, dilation=dilation)


def _set_aspp_rates(head: nn.Module, rates: tuple[int, ...]) -> None:
    # ASPP's dilated branches are convs[1:4]; scaling their rates with the output stride keeps
    # the image-space context they see (the DeepLabV3 paper's rule).
    for branch, rate in zip(head[0].convs[1 : 1 + len(rates)], rates, strict=True):
        _set_conv(branch[0], dilation=rate)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _torchvision_net(arch: str, num_classes: int) -> nn.Module:
    """The torchvision model (dict output), randomly initialised, without auxiliary head."""
    import torchvision.models
    from torchvision.models import segmentation as seg
    from torchvision.models._utils import IntermediateLayerGetter

    if arch in _TORCHVISION_BUILT:
        kwargs = {} if arch.startswith("lraspp") else {"aux_loss": False}
        return getattr(seg, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if arch == "fcn_mobilenet_v3_large":
        # As torchvision's deeplabv3_mobilenet_v3_large, with an FCN head on the last block.
        features = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).features
        last = len(features) - 1
        channels = features[last].out_channels  # 960
        backbone = IntermediateLayerGetter(features, return_layers={str(last): "out"})
    else:
        resnet = getattr(torchvision.models, _backbone_of(arch))(weights=None)
        channels = resnet.fc.in_features  # 512 for ResNet-18/34
        backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    if arch.startswith("deeplabv3_"):
        return seg.deeplabv3.DeepLabV3(backbone, seg.deeplabv3.DeepLabHead(channels, num_classes))
    return seg.fcn.FCN(backbone, seg.fcn.FCNHead(channels, num_classes))


def build_seg_model(
    arch: str,
    num_classes: int,
    *,
    weights: str = "",
    base_dir: Path = Path("."),
    output_stride: int | None = None,
) -> SegLogits:
    """Build a segmentation model returning ``N×num_classes×H×W`` logits for ``N×3×H×W`` inputs.

    ``arch``: one of :data:`SEG_ARCHS`. ``output_stride``: 8, 16 or 32 at the last backbone
    stage; None is torchvision's default (8 for ResNets, 16 for MobileNetV3). ASPP rates scale
    with it (12, 24, 36 at the default). ``weights``: ``""`` (random init; the caller seeds
    torch), a state-dict path (relative to ``base_dir``, see :func:`load_seg_weights`), or
    ``torchvision:DEFAULT`` / ``torchvision:<ENUM_NAME>`` (downloads: the full model for the
    torchvision-built archs, ImageNet backbone weights for the composed ones). No
    FrozenBatchNorm: every layer can be trained and pruned. Raises :class:`ConfigError`.
    """
    check_seg_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes = {num_classes!r}: must be a positive integer")
    default = default_output_stride(arch)
    stride = default if output_stride is None else output_stride
    if stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output_stride = {output_stride!r}: allowed values are 8, 16, 32")
    model = SegLogits(_torchvision_net(arch, num_classes), num_classes)
    if _backbone_of(arch).startswith("resnet"):
        _set_resnet_output_stride(model.backbone, stride)
    else:
        _set_mobilenet_output_stride(model.backbone, stride)
    if arch.startswith("deeplabv3_"):
        _set_aspp_rates(model.classifier, tuple(r * default // stride for r in ASPP_RATES))
    log.info("%s: %d classes, output stride %d", arch, num_classes, stride)
    if weights.startswith(TORCHVISION_WEIGHTS_PREFIX):
        _load_torchvision_seg_weights(model, arch, weights)
    elif weights:
        p = Path(weights).expanduser()
        load_seg_weights(model, p if p.is_absolute() else Path(base_dir) / p, arch=arch)
    return standard_bn_momentum(model, arch)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _fit_seg_state_dict(
    model: SegLogits, sd: Mapping[str, torch.Tensor], *, source: str, arch: str, may_miss: tuple[str, ...] = ()
) -> None:
    """Load ``sd`` strictly, except: ``aux_classifier.*`` keys and head keys of another class
    count are skipped (logged), and keys under ``may_miss`` prefixes may be absent."""
    own = model.state_dict()
    heads = tuple(h + "." for h in seg_head_layers(model))
    aux = [k for k in sd if k.startswith("aux_classifier.")]
    if aux:
        log.info("%s: skipped %d auxiliary-classifier key(s) of %s (training-only head)", arch, len(aux), source)
    sd = {k: v for k, v in sd.items() if k not in aux}
    problems, head_shape = state_dict_mismatch(own, sd, may_miss=may_miss, may_differ=lambda k: k.startswith(heads))
    if problems:
        raise ConfigError(f"weights = '{source}' does not fit {arch}: {describe_mismatch(problems)}; "
                          "is it for another architecture?")
    if head_shape:
        log.warning(
            "%s: %s has a classifier head for another class count; kept random init for %s",
            arch, source, ", ".join(head_shape),
        )
    model.load_state_dict({k: v for k, v in sd.items() if k not in head_shape}, strict=False)


def load_seg_weights(model: SegLogits, path: Path, *, arch: str) -> None:
    """Load a state-dict file (``torch.load(..., weights_only=True)``) into a :func:`build_seg_model` model.

    Keys are torchvision's (``backbone.*``, ``classifier.*``): a state dict saved from this
    model or from a torchvision segmentation model fits (``module.`` / ``_orig_mod.`` prefixes
    of DDP / torch.compile are stripped, ``aux_classifier.*`` skipped). A head for another class
    count keeps its random init (logged); any other mismatch is a :class:`ConfigError`.
    """
    path = Path(path)
    sd = read_state_dict(path)
    _fit_seg_state_dict(model, sd, source=str(path), arch=arch)
    log.info("%s: loaded weights from %s", arch, path)


def _load_torchvision_seg_weights(model: SegLogits, arch: str, spec: str) -> None:
    """``torchvision:<ENUM_NAME>``: the segmentation weights of a torchvision-built arch, or the
    ImageNet backbone of a composed one (downloads; needs a network)."""

    composed = arch not in _TORCHVISION_BUILT
    name = _backbone_of(arch) if composed else arch
    sd, weights = torchvision_state_dict(name, spec)
    if composed:
        # An ImageNet classifier: its feature layers are our backbone's, its classifier (ResNet
        # `fc.*`, MobileNetV3 `classifier.*`) has no counterpart.
        if name.startswith("resnet"):
            sd = {"backbone." + k: v for k, v in sd.items() if not k.startswith("fc.")}
        else:
            sd = {"backbone." + k[len("features.") :]: v for k, v in sd.items() if k.startswith("features.")}
    _fit_seg_state_dict(model, sd, source=str(weights), arch=arch, may_miss=("classifier.",) if composed else ())
    log.info("%s: loaded pretrained %s", arch, weights)
