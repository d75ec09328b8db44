"""The task contract: everything the pipeline needs to know about a learning task.

A task *declares* what the core would otherwise list (its name, data sources and the ``[data]``
keys each needs, its quality metrics with units, directions and labels, the config keys only it
accepts, its training recipe, MGD/KD defaults and default teacher/student pair) and *implements*
data loading, models, the training loss, evaluation and post-processing. Methods marked
*optional* have a default here; the others are abstract: a task class that leaves one out
cannot be instantiated.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.data import DataBundle
    from pipeline.schema import Config, DataConfig, KDConfig, OptimConfig

# The unit of a metric that is a share of the evaluation images (top-1 accuracy): one image is
# 1/N of it, its resolution. Metrics that pool pixels or boxes are a plain "fraction".
PER_IMAGE_FRACTION = "fraction of images"


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


@dataclass(frozen=True)
class Metric:
    """A quality metric a task records: a fraction 0..1 (or a unit of its own) and how to show it."""

    name: str  # the key in the manifest's metrics, e.g. "miou"
    label: str  # its display name, e.g. "mIoU"
    unit: str = "fraction"
    better: str = "higher"
    axis: str = ""  # a plot axis label where it says more than `label` ("top-1 accuracy")

    @property
    def axis_label(self) -> str:
        """What a plot axis showing this metric says."""
        return self.axis or self.label


@dataclass(frozen=True)
class Source:
    """A ``[data] source`` value a task reads, and the ``[data]`` keys it needs set."""

    name: str
    needs: dict[str, str] = field(default_factory=dict)  # key → what it must hold (the error's hint)
    about: str = ""  # one line for the docs


class Task(ABC):
    """Base class of a task; subclasses fill in the declarations and the abstract methods."""

    # -- declarations ------------------------------------------------------------------------
    name: ClassVar[str]  # the `[pipeline] task` value
    quality: ClassVar[tuple[Metric, ...]]  # every quality metric recorded, the primary one first
    history_metric: ClassVar[str]  # short name in training curves: val_<history_metric>
    agreement: ClassVar[str]  # what Parity.agreement counts, for metric names: parity_<agreement>
    output_names: ClassVar[tuple[str, ...]]  # raw outputs of the model, in order (ONNX output names)
    sources: ClassVar[tuple[Source, ...]]  # the `[data] source` values this task reads; the first is the default
    default_pair: ClassVar[tuple[str, str]]  # (teacher.arch, distill.student) when the config leaves them out
    mgd_defaults: ClassVar[dict[str, Any]]  # [distill.mgd] alpha / mask_ratio / mask the user left out
    kd_defaults: ClassVar[dict[str, Any]] = {}  # [distill.kd] values the user left out
    # The training recipe for the keys a config leaves out: "optim" (optimizer keys of [teacher]
    # and [distill]: optimizer, lr, momentum, weight_decay, warmup_epochs, grad_clip, ...),
    # "batch_size" ([data]) and "heal_lr" ([prune] lr). Explicit keys win.
    recipe: ClassVar[dict[str, Any]] = {}
    # Keys of [teacher] / [distill] that this task's build_model takes (and a pruned artifact
    # records); another task's keys are refused when set to anything but their default.
    model_options: ClassVar[tuple[str, ...]] = ()
    # Teacher parameter-name prefixes that `[distill] init_student` copies into the distilled
    # student; empty: the task has no init_student.
    init_student_prefixes: ClassVar[tuple[str, ...]] = ()
    # `[distill] init_student` when the config leaves it out (only with init_student_prefixes).
    init_student_default: ClassVar[bool] = False
    # `[gates]` keys this task accepts as another spelling of a generic one (alias → key).
    gate_aliases: ClassVar[dict[str, str]] = {}
    # INT8 builds keep the layers producing the outputs in floating point (detection heads).
    int8_fp32_outputs: ClassVar[bool] = False

    @property
    def metric(self) -> str:
        """The primary quality metric (gated, plotted, compared with the teacher)."""
        return self.quality[0].name

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every quality metric's name, the primary one first."""
        return tuple(m.name for m in self.quality)

    def options_of(self, table: Any) -> dict[str, Any]:
        """The :attr:`model_options` as a `[teacher]` or `[distill]` table sets them."""
        return {k: getattr(table, k) for k in self.model_options}

    def source(self, name: str) -> Source | None:
        """The declared source called ``name``, or None."""
        return next((s for s in self.sources if s.name == name), None)

    # -- optional hooks ----------------------------------------------------------------------
    def bind(self, cfg: "Config") -> "Task":
        """Optional: this task for one run's config. A task whose post-processing depends on the
        run's models (decoding with a detector family's anchors at the input size) returns a
        bound copy; by default the task itself."""
        return self

    def check_config(self, cfg: "Config") -> None:
        """Optional: the task's own checks of a loaded config (a ConfigError naming the key);
        by default none."""

    # -- data --------------------------------------------------------------------------------
    @abstractmethod
    def check_data(self, cfg: "DataConfig", base_dir: Path) -> None:
        """Cheap preflight of ``[data]`` (paths, layout); a ConfigError/DataError naming the problem."""
        raise NotImplementedError

    @abstractmethod
    def load_data(self, cfg: "DataConfig", seed: int, base_dir: Path) -> "DataBundle":
        """Train / val / calibration splits (calibration from train, never val)."""
        raise NotImplementedError

    @abstractmethod
    def unlabeled_transform(self, cfg: "DataConfig") -> Any:
        """PIL image → the model input (3×S×S, normalised) for ``[distill] unlabeled`` image
        files: as this task's evaluation images are made."""
        raise NotImplementedError

    # -- models ------------------------------------------------------------------------------
    @abstractmethod
    def check_arch(self, arch: str) -> None:
        """A ConfigError unless ``arch`` is a model this task can build."""
        raise NotImplementedError

    @abstractmethod
    def build_model(self, arch: str, num_classes: int, *, image_size: int, weights: str = "",
                    base_dir: Path = Path("."), **options: Any) -> "nn.Module":
        """The model, with ``num_classes`` outputs, for ``image_size``² RGB inputs; ``options``:
        the run's values of :attr:`model_options` (a task's defaults where they are left out)."""
        raise NotImplementedError

    def check_pair(self, teacher: str, student: str) -> None:
        """Optional: a ConfigError when this teacher and student cannot be distilled together
        (by default any pair can)."""

    @abstractmethod
    def default_layers(self, arch: str) -> list[str]:
        """The layers MGD taps on `arch` when `[distill.mgd]` names none (its last feature stage)."""
        raise NotImplementedError

    @abstractmethod
    def prune_keep(self, model: "nn.Module") -> list[str]:
        """Names of the layers structured pruning must leave whole (the output heads)."""
        raise NotImplementedError

    # -- training ----------------------------------------------------------------------------
    def named_outputs(self, out: Any) -> dict[str, "torch.Tensor"]:
        """Optional: a model's forward result as ``{output name: tensor}`` (names from :attr:`output_names`)."""
        if isinstance(out, dict):
            return dict(out)
        if isinstance(out, (tuple, list)):
            return dict(zip(self.output_names, out))
        return {self.output_names[0]: out}

    @abstractmethod
    def loss(self, out: Any, targets: Any, cfg: "OptimConfig") -> "torch.Tensor":
        """The task's own training loss on a forward result."""
        raise NotImplementedError

    @abstractmethod
    def kd_loss(self, student_out: Any, teacher_out: Any, cfg: "KDConfig") -> "torch.Tensor":
        """The logit-distillation term (``[distill] method = kd`` or ``mgd+kd``)."""
        raise NotImplementedError

    def targets_to(self, targets: Any, device: "torch.device") -> Any:
        """Optional: move a batch of targets to ``device`` (by default one tensor)."""
        return targets.to(device, non_blocking=True)

    def batch_size_of(self, targets: Any) -> int:
        """Optional: images in a batch of targets (by default its length)."""
        return len(targets)

    def train_correct(self, out: Any, targets: Any) -> tuple[int, int] | None:
        """Optional: (correct, counted) for a running training metric; by default None (none)."""
        return None

    # -- evaluation --------------------------------------------------------------------------
    @abstractmethod
    def evaluator(self, num_classes: int) -> Evaluator:
        """A fresh accumulator of :attr:`metrics`."""
        raise NotImplementedError

    @abstractmethod
    def postprocess(self, outputs: dict[str, np.ndarray]) -> Any:
        """Raw outputs (numpy, by name) → predictions (class ids, label maps, boxes)."""
        raise NotImplementedError

    def parity(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Parity:
        """Optional: compare two runtimes' raw outputs on the same images (by default: the largest
        difference of every output, and :meth:`_agreement` of their predictions)."""
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
