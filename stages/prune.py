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

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.bench import latency_metrics
from pipeline.schema import PruneConfig
from pipeline.evaluate import count_macs, count_params, evaluate_module
from pipeline.manifest import ArtifactRole
from pipeline.models import build_student, is_pruned_payload, load_student_file, pruned_payload, rebuild_pruned
from pipeline.stage import Measure, StageContext, StageResult, register
from pipeline.tasks import task_for
from pipeline.torch_runtime import TorchRuntime
from stages import prune_target
from stages.pruning import ignored_modules, make_pruner, too_narrow  # noqa: F401 - the stage's public API
from stages.distill_loss import distillation
from stages.training import fit, loaders, save_torch

log = logging.getLogger(__name__)

Config = PruneConfig

# Batches of calibration images whose gradients feed the Taylor importance (per pruning step).
_TAYLOR_BATCHES = 4


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


def _pruned_unhealed(ctx: StageContext, student: nn.Module, cfg: PruneConfig) -> tuple[nn.Module, list]:
    """Prune a copy of the student at `cfg.ratio` (0: nothing to prune), or reload the
    pruned-but-unhealed model saved by an interrupted run of this same stage (same key), so
    healing resumes on identical channels."""
    dcfg = ctx.cfg.distill
    saved = ctx.resume_file("pruned_unhealed.pt")
    if saved.is_file():
        obj = torch.load(saved, map_location="cpu", weights_only=True)
        if is_pruned_payload(obj) and obj.get("key") == ctx.key:
            log.info("prune: resuming from %s", saved.name)
            return rebuild_pruned(obj), obj["history"]
    torch.manual_seed(ctx.cfg.pipeline.seed)
    model = build_student(ctx.cfg, ctx.data.num_classes, weights="")
    model.load_state_dict(student.state_dict())
    history = prune_model(model, ctx, cfg, dcfg.student) if cfg.ratio > 0 else []
    payload = _payload(ctx, model.cpu(), history)
    save_torch({**payload, "key": ctx.key}, saved)
    return model, payload["history"]


def preflight(cfg) -> None:
    """Ignored layers exist, some layer is wide enough to prune, and Torch-Pruning can trace the
    student: checked on a randomly initialised student before anything trains. With a latency
    target, also that the build exists and runs here and that `max_ratio` reaches the target
    (:func:`stages.prune_target.preflight`)."""
    if not cfg.prune.enabled:
        return
    task = task_for(cfg)
    with torch.random.fork_rng():  # probing must not shift the run's random stream
        student = build_student(cfg, 10, weights="").eval()
        pcfg = cfg.prune.model_copy(update={"ratio": cfg.prune.max_ratio}) if cfg.prune.targeted else cfg.prune
        make_pruner(copy.deepcopy(student), torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size), pcfg,
                    cfg.distill.student, task, log_level=logging.DEBUG)  # the stage says it when it prunes
        if cfg.prune.targeted:
            prune_target.preflight(cfg, student)


@register("prune", order=30, inputs=("student", "teacher"), reads=("distill", "teacher", "data"),
          enabled=lambda cfg: cfg.prune.enabled, preflight=preflight, extra_reads=prune_target.extra_reads,
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
    search = None
    if cfg.targeted:
        search = prune_target.search_ratio(ctx, student)
        cfg = cfg.model_copy(update={"ratio": search["chosen_ratio"]})
    model, prune_history = _pruned_unhealed(ctx, student, cfg)
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
        **({"latency_search": search} if search else {}),
    }
    result = StageResult(
        outputs={"pruned": path},
        measure={"pruned": Measure(TorchRuntime(model, ctx.device, ctx.cfg.bench.threads, output_names=task.output_names),
                                   model=model, path=path)},
        metrics={"pruned": metrics},
        history={"pruned": history} if history else {},
    )
    if search and search["chosen_ratio"] == 0:
        result.warnings.append(f"the unpruned student already meets the target on {search['build']} "
                               f"({search['unpruned_latency_ms']:.4g} ms <= {search['target_ms']:.4g} ms): nothing pruned")
    elif search and not search["within_tolerance"]:
        result.warnings.append(f"latency search: ratio {search['chosen_ratio']:g} measures "
                               f"{search['chosen_latency_ms']:.4g} ms on {search['build']}, more than 10% under the "
                               f"target {search['target_ms']:.4g} ms ({search['stop']}): a smaller ratio may also meet it")
    if search is None and metrics["latency_speedup"] < 1.05:
        result.warnings.append(
            f"pruning cut MACs to {metrics['macs_ratio']:.0%} but torch-eager latency at batch 1 only changed "
            f"{metrics['latency_speedup']:.2f}x (small inputs are dominated by per-op overhead); "
            "judge it on the deployment runtime (onnx/openvino stages)"
        )
    return result

