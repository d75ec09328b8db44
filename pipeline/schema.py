"""The `pipeline.toml` schema: one pydantic model per TOML table.

Every key has a default; a key whose default is the task's (the MGD/KD settings, the training
recipe, the model pair, the data source) is filled in by :func:`pipeline.config.from_dict` from
the task's declarations. Unknown keys are errors. Loading, those defaults and the checks that
need the task or the stage registry live in :mod:`pipeline.config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PipelineConfig(_Section):
    name: str = Field("pipeline", description="Name of this pipeline, recorded in the manifest.")
    workdir: str = Field(
        "runs/default",
        description="Run directory (relative to the config file): manifest.json and one folder per stage.",
    )
    seed: int = Field(0, ge=0, description="Seed for data splits, initialisation and shuffling.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    task: str | None = Field(
        None, description="The task: data, loss, metrics and export follow it (docs/tasks.md lists them, "
                          "docs/architecture.md says how to add one); unset: the default task (docs/config.md).")
    keep_checkpoints: bool = Field(
        False, description="Keep a training stage's per-epoch resume checkpoints after the stage is recorded "
                           "(by default they are deleted then; with them, --force re-uses the finished training).",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")


class ScenesConfig(_Section):
    """The embedded scene generator: scikit-learn's digits composed into larger canvases."""

    train_images: int = Field(2000, ge=2, le=200_000, description="Scenes generated for training (digits from the train pool).")
    val_images: int = Field(500, ge=1, le=100_000, description="Scenes generated for evaluation (digits from a disjoint pool).")
    min_digits: int = Field(2, ge=1, le=20, description="Fewest digits attempted per canvas.")
    max_digits: int = Field(5, ge=1, le=20, description="Most digits attempted per canvas.")
    min_scale: float = Field(0.18, gt=0, le=1, description="Smallest digit side as a fraction of the canvas side.")
    max_scale: float = Field(0.45, gt=0, le=1, description="Largest digit side as a fraction of the canvas side.")
    min_contrast: float = Field(0.35, ge=0, le=1, description="A digit's peak intensity is uniform in [min_contrast, 1].")
    clutter: int = Field(3, ge=0, le=50, description="Distractor stroke fragments per canvas (labelled background).")
    noise: float = Field(0.03, ge=0, le=1, description="Std of the gaussian pixel noise.")
    ignore_border: int = Field(1, ge=0, le=8, description="Pixels around each digit's strokes labelled 255 (ignore); 0 disables.")
    max_overlap: float = Field(0.2, ge=0, le=1, description="Largest IoU between two digits' boxes.")

    @model_validator(mode="after")
    def _ranges(self) -> "ScenesConfig":
        if self.min_digits > self.max_digits:
            raise ValueError("data.scenes: min_digits must be <= max_digits")
        if self.min_scale > self.max_scale:
            raise ValueError("data.scenes: min_scale must be <= max_scale")
        return self


class DataConfig(_Section):
    source: str | None = Field(
        None, description="Where the images come from: one of the task's sources (docs/config.md, data sources); "
                          "unset: the task's first.")
    root: str = Field("", description="imagefolder: root/train/<class>/*, root/val/<class>/*; masks: root/{train,val}/{images,masks}/*; torchvision: download root.")
    num_classes: int = Field(0, ge=0, le=255, description="masks: classes including background (mask value = class index, 255 = ignore).")
    class_names: list[str] = Field([], description="masks: optional class names, num_classes of them (background first).")
    scenes: ScenesConfig = Field(default_factory=ScenesConfig)
    name: str = Field("", description="torchvision dataset class name, e.g. 'CIFAR10'.")
    train_images: str = Field("", description="coco: folder of the training images (relative to the config).")
    train_annotations: str = Field("", description="coco: COCO instances JSON of the training split.")
    val_images: str = Field("", description="coco: folder of the validation images.")
    val_annotations: str = Field("", description="coco: COCO instances JSON of the validation split.")
    download: bool = Field(False, description="torchvision: allow downloading the dataset (needs a network).")
    image_size: int = Field(32, ge=8, le=1024, description="Square input side in pixels.")
    batch_size: int = Field(64, ge=1, le=4096, description="Training batch size; also the 'configured batch' for throughput; unset: the task's recipe.")
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader worker processes per training loader (0: load in the training process); "
                            "auto: 0 for the in-memory sources (digits, scenes), else min(8, available CPUs // "
                            "torchrun ranks per node - 1). Pinned memory on CUDA. Augmentation draws depend on the count: "
                            "set a number to repeat a run on another machine.",
    )
    val_fraction: float = Field(0.2, gt=0, lt=1, description="digits: share of images held out for evaluation.")
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="Use only this share of the training split (low-data experiments)."
    )
    dev_fraction: float = Field(
        0.0, ge=0, lt=1, description="Hold out this seeded share of the training split and evaluate on it instead "
                                     "of val: a development split for choosing recipes without the evaluation images.")
    calibration_size: int = Field(
        256, ge=1, description="Images drawn from the training split for INT8 calibration (never val)."
    )
    augment: bool = Field(True, description="Random crop/flip augmentation for the training split.")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Normalisation mean (RGB).")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Normalisation std (RGB).")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _num_workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 64):
            return v
        raise ValueError("must be 'auto' or a number of worker processes from 0 to 64")

    @model_validator(mode="after")
    def _class_names(self) -> "DataConfig":
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"data.class_names: {len(self.class_names)} names for num_classes = {self.num_classes}")
        return self


class OptimConfig(_Section):
    """Training-loop settings shared by every training stage. A key left out takes the task's
    recipe (`Task.recipe`, docs/config.md); the defaults shown are the first built-in task's."""

    epochs: int = Field(8, ge=0, le=10_000, description="Training epochs.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd | adamw")
    lr: float = Field(0.02, gt=0, le=10, description="Peak learning rate (cosine schedule to 0).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="Weight decay.")
    warmup_epochs: int = Field(1, ge=0, description="Linear warm-up epochs before the cosine decay.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    grad_clip: float = Field(0.0, ge=0, description="Clip the gradients' global L2 norm at this value; 0: no clipping.")
    amp: bool = Field(True, description="Mixed precision on CUDA (bf16 at compute capability 8.0 and up, else fp16 with loss scaling).")


def _fpn_channels() -> Any:
    return Field(256, ge=8, le=1024,
                 description="Tasks with an FPN: width of the FPN and the head (torchvision's: 256); narrower trains faster on CPU.")


class TeacherConfig(OptimConfig):
    arch: str | None = Field(None, description="Model name for the task (docs/tasks.md lists each task's); "
                                               "unset: the task's default teacher.")
    fpn_channels: int = _fpn_channels()
    weights: str = Field("", description="'' random init | path to a state dict | 'torchvision:DEFAULT'.")
    small_input: Literal["auto", "on", "off"] = Field(
        "auto", description="Classifiers: a stride-1 stem for small inputs (auto: on below 64 px)."
    )


class MGDConfig(_Section):
    """MGD settings; a key left out takes the task's default (see `pipeline/tasks/`)."""

    alpha: float | Literal["auto"] | None = Field(
        None, description="Loss weight α, or \"auto\": measured on the first training batch so that the MGD loss is "
                          "auto_ratio × the task loss (the authors' advice; their α fits only their map sizes); "
                          "unset: the task's (auto).")
    auto_ratio: float = Field(1.0, gt=0, le=100, description="alpha = \"auto\": the MGD loss at the first batch as a multiple of the task loss.")
    resample: Literal["student", "teacher"] = Field(
        "student", description="Taps of different H×W: student: the student's aligned map is resampled to the "
                               "teacher's size (the generation block must produce the teacher's detail); teacher: the "
                               "teacher's map is pooled to the student's (cheaper, loses detail).")
    mask_ratio: float | None = Field(None, ge=0, lt=1, description="Fraction λ of the student feature masked out; unset: the task's (docs/config.md).")
    mask: Literal["channel", "pixel"] | None = Field(None, description="channel | pixel; unset: the task's (a channel mask on a classifier's last stage, pixel masks on dense maps).")
    teacher_layers: list[str] | None = Field(None, min_length=1, description="Teacher layers to tap; unset: the task's (a classifier's last feature stage, e.g. layer4 for ResNet, features for MobileNet/EfficientNet; every FPN level of a detector).")
    student_layers: list[str] | None = Field(None, min_length=1, description="Student layers to tap, paired in order; unset: the task's.")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not v > 0:
            raise ValueError("must be > 0 or \"auto\"")
        return v

    @model_validator(mode="after")
    def _paired(self) -> "MGDConfig":
        if (self.teacher_layers is not None and self.student_layers is not None
                and len(self.teacher_layers) != len(self.student_layers)):
            raise ValueError(
                f"distill.mgd: teacher_layers has {len(self.teacher_layers)} entries but student_layers has "
                f"{len(self.student_layers)}; they are paired in order"
            )
        return self


class KDConfig(_Section):
    """Logit distillation settings; a key left out takes the task's default."""

    temperature: float | None = Field(None, gt=0, description="Softmax temperature; unset: the task's (4).")
    weight: float | None = Field(None, ge=0, description="Weight of the KD term (scaled by T²); unset: the task's (docs/config.md).")


class DistillConfig(OptimConfig):
    epochs: int = Field(10, ge=0, le=10_000, description="Training epochs.")
    student: str | None = Field(None, description="Student architecture, a model name for the task; unset: the task's default student.")
    fpn_channels: int = _fpn_channels()
    init_student: bool | None = Field(
        None, description="Tasks that declare it (those built on a detector): start the distilled student from the "
                          "teacher's neck and head weights where shapes match (the MGD authors' RetinaNet and SOLO "
                          "recipes); the baseline starts from random init. Unset: the task's default (docs/config.md)."
    )
    weights: str = Field("", description="Student initial weights: '' | state dict path | 'torchvision:DEFAULT'.")
    small_input: Literal["auto", "on", "off"] = Field("auto", description="Stride-1 stem for small inputs.")
    method: Literal["mgd", "kd", "mgd+kd", "none"] = Field("mgd", description="mgd | kd | mgd+kd | none")
    baseline: bool = Field(True, description="Also train the student without distillation, same budget and seed.")
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the training split the students train on (baseline, distilled, and "
                                     "healing after pruning: the same seeded subset); the teacher uses all of it."
    )
    unlabeled: str = Field(
        "", description="Images without labels that distillation also learns from (MGD/KD terms only, every step): "
                        "a folder (recursive, any image format; relative to the config), or \"rest\": the training "
                        "images train_fraction leaves out, labels unused. '' disables. The baseline never sees them.")
    unlabeled_batch_size: int = Field(0, ge=0, le=4096, description="Unlabelled images per step; 0: data.batch_size.")
    mgd: MGDConfig = Field(default_factory=MGDConfig)
    kd: KDConfig = Field(default_factory=KDConfig)


class PruneConfig(_Section):
    enabled: bool = Field(False, description="Run structured pruning of the distilled student.")
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of channels removed; with target_latency_ms or target_speedup the search chooses it (leave it out).")
    importance: Literal["magnitude", "taylor", "bn_scale"] = Field("magnitude", description="magnitude | taylor | bn_scale")
    steps: int = Field(1, ge=1, le=100, description="Iterative pruning steps.")
    round_to: int = Field(8, ge=1, description="Keep channel counts multiples of this; a layer narrower than round_to / (1 - ratio) keeps every channel.")
    ignore_layers: list[str] = Field([], description="Layers never pruned (the classifier head always is kept).")
    heal_epochs: int = Field(3, ge=0, le=10_000, description="MGD fine-tune epochs after pruning.")
    lr: float = Field(0.01, gt=0, le=10, description="Healing learning rate; unset: the task's recipe (heal_lr).")
    target_latency_ms: float | None = Field(
        None, gt=0, description="Prune to a latency budget instead of a ratio: the least pruning whose target_build "
                                "measures at most this p50 at batch 1 (ms, on this machine; docs/deployment.md).")
    target_speedup: float | None = Field(
        None, gt=1, description="Prune to a speedup instead of a ratio: the least pruning whose target_build is this "
                                "many times faster than the unpruned student's, measured back to back (portable, for CI).")
    target_build: str = Field(
        "", description="The build a target is measured on (an artifact name: openvino_int8, onnx, ...); '': "
                        "openvino_int8 when the openvino stage builds INT8, else the first build a later stage declares.")
    max_ratio: float = Field(0.8, gt=0, lt=1, description="With a target: the largest ratio the search may choose.")
    max_probes: int = Field(6, ge=2, le=50, description="With a target: at most this many quick probe builds (export, "
                                                           "build, time; no healing); 2 bracket the search.")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneConfig":
        if self.target_latency_ms is not None and self.target_speedup is not None:
            raise ValueError("prune.target_latency_ms and prune.target_speedup: set one of them, not both")
        if self.targeted and "ratio" in self.model_fields_set:
            raise ValueError("prune.ratio: with a target (target_latency_ms / target_speedup) the search chooses the "
                             "ratio; remove prune.ratio (prune.max_ratio bounds it)")
        if self.target_build and not self.targeted:
            raise ValueError("prune.target_build names the build a target is measured on; set target_latency_ms or "
                             "target_speedup too, or remove it")
        return self

    @property
    def targeted(self) -> bool:
        """True when the ratio is searched for a latency target rather than given."""
        return self.target_latency_ms is not None or self.target_speedup is not None


class OnnxConfig(_Section):
    enabled: bool = Field(True, description="Export the final student to ONNX.")
    opset: int = Field(18, ge=11, le=23, description="ONNX opset.")
    dynamic_batch: bool = Field(True, description="Dynamic batch axis.")
    simplify: bool = Field(True, description="Simplify with onnxslim.")
    parity_atol: float = Field(
        1e-3, gt=0,
        description="Max abs logit difference vs torch allowed (never below float32 rounding at the logits' magnitude: 64 ulps of the largest logit).",
    )
    parity_min_agreement: float = Field(
        0.99, ge=0, le=1, description="Min share of val images where ONNX and torch agree on the top-1 class."
    )
    int8: bool = Field(
        True, description="Also build onnx_int8 for ONNX Runtime CPU (static Q/DQ, QUInt8 activations, calibration split)."
    )
    export_teacher: bool = Field(
        True, description="Also export the teacher (teacher_onnx) so speedups are measured on the same runtime."
    )


class OpenVINOConfig(_Section):
    enabled: bool = Field(True, description="Build OpenVINO IR.")
    precisions: list[Literal["fp32", "int8"]] = Field(["fp32", "int8"], min_length=1, description="fp32 and/or int8")
    accuracy_control: bool = Field(False, description="INT8 with nncf.quantize_with_accuracy_control.")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Accuracy-control budget.")
    inference_precision: Literal["f32", "bf16", "f16", "default"] = Field(
        "f32", description="INFERENCE_PRECISION_HINT for the FP32 builds (default: the device's own choice, bf16 on some CPUs)."
    )
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="NNCF preset: performance (symmetric) | mixed (asymmetric activations)."
    )


class TensorRTConfig(_Section):
    enabled: bool = Field(True, description="Build the TensorRT INT8 Q/DQ ONNX (and an engine where CUDA is present).")
    calibration: Literal["minmax", "entropy", "percentile"] = Field("entropy", description="minmax | entropy | percentile")
    workspace_mb: int = Field(1024, ge=16, description="Builder workspace limit.")
    percentile: float = Field(99.999, gt=90, le=100, description="calibration = percentile: the percentile kept.")
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    build_engine: bool = Field(True, description="Build the engine when the tensorrt package and a CUDA device are present.")


class Int8FallbackConfig(_Section):
    """When an INT8 build fails `max_int8_metric_drop`, keep its most sensitive layers in floating point."""

    max_fp_layers: int = Field(
        8, ge=0, le=1000, description="Most layers kept in floating point by the INT8 fallback search (ranked by the "
                                      "output error each adds on calibration images); 0 disables the fallback.")
    sensitivity_images: int = Field(
        64, ge=1, le=10_000, description="Calibration images the layers' sensitivity (output error) is measured on.")


class QadConfig(_Section):
    """Quantization-aware distillation: fine-tune the student with fake quantization (NNCF QAT) and the teacher."""

    when: Literal["off", "ptq_fails", "always"] = Field(
        "ptq_fails", description="off; ptq_fails: run when the OpenVINO PTQ build fails max_int8_metric_drop; "
                                 "always. Without a [qad] table: off.")
    epochs: int = Field(2, ge=1, le=1000, description="Fine-tuning epochs with fake quantization.")
    lr: float = Field(1e-4, gt=0, le=1, description="Learning rate (low: the student is already trained; AdamW).")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps in all (0: no limit).")


class BenchConfig(_Section):
    warmup: int = Field(10, ge=0, description="Untimed runs before timing.")
    runs: int = Field(50, ge=3, description="Timed runs at batch 1.")
    batch_runs: int = Field(10, ge=1, description="Timed runs at the configured batch.")
    threads: int = Field(0, ge=0, description="Intra-op threads for every runtime (0: all cores). Recorded.")


class GatesConfig(_Section):
    max_metric_drop: float | None = Field(
        None, ge=0, le=1,
        description="Per stage, vs the teacher: the task's primary metric (absolute, 0..1) may drop at most this; unset disables.",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Alias of max_metric_drop, for a task whose primary metric is top-1 accuracy."
    )
    min_speedup_vs_teacher: float = Field(0.0, ge=0, description="Deployed build latency ratio at batch 1; 0 disables.")
    latency_ms: dict[str, float] = Field({}, description="p90 at batch 1 budget, keyed by artifact name.")
    min_int8_speedup: float = Field(
        0.0, ge=0, description="INT8 build p50 vs the FP32 build on the same runtime, at batch 1, at least this; 0 disables."
    )
    max_int8_metric_drop: float | None = Field(
        None, ge=0, le=1, description="INT8 build vs the FP32 build on the same runtime: the primary metric may drop at most this."
    )
    max_int8_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Alias of max_int8_metric_drop, for a task whose primary metric is top-1 accuracy."
    )

    @field_validator("latency_ms")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        for name, budget in v.items():
            if not budget > 0:
                raise ValueError(f"budget for {name!r} must be > 0 ms, got {budget}")
        return v

    @model_validator(mode="after")
    def _one_spelling(self) -> "GatesConfig":
        for new, alias in (("max_metric_drop", "max_accuracy_drop"), ("max_int8_metric_drop", "max_int8_accuracy_drop")):
            if getattr(self, new) is not None and getattr(self, alias) is not None:
                raise ValueError(f"gates: set {new} or its alias {alias}, not both")
        return self

    def metric_drop(self) -> tuple[str, float] | None:
        """(the key the user set, its budget) for the drop vs the teacher, or None when unset."""
        return _either(self, "max_metric_drop", "max_accuracy_drop")

    def int8_metric_drop(self) -> tuple[str, float] | None:
        """(the key the user set, its budget) for the INT8-vs-FP32 drop, or None when unset."""
        return _either(self, "max_int8_metric_drop", "max_int8_accuracy_drop")


def _either(gates: GatesConfig, name: str, alias: str) -> tuple[str, float] | None:
    for key in (name, alias):
        value = getattr(gates, key)
        if value is not None:
            return key, value
    return None


class Config(_Section):
    """The whole pipeline config: one attribute per TOML table."""

    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    openvino: OpenVINOConfig = Field(default_factory=OpenVINOConfig)
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    int8_fallback: Int8FallbackConfig = Field(default_factory=Int8FallbackConfig)
    qad: QadConfig = Field(default_factory=lambda: QadConfig(when="off"))
    bench: BenchConfig = Field(default_factory=BenchConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    # Where the file came from: relative paths in the config resolve against it.
    _base_dir: Path = PrivateAttr(default_factory=Path)

    def resolve(self, path: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        p = Path(path).expanduser()
        # normpath folds "configs/../runs" into "runs" (printed paths stay readable); symlinks
        # are left alone, unlike Path.resolve.
        return Path(os.path.normpath(p if p.is_absolute() else (self._base_dir / p)))

    @property
    def workdir(self) -> Path:
        return self.resolve(self.pipeline.workdir)
