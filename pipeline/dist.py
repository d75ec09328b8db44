"""Multi-GPU / multi-node training through PyTorch's own engine (torchrun + DDP).

Launched under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), every rank runs the same
stage chain; the training stages wrap the model in DistributedDataParallel and shard the
training split with a DistributedSampler. Only rank 0 writes artifacts, checkpoints and the
manifest; the other ranks wait at a barrier and then read what rank 0 wrote, so the work
directory must be on a filesystem every rank sees (a single node, or a shared mount).
Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> bool:
    """Join the process group when launched by torchrun; return True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
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
