"""Masked Generative Distillation (Yang et al., ECCV 2022, arXiv 2205.01529).

MGD does not ask the student to mimic the teacher's feature; it masks part of the student's
feature and asks a small generation block to *generate* the teacher's full feature from what
is left, which forces the student's feature to carry the teacher's information:

1. align: ``S' = Conv1x1(Cs→Ct)(S)`` when ``Cs != Ct``, else ``S' = S``;
2. mask: a random binary ``M`` zeroing a fraction λ (``mask_ratio``) of ``S'``:
   per channel (``N×C×1×1``, classification) or per pixel (``N×1×H×W``, dense tasks);
3. generate: ``G = Conv3x3 → ReLU → Conv3x3`` (teacher width) applied to ``S' ⊙ M``;
4. loss: ``α · Σ (G − T)² / N`` (sum over C, H, W and batch, divided by the batch size).

As in the authors' code (github.com/yzd-v/MGD), the mask is drawn after the align conv, the
convolutions have biases, and the loss is added to the student's own task loss. The align and
generation blocks are training-only: they never become part of the exported student.

This module also holds the feature taps: forward hooks on named layers, with channel counts
and spatial sizes discovered by a dry forward (never typed by the user).
"""

from __future__ import annotations

import difflib
from typing import Literal

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models import head_names
from pipeline.taps import HEAD_NAMES, PROBE_SIZE, Stage, analyse


class MGDLoss(nn.Module):
    """The MGD loss for one pair of feature maps.

    ``forward(student_feat, teacher_feat, mask=None)``: ``mask`` (a 0/1 tensor broadcastable to
    ``N×Ct×H×W``) replaces the random mask, so the value can be checked exactly.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha: float = 7e-5,
        mask_ratio: float = 0.15,
        mask: Literal["channel", "pixel"] = "channel",
        *,
        names: tuple[str, str] = ("student", "teacher"),
        seed: int = 0,
    ):
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask not in ("channel", "pixel"):
            raise ValueError(f"mask must be 'channel' or 'pixel', got {mask!r}")
        self.alpha = alpha
        self.mask_ratio = mask_ratio
        self.mask = mask
        self.names = names  # layer names, for error messages only
        # Only when widths differ: an identity align would add parameters that learn nothing.
        self.align: nn.Conv2d | None = (
            nn.Conv2d(student_channels, teacher_channels, kernel_size=1) if student_channels != teacher_channels else None
        )
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        # The masks come from a generator of their own, not torch's global one: the global stream
        # (data augmentation) then runs the same for the MGD student as for its baseline. Its
        # state is a buffer, so a resume checkpoint (which saves these blocks) restores it too.
        self.register_buffer("mask_rng", torch.Generator().manual_seed(seed).get_state())

    def random_mask(self, n: int, c: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """A 0/1 float mask zeroing each channel (or pixel) with probability ``mask_ratio``."""
        shape = (n, c, 1, 1) if self.mask == "channel" else (n, 1, h, w)  # N×C×1×1 | N×1×H×W
        gen = torch.Generator()
        gen.set_state(self.mask_rng.cpu())  # drawn on the CPU: a mask is small, and this works on any device
        drawn = torch.rand(shape, generator=gen)
        self.mask_rng.copy_(gen.get_state())
        return (drawn >= self.mask_ratio).float().to(device)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha · Σ(G − T)² / N`` for student (N×Cs×H×W) and teacher (N×Ct×H×W) features."""
        if student_feat.dim() != 4 or teacher_feat.dim() != 4:
            raise ValueError(
                f"MGD needs N×C×H×W feature maps: {self.names[0]} gave {tuple(student_feat.shape)}, "
                f"{self.names[1]} gave {tuple(teacher_feat.shape)}"
            )
        if student_feat.shape[-2:] != teacher_feat.shape[-2:] or student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(
                f"MGD feature maps differ in batch or spatial size: student {self.names[0]} "
                f"{tuple(student_feat.shape)} vs teacher {self.names[1]} {tuple(teacher_feat.shape)}; "
                "tap layers with the same H×W"
            )
        if student_feat.shape[1] != self.student_channels or teacher_feat.shape[1] != self.teacher_channels:
            raise ValueError(
                f"MGD built for {self.student_channels}→{self.teacher_channels} channels but got "
                f"{student_feat.shape[1]}→{teacher_feat.shape[1]} ({self.names[0]} → {self.names[1]})"
            )
        n, c, h, w = teacher_feat.shape
        teacher_feat = teacher_feat.detach()  # the teacher is a target, never trained
        aligned = self.align(student_feat) if self.align is not None else student_feat  # N×Ct×H×W
        if mask is None:
            mask = self.random_mask(n, c, h, w, aligned.device)
        masked = aligned * mask.to(aligned.dtype)  # N×Ct×H×W, a fraction λ zeroed
        generated = self.generation(masked)  # N×Ct×H×W
        # Sum of squares over everything / N (the authors' MSELoss(reduction="sum") / N), in
        # float32 so a bf16/fp16 autocast does not lose the small α-scaled value.
        return self.alpha * (generated.float() - teacher_feat.float()).pow(2).sum() / n


class FeatureTap:
    """Capture the outputs of named submodules during a forward pass (forward hooks).

    Hooks work on any ``nn.Module`` (torchvision, timm, DDP-wrapped inner module) without
    tracing, and the captured tensors keep their autograd graph for the student.
    """

    def __init__(self, model: nn.Module, layers: list[str], *, role: str,
                 input_shape: tuple[int, int, int] | None = None):
        modules = dict(model.named_modules())
        self.features: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer in layers:
            if layer not in modules or layer == "":
                raise ConfigError(f"distill.mgd.{role}_layers: {layer!r} is not a layer of the {role}"
                                  f"{_stage_hint(model, layer, input_shape)}")
            self._handles.append(modules[layer].register_forward_hook(self._hook(layer)))
        self.layers = list(layers)

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.features[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def take(self) -> list[torch.Tensor]:
        """The captured features in layer order; clears them for the next forward."""
        missing = [layer for layer in self.layers if layer not in self.features]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the forward pass")
        out = [self.features[layer] for layer in self.layers]
        self.features.clear()
        return out

    def remove(self) -> None:
        """Detach the hooks (the exported student must carry none)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _analyse(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[Stage], Stage | None] | None:
    """The model's feature stages and its last one (one dry forward), or None when it cannot be probed."""
    try:
        return analyse(model, input_shape)
    except Exception:  # noqa: BLE001 - only a hint for an error message; never mask the error itself
        return None


def _stage_hint(model: nn.Module, layer: str, input_shape: tuple[int, int, int] | None) -> str:
    """"; did you mean …? (feature stages: …)": feature stages only, never the classifier."""
    shape = input_shape or (3, PROBE_SIZE, PROBE_SIZE)
    found = _analyse(model, shape)
    if found is None:  # fall back to module names, output heads left out
        heads = tuple(head_names(model))
        names = [n for n, m in model.named_modules()
                 if n and not isinstance(m, nn.Linear) and not n.startswith(heads)
                 and n.split(".")[0] not in HEAD_NAMES]
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        top = ", ".join(n for n, _ in model.named_children() if n not in HEAD_NAMES and not n.startswith(heads))
        return (f"; did you mean {', '.join(close)}?" if close else "") + f" (top-level layers: {top})"
    stages, last = found
    if not stages:
        return " (it has no layer that outputs an N×C×H×W feature map to tap)"
    close = difflib.get_close_matches(layer, [s.name for s in stages], n=3, cutoff=0.5)
    if not close and last is not None:
        close = [last.name]
    default = f"; the last feature stage is {last.name}" if last is not None else ""
    return ((f"; did you mean {', '.join(close)}?" if close else "")
            + f" (feature stages, C×H×W at {shape[1]}×{shape[2]} px: {', '.join(s.describe() for s in stages)}{default})")


def _same_size(model: nn.Module, input_shape: tuple[int, int, int], hw: tuple[int, ...]) -> str:
    """The model's feature stages whose maps are ``hw`` (H, W), for a pairing hint."""
    found = _analyse(model, input_shape)
    names = [s.name for s in found[0] if s.shape[1:] == tuple(hw)] if found else []
    return ", ".join(names) if names else "none"


@torch.no_grad()
def probe_shapes(model: nn.Module, layers: list[str], input_shape: tuple[int, int, int], *, role: str) -> list[tuple[int, ...]]:
    """Shapes (C, H, W) of the named layers' outputs, from a dry forward of one zero image."""
    was_training = model.training
    device = next(model.parameters()).device
    tap = FeatureTap(model, layers, role=role, input_shape=input_shape)
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=device))
        return [tuple(f.shape[1:]) for f in tap.take()]
    finally:
        tap.remove()
        model.train(was_training)


class MGDHead(nn.Module):
    """One :class:`MGDLoss` per (student layer, teacher layer) pair, summed."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: list[str],
        teacher_layers: list[str],
        input_shape: tuple[int, int, int],
        *,
        alpha: float,
        mask_ratio: float,
        mask: str,
        seed: int = 0,
    ):
        super().__init__()
        s_shapes = probe_shapes(student, student_layers, input_shape, role="student")
        t_shapes = probe_shapes(teacher, teacher_layers, input_shape, role="teacher")
        losses = []
        for s_name, t_name, s_shape, t_shape in zip(student_layers, teacher_layers, s_shapes, t_shapes):
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise ConfigError(
                    f"distill.mgd: layers must output C×H×W feature maps; student {s_name} gives {s_shape}, "
                    f"teacher {t_name} gives {t_shape}"
                )
            if s_shape[1:] != t_shape[1:]:
                size = f"{input_shape[1]}×{input_shape[2]} px"
                raise ConfigError(
                    f"distill.mgd: student layer {s_name} outputs {s_shape[1]}×{s_shape[2]} but teacher layer "
                    f"{t_name} outputs {t_shape[1]}×{t_shape[2]} (C×H×W {s_shape} vs {t_shape}) at {size}; "
                    f"pair layers of the same spatial size: student stages at {t_shape[1]}×{t_shape[2]}: "
                    f"{_same_size(student, input_shape, t_shape[1:])}; teacher stages at {s_shape[1]}×{s_shape[2]}: "
                    f"{_same_size(teacher, input_shape, s_shape[1:])} (set them in [distill.mgd] student_layers / "
                    "teacher_layers), or change the stems' strides with teacher.small_input / distill.small_input"
                )
            losses.append(
                MGDLoss(s_shape[0], t_shape[0], alpha=alpha, mask_ratio=mask_ratio, mask=mask, names=(s_name, t_name),
                        seed=seed + len(losses))
            )
        self.losses = nn.ModuleList(losses)
        self.pairs = list(zip(student_layers, teacher_layers))

    def forward(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the per-pair MGD losses."""
        return sum(loss(s, t) for loss, s, t in zip(self.losses, student_feats, teacher_feats))
