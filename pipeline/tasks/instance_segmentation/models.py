"""Instance segmentation models by name: a YOLACT mask branch on torchvision's FCOS detector,
returning only fixed-shape raw tensors.

Why this design: the deployment rule of this project is raw network outputs at a fixed input
size, with decoding, NMS and mask assembly outside the graph, identical on every runtime. Mask
R-CNN breaks it (RoIAlign and NMS between its two stages, outputs whose shape depends on the
data; its OpenVINO and TensorRT conversions are known to fail). A prototype head keeps it: the
network predicts, at every location, class scores, a box and ``K`` mask coefficients, plus one
set of ``K`` prototype masks per image (YOLACT, Bolya et al. 2019; Ultralytics' segment models
export the same pair). A detection's mask is ``sigmoid(coefficients · prototypes)`` cropped to
its box: a matrix product done after NMS, outside the graph, on the few detections kept.
SOLOv2's per-grid kernels fit the rule too, but its grid cells and matrix NMS would be a second
decoder beside the FCOS one detection already shares; the prototype head reuses it as it is.

Parts (every backbone layer trainable, plain BatchNorm in the backbone and the prototype net):

- backbone + FPN (P3-P7) and the FCOS head: exactly :mod:`pipeline.tasks.common.detectors`'s
  ``fcos_<backbone>_fpn``, so the state-dict keys of those parts are the detector's;
- ``head.mask_coeff``: a 3×3 conv on the FCOS box tower's features (YOLACT puts its
  coefficient branch beside the box branch), ``K`` = :data:`NUM_PROTOS` values per location,
  squashed by ``tanh`` so a prototype can be added or subtracted;
- ``proto``: the prototype net on P3 (stride 8): two 3×3 conv-BN-ReLU, a 2× nearest upsample,
  one more conv-BN-ReLU and a 1×1 conv to ``K`` channels, ReLU'd: ``K`` masks at stride 4.

Outputs, in :data:`OUTPUT_NAMES` order: ``cls_logits`` N×A×C, ``bbox_regression`` N×A×4,
``bbox_ctrness`` N×A×1 (FCOS's, A = every location of P3-P7), ``mask_coeffs`` N×A×K and
``protos`` N×K×S/4×S/4.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.tasks.common.box_decode import OUTPUT_NAMES as BOX_OUTPUTS
from pipeline.tasks.common.detectors import FPN_LEVELS, DetRaw, check_size_and_classes, torchvision_net, with_weights

log = logging.getLogger(__name__)

FAMILY = "yolact"
_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
INST_ARCHS: tuple[str, ...] = tuple(f"{FAMILY}_{b}_fpn" for b in _BACKBONES)
NUM_PROTOS = 32  # YOLACT's and Ultralytics' prototype count
PROTO_STRIDE = 4  # the prototypes' resolution: 1/4 of the input side
OUTPUT_NAMES: tuple[str, ...] = (*BOX_OUTPUTS["fcos"], "mask_coeffs", "protos")
# MGD taps: the first four FPN levels, as the authors' SOLO / Mask R-CNN configs (neck levels 0-3).
MGD_LEVELS = FPN_LEVELS[:4]


def check_inst_arch(arch: str) -> None:
    """Raise :class:`ConfigError` unless ``arch`` is one of :data:`INST_ARCHS` (with suggestions)."""
    if arch in INST_ARCHS:
        return
    close = difflib.get_close_matches(str(arch).lower(), INST_ARCHS, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"arch = {arch!r}: unknown instance segmentation architecture; {hint}"
                      f"allowed: {', '.join(INST_ARCHS)}")


def detector_arch(arch: str) -> str:
    """The torchvision-family detector an instance model is built on (``fcos_resnet18_fpn``)."""
    check_inst_arch(arch)
    return "fcos_" + arch.removeprefix(FAMILY + "_")


class ProtoNet(nn.Module):
    """P3 (stride 8, ``channels`` wide) → ``num_protos`` prototype masks at stride 4 (ReLU'd)."""

    def __init__(self, channels: int, num_protos: int = NUM_PROTOS):
        super().__init__()
        from torchvision.ops.misc import Conv2dNormActivation

        self.convs = nn.Sequential(Conv2dNormActivation(channels, channels, 3),
                                   Conv2dNormActivation(channels, channels, 3))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.refine = Conv2dNormActivation(channels, channels, 3)
        self.out = nn.Conv2d(channels, num_protos, 1)

    def forward(self, p3: torch.Tensor) -> torch.Tensor:
        return F.relu(self.out(self.refine(self.upsample(self.convs(p3)))))


def _per_location(t: torch.Tensor) -> torch.Tensor:
    """N×K×H×W → N×(H·W)×K, torchvision's FCOS order (one anchor point per location)."""
    n, k = t.shape[:2]
    return t.permute(0, 2, 3, 1).reshape(n, -1, k)


class InstRaw(DetRaw):
    """An FCOS :class:`DetRaw` with a YOLACT mask branch (see the module docstring).

    Attributes as :class:`DetRaw` (anchors, level sizes, ``feature_layers`` = the FPN taps),
    plus ``num_protos``; ``arch`` is the instance model's name, ``detector`` the FCOS arch it is
    built on; ``head_layers`` adds the coefficient conv and the prototype net's last conv.
    """

    def __init__(self, arch: str, net: nn.Module, *, num_classes: int, image_size: int, num_protos: int = NUM_PROTOS):
        super().__init__(detector_arch(arch), net, num_classes=num_classes, image_size=image_size, levels=FPN_LEVELS)
        self.detector, self.arch = self.arch, arch
        channels = self.head.regression_head.bbox_reg.in_channels
        self.num_protos = num_protos
        # Registered inside the head: `init_student`'s "head." copies it with the box head.
        self.head.mask_coeff = nn.Conv2d(channels, num_protos, kernel_size=3, padding=1)
        nn.init.normal_(self.head.mask_coeff.weight, std=0.01)
        nn.init.zeros_(self.head.mask_coeff.bias)
        self.proto = ProtoNet(channels, num_protos)
        self.output_names = OUTPUT_NAMES
        self.head_layers = (*self.head_layers, "head.mask_coeff", "proto.out")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self._features(x)
        cls_logits = self.head.classification_head(features)
        tower = self.head.regression_head
        boxes, ctrness, coeffs = [], [], []
        for f in features:  # torchvision's FCOSRegressionHead, plus the coefficients on its tower
            t = tower.conv(f)
            boxes.append(_per_location(F.relu(tower.bbox_reg(t))))
            ctrness.append(_per_location(tower.bbox_ctrness(t)))
            coeffs.append(_per_location(torch.tanh(self.head.mask_coeff(t))))
        return (cls_logits, torch.cat(boxes, 1), torch.cat(ctrness, 1), torch.cat(coeffs, 1),
                self.proto(features[0]))


def build_inst_model(arch: str, num_classes: int, *, image_size: int, weights: str = "", base_dir: Path = Path("."),
                     fpn_channels: int = 256) -> InstRaw:
    """Build an instance segmentation model returning raw outputs for ``N×3×S×S`` inputs.

    ``arch``: one of :data:`INST_ARCHS`. ``image_size``: a multiple of 32. ``fpn_channels``: the
    FPN, head and prototype-net width. ``weights``: ``""`` (random init; the caller seeds
    torch), a state-dict path (relative to ``base_dir``; this model's own keys), or
    ``torchvision:DEFAULT`` / ``torchvision:<ENUM_NAME>`` (the ImageNet backbone; downloads).
    Raises :class:`ConfigError`.
    """
    det = detector_arch(arch)
    check_size_and_classes(num_classes, image_size, "instance segmentation")
    model = InstRaw(arch, torchvision_net(det, num_classes, image_size, fpn_channels), num_classes=num_classes,
                    image_size=image_size)
    log.info("%s: %d classes at %d px, %d locations, %d prototypes at %d px", arch, num_classes, image_size,
             len(model.anchors), model.num_protos, image_size // PROTO_STRIDE)
    return with_weights(model, arch, weights, base_dir)
