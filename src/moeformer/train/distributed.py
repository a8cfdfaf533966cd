"""Data-parallel training on torch.distributed: set-up, data sharding, reductions.

``torchrun --nproc_per_node N -m moeformer train CONFIG`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in the environment; :func:`init_distributed` joins
them into one process group (NCCL on GPUs, gloo on CPUs) with a timeout, so a dead rank ends
the run with an error instead of a hang. The model is wrapped in DistributedDataParallel; each
rank takes every N-th batch of the shared, deterministic batch order (no overlap), and the loss
of each rank is weighted by its share of the step's tokens, so the averaged gradient is that of
the whole global batch. Routing loads are summed over ranks before the bias update and before
logging; only rank 0 logs, evaluates into files and writes checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from moeformer.validation import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: Tensor) -> Tensor:
        """All-reduce (sum) a copy of ``value`` over the ranks."""
        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def shard(self, batches: list[T]) -> list[T]:
        """This rank's batches: every world_size-th, the same count on every rank (no rank waits alone)."""
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]


def init_distributed(*, expected_world_size: int | None = None, timeout_s: float = 600.0) -> Distributed | None:
    """Join the process group torchrun describes, or return None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if expected_world_size is not None and world != expected_world_size:
        raise ConfigError(
            "train.world_size", f"the config asks for {expected_world_size} processes but {world} were started"
        )
    if world == 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Distributed(rank, world, local_rank)


def reduce_loads(loads: dict[str, Tensor], ctx: Distributed | None) -> dict[str, Tensor]:
    """Tokens per expert summed over ranks (bias updates and load logging see the global batch)."""
    if ctx is None or not loads:
        return loads
    names = sorted(loads)
    flat = ctx.sum(torch.cat([loads[n].float() for n in names]))
    return dict(zip(names, flat.split([loads[n].numel() for n in names])))
