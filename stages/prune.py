"""Prune stage: structured channel pruning of the distilled student, healed by MGD.

Torch-Pruning's dependency graph (DepGraph, Fang et al. CVPR 2023) removes whole channels
through every coupled layer (a residual block's convs, BatchNorms and shortcut together), so
the result is a smaller dense network that every runtime runs faster, not a sparse mask.
Channel importance is `magnitude` (L2 of each channel group's weights), `taylor` (first-order
Taylor, |w · ∂L/∂w|, from a few calibration batches) or `bn_scale` (|γ| of the BatchNorms).
The remaining channel counts stay multiples of `round_to` (SIMD- and tensor-core-friendly); the
task's output heads (the classifier), the user's `ignore_layers` and every layer too narrow to
keep a single multiple of `round_to` at this ratio (the squeeze-excitation convs of MobileNetV3
and EfficientNet at the defaults; named in the log and in `metrics["pruned"]["kept_whole"]`)
keep all their channels.

Pruning costs accuracy, so the pruned student is fine-tuned for `heal_epochs` with the task
loss plus MGD from the teacher (Yang et al. 2022, arXiv 2205.01529): the tap layers are probed
again on the pruned student, so the MGD align convs match its new widths. The stage records
params, MACs, size, accuracy and torch-eager latency before pruning, after pruning and after
healing, so the manifest shows what pruning bought in measured time, not only in MACs; the
latency of the unpruned and the pruned student is measured back to back (`*_before`,
`*_after`, `latency_speedup`).

Inputs: `student`, `teacher`. Output: `pruned` — architecture, Torch-Pruning history and state
dict as plain data (see `pipeline/models.py`), rebuilt without unpickling any module.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.bench import latency_metrics
from pipeline.schema import PruneConfig
from pipeline.errors import ConfigError, LibraryError
from pipeline.evaluate import count_macs, count_params, evaluate_module
from pipeline.manifest import ArtifactRole
from pipeline.models import build_student, is_pruned_payload, load_student_file, pruned_payload, rebuild_pruned
from pipeline.stage import Measure, StageContext, StageResult, register
from pipeline.tasks import Task, task_for
from pipeline.torch_runtime import TorchRuntime
from stages.distill_loss import distillation
from stages.training import fit, loaders, save_torch

log = logging.getLogger(__name__)

Config = PruneConfig

# Batches of calibration images whose gradients feed the Taylor importance (per pruning step).
_TAYLOR_BATCHES = 4


def _importance(name: str):
    import torch_pruning as tp

    if name == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    raise ConfigError(f"prune.importance = {name!r}: allowed magnitude, taylor, bn_scale")


def ignored_modules(model: nn.Module, cfg: PruneConfig, task: Task) -> list[nn.Module]:
    """The task's output heads plus every layer named in `prune.ignore_layers` (and its children).

    Raises :class:`ConfigError` naming an unknown layer, with the closest names.
    """
    named = dict(model.named_modules())
    ignored = [named[h] for h in task.prune_keep(model)]
    for name in cfg.ignore_layers:
        if name not in named:
            close = difflib.get_close_matches(name, [n for n in named if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"prune.ignore_layers: the student has no layer {name!r}{hint}")
        ignored.append(named[name])
    return ignored


def too_narrow(model: nn.Module, ignored: list[nn.Module], cfg: PruneConfig) -> list[tuple[str, int]]:
    """The prunable layers that `ratio` and `round_to` would empty, as `(name, channels)`.

    Torch-Pruning keeps `int(width * (1 - ratio))` channels of a layer and rounds that *down* to a
    multiple of `round_to`, so a layer narrower than `round_to / (1 - ratio)` would lose every
    channel, which breaks the network: at the defaults (0.5, 8) every layer under 16 channels,
    such as the 8-channel squeeze-excitation convs (`fc1`) of MobileNetV3 and EfficientNet.
    :func:`make_pruner` keeps these layers whole. Layers in `ignored` (the heads, the user's
    `ignore_layers`) are not listed. Raises :class:`ConfigError` when no prunable layer is left.
    """
    skip = {id(m) for root in ignored for m in root.modules()}
    narrow, prunable = [], 0
    for name, m in model.named_modules():
        if id(m) in skip or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        keep = int(width * (1 - cfg.ratio))
        keep -= keep % cfg.round_to
        prunable += 1
        if keep <= 0:
            narrow.append((name, width))
    if prunable and len(narrow) == prunable:
        widest = max(narrow, key=lambda nw: nw[1])
        raise ConfigError(
            f"prune.ratio = {cfg.ratio} with prune.round_to = {cfg.round_to} would remove every channel of every "
            f"prunable layer (the widest, {widest[0]!r}, has {widest[1]}; a layer needs at least "
            f"{math.ceil(cfg.round_to / (1 - cfg.ratio))}): lower the ratio or round_to, or disable [prune]"
        )
    return narrow


def _say_kept_whole(narrow: list[tuple[str, int]], cfg: PruneConfig, level: int) -> None:
    """One log line: which layers pruning leaves whole because it would empty them, and why."""
    if not narrow:
        return
    shown = ", ".join(f"{n} ({w})" for n, w in narrow[:12]) + (f" and {len(narrow) - 12} more" if len(narrow) > 12 else "")
    log.log(level, "prune: %d layer%s kept whole (at ratio %s with round_to %d a layer needs %d channels, or pruning "
            "would remove them all; typically squeeze-excitation convs): %s", len(narrow), "s" if len(narrow) > 1 else "",
            cfg.ratio, cfg.round_to, math.ceil(cfg.round_to / (1 - cfg.ratio)), shown)


def _failing_module(model: nn.Module, example: torch.Tensor) -> str | None:
    """Re-run the forward as Torch-Pruning does (gradients on) with hooks; if it raises, the name
    of the module that was running, else None (the failure was in Torch-Pruning's graph pass)."""
    running: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _i, n=n: running.append(n)) for n, m in model.named_modules() if n]
    # A forward hook that returns a value replaces the module's output: return None explicitly.
    hooks += [m.register_forward_hook(lambda _m, _i, _o: running.pop() and None) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            model(example)
        return None
    except Exception:
        return running[-1] if running else "<model>"
    finally:
        for h in hooks:
            h.remove()


def make_pruner(model: nn.Module, example: torch.Tensor, cfg: PruneConfig, arch: str, task: Task,
                log_level: int = logging.INFO):
    """A Torch-Pruning `BasePruner` for `model`: the task's heads, the user's `ignore_layers` and
    the layers too narrow to prune at this ratio and round_to (:func:`too_narrow`, logged at
    `log_level`) are its ignored layers, so they keep every channel.

    Raises :class:`LibraryError` when Torch-Pruning cannot trace the model, naming the layer
    that was running (the model and Torch-Pruning disagree: not a mistake in the config).
    """
    import torch_pruning as tp

    ignored = ignored_modules(model, cfg, task)
    narrow = too_narrow(model, ignored, cfg)
    _say_kept_whole(narrow, cfg, log_level)
    named = dict(model.named_modules())
    ignored += [named[name] for name, _ in narrow]
    try:
        return tp.pruner.BasePruner(
            model, example, importance=_importance(cfg.importance), pruning_ratio=cfg.ratio,
            iterative_steps=cfg.steps, round_to=cfg.round_to, ignored_layers=ignored,
        )
    except Exception as exc:
        layer = _failing_module(model, example)
        where = f"layer {layer!r} fails under tracing" if layer else "its outputs or graph are not traceable"
        raise LibraryError(
            "Torch-Pruning",
            f"it cannot trace {arch}: {where} ({type(exc).__name__}: {exc}); "
            "list the layer in prune.ignore_layers, make the model return tensors, or disable [prune]",
        ) from None


def _taylor_gradients(model: nn.Module, ctx: StageContext) -> None:
    """Accumulate ∂L/∂w over a few calibration batches (Taylor importance reads `.grad`)."""
    model.zero_grad(set_to_none=True)
    model.train()  # BatchNorm in train mode as during training; its running stats are restored below
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    loader = ctx.data.loader("calibration", ctx.cfg.data.batch_size)
    task = ctx.task
    for i, (images, targets) in enumerate(loader):
        if i >= _TAYLOR_BATCHES:
            break
        # The task loss without label smoothing: the gradient of the plain objective.
        loss = task.loss(model(images.to(ctx.device)), task.targets_to(targets, ctx.device),
                         ctx.cfg.distill.model_copy(update={"label_smoothing": 0.0}))
        loss.backward()
    model.load_state_dict(stats, strict=False)
    model.eval()


def prune_model(model: nn.Module, ctx: StageContext, cfg: PruneConfig, arch: str) -> list:
    """Prune `model` in place in `cfg.steps` steps; return Torch-Pruning's pruning history."""
    example = torch.zeros(1, *ctx.data.input_shape, device=ctx.device)
    model.to(ctx.device).eval()
    pruner = make_pruner(model, example, cfg, arch, ctx.task)
    for step in range(cfg.steps):
        if cfg.importance == "taylor":
            _taylor_gradients(model, ctx)
        pruner.step()
        log.info("prune step %d/%d: %d params", step + 1, cfg.steps, count_params(model))
    model.zero_grad(set_to_none=True)
    return pruner.pruning_history()


def _torch_latency(model: nn.Module, ctx: StageContext) -> dict[str, float | int]:
    """The shared harness on torch eager, with the training thread count restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return latency_metrics(TorchRuntime(model, ctx.device, ctx.cfg.bench.threads, output_names=ctx.task.output_names),
                               ctx.data.input_shape,
                               batch_size=ctx.cfg.data.batch_size, bench=ctx.cfg.bench)
    finally:
        torch.set_num_threads(threads)


def _heal(ctx: StageContext, model: nn.Module) -> tuple[list[dict[str, float]], dict]:
    """Fine-tune the pruned student with the task loss + the distill stage's method (MGD);
    return its history and what the manifest records of its MGD (taps, α)."""
    cfg, dcfg = ctx.cfg.prune, ctx.cfg.distill
    if cfg.heal_epochs == 0:
        return [], {}
    with distillation(ctx, model, dcfg.method) as wiring:
        train, val = loaders(ctx, ctx.cfg.distill.train_fraction)
        history = fit(model, train_loader=train, val_loader=val, optim=dcfg, device=ctx.device,
                      checkpoint=ctx.resume_file("heal.checkpoint.pt"), key=f"{ctx.key}:heal",
                      desc=f"heal pruned {dcfg.student} ({dcfg.method})", epochs=cfg.heal_epochs, lr=cfg.lr,
                      task=ctx.task, num_classes=ctx.data.num_classes, loss_fn=wiring.loss_fn, extra=wiring.head,
                      unlabeled=wiring.unlabeled)
        return history.epochs, wiring.record()


def _payload(ctx: StageContext, model: nn.Module, history: list) -> dict:
    """The pruned artifact's plain-data record for the configured student."""
    d = ctx.cfg.distill
    return pruned_payload(model, history, arch=d.student, num_classes=ctx.data.num_classes,
                          image_size=ctx.cfg.data.image_size, task=ctx.cfg.pipeline.task,
                          options=ctx.task.options_of(d))


def _pruned_unhealed(ctx: StageContext, student: nn.Module) -> tuple[nn.Module, list]:
    """Prune a copy of the student, or reload the pruned-but-unhealed model saved by an
    interrupted run of this same stage (same key), so healing resumes on identical channels."""
    cfg, dcfg = ctx.cfg.prune, ctx.cfg.distill
    saved = ctx.resume_file("pruned_unhealed.pt")
    if saved.is_file():
        obj = torch.load(saved, map_location="cpu", weights_only=True)
        if is_pruned_payload(obj) and obj.get("key") == ctx.key:
            log.info("prune: resuming from %s", saved.name)
            return rebuild_pruned(obj), obj["history"]
    torch.manual_seed(ctx.cfg.pipeline.seed)
    model = build_student(ctx.cfg, ctx.data.num_classes, weights="")
    model.load_state_dict(student.state_dict())
    history = prune_model(model, ctx, cfg, dcfg.student)
    payload = _payload(ctx, model.cpu(), history)
    save_torch({**payload, "key": ctx.key}, saved)
    return model, payload["history"]


def preflight(cfg) -> None:
    """Ignored layers exist, some layer is wide enough to prune, and Torch-Pruning can trace the
    student: checked on a randomly initialised student before anything trains."""
    if not cfg.prune.enabled:
        return
    task = task_for(cfg)
    with torch.random.fork_rng():  # probing must not shift the run's random stream
        student = build_student(cfg, 10, weights="").eval()
        make_pruner(student, torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size), cfg.prune,
                    cfg.distill.student, task, log_level=logging.DEBUG)  # the stage says it when it prunes


@register("prune", order=30, inputs=("student", "teacher"), reads=("distill", "teacher", "data"),
          enabled=lambda cfg: cfg.prune.enabled, preflight=preflight,
          artifacts={"pruned": ArtifactRole(model="student", runtime="torch", precision="fp32", target="torch",
                                            supersedes="student")})
def run(ctx: StageContext) -> StageResult:
    """Prune the distilled student, heal it with MGD, save it as plain data, record before/after."""
    cfg = ctx.cfg.prune
    shape = ctx.data.input_shape
    val = ctx.data.loader("val", ctx.cfg.data.batch_size)
    task, n = ctx.task, ctx.data.num_classes
    student = load_student_file(ctx.inputs["student"], ctx).to(ctx.device)
    before = {
        "params_before": count_params(student),
        "macs_before": count_macs(student, shape),
        "size_bytes_before": Path(ctx.inputs["student"]).stat().st_size,
        **{f"{k}_before": v for k, v in evaluate_module(student, val, ctx.device, task, n).items()},
    }
    model, prune_history = _pruned_unhealed(ctx, student)
    model.to(ctx.device)
    before.update({f"{k}_before_heal": v for k, v in evaluate_module(model, val, ctx.device, task, n).items()})
    history, heal_mgd = _heal(ctx, model)
    model.eval()
    path = ctx.out_dir / "pruned.pt"
    save_torch(_payload(ctx, model.cpu(), prune_history), path)
    model.to(ctx.device)

    # Latency before and after, measured back to back with the same harness, so the ratio is
    # not skewed by the machine's load drifting between stages. Both sides are recorded
    # (`*_before`, `*_after`): the report shows these, never the before of one measurement
    # next to the after of another (the runner measures `pruned` again, later).
    lat_before, lat_after = _torch_latency(student, ctx), _torch_latency(model, ctx)
    timed = [k for k in lat_before if k.endswith("_ms") or k == "throughput_ips"]
    metrics = {
        **before,
        **{f"{k}_before": lat_before[k] for k in timed},
        **{f"{k}_after": lat_after[k] for k in timed},
        "macs_ratio": count_macs(model, shape) / max(1, before["macs_before"]),
        "params_ratio": count_params(model) / max(1, before["params_before"]),
        "latency_speedup": lat_before["latency_p50_ms"] / lat_after["latency_p50_ms"],
        "batch_latency_speedup": lat_before["batch_latency_p50_ms"] / lat_after["batch_latency_p50_ms"],
        "ratio": cfg.ratio, "importance": cfg.importance, "steps": cfg.steps, "round_to": cfg.round_to,
        "heal_epochs": cfg.heal_epochs, "heal_method": ctx.cfg.distill.method if cfg.heal_epochs else "none",
        **heal_mgd,
        "kept_whole": [name for name, _ in too_narrow(student, ignored_modules(student, cfg, task), cfg)],
        "data_workers": ctx.data.workers(ctx.cfg.data.num_workers),
    }
    result = StageResult(
        outputs={"pruned": path},
        measure={"pruned": Measure(TorchRuntime(model, ctx.device, ctx.cfg.bench.threads, output_names=task.output_names),
                                   model=model, path=path)},
        metrics={"pruned": metrics},
        history={"pruned": history} if history else {},
    )
    if metrics["latency_speedup"] < 1.05:
        result.warnings.append(
            f"pruning cut MACs to {metrics['macs_ratio']:.0%} but torch-eager latency at batch 1 only changed "
            f"{metrics['latency_speedup']:.2f}x (small inputs are dominated by per-op overhead); "
            "judge it on the deployment runtime (onnx/openvino stages)"
        )
    return result

