"""torch.distributed set-up for ``torchrun``: returns a DistContext value instead of setting globals."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistContext:
    """Who this process is. ``world == 1`` means plain single-process training (no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's env vars (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world=world, local_rank=local, device=device)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """In-place sum across processes (no-op on one process)."""
    if ctx.distributed:
        torch.distributed.all_reduce(t)
    return t


def broadcast(t: torch.Tensor, ctx: DistContext, src: int = 0) -> torch.Tensor:
    if ctx.distributed:
        torch.distributed.broadcast(t, src)
    return t
