"""The training loop shared by every training stage (teacher, distill, prune healing).

SGD or AdamW, linear warm-up then cosine decay (stepped per batch), optional label smoothing,
seeded, mixed precision and channels_last on CUDA. After every epoch the whole state (model,
extra trainable modules such as MGD blocks, optimizer, scheduler, grad scaler, RNG states and
history) is checkpointed atomically, so an interrupted stage resumes at the last finished epoch.
A checkpoint carries the stage's cache key: one written under another config is ignored.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from pipeline import dist, faults
from pipeline.errors import ConfigError
from pipeline.schema import OptimConfig
from pipeline.evaluate import evaluate_module
from pipeline.manifest import atomic_write_bytes
from pipeline.ui import clock_after, format_duration, progress
from stages.fast_conv_grad import fast_weight_grad

if TYPE_CHECKING:
    from pipeline.stage import StageContext
    from pipeline.tasks import Task
    from stages.unlabeled_stream import UnlabeledStream

log = logging.getLogger(__name__)

# Longest training a crash may lose (seconds): see `fit`.
CHECKPOINT_EVERY_S = 20.0

clock = time.perf_counter  # epoch timing (a module attribute, so a test can drive it)

# loss_fn(model, images, targets) -> (loss, model output, {term: value}). The default is the task
# loss alone ({"task": loss}); distillation passes a closure that adds its terms (mgd, kd), each
# logged and recorded per epoch apart from the total.
LossFn = Callable[[nn.Module, torch.Tensor, Any], tuple[torch.Tensor, Any, dict[str, torch.Tensor]]]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@dataclass
class History:
    """Per-epoch records: epoch, loss, loss_<term> (each loss term's mean: loss_task, loss_mgd,
    loss_mgd[<tap>] when MGD taps several layers, loss_kd), train_<m> (when the task has a
    running training metric), val_<m> (the task's primary metric, e.g. val_acc, val_miou), lr,
    seconds."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(e["seconds"] for e in self.epochs))


def save_torch(obj: object, path: Path) -> None:
    """torch.save, atomically (temp file + fsync + rename): a crash never leaves half a file.

    Under torchrun only rank 0 writes; the runner's barrier lets the others read the file.
    """
    if not dist.is_main():
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor on the CPU (portable checkpoints)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def loaders(ctx: "StageContext", train_fraction: float = 1.0) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Train and val loaders for a training stage: seeded shuffling, a DistributedSampler
    under torchrun (each rank sees its shard), ``[data] num_workers`` worker processes (resolved
    by :meth:`DataBundle.workers`: "auto" is 0 for in-memory sources), pinned memory on CUDA.
    ``train_fraction`` < 1 trains on a seeded share of the training split (the students'
    ``[distill] train_fraction``)."""
    data, seed, cfg = ctx.data.with_train_share(train_fraction, ctx.cfg.pipeline.seed), ctx.cfg.pipeline.seed, ctx.cfg.data
    sampler = None
    if dist.enabled():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(data.train, shuffle=True, seed=seed)
    n = len(sampler) if sampler is not None else len(data.train)  # images per rank and epoch
    if n < 2:
        raise ConfigError(f"data: the training split has {n} image(s) (data.train_fraction = {cfg.train_fraction}, "
                          f"distill.train_fraction = {train_fraction}); training needs at least 2")
    workers = data.workers(cfg.num_workers)
    log.log(logging.INFO if workers else logging.DEBUG, "data loading: %d worker process%s per loader "
            "(data.num_workers = %r)", workers, "" if workers == 1 else "es", cfg.num_workers)
    # Workers are NOT persistent: restarted each epoch they are reseeded from the loader's
    # generator, which the checkpoint restores, so a resumed run draws the same augmentations as
    # an uninterrupted one. Persistent workers would carry their random streams across epochs,
    # which no resume can replay; the restart cost ~0.1 s per epoch (benchmarks/loader_throughput.py).
    # Pinned pages make the copy to the GPU asynchronous (fit moves batches with non_blocking=True).
    common = dict(num_workers=workers, pin_memory=ctx.device.type == "cuda")
    # A last batch of ONE image breaks BatchNorm in training mode; drop only that one, so every
    # other dataset size trains on exactly the images it has.
    train = data.loader("train", cfg.batch_size, seed=seed, sampler=sampler, drop_last=n % cfg.batch_size == 1, **common)
    return train, data.loader("val", cfg.batch_size, **common)


def _optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak lr, then cosine decay to zero, as a LambdaLR factor."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPUs of compute capability 8.0 (Ampere) and newer, fp16
    (with a grad scaler) below, None (fp32) on the CPU or when AMP is off."""
    if not enabled or device.type != "cuda":
        return None  # autocast on CPU is slower than fp32 for these convnets
    # Not torch.cuda.is_bf16_supported(): it counts emulation and is true on T4, V100 and
    # Xavier, where cuDNN has no bf16 convolution kernels; fp16 is the fast kind there.
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def task_loss(task: "Task", optim: OptimConfig) -> LossFn:
    """The task's own loss on the model's output."""

    def loss_fn(model: nn.Module, images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, Any, dict]:
        out = model(images)
        loss = task.loss(out, targets, optim)
        return loss, out, {"task": loss}

    return loss_fn


def term_summary(record: dict[str, float]) -> str:
    """" (task 1.23, mgd 0.45, kd 0.06)" from an epoch record's loss_<term> entries ("" when the
    task loss is the only term)."""
    terms = [(k[5:], v) for k, v in record.items() if k.startswith("loss_") and "[" not in k]
    if len(terms) < 2:
        return ""
    return " (" + ", ".join(f"{name} {value:.4g}" for name, value in terms) + ")"


def fit(
    model: nn.Module,
    *,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    optim: OptimConfig,
    device: torch.device,
    checkpoint: Path,
    key: str,
    desc: str,
    epochs: int | None = None,
    lr: float | None = None,
    task: "Task",
    num_classes: int,
    loss_fn: LossFn | None = None,
    extra: nn.Module | None = None,
    then: str = "",
    checkpoint_every: float = CHECKPOINT_EVERY_S,
    unlabeled: "UnlabeledStream | None" = None,
) -> History:
    """Train `model` in place; return its per-epoch history.

    `extra` holds additional trainable modules (e.g. MGD generation blocks) that are optimised
    and checkpointed with the model but are not part of it. Under torchrun the model is wrapped
    in DistributedDataParallel (the caller passes a DistributedSampler in `train_loader`) and
    the gradients of `extra` are averaged across ranks. `epochs`/`lr` override `optim`'s
    (healing uses its own). Resumes from `checkpoint` when it was written under the same `key`.
    The final weights are kept (no selection on val: that would tune on evaluation images).
    A resume checkpoint is written after the first epoch run, the last, and any epoch ending at
    least `checkpoint_every` seconds after the previous save (0: every epoch), so a crash loses
    at most that much training.
    After the first epoch it runs, it logs how long the remaining epochs should take and when
    they should end; `then` adds what follows this model (e.g. "the baseline student follows").
    `unlabeled`: a stream of unlabelled images; each step's labelled images are followed, in the
    same batch, by one batch of it, and `loss_fn` (which must then be distillation's) puts only
    distillation terms on those (the output it returns is the labelled part's).
    """
    epochs = optim.epochs if epochs is None else epochs
    peak_lr = optim.lr if lr is None else lr
    loss_fn = loss_fn or task_loss(task, optim)
    val_key = f"val_{task.history_metric}"
    model.to(device)
    if extra is not None:
        extra.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:
        params += [p for p in extra.parameters() if p.requires_grad]
    opt = _optimizer(params, optim.model_copy(update={"lr": peak_lr}))
    steps = max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(epochs * steps, optim.warmup_epochs * steps))
    amp_dtype = _amp_dtype(device, optim.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history = History()
    start_epoch = _resume(checkpoint, key, model, extra, opt, sched, scaler, train_loader, history)
    if start_epoch >= epochs and epochs > 0:
        log.info("%s: all %d epochs already done (checkpoint)", desc, epochs)
        return history
    net: nn.Module = model
    if dist.enabled():
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if extra is not None:
            dist.broadcast_parameters(extra)

    # On CPU, small feature maps train ~2× faster with the GEMM weight gradient (stages/fast_conv_grad.py).
    faster = fast_weight_grad(model, extra) if device.type == "cpu" else contextlib.nullcontext()
    last_save = clock()
    with faster, progress() as bar:
        bar_task = bar.add_task(desc, total=(epochs - start_epoch) * steps, info="", visible=dist.is_main())
        for epoch in range(start_epoch, epochs):
            t0 = clock()
            model.train()
            if extra is not None:
                extra.train()
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)  # DistributedSampler reshuffles per epoch
            if unlabeled is not None:
                unlabeled.start_epoch(epoch)
            loss_sum, correct, counted, seen = 0.0, 0, 0, 0
            term_sums: dict[str, float] = {}
            for batch_idx, (images, targets) in enumerate(train_loader):
                images = images.to(device, non_blocking=True)
                if unlabeled is not None:
                    images = torch.cat([images, unlabeled.next().to(device, non_blocking=True)])
                targets = task.targets_to(targets, device)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    loss, out, terms = loss_fn(net, images, targets)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{desc}: loss is {loss.item()} at epoch {epoch + 1} batch {batch_idx + 1}; "
                        f"lower the learning rate (lr = {peak_lr}) or the distillation weight (alpha); "
                        f"the last good checkpoint ({checkpoint.name}) is kept"
                    )
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                if extra is not None:
                    dist.average_gradients(extra)  # DDP syncs the model; the MGD blocks are ours to sync
                if optim.grad_clip:
                    if scaler is not None:
                        scaler.unscale_(opt)  # clip the true gradients, not the loss-scaled ones
                    torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                sched.step()
                faults.point("train-step")
                n = task.batch_size_of(targets)
                loss_sum += loss.item() * n
                for term, value in terms.items():
                    term_sums[term] = term_sums.get(term, 0.0) + float(value.detach()) * n
                seen += n
                hits = task.train_correct(out, targets)
                if hits is not None:
                    correct += hits[0]
                    counted += hits[1]
                bar.update(bar_task, advance=1, info=f"epoch {epoch + 1}/{epochs} loss {loss_sum / seen:.3f}")
            val = evaluate_module(model, val_loader, device, task, num_classes)[task.metric]
            record = {"epoch": epoch + 1, "loss": loss_sum / max(1, seen),
                      **{f"loss_{term}": total / max(1, seen) for term, total in term_sums.items()}}
            if counted:
                record[f"train_{task.history_metric}"] = correct / counted
            record.update({val_key: val, "lr": opt.param_groups[0]["lr"], "seconds": clock() - t0})
            history.epochs.append(record)
            (log.info if dist.is_main() else log.debug)(
                "%s epoch %d/%d: loss %.4f%s, %sval %s %.4f (%.1fs)",
                desc, epoch + 1, epochs, record["loss"], term_summary(record),
                f"train {task.history_metric} {correct / counted:.4f}, " if counted else "", task.metric, val,
                record["seconds"],
            )
            # Every epoch would cost more than it saves on short epochs (a ResNet-18 checkpoint with
            # AdamW state is ~130 MB, about a second to write and fsync): save the first epoch run,
            # the last, and otherwise once `checkpoint_every` seconds have passed since the last save.
            if epoch in (start_epoch, epochs - 1) or clock() - last_save >= checkpoint_every:
                _save(checkpoint, key, epoch + 1, model, extra, opt, sched, scaler, train_loader, history)
                last_save = clock()
            if epoch == start_epoch and dist.is_main():
                _log_estimate(desc, epoch + 1, epochs, clock() - t0, then)
    return history


def _log_estimate(desc: str, done: int, epochs: int, seconds: float, then: str) -> None:
    """One line after a stage's first epoch: what it took, and what the rest should take."""
    left = epochs - done
    if left <= 0:
        return
    rest = seconds * left
    log.info("%s: epoch %d/%d took %s; about %s left for this model (ETA %s)%s", desc, done, epochs,
             f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds), format_duration(rest),
             clock_after(rest), f"; {then}" if then else "")


def _save(checkpoint, key, epoch, model, extra, opt, sched, scaler, loader, history) -> None:
    state = {
        "key": key,
        "epoch": epoch,
        "model": state_dict_cpu(model),
        "extra": state_dict_cpu(extra) if extra is not None else None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_loader": loader.generator.get_state() if loader.generator is not None else None,
        "history": history.epochs,
    }
    save_torch(state, checkpoint)


def _resume(checkpoint, key, model, extra, opt, sched, scaler, loader, history) -> int:
    """Load a same-key checkpoint into the live objects; return the number of finished epochs."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        return 0
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint cut short by a crash is not fatal: start over
        log.warning("ignoring unreadable checkpoint %s (%s); training from the start", checkpoint, exc)
        return 0
    if not isinstance(state, dict) or state.get("key") != key:
        log.info("checkpoint %s belongs to another config; training from the start", checkpoint)
        return 0
    model.load_state_dict(state["model"])
    if extra is not None and state.get("extra") is not None:
        extra.load_state_dict(state["extra"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    if loader.generator is not None and state.get("rng_loader") is not None:
        loader.generator.set_state(state["rng_loader"])
    history.epochs.extend(state["history"])
    log.info("resuming %s from epoch %d", checkpoint.parent.name, state["epoch"] + 1)
    return int(state["epoch"])
