"""Setting up the ranks: torch.distributed from torchrun's environment (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from specdec.model.errors import ConfigError
from specdec.model.parallel import ParallelContext


def rank_device(device: torch.device, local_rank: int, world_size: int, visible_gpus: int) -> torch.device:
    """The device this rank runs on. A CPU device stays. `cuda` without an index becomes the rank's
    own GPU: cuda:LOCAL_RANK when this process sees several GPUs, cuda:0 when it sees one (each rank
    given its own by CUDA_VISIBLE_DEVICES). Under torchrun, an explicit `cuda:i` that is not the
    rank's own GPU is refused: every rank would launch its kernels on GPU i."""
    if device.type != "cuda":
        return device
    if visible_gpus < 1:
        raise ConfigError(f"--device {device}: no CUDA device is visible to this process")
    own = local_rank if visible_gpus > 1 and world_size > 1 else 0
    if own >= visible_gpus:
        raise ConfigError(f"LOCAL_RANK={local_rank} but this process sees only {visible_gpus} GPU(s): "
                          f"run at most {visible_gpus} ranks per node, or give each its GPU with CUDA_VISIBLE_DEVICES")
    if device.index is None:
        return torch.device("cuda", own)
    if world_size > 1 and device.index != own:
        raise ConfigError(f"--device {device} under torchrun: rank {local_rank} on this node must run on cuda:{own}; "
                          "pass --device cuda and each rank takes its own GPU")
    return device


def bind_device(device: torch.device) -> torch.device:
    """Resolve `device` for this process (`rank_device`, from torchrun's LOCAL_RANK and WORLD_SIZE) and,
    for CUDA, make it the current device, so Triton launches, NCCL collectives and
    `broadcast_object_list` use this rank's GPU rather than GPU 0. Call before `init_parallel`."""
    if device.type != "cuda":
        return device
    bound = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")), _world_size(), torch.cuda.device_count())
    torch.cuda.set_device(bound)
    return bound


def init_parallel(device: torch.device, timeout_s: float = 600.0) -> ParallelContext:
    """ParallelContext for this process; joins the torchrun process group when WORLD_SIZE > 1 (gloo
    on the CPU; NCCL bound to `device`, this rank's GPU from `bind_device`, on CUDA)."""
    world_size = _world_size()
    if world_size == 1:
        return ParallelContext()
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout_s), device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return ParallelContext(world_size=world_size, rank=rank)


def default_device() -> torch.device:
    """`cuda` when CUDA is present (`bind_device` picks the rank's GPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shutdown(wait_for_peers: bool = False) -> None:
    """Leave the process group. With wait_for_peers, first meet every rank at a barrier, so no rank tears
    down gloo's transport while a peer still uses it (after a fault, call it without: a dead peer never arrives)."""
    if not dist.is_initialized():
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def exit_rank(status: int) -> NoReturn:
    """End a torchrun rank's process with `status` now, after `shutdown`: flush stdout and stderr,
    then `os._exit`, skipping the interpreter's finalization. There torch's C++ objects (thread
    pools, the gloo transport) were torn down in no fixed order, and in CI one rank of a finished
    2-rank run now and then aborted ("terminate called without an active exception", SIGABRT),
    failing a run whose work was done. Outputs are written (atomically) before this is called."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def under_torchrun() -> bool:
    """Whether this process is one rank of several (torchrun's WORLD_SIZE > 1)."""
    return _world_size() > 1


def _world_size() -> int:
    """torchrun's WORLD_SIZE (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
