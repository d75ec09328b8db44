"""The training loss of the YOLACT-on-FCOS model: torchvision's FCOS loss plus YOLACT's mask loss.

Box terms: torchvision's ``FCOS.compute_loss`` on the raw outputs (sigmoid focal loss on the
classes, GIoU on the boxes, BCE on the centre-ness, each over the positive locations), with
its own assignment of locations to objects (centre sampling, per-level size ranges).

Mask term (YOLACT, Bolya et al. 2019): every positive location's mask,
``coefficients · prototypes`` at the prototypes' resolution, against the mask of the object it
was assigned, by binary cross-entropy averaged over the object's box (cells whose centre lies in
it: the mask is cropped to its box at inference too), then over the positives. The target is the
object's mask area-averaged to the prototypes' grid (each cell: the share of it covered), so a
thin part of an object still counts. At most :data:`MAX_MASKS` positives per image are scored
(YOLACT's 100), evenly spread over them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

MAX_MASKS = 100
MASK_WEIGHT = 2.0  # the mask term against the three box terms (each about 1 at the start)


class _Assignments:
    """Stands in for an FCOS head's ``compute_loss``: records torchvision's location → object
    assignment (``matched_idxs``), then computes the head's loss as usual."""

    def __init__(self, head: Any):
        self.head, self.matched = head, None

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        self.matched = matched_idxs
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


def box_losses(detector: Any, targets: list[dict[str, torch.Tensor]], head: dict[str, torch.Tensor],
               anchors: torch.Tensor, level_sizes: list[int]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """torchvision's FCOS losses for raw ``head`` outputs, and the object index each location was
    assigned (-1: background) per image."""
    from torchvision.models.detection import FCOS

    assign = _Assignments(detector.head)
    # FCOS.compute_loss reads only these two attributes of the detector: the assignment is
    # torchvision's own, not a copy of it.
    view = SimpleNamespace(center_sampling_radius=detector.center_sampling_radius, head=assign)
    losses = FCOS.compute_loss(view, targets, head, [anchors] * len(targets), level_sizes)
    return losses, assign.matched


def _box_cells(boxes: torch.Tensor, h: int, w: int, stride: float) -> torch.Tensor:
    """bool P×h×w: the prototype cells whose centre lies inside each box (input pixels)."""
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    in_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])
    in_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def mask_loss(coeffs: torch.Tensor, protos: torch.Tensor, matched: list[torch.Tensor],
              targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """YOLACT's mask loss (see the module docstring) over a batch; 0 (in the graph) without positives."""
    n, k, h, w = protos.shape
    total, count = coeffs.sum() * 0.0, 0
    for i in range(n):
        positive = torch.where(matched[i] >= 0)[0]
        if positive.numel() == 0:
            continue
        if positive.numel() > MAX_MASKS:
            positive = positive[torch.linspace(0, positive.numel() - 1, MAX_MASKS, device=positive.device).long()]
        objects = matched[i][positive]
        gt = targets[i]["masks"].to(protos.device, torch.float32)
        size = gt.shape[-1]
        share = F.adaptive_avg_pool2d(gt[objects], (h, w))  # P×h×w: covered share of each cell
        logits = (coeffs[i, positive].float() @ protos[i].float().reshape(k, h * w)).reshape(-1, h, w)
        bce = F.binary_cross_entropy_with_logits(logits, share, reduction="none")
        cells = _box_cells(targets[i]["boxes"][objects].to(protos.device, torch.float32), h, w, size / w).float()
        total = total + ((bce * cells).sum((1, 2)) / cells.sum((1, 2)).clamp_min(1.0)).sum()
        count += positive.numel()
    return total / max(count, 1)
