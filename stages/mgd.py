"""Masked Generative Distillation (Yang et al., ECCV 2022, arXiv 2205.01529).

MGD does not ask the student to mimic the teacher's feature; it masks part of the student's
feature and asks a small generation block to *generate* the teacher's full feature from what
is left, which forces the student's feature to carry the teacher's information:

1. align: ``S' = Conv1x1(Cs→Ct)(S)`` when ``Cs != Ct``, else ``S' = S``;
2. mask: a random binary ``M`` zeroing a fraction λ (``mask_ratio``) of ``S'``:
   per channel (``N×C×1×1``, classification) or per pixel (``N×1×H×W``, dense tasks);
3. generate: ``G = Conv3x3 → ReLU → Conv3x3`` (teacher width) applied to ``S' ⊙ M``;
4. loss: ``α · Σ (G − T)² / N`` (sum over C, H, W and batch, divided by the batch size).

Taps of different spatial size (a ResNet teacher and a MobileNet student, DeepLabV3 and LRASPP)
are resampled so that they meet (``resample``): by default the student's aligned map is brought
to the teacher's H×W (bilinear when it grows, area-averaged when it shrinks) before the mask
and the generation block, so the block has to generate the teacher's full detail, which is
MGD's point; ``resample = "teacher"`` brings the teacher's map to the student's size instead
(cheaper, and the teacher's detail is averaged away). Sizes that differ by more than
:data:`MAX_RESAMPLE` in a dimension are refused: the two maps then see different things.

Because the loss is a sum over C·H·W, the authors' α fits only their map sizes. ``alpha =
"auto"`` (the tasks' default) follows their advice instead: choose α so that the MGD loss is
about the size of the task loss. :class:`MGDHead` measures both on the first training batch
and sets one α for every tap (so the taps keep the authors' relative weights), recorded per tap.

As in the authors' code (github.com/yzd-v/MGD), the mask is drawn after the align conv, the
convolutions have biases, and the loss is added to the student's own task loss. The align and
generation blocks are training-only: they never become part of the exported student.

This module also holds the feature taps: forward hooks on named layers, with channel counts
and spatial sizes discovered by a dry forward (never typed by the user).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError
from pipeline.taps import HEAD_NAMES, PROBE_SIZE, FeatureStage, analyse, head_names

# The largest factor between a teacher tap's and its student tap's H (or W) that MGD resamples.
MAX_RESAMPLE = 4
RESAMPLE = ("student", "teacher")


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` (N×C×H×W) at ``size``: area-averaged where a side shrinks, bilinear where it grows."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
        resample: Literal["student", "teacher"] = "student",
    ):
        super().__init__()
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be 'student' or 'teacher', got {resample!r}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask not in ("channel", "pixel"):
            raise ValueError(f"mask must be 'channel' or 'pixel', got {mask!r}")
        # A buffer: an α measured on the first batch (alpha = "auto") is restored on resume.
        self.register_buffer("alpha_value", torch.tensor(float(alpha), dtype=torch.float64))
        self.resample = resample
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

    @property
    def alpha(self) -> float:
        """The loss weight α."""
        return float(self.alpha_value)

    @alpha.setter
    def alpha(self, value: float) -> None:
        self.alpha_value.fill_(float(value))

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
        if student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(
                f"MGD feature maps differ in batch size: student {self.names[0]} {tuple(student_feat.shape)} vs "
                f"teacher {self.names[1]} {tuple(teacher_feat.shape)}"
            )
        if student_feat.shape[1] != self.student_channels or teacher_feat.shape[1] != self.teacher_channels:
            raise ValueError(
                f"MGD built for {self.student_channels}→{self.teacher_channels} channels but got "
                f"{student_feat.shape[1]}→{teacher_feat.shape[1]} ({self.names[0]} → {self.names[1]})"
            )
        return self.alpha_value.float() * self.distance(student_feat, teacher_feat, mask)

    def distance(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ(G − T)² / N``: the loss before its weight α (maps resampled to meet, see ``resample``)."""
        teacher_feat = teacher_feat.detach()  # the teacher is a target, never trained
        aligned = self.align(student_feat) if self.align is not None else student_feat  # N×Ct×Hs×Ws
        if self.resample == "student":
            aligned = resize_map(aligned, tuple(teacher_feat.shape[-2:]))  # N×Ct×Ht×Wt
        else:
            teacher_feat = resize_map(teacher_feat, tuple(aligned.shape[-2:]))  # N×Ct×Hs×Ws
        n, c, h, w = teacher_feat.shape
        if mask is None:
            mask = self.random_mask(n, c, h, w, aligned.device)
        masked = aligned * mask.to(aligned.dtype)  # N×Ct×H×W, a fraction λ zeroed
        generated = self.generation(masked)  # N×Ct×H×W
        # Sum of squares over everything / N (the authors' MSELoss(reduction="sum") / N), in
        # float32 so a bf16/fp16 autocast does not lose the small α-scaled value.
        return (generated.float() - teacher_feat.float()).pow(2).sum() / n


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


def _analyse(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[list[FeatureStage], FeatureStage | None] | None:
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


def _stage_list(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """"a 64×8×8, b 128×4×4, …": a model's feature stages with their sizes, for error messages."""
    found = _analyse(model, input_shape)
    return ", ".join(s.describe() for s in found[0]) if found and found[0] else "none found"


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape)


def check_pair_sizes(s_name: str, t_name: str, s_shape: tuple[int, ...], t_shape: tuple[int, ...], *,
                     student: nn.Module, teacher: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """A :class:`ConfigError` that reads as a sentence when two taps cannot be paired: not
    feature maps, or H×W apart by more than :data:`MAX_RESAMPLE`."""
    size = f"{input_shape[1]}×{input_shape[2]} px"
    if len(s_shape) != 3 or len(t_shape) != 3:
        raise ConfigError(
            f"distill.mgd: MGD pairs C×H×W feature maps, but at {size} the student's {s_name} gives {s_shape} and "
            f"the teacher's {t_name} gives {t_shape}; student stages: {_stage_list(student, input_shape)}; "
            f"teacher stages: {_stage_list(teacher, input_shape)}"
        )
    factor = max(max(a, b) / min(a, b) for a, b in zip(s_shape[1:], t_shape[1:]))
    if factor > MAX_RESAMPLE:
        raise ConfigError(
            f"distill.mgd: at {size} the student's {s_name} map ({_dims(s_shape)}) and the teacher's {t_name} map "
            f"({_dims(t_shape)}) differ {factor:g}-fold in size, more than the {MAX_RESAMPLE}-fold MGD resamples; "
            f"pair stages closer in size (student stages, C×H×W: {_stage_list(student, input_shape)}; teacher "
            f"stages: {_stage_list(teacher, input_shape)}) in [distill.mgd] student_layers / teacher_layers, or "
            "change a stem's stride with teacher.small_input / distill.small_input"
        )


class MGDHead(nn.Module):
    """One :class:`MGDLoss` per (student layer, teacher layer) pair, summed.

    ``alpha = "auto"``: every tap's α is unset (NaN) until :meth:`calibrate` measures the first
    batch; ``auto_ratio`` is the MGD loss at that batch as a multiple of the task loss.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_layers: list[str],
        teacher_layers: list[str],
        input_shape: tuple[int, int, int],
        *,
        alpha: float | str,
        mask_ratio: float,
        mask: str,
        seed: int = 0,
        resample: str = "student",
        auto_ratio: float = 1.0,
    ):
        super().__init__()
        if resample not in RESAMPLE:
            raise ConfigError(f"distill.mgd.resample = {resample!r}: allowed student, teacher")
        s_shapes = probe_shapes(student, student_layers, input_shape, role="student")
        t_shapes = probe_shapes(teacher, teacher_layers, input_shape, role="teacher")
        self.auto = alpha == "auto"
        self.auto_ratio = auto_ratio
        losses, self.taps = [], []
        for s_name, t_name, s_shape, t_shape in zip(student_layers, teacher_layers, s_shapes, t_shapes):
            check_pair_sizes(s_name, t_name, s_shape, t_shape, student=student, teacher=teacher, input_shape=input_shape)
            block = MGDLoss(s_shape[0], t_shape[0], alpha=math.nan if self.auto else float(alpha),
                            mask_ratio=mask_ratio, mask=mask, names=(s_name, t_name), seed=seed + len(losses),
                            resample=resample)
            losses.append(block)
            moved = "" if s_shape[1:] == t_shape[1:] else (
                f"student {_dims(s_shape[1:])} → {_dims(t_shape[1:])}" if resample == "student"
                else f"teacher {_dims(t_shape[1:])} → {_dims(s_shape[1:])}")
            self.taps.append({"student": s_name, "teacher": t_name, "student_shape": list(s_shape),
                              "teacher_shape": list(t_shape), "align": block.align is not None,
                              "resample": moved or "none"})
        self.losses = nn.ModuleList(losses)
        self.pairs = list(zip(student_layers, teacher_layers))

    @property
    def pending(self) -> bool:
        """True while ``alpha = "auto"`` has not been measured yet (a resumed head has been)."""
        return self.auto and any(math.isnan(loss.alpha) for loss in self.losses)

    @torch.no_grad()
    def calibrate(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                  task_loss: torch.Tensor) -> float:
        """Set one α for every tap so that the MGD loss of this batch (no mask drawn, so the mask
        stream is untouched) is ``auto_ratio`` × ``task_loss``; averaged over ranks under torchrun."""
        from pipeline import dist

        raw = sum(loss.distance(s, t, mask=torch.ones((), device=s.device))
                  for loss, s, t in zip(self.losses, student_feats, teacher_feats))
        both = dist.mean(torch.stack([raw.detach().float(), task_loss.detach().float()]))
        raw_v, task_v = float(both[0]), float(both[1])
        if not (math.isfinite(raw_v) and math.isfinite(task_v)) or raw_v <= 0 or task_v <= 0:
            raise ValueError(f"alpha = \"auto\" cannot be measured: MGD distance {raw_v:g}, task loss {task_v:g} at "
                             "the first batch; set [distill.mgd] alpha")
        alpha = self.auto_ratio * task_v / raw_v
        for loss in self.losses:
            loss.alpha = alpha
        return alpha

    def describe(self) -> list[dict[str, Any]]:
        """Each tap pair: layers, C×H×W on both sides, align, resampling and the α used."""
        return [{**tap, "alpha": loss.alpha} for tap, loss in zip(self.taps, self.losses)]

    def terms(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The per-pair MGD losses, in pair order."""
        return [loss(s, t) for loss, s, t in zip(self.losses, student_feats, teacher_feats)]

    def forward(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the per-pair MGD losses."""
        return sum(self.terms(student_feats, teacher_feats))
