"""Multi-GPU / multi-node training through PyTorch's own engine (torchrun + DDP).

Launched under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), every rank runs the same
stage chain; the training stages wrap the model in DistributedDataParallel and shard the
training split with a DistributedSampler. Only rank 0 writes artifacts, checkpoints and the
manifest; the other ranks wait at a barrier and then read what rank 0 wrote, so the work
directory must be on a filesystem every rank sees (a single node, or a shared mount).
Backend: NCCL when the configured device is CUDA, gloo otherwise (a `device = "cpu"` run on a
GPU machine uses gloo). While rank 0 alone exports and measures, the other ranks wait in a
barrier, so the collective timeout is long (:data:`TIMEOUT`, ``PIPELINE_DIST_TIMEOUT_S``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.errors import UserError


# How long a rank waits in a collective (a barrier) before the run is aborted. NCCL's default
# is 10 minutes and gloo's 30, but rank 0 alone exports, calibrates, builds engines and
# measures every artifact on the whole validation split while the others wait at a barrier:
# that can take hours on a large split. On one node a rank that fails exits and torchrun stops
# the others, so a long timeout does not make a failed run hang; across nodes the other nodes'
# ranks may wait out the timeout, which is why it can be set (PIPELINE_DIST_TIMEOUT_S).
TIMEOUT = timedelta(hours=4)


def _timeout() -> timedelta:
    """:data:`TIMEOUT`, or ``PIPELINE_DIST_TIMEOUT_S`` seconds when that is set."""
    value = os.environ.get("PIPELINE_DIST_TIMEOUT_S", "").strip()
    if not value:
        return TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"PIPELINE_DIST_TIMEOUT_S = {value!r}: give a number of seconds above 0")
    return timedelta(seconds=seconds)


def _uses_cuda(device: str) -> bool:
    """Whether `[pipeline] device` puts this run on CUDA. A CUDA device asked for on a machine
    without one gets gloo here, so that the config check reports it (exit 2) rather than NCCL."""
    return torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))


def init(device: str = "auto") -> bool:
    """Join the process group when launched by torchrun; return True when distributed.

    `device` is `[pipeline] device`: NCCL, bound to this rank's GPU (``cuda:LOCAL_RANK``), when
    it resolves to CUDA; gloo otherwise, whatever GPUs the machine has.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if _uses_cuda(device):
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(local)
            # device_id binds the communicator to this GPU now, so a barrier never guesses it.
            dist.init_process_group("nccl", timeout=_timeout(), device_id=local)
        else:
            dist.init_process_group("gloo", timeout=_timeout())
    return True


def enabled() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if enabled():
        dist.barrier()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank drives its own GPU: ``cuda`` → ``cuda:LOCAL_RANK``."""
    if enabled() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP.

    Used for the MGD align/generation blocks, which are optimised with the student but are
    not part of its forward, so DDP does not see them.
    """
    if not enabled():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (DDP does this for the model itself)."""
    if not enabled():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def mean(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over every rank (``t`` itself when not distributed)."""
    if not enabled():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()
