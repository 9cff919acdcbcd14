"""Setting up the ranks: torch.distributed from torchrun's environment (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from model.parallel import ParallelContext


def init_parallel(device: torch.device, timeout_s: float = 600.0) -> ParallelContext:
    """ParallelContext for this process; joins the torchrun process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ParallelContext()
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return ParallelContext(world_size=world_size, rank=rank)


def default_device() -> torch.device:
    """This rank's CUDA device when CUDA is present (LOCAL_RANK picks it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group. With wait_for_peers, first meet every rank at a barrier, so no rank tears
    down gloo's transport while a peer still uses it (after a fault, call it without: a dead peer never arrives)."""
    if not dist.is_initialized():
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()
