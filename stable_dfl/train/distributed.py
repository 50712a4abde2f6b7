"""Process-group setup for ``torchrun`` (DDP): gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistContext:
    """Joins the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    ``device``: 'auto' (CUDA when available), 'cpu' or 'cuda'. Each rank uses the GPU of
    its ``LOCAL_RANK``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device)
    if world_size == 1:
        return DistContext(0, 1, torch_device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), torch_device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The mean of ``values`` over ranks (identity on one process)."""
    if not context.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / context.world_size


def broadcast_from_main(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not context.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(value: Any, context: DistContext) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered
