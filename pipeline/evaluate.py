"""Quality metrics (through the task), parameter count, MACs, artifact size, and the per-artifact measurement.

:func:`measure` is what the runner applies to every artifact after every stage; it is the
same for every runtime (torch, ONNX Runtime, OpenVINO, TensorRT) so the manifest's metrics
compare like with like.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import nn

from pipeline.bench import latency_metrics

if TYPE_CHECKING:
    from pipeline.bench import Runtime
    from pipeline.schema import BenchConfig
    from pipeline.tasks import Task

log = logging.getLogger(__name__)


def _track(iterable: Iterable, description: str, total: int | None) -> Iterable:
    """A rich progress bar on an interactive terminal; the plain iterable otherwise (logs, CI)."""
    from pipeline.ui import track

    return track(iterable, description, total)


def _len_or_none(obj: object) -> int | None:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    # Per-module, not just the root flag: a model with e.g. frozen BatchNorm in eval inside
    # a training model must come back exactly as it was.
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, training in modes.items():
        m.training = training


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on ONE image of shape `input_shape` (C, H, W).

    Uses Torch-Pruning's counter (`torch_pruning.utils.count_ops_and_params`, which counts
    bias additions as MACs too); falls back to `torch.utils.flop_counter.FlopCounterMode`
    (FLOPs // 2, no bias) when Torch-Pruning is missing or fails. The model is not changed:
    counting happens in eval mode (BatchNorm running stats stay untouched) on CPU — on a copy
    when the model lives elsewhere — and every module's train/eval mode is restored.
    """
    params = list(model.parameters()) + list(model.buffers())
    on_cpu = all(t.device.type == "cpu" for t in params)
    target = model if on_cpu else copy.deepcopy(model).to("cpu")
    dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()), torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        # Half kernels are patchy on CPU; MACs do not depend on dtype.
        if target is model:
            target = copy.deepcopy(model)
        target = target.float()
        dtype = torch.float32
    example = torch.zeros((1, *input_shape), dtype=dtype)

    modes = _module_modes(model)
    target.eval()
    try:
        with torch.no_grad():
            try:
                import torch_pruning as tp

                macs, _ = tp.utils.count_ops_and_params(target, example)
                return int(macs)
            except Exception as exc:  # ImportError, or an op Torch-Pruning cannot trace
                log.debug("torch_pruning MAC count failed (%s); using FlopCounterMode", exc)
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                target(example)
            return int(counter.get_total_flops() // 2)
    finally:
        _restore_modes(modes)


def _numpy(batch: object) -> np.ndarray:
    return batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)


def evaluate_runtime(runtime: "Runtime", loader: Iterable, task: "Task", num_classes: int) -> dict[str, float]:
    """The task's quality metrics of `runtime` over a loader of `(images, targets)` batches.

    The runtime returns its raw outputs by name; the task post-processes them and scores them,
    so every runtime of every task is judged by one code path.
    """
    evaluator = task.evaluator(num_classes)
    for batch in _track(loader, f"{task.metric} {runtime.name}", _len_or_none(loader)):
        images, targets = batch[0], batch[1]
        evaluator.update(runtime.outputs(_numpy(images).astype(np.float32, copy=False)), targets)
    return evaluator.compute()


@torch.no_grad()
def evaluate_module(model: nn.Module, loader: Iterable, device: str | torch.device, task: "Task",
                    num_classes: int) -> dict[str, float]:
    """The task's quality metrics of a torch module during training.

    Switches to eval mode for the pass and restores every module's previous mode afterwards,
    so it can be called between epochs.
    """
    device = torch.device(device)
    modes = _module_modes(model)
    model.eval()
    evaluator = task.evaluator(num_classes)
    try:
        for images, targets in (b[:2] for b in loader):
            out = task.named_outputs(model(images.to(device, non_blocking=True)))
            evaluator.update({n: t.detach().float().cpu().numpy() for n, t in out.items()}, targets)
    finally:
        _restore_modes(modes)
    return evaluator.compute()


def artifact_size(path: Path) -> int:
    """Bytes on disk of an artifact.

    A directory counts every file under it; an OpenVINO `.xml` counts its sibling `.bin`
    (the weights live there); anything else is the single file's size.
    """
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    size = path.stat().st_size  # FileNotFoundError for a missing artifact is the right failure
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        if weights.is_file():
            size += weights.stat().st_size
    return size


def measure(
    runtime: "Runtime",
    *,
    val_loader: Iterable,
    input_shape: tuple[int, int, int],
    batch_size: int,
    bench: "BenchConfig",
    task: "Task",
    num_classes: int,
    model: nn.Module | None = None,
    artifact_path: Path | None = None,
) -> dict[str, float | int]:
    """The per-artifact measurement, identical for every runtime.

    Returns the task's quality metrics (`accuracy`; `miou`, `pixel_accuracy`; `map`, `map_50`)
    and the :func:`pipeline.bench.latency_metrics` keys always; `params` and `macs` when a
    torch `model` is given; `size_bytes` when `artifact_path` is given.
    """
    metrics: dict[str, float | int] = dict(evaluate_runtime(runtime, val_loader, task, num_classes))
    metrics.update(latency_metrics(runtime, input_shape, batch_size=batch_size, bench=bench))
    if model is not None:
        metrics["params"] = count_params(model)
        metrics["macs"] = count_macs(model, input_shape)
    if artifact_path is not None:
        metrics["size_bytes"] = artifact_size(Path(artifact_path))
    return metrics
