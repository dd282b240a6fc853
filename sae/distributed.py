"""Process-group plumbing for `torchrun`: N processes compute what one would with the same global batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def dist_info() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_mean_(tensors: list[Tensor], world: int) -> None:
    if world > 1:
        for t in tensors:
            dist.all_reduce(t)
            t /= world


def all_sum_(t: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def leave(world: int) -> None:
    """Leave the group explicitly: gloo aborts a process that exits with it still open."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
