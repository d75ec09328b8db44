"""Object detection models by torchvision name (RetinaNet, FCOS on ResNet/MobileNetV3 FPNs, and
SSDlite), each returning its RAW head outputs at one fixed input size.

Exporters and runtimes handle torchvision's data-dependent resize/pad transform and its in-graph
TopK/NMS badly (pytorch/vision#4395, NVIDIA/TensorRT#2721), so a :class:`DetRaw` stops at the
head: it takes an already normalised ``N×3×S×S`` tensor and returns a tuple of raw tensors
flattened over levels in torchvision's anchor order (level, row, column, anchor). Box decoding
and NMS run outside the graph, in :func:`pipeline.tasks.common.box_decode.decode`, identically for every runtime.

Built by torchvision itself: ``retinanet_resnet50_fpn``, ``fcos_resnet50_fpn`` and
``ssdlite320_mobilenet_v3_large``. Composed here from torchvision's own parts (its extractors
``_resnet_fpn_extractor`` / ``_mobilenet_extractor``, ``LastLevelP6P7``, ``RetinaNet``/``FCOS``
heads): the ResNet-18/34 and MobileNetV3-Large FPN variants. Every FPN has the five levels P3-P7
of torchvision's RetinaNet/FCOS (C3-C5 laterals, P6/P7 from ``LastLevelP6P7`` on P5), so the
teacher and student archs of one family have the same levels for MGD. On MobileNetV3-Large the
laterals are torchvision's stage taps at strides 8, 16 and 32 (``returned_layers=[2, 3, 5]``).
Every backbone layer is trainable and every norm is a plain ``nn.BatchNorm2d`` (torchvision
freezes them for pretrained backbones): Torch-Pruning can then prune the backbone.

Anchors, for the fixed input side ``S`` (a multiple of 32):

- RetinaNet: the 3 sizes per level (torchvision's octave scales) of all five levels form one
  geometric sequence from ``max(8, S/25)`` px to ``S`` px, aspect ratios 0.5, 1, 2. At 800 px
  this is torchvision's 32...812 px; at 64 px, 8...64 px, so ~10 px objects still meet an anchor.
- SSDlite: torchvision's ``DefaultBoxGenerator`` (aspect ratios 2, 3; scales relative to ``S``)
  with ``min_ratio = max(8, S/25) / S`` instead of torchvision's 0.2 (64 px at 320, too coarse
  for small objects at 64-128 px), ``max_ratio`` 0.95 as torchvision.
- FCOS: torchvision's rule, one anchor point per location of size 8, 16, ... 128 (the level's
  nominal stride): FCOS's centre sampling (1.5 × size) and per-level regression ranges
  ([4, 8] × size) are defined relative to it, so it is not scaled with ``S``.

State-dict keys are torchvision's detector keys: the wrapper's ``backbone`` and ``head`` are the
detector's own modules (``backbone.body.*``, ``backbone.fpn.*``, ``head.*``), the feature taps and
anchor generator hold no state. A torchvision detector's state dict therefore loads as is.
"""

from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.tasks.common.box_decode import OUTPUT_NAMES, POSTPROCESS
from pipeline.tasks.common.weights import (
    TORCHVISION_WEIGHTS_PREFIX,
    read_state_dict,
    standard_bn_momentum,
    describe_mismatch,
    state_dict_mismatch,
    torchvision_state_dict,
)

log = logging.getLogger(__name__)

_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
DET_ARCHS: tuple[str, ...] = (
    *(f"fcos_{b}_fpn" for b in _BACKBONES),
    *(f"retinanet_{b}_fpn" for b in _BACKBONES),
    "ssdlite320_mobilenet_v3_large",
)
# Built by torchvision's own builders (and shipped with COCO weights); the others are composed.
_TORCHVISION_BUILT = ("retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large")
MIN_ANCHOR_PX = 8  # the smallest anchor side at small inputs (covers ~6-11 px objects at IoU 0.5)
FPN_LEVELS = ("p3", "p4", "p5", "p6", "p7")
SSD_LEVELS = ("p4", "p5", "p6", "p7", "p8", "p9")  # SSDlite: C4 expansion, C5, four extra blocks
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_det_arch(arch: str) -> None:
    """Raise :class:`ConfigError` unless ``arch`` is one of :data:`DET_ARCHS` (with suggestions)."""
    if arch in DET_ARCHS:
        return
    close = difflib.get_close_matches(str(arch).lower(), DET_ARCHS, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"arch = {arch!r}: unknown detection architecture; {hint}allowed: {', '.join(DET_ARCHS)}")


def det_arch_kind(arch: str) -> str:
    """The decoder family of ``arch``: ``"retinanet"``, ``"fcos"`` or ``"ssd"``."""
    check_det_arch(arch)
    return "ssd" if arch.startswith("ssdlite") else arch.split("_", 1)[0]


def _backbone_of(arch: str) -> str:
    return "mobilenet_v3_large" if arch.startswith("ssdlite") else arch.split("_", 1)[1].removesuffix("_fpn")


def anchor_size_range(image_size: int) -> tuple[float, float]:
    """(smallest, largest) anchor side in px for RetinaNet and SSDlite: ``(max(8, S/25), S)``."""
    return max(float(MIN_ANCHOR_PX), image_size / 25), float(image_size)


def retinanet_anchor_sizes(image_size: int, num_levels: int = 5) -> tuple[tuple[float, ...], ...]:
    """RetinaNet's anchor sides per level: 3 per level, one geometric sequence over all levels
    from ``max(8, S/25)`` to ``S`` (torchvision's 32·2^(k/3) at 800 px, to within 2 %)."""
    lo, hi = anchor_size_range(image_size)
    n = 3 * num_levels
    sizes = [lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]
    return tuple(tuple(sizes[3 * i : 3 * i + 3]) for i in range(num_levels))


class PyramidLevel(nn.Identity):
    """Passes one pyramid level through unchanged, so forward hooks (MGD) see that level alone:
    torchvision's FPN returns all levels at once as a dict."""


# --------------------------------------------------------------------------------------------
# The model: raw head outputs
# --------------------------------------------------------------------------------------------


class DetRaw(nn.Module):
    """A torchvision detector's backbone (+FPN) and head, returning raw outputs at a fixed size.

    ``forward(x)`` takes a normalised ``N×3×S×S`` tensor (no resize, no padding: the caller
    normalises with :attr:`image_mean` / :attr:`image_std`) and returns the tuple named by
    :attr:`output_names`, flattened over levels in a fixed anchor order:

    - RetinaNet: ``cls_logits`` N×A×C (sigmoid), ``bbox_regression`` N×A×4 (BoxCoder weights 1).
    - FCOS: ``cls_logits`` N×A×C, ``bbox_regression`` N×A×4 (ReLU'd l, t, r, b over anchor size),
      ``bbox_ctrness`` N×A×1.
    - SSD: ``cls_logits`` N×A×(C+1) (softmax; column 0 is background), ``bbox_regression`` N×A×4
      (BoxCoder weights 10, 10, 5, 5).

    Attributes: ``arch``, ``arch_kind``, ``num_classes`` (C, without SSD's background),
    ``image_size`` (S), ``anchors`` (A×4 xyxy float32 numpy, for S), ``level_sizes`` (anchors per
    level, summing to A), ``feature_layers`` (one identity tap per pyramid level, ``fpn_taps.p3``
    ...), ``head_layers`` (the final class/box convs, which pruning must keep), ``image_mean`` /
    ``image_std`` (torchvision's input normalisation for this arch).

    Training mode returns the same tuple; torchvision's losses for it come from
    :func:`pipeline.tasks.common.box_decode.torchvision_detector` (``compute_loss``), fed these raw outputs.
    """

    def __init__(self, arch: str, net: nn.Module, *, num_classes: int, image_size: int, levels: tuple[str, ...]):
        super().__init__()
        self.backbone = net.backbone
        self.fpn_taps = nn.ModuleDict({name: PyramidLevel() for name in levels})
        self.head = net.head
        # Kept (it holds no state) so torchvision's losses and reference postprocess can be rebuilt.
        self.anchor_generator = net.anchor_generator
        self.arch, self.arch_kind = arch, det_arch_kind(arch)
        self.num_classes, self.image_size = num_classes, image_size
        self.output_names: tuple[str, ...] = OUTPUT_NAMES[self.arch_kind]
        self.feature_layers: tuple[str, ...] = tuple(f"fpn_taps.{name}" for name in levels)
        self.head_layers: tuple[str, ...] = _head_layers(self.head, self.arch_kind)
        ssd = self.arch_kind == "ssd"
        self.image_mean = (0.5, 0.5, 0.5) if ssd else _IMAGENET_MEAN
        self.image_std = (0.5, 0.5, 0.5) if ssd else _IMAGENET_STD
        self.anchors, self.level_sizes = self._make_anchors()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(x)
        return [tap(f) for tap, f in zip(self.fpn_taps.values(), features.values(), strict=True)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.head(self._features(x))
        return tuple(out[name] for name in self.output_names)

    @torch.no_grad()
    def _make_anchors(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """Anchors at the fixed size, once: torchvision's generators only read the feature shapes."""
        from torchvision.models.detection.image_list import ImageList

        s = self.image_size
        was_training = self.training
        self.eval()  # a dummy batch must not touch the BatchNorm running statistics
        try:
            features = self._features(torch.zeros(1, 3, s, s))
        finally:
            self.train(was_training)
        anchors = self.anchor_generator(ImageList(torch.zeros(1, 3, s, s), [(s, s)]), features)[0]
        per_location = self.anchor_generator.num_anchors_per_location()
        level_sizes = tuple(f.shape[-2] * f.shape[-1] * k for f, k in zip(features, per_location, strict=True))
        array = anchors.to(torch.float32).numpy().copy()
        array.flags.writeable = False
        return array, level_sizes


def _head_layers(head: nn.Module, kind: str) -> tuple[str, ...]:
    if kind == "ssd":
        n = len(head.classification_head.module_list)
        return tuple(f"head.{part}.module_list.{i}.1" for part in ("classification_head", "regression_head")
                     for i in range(n))
    extra = ("head.regression_head.bbox_ctrness",) if kind == "fcos" else ()
    return ("head.classification_head.cls_logits", "head.regression_head.bbox_reg", *extra)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def torchvision_net(arch: str, num_classes: int, image_size: int, fpn_channels: int = 256) -> nn.Module:
    """The torchvision detector (randomly initialised, plain BatchNorm, nothing frozen)."""
    import torchvision.models
    from torchvision.models import detection as det
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    kind = det_arch_kind(arch)
    if kind == "ssd":
        # The builder's other kwargs also reach mobilenet_v3_large, so only the anchors are replaced.
        net = det.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1)
        lo, _ = anchor_size_range(image_size)
        net.anchor_generator = DefaultBoxGenerator([[2, 3]] * 6, min_ratio=lo / image_size, max_ratio=0.95)
        return net
    kwargs = {}
    if kind == "retinanet":
        sizes = retinanet_anchor_sizes(image_size)
        kwargs["anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    if arch in _TORCHVISION_BUILT and fpn_channels == 256:  # untrained: every layer trainable, plain BN
        return getattr(det, arch)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    name = _backbone_of(arch)
    classifier = getattr(torchvision.models, name)(weights=None)  # nn.BatchNorm2d by default
    c = fpn_channels
    extra = LastLevelP6P7(c, c)  # P6 from P5, as torchvision's RetinaNet and FCOS
    # torchvision's _resnet_fpn_extractor / _mobilenet_extractor (every layer trainable), at the
    # FPN width asked for (theirs is fixed at 256).
    if name.startswith("resnet"):
        stage = classifier.inplanes // 8  # C2's width: 64 (BasicBlock) or 256 (Bottleneck)
        backbone = BackboneWithFPN(classifier, {"layer2": "0", "layer3": "1", "layer4": "2"},
                                   [stage * 2, stage * 4, stage * 8], c, extra_blocks=extra)
    else:
        features = classifier.features
        stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
        picked = [stages[k] for k in (2, 3, 5)]  # strides 8, 16, 32
        backbone = BackboneWithFPN(features, {str(i): str(v) for v, i in enumerate(picked)},
                                   [features[i].out_channels for i in picked], c, extra_blocks=extra)
    cls = det.RetinaNet if kind == "retinanet" else det.FCOS
    return cls(backbone, num_classes, **kwargs)


def build_det_model(
    arch: str, num_classes: int, *, image_size: int, weights: str = "", base_dir: Path = Path("."),
    fpn_channels: int = 256,
) -> DetRaw:
    """Build a detector returning raw head outputs for ``N×3×image_size×image_size`` inputs.

    ``arch``: one of :data:`DET_ARCHS`. ``num_classes``: object classes (SSD adds background).
    ``image_size``: the fixed input side, a multiple of 32; anchors are computed for it (see the
    module docstring). ``fpn_channels``: the FPN and head width (torchvision's 256; not SSDlite,
    which has no FPN). ``weights``: ``""`` (random init; the caller seeds torch), a state-dict path
    (relative to ``base_dir``, see :func:`load_det_weights`), or ``torchvision:DEFAULT`` /
    ``torchvision:<ENUM_NAME>`` (downloads: COCO detector weights for the torchvision-built
    archs, ImageNet backbone weights for the composed ones). Raises :class:`ConfigError`.
    """
    check_det_arch(arch)
    check_size_and_classes(num_classes, image_size, "detection")
    if arch.startswith("ssdlite") and fpn_channels != 256:
        raise ConfigError(f"fpn_channels = {fpn_channels}: {arch} has no FPN; leave it at 256")
    model = DetRaw(arch, torchvision_net(arch, num_classes, image_size, fpn_channels), num_classes=num_classes,
                   image_size=image_size, levels=SSD_LEVELS if arch.startswith("ssdlite") else FPN_LEVELS)
    log.info("%s: %d classes at %d px, %d anchors", arch, num_classes, image_size, len(model.anchors))
    return with_weights(model, arch, weights, base_dir)


def check_size_and_classes(num_classes: int, image_size: int, task: str) -> None:
    """A ConfigError unless ``num_classes`` is a positive integer and ``image_size`` a multiple of 32
    (every level's stride stays exact; torchvision's transform pads to them too)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes = {num_classes!r}: must be a positive integer")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % 32:
        raise ConfigError(f"image_size = {image_size!r}: {task} needs a multiple of 32 (32, 64, 96, 128, ...)")


def with_weights(model: nn.Module, arch: str, weights: str, base_dir: Path) -> nn.Module:
    """``model`` with ``weights`` loaded (a torchvision name or a checkpoint file, relative to
    ``base_dir``) and BatchNorm momenta as the family trains them."""
    if weights.startswith(TORCHVISION_WEIGHTS_PREFIX):
        load_torchvision_det_weights(model, weights)
    elif weights:
        p = Path(weights).expanduser()
        load_det_weights(model, p if p.is_absolute() else Path(base_dir) / p)
    return standard_bn_momentum(model, arch)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _fit_det_state_dict(
    model: DetRaw, sd: Mapping[str, torch.Tensor], *, source: str, may_miss: tuple[str, ...] = ()
) -> None:
    """Load ``sd`` strictly, except: class-logit keys of another class count are skipped (logged),
    ``num_batches_tracked`` may be absent (FrozenBatchNorm checkpoints) and so may keys under
    ``may_miss`` prefixes."""
    own = model.state_dict()
    sd = dict(sd)
    if model.arch_kind == "retinanet":
        from torchvision.models.detection.retinanet import _v1_to_v2_weights

        # torchvision's COCO RetinaNet checkpoint predates its head's Conv2dNormActivation layout.
        for prefix in ("head.classification_head.", "head.regression_head."):
            _v1_to_v2_weights(sd, prefix)
    class_heads = tuple(h + "." for h in model.head_layers if ".classification_head." in h)
    # FrozenBatchNorm checkpoints have no num_batches_tracked: it may be absent.
    own_checked = {k: v for k, v in own.items() if k in sd or not k.endswith(".num_batches_tracked")}
    problems, head_shape = state_dict_mismatch(own_checked, sd, may_miss=may_miss,
                                               may_differ=lambda k: k.startswith(class_heads))
    if problems:
        raise ConfigError(f"weights = '{source}' does not fit {model.arch}: {describe_mismatch(problems)}; "
                          "is it for another architecture?")
    if head_shape:
        log.warning("%s: %s has a class head for another class count; kept random init for %s",
                    model.arch, source, ", ".join(head_shape))
    model.load_state_dict({k: v for k, v in sd.items() if k not in head_shape}, strict=False)


def load_det_weights(model: DetRaw, path: Path) -> None:
    """Load a state-dict file (``torch.load(..., weights_only=True)``) into a :func:`build_det_model` model.

    Keys are torchvision's detector keys (``backbone.*``, ``head.*``): a state dict saved from
    this model or from the torchvision detector fits (``module.`` / ``_orig_mod.`` prefixes of
    DDP / torch.compile are stripped). A class head for another class count keeps its random
    init (logged); any other mismatch is a one-line :class:`ConfigError`.
    """
    path = Path(path)
    sd = read_state_dict(path)
    _fit_det_state_dict(model, sd, source=str(path))
    log.info("%s: loaded weights from %s", model.arch, path)


def load_torchvision_det_weights(model: DetRaw, spec: str) -> None:
    """``torchvision:<ENUM_NAME>``: the COCO weights of a torchvision-built arch, or the ImageNet
    backbone of a composed one (downloads; needs a network)."""

    composed = model.arch not in _TORCHVISION_BUILT
    name = _backbone_of(model.arch) if composed else model.arch
    sd, weights = torchvision_state_dict(name, spec)
    if composed:
        # An ImageNet classifier: its feature layers are the FPN's body, its classifier (ResNet
        # `fc.*`, MobileNetV3 `classifier.*`) has no counterpart; FPN and head stay random.
        if name.startswith("resnet"):
            sd = {"backbone.body." + k: v for k, v in sd.items() if not k.startswith("fc.")}
        else:
            sd = {"backbone.body." + k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    # torchvision's COCO RetinaNet ran FrozenBatchNorm with eps 0 (its `overwrite_eps`); plain
    # BatchNorm keeps its eps: the difference is negligible against trained running variances.
    # A composed model keeps random weights everywhere outside the backbone's body (the FPN, the
    # heads and whatever a subclass adds, such as a mask branch).
    rest = tuple(sorted({k.split(".", 1)[0] + "." for k in model.state_dict()} - {"backbone."})) + ("backbone.fpn.",)
    _fit_det_state_dict(model, sd, source=str(weights), may_miss=rest if composed else ())
    log.info("%s: loaded pretrained %s", model.arch, weights)


@lru_cache(maxsize=8)
def stand_in(kind: str, image_size: int, num_classes: int) -> tuple[DetRaw, nn.Module]:
    """A small model of the family at this size, and torchvision's detector around it: the
    family's anchors and level sizes (for decoding) and torchvision's losses (for training).

    The anchors depend only on the family and the input size (every backbone of a family has the
    same pyramid levels), and the losses use no weights, so a narrow ResNet-18 stands in for any.
    """
    from pipeline.tasks.common.box_decode import torchvision_detector

    arch = {"retinanet": "retinanet_resnet18_fpn", "fcos": "fcos_resnet18_fpn",
            "ssd": "ssdlite320_mobilenet_v3_large"}[kind]
    with torch.random.fork_rng():  # building must not shift the run's random stream
        model = build_det_model(arch, num_classes, image_size=image_size,
                                fpn_channels=256 if kind == "ssd" else 32)  # FCOS: GroupNorm(32)
    return model, torchvision_detector(model, **POSTPROCESS)
