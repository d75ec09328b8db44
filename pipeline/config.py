"""The whole `pipeline.toml` schema, loaded with tomllib and validated by pydantic.

Every table is defined here, one pydantic model per TOML table. Every key has a default
(for the MGD/KD settings: the task's own, filled in at load time); unknown keys are errors.
Checks that need the stage registry (artifact names in `[gates.latency_ms]`) run right after
validation, in :func:`from_dict`. A user mistake becomes one :class:`ConfigError` line naming the TOML key
path, the bad value and what is allowed; never a traceback.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError  # noqa: F401 - re-exported: the name users of this module know
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator



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
    task: Literal["classification", "segmentation", "detection"] = Field(
        "classification", description="classification | segmentation | detection: data, loss, metrics and export follow it."
    )
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
    source: Literal["digits", "imagefolder", "torchvision", "scenes", "masks", "coco"] = Field(
        "digits", description="digits (embedded, scikit-learn) | imagefolder | torchvision (classification); "
                              "scenes (embedded; segmentation, detection) | masks (segmentation) | coco (detection)"
    )
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
    def _source_needs(self) -> "DataConfig":
        if self.source == "imagefolder" and not self.root:
            raise ValueError("data.root: source 'imagefolder' needs root = path with train/ and val/ subfolders")
        if self.source == "torchvision" and not self.name:
            raise ValueError("data.name: source 'torchvision' needs name = a torchvision dataset class, e.g. 'CIFAR10'")
        if self.source == "masks":
            if not self.root:
                raise ValueError("data.root: source 'masks' needs root = path with train/images, train/masks, "
                                 "val/images and val/masks")
            if self.num_classes < 2:
                raise ValueError("data.num_classes: source 'masks' needs the class count, background included (>= 2)")
        if self.source == "coco":
            missing = [k for k in ("train_images", "train_annotations", "val_images", "val_annotations")
                       if not getattr(self, k)]
            if missing:
                raise ValueError(f"data.{missing[0]}: source 'coco' needs train_images, train_annotations, "
                                 "val_images and val_annotations (image folders and COCO instances JSON files)")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"data.class_names: {len(self.class_names)} names for num_classes = {self.num_classes}")
        return self


class OptimConfig(_Section):
    """Training-loop settings shared by every training stage. The defaults shown are the
    classification recipe's: a key left out takes the task's recipe (`Task.recipe`)."""

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
                 description="detection: width of the FPN and the head (torchvision's: 256); narrower trains faster on CPU.")


class TeacherConfig(OptimConfig):
    arch: str = Field("resnet34", description="Model name for the task: a torchvision classifier (or timm:<name>), "
                                              "a segmentation or detection model (see README).")
    fpn_channels: int = _fpn_channels()
    weights: str = Field("", description="'' random init | path to a state dict | 'torchvision:DEFAULT'.")
    small_input: Literal["auto", "on", "off"] = Field(
        "auto", description="Stride-1 stem for small inputs (auto: on below 64 px)."
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
    mask_ratio: float | None = Field(None, ge=0, lt=1, description="Fraction λ of the student feature masked out; unset: the task's (0.15 classification).")
    mask: Literal["channel", "pixel"] | None = Field(None, description="channel | pixel; unset: the task's (channel for classification, pixel for dense tasks).")
    teacher_layers: list[str] | None = Field(None, min_length=1, description="Teacher layers to tap; unset: the task's (classification: the model's last feature stage, e.g. layer4 for ResNet, features for MobileNet/EfficientNet).")
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
    weight: float | None = Field(None, ge=0, description="Weight of the KD term (scaled by T²); unset: the task's (1 for classification).")


class DistillConfig(OptimConfig):
    epochs: int = Field(10, ge=0, le=10_000, description="Training epochs.")
    student: str = Field("resnet18", description="Student architecture (torchvision name or timm:<name>).")
    fpn_channels: int = _fpn_channels()
    init_student: bool = Field(
        False, description="detection: start the distilled student from the teacher's neck and head weights where "
                           "shapes match (the MGD authors' RetinaNet recipe); the baseline starts from random init."
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
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of channels removed.")
    importance: Literal["magnitude", "taylor", "bn_scale"] = Field("magnitude", description="magnitude | taylor | bn_scale")
    steps: int = Field(1, ge=1, le=100, description="Iterative pruning steps.")
    round_to: int = Field(8, ge=1, description="Keep channel counts multiples of this; a layer narrower than round_to / (1 - ratio) keeps every channel.")
    ignore_layers: list[str] = Field([], description="Layers never pruned (the classifier head always is kept).")
    heal_epochs: int = Field(3, ge=0, le=10_000, description="MGD fine-tune epochs after pruning.")
    lr: float = Field(0.01, gt=0, le=10, description="Healing learning rate; unset: the task's recipe (heal_lr).")


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


class BenchConfig(_Section):
    warmup: int = Field(10, ge=0, description="Untimed runs before timing.")
    runs: int = Field(50, ge=3, description="Timed runs at batch 1.")
    batch_runs: int = Field(10, ge=1, description="Timed runs at the configured batch.")
    threads: int = Field(0, ge=0, description="Intra-op threads for every runtime (0: all cores). Recorded.")


class GatesConfig(_Section):
    max_metric_drop: float | None = Field(
        None, ge=0, le=1,
        description="Per stage, vs the teacher: the task's primary metric (accuracy, miou, map; absolute, 0..1) may drop at most this; unset disables.",
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Classification alias of max_metric_drop (the primary metric is accuracy)."
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
        None, ge=0, le=1, description="Classification alias of max_int8_metric_drop."
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


def _did_you_mean(loc: tuple) -> str:
    """'did you mean X? ' for an unknown key: the closest allowed keys of its own table."""
    import difflib
    import typing

    model: Any = Config
    for part in loc[:-1]:  # walk down to the table holding the unknown key
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return "check the spelling; "
        model = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    allowed, name = list(getattr(model, "model_fields", {})), str(loc[-1])
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6) or [
        k for k in allowed if min(len(k), len(name)) >= 3 and (name.startswith(k) or k.startswith(name))]
    if close:
        return f"did you mean {', '.join(close[:-1]) + ' or ' if len(close) > 1 else ''}{close[-1]}? "
    return f"allowed here: {', '.join(allowed)}; " if allowed else "check the spelling; "


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
    msg = err["msg"].removeprefix("Value error, ")
    if loc and msg.startswith(loc + "."):
        return msg  # a cross-field check that already names its key
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key ({_did_you_mean(err['loc'])}see the config reference in docs/config.md)"
    if "input" in err and loc and not isinstance(err["input"], dict):  # no loc: a model check, input is the model
        return f"{loc} = {err['input']!r}: {msg}"
    return f"{loc}: {msg}" if loc else msg


def from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate a config dict; raise :class:`ConfigError` with one line per problem."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError("; ".join(lines)) from None
    cfg._base_dir = base_dir
    _apply_task_defaults(cfg)
    from pipeline.stage import check_config  # the registry knows every artifact name

    check_config(cfg)
    return cfg


def _apply_task_defaults(cfg: Config) -> None:
    """Fill the MGD/KD keys the user left out with the task's defaults; alias checks per task."""
    from pipeline.tasks import get_task

    task = get_task(cfg.pipeline.task)
    if cfg.data.source not in task.sources:
        raise ConfigError(f"data.source = {cfg.data.source!r} does not fit pipeline.task = {task.name!r}; "
                          f"allowed: {', '.join(task.sources)}")
    _apply_recipe(cfg, task)
    layers = _default_layers(cfg, task)
    for table, defaults in ((cfg.distill.mgd, {**task.mgd_defaults, **layers}), (cfg.distill.kd, task.kd_defaults)):
        for key, value in defaults.items():
            if getattr(table, key) is None:
                try:
                    setattr(table, key, value)
                except ValidationError as exc:  # e.g. the default pairs badly with the user's other list
                    if key.endswith("_layers"):
                        # Default tap lists of different lengths (detection: 5 FPN levels, SSDlite's 6,
                        # an unknown arch's 1) come from an unknown arch or a cross-family pair: say that.
                        _check_archs(cfg, task)
                    raise ConfigError("; ".join(_format_error(e) for e in exc.errors())) from None
    if task.name != "detection":
        for key, table in (("teacher.fpn_channels", cfg.teacher), ("distill.fpn_channels", cfg.distill)):
            if table.fpn_channels != 256:
                raise ConfigError(f"{key} = {table.fpn_channels} is a detection setting; pipeline.task is {task.name!r}")
        if cfg.distill.init_student:
            raise ConfigError(f"distill.init_student is a detection setting; pipeline.task is {task.name!r}")
    if task.metric != "accuracy":
        for alias, name in (("max_accuracy_drop", "max_metric_drop"), ("max_int8_accuracy_drop", "max_int8_metric_drop")):
            if getattr(cfg.gates, alias) is not None:
                raise ConfigError(f"gates.{alias} is the classification spelling; for task {task.name!r} use "
                                  f"gates.{name} (it compares {task.metric})")


def _apply_recipe(cfg: Config, task: Any) -> None:
    """The task's training recipe for every recipe key the config left out: the optimizer keys
    of [teacher] and [distill], [data] batch_size and [prune] lr (healing). Explicit keys win."""
    recipe = task.recipe
    tables = ((cfg.teacher, recipe.get("optim", {})), (cfg.distill, recipe.get("optim", {})),
              (cfg.data, {k: recipe[k] for k in ("batch_size",) if k in recipe}),
              (cfg.prune, {"lr": recipe["heal_lr"]} if "heal_lr" in recipe else {}))
    for table, defaults in tables:
        for key, value in defaults.items():
            if key not in table.model_fields_set:
                setattr(table, key, value)


def _default_layers(cfg: Config, task: Any) -> dict[str, list[str]]:
    """The task's MGD taps (each model's last feature stage) for the layer lists left out.

    Finding them builds the model (abstractly): an unknown architecture or one without a
    feature map to tap is an error here only when MGD will tap it; otherwise the list stays unset.
    """
    uses_mgd = cfg.distill.method in ("mgd", "mgd+kd")
    out: dict[str, list[str]] = {}
    for key, arch_key, arch in (("teacher_layers", "teacher.arch", cfg.teacher.arch),
                                ("student_layers", "distill.student", cfg.distill.student)):
        if getattr(cfg.distill.mgd, key) is not None:
            continue
        where = arch_key
        try:
            task.check_arch(arch)
            where = f"distill.mgd.{key} (unset)"
            out[key] = task.default_layers(arch)
        except ConfigError as exc:
            if uses_mgd:
                raise ConfigError(f"{where}: {exc}") from None
    return out


def _check_archs(cfg: Config, task: Any) -> None:
    """A ConfigError naming the key for an unknown teacher or student arch, or a pair the task refuses."""
    for key, arch in (("teacher.arch", cfg.teacher.arch), ("distill.student", cfg.distill.student)):
        try:
            task.check_arch(arch)
        except ConfigError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    task.check_pair(cfg.teacher.arch, cfg.distill.student)


def load(path: str | Path) -> Config:
    """Read and validate a `pipeline.toml`.

    Raises :class:`ConfigError` for a missing file, malformed TOML (with line and column) or
    any schema violation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line L, column C)".
        raise ConfigError(f"{path}: malformed TOML: {exc}") from None
    try:
        return from_dict(raw, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def reference_rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(TOML key path, default, description) for every key, for the README's config reference."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += reference_rows(ann, f"{path}.")
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((path, json.dumps(default), field.description or ""))
    return rows


RECIPE_COLUMNS = ("optimizer", "lr", "weight_decay", "warmup_epochs", "grad_clip", "batch_size", "prune.lr",
                  "mgd.alpha", "mgd.mask_ratio", "mgd.mask")


def recipe_rows() -> list[tuple[str, ...]]:
    """(task, then each of :data:`RECIPE_COLUMNS` as shown in docs/config.md) for every task:
    what a config that leaves those keys out trains with."""
    from pipeline.tasks import TASKS, get_task

    def shown(v: Any) -> str:
        return f"`{v:g}`" if isinstance(v, float) else f"`{v}`"

    rows = []
    for name in TASKS:
        task = get_task(name)
        values = {**task.recipe.get("optim", {}), "batch_size": task.recipe.get("batch_size"),
                  "prune.lr": task.recipe.get("heal_lr"), **{f"mgd.{k}": v for k, v in task.mgd_defaults.items()}}
        rows.append((name, *(shown(values.get(c)) for c in RECIPE_COLUMNS)))
    return rows
