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


def broadcast_flag(value: bool, world: int, device: torch.device | str = "cpu") -> bool:
    """Rank 0's `value` on every rank: one decision (e.g. a timed kernel choice) shared by the whole job."""
    if world == 1:
        return value
    t = torch.tensor([int(value)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


class GlobalBatch:
    """`sae.saes.kernels.BatchGroup` for a torchrun job: each process holds an equal slice of every global
    batch, in rank order, so a selection over the global batch is a few small collectives."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def all_min(self, t: Tensor) -> Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def all_sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def gather(self, t: Tensor) -> list[Tensor]:
        """Every process's 1-D tensor, sizes may differ: sizes first, then the padded tensors, trimmed."""
        size = torch.tensor([t.numel()], device=t.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        counts = [int(s) for s in sizes]
        padded = t.new_zeros(max(counts))
        padded[:t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [p[:c] for p, c in zip(parts, counts, strict=True)]


def global_batch_group(world: int) -> GlobalBatch | None:
    """The collectives for a global-batch selection, or None on one process (no collective at all)."""
    return GlobalBatch() if world > 1 else None
