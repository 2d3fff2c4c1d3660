"""Which rank this process is, and the process group that joins the ranks.

`torchrun` (PyTorch's launcher) starts one process per rank and tells each, through environment
variables, who it is (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) and where rank 0 listens (`MASTER_ADDR`,
`MASTER_PORT`). Nothing here launches anything: a single process is simply a world of one.

    with session() as ranks:        # inits the process group under torchrun, a no-op otherwise
        if ranks.rank == 0: ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmscope.errors import LmscopeError


class DistributedError(LmscopeError):
    """The ranks of a distributed run disagree, or the launch environment is incomplete."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: `rank` of `world`, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """What torchrun set; a world of one when it did not."""
        try:
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as e:
            raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None
        if not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes what all ranks share (merged manifests, suite records)."""
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """The device this rank should use: `cuda` (or the default, on a GPU machine) becomes
        `cuda:<local_rank>`, so ranks on one machine do not share GPU 0. Others pass through."""
        gpu = torch.cuda.is_available()
        if self.world > 1 and gpu and requested in (None, "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init(ranks: Ranks | None = None) -> Ranks:
    """Join the process group of a torchrun launch (gloo for CPU tensors, NCCL for CUDA ones).
    A world of one needs no group and gets none."""
    ranks = ranks or Ranks.from_env()
    if ranks.world == 1 or dist.is_initialized():
        return ranks
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={ranks.world} but {missing} unset; launch with torchrun"
        )
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(ranks.local_rank)
        backend = "cpu:gloo,cuda:nccl"  # barriers and small objects on CPU, gradients on GPU
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world)
    return ranks


@contextmanager
def session() -> Iterator[Ranks]:
    """`init()` for the length of a command; the group is torn down after, error or not."""
    started = not dist.is_initialized()
    ranks = init()
    try:
        yield ranks
    finally:
        if started and dist.is_initialized():  # only a group we made
            dist.destroy_process_group()
