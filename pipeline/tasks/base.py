"""The task contract: everything the pipeline needs to know about a learning task.

One place per concept: data (datasets and their collate function), the training loss, the
quality metrics (a primary metric that gates, ship choice and the report compare), turning raw
model outputs into predictions, the parity check between two runtimes' raw outputs, which
layers structured pruning must keep, the default MGD/KD settings and the ONNX output names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.config import Config, DataConfig, KDConfig, OptimConfig
    from pipeline.data import DataBundle


class Evaluator(Protocol):
    """Accumulates a task's quality metrics over batches of raw outputs."""

    def update(self, outputs: dict[str, np.ndarray], targets: Any) -> None:
        """Add one batch: raw outputs by name (numpy) and the loader's targets for that batch."""
        ...

    def compute(self) -> dict[str, float]:
        """The metrics over everything seen so far (every value 0..1 for quality metrics)."""
        ...


@dataclass(frozen=True)
class Parity:
    """How two runtimes' raw outputs on the same images compare."""

    max_abs_diff: float  # over every raw output
    agreement: float  # share of predictions that agree (top-1 class, pixel class, ...)
    scale: float  # largest |value| of the reference outputs (float32 rounding grows with it)
    count: int  # images compared


class Task:
    """Base class of a task; subclasses fill in the class attributes and methods."""

    name: ClassVar[str]
    metric: ClassVar[str]  # the primary quality metric (higher is better), e.g. "accuracy"
    metrics: ClassVar[tuple[str, ...]]  # every quality metric recorded, primary first
    history_metric: ClassVar[str]  # short name in training curves: val_<history_metric>
    agreement: ClassVar[str]  # what Parity.agreement counts, for metric names: parity_<agreement>
    output_names: ClassVar[tuple[str, ...]]  # raw outputs of the model, in order (ONNX output names)
    sources: ClassVar[tuple[str, ...]]  # the `[data] source` values this task reads
    mgd_defaults: ClassVar[dict[str, Any]]  # [distill.mgd] alpha / mask_ratio / mask the user left out
    kd_defaults: ClassVar[dict[str, Any]] = {}  # [distill.kd] values the user left out
    # The training recipe for the keys a config leaves out: "optim" (optimizer keys of [teacher]
    # and [distill]: optimizer, lr, momentum, weight_decay, warmup_epochs, grad_clip, ...),
    # "batch_size" ([data]) and "heal_lr" ([prune] lr). Explicit keys win.
    recipe: ClassVar[dict[str, Any]] = {}
    # INT8 builds keep the layers producing the outputs in floating point (detection heads).
    int8_fp32_outputs: ClassVar[bool] = False

    def bind(self, cfg: "Config") -> "Task":
        """This task for one run's config. Tasks whose post-processing depends on the run's models
        (detection decodes with the detector family's anchors at the input size) return a bound
        copy; the others return themselves."""
        return self

    # -- data --------------------------------------------------------------------------------
    def check_data(self, cfg: "DataConfig", base_dir: Path) -> None:
        """Cheap preflight of ``[data]`` (paths, layout); a ConfigError/DataError naming the problem."""
        raise NotImplementedError

    def load_data(self, cfg: "DataConfig", seed: int, base_dir: Path) -> "DataBundle":
        """Train / val / calibration splits (calibration from train, never val)."""
        raise NotImplementedError

    def unlabeled_transform(self, cfg: "DataConfig") -> Any:
        """PIL image → the model input (3×S×S, normalised) for ``[distill] unlabeled`` image
        files: as this task's evaluation images are made."""
        raise NotImplementedError

    # -- models ------------------------------------------------------------------------------
    def check_arch(self, arch: str) -> None:
        """A ConfigError unless ``arch`` is a model this task can build."""
        raise NotImplementedError

    def build_model(self, arch: str, num_classes: int, *, image_size: int, small_input: str = "auto",
                    weights: str = "", base_dir: Path = Path("."), fpn_channels: int = 256) -> "nn.Module":
        """The model, with ``num_classes`` outputs, for ``image_size``² RGB inputs
        (``small_input``: classification stems; ``fpn_channels``: detection necks)."""
        raise NotImplementedError

    def check_pair(self, teacher: str, student: str) -> None:
        """A ConfigError when this teacher and student cannot be distilled together (default: any pair can)."""

    def default_layers(self, arch: str) -> list[str]:
        """The layers MGD taps on `arch` when `[distill.mgd]` names none (its last feature stage)."""
        raise NotImplementedError

    def prune_keep(self, model: "nn.Module") -> list[str]:
        """Names of the layers structured pruning must leave whole (the output heads)."""
        raise NotImplementedError

    # -- training ----------------------------------------------------------------------------
    def named_outputs(self, out: Any) -> dict[str, "torch.Tensor"]:
        """A model's forward result as ``{output name: tensor}`` (names from :attr:`output_names`)."""
        if isinstance(out, dict):
            return dict(out)
        if isinstance(out, (tuple, list)):
            return dict(zip(self.output_names, out))
        return {self.output_names[0]: out}

    def loss(self, out: Any, targets: Any, cfg: "OptimConfig") -> "torch.Tensor":
        """The task's own training loss on a forward result."""
        raise NotImplementedError

    def kd_loss(self, student_out: Any, teacher_out: Any, cfg: "KDConfig") -> "torch.Tensor":
        """The logit-distillation term (``[distill] method = kd`` or ``mgd+kd``)."""
        raise NotImplementedError

    def targets_to(self, targets: Any, device: "torch.device") -> Any:
        """Move a batch of targets to ``device``."""
        return targets.to(device, non_blocking=True)

    def batch_size_of(self, targets: Any) -> int:
        """Images in a batch of targets."""
        return len(targets)

    def train_correct(self, out: Any, targets: Any) -> tuple[int, int] | None:
        """(correct, counted) for a running training metric, or None when the task has none."""
        return None

    # -- evaluation --------------------------------------------------------------------------
    def evaluator(self, num_classes: int) -> Evaluator:
        """A fresh accumulator of :attr:`metrics`."""
        raise NotImplementedError

    def postprocess(self, outputs: dict[str, np.ndarray]) -> Any:
        """Raw outputs (numpy, by name) → predictions (class ids, label maps, boxes)."""
        raise NotImplementedError

    def parity(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Parity:
        """Compare two runtimes' raw outputs on the same images."""
        missing = [n for n in self.output_names if n not in candidate or n not in reference]
        if missing:
            raise ValueError(f"outputs {missing} missing (reference has {sorted(reference)}, "
                             f"candidate has {sorted(candidate)})")
        diff, scale = 0.0, 0.0
        for name in self.output_names:
            r = np.asarray(reference[name], dtype=np.float32)
            c = np.asarray(candidate[name], dtype=np.float32)
            if r.shape != c.shape or r.size == 0:
                raise ValueError(f"output {name!r}: shape {c.shape} vs reference {r.shape}")
            d = float(np.max(np.abs(r - c)))
            diff = d if not d <= diff else diff  # a NaN anywhere must survive: max() would drop it
            scale = max(scale, float(np.nanmax(np.abs(r))))
        agree = self._agreement(self.postprocess(reference), self.postprocess(candidate))
        count = len(next(iter(reference.values())))
        return Parity(max_abs_diff=diff, agreement=agree, scale=scale, count=count)

    def _agreement(self, reference: Any, candidate: Any) -> float:
        """Share of predictions that agree; elementwise equality of prediction arrays by default."""
        return float(np.mean(np.asarray(reference) == np.asarray(candidate)))
