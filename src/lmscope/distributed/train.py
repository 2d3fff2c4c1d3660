"""A suite trained by many ranks: SAEs split among groups of ranks, DDP inside a group.

Every SAE is trained by exactly one *group* of ranks. A group of one trains its SAEs as
`train_suite` would alone, reading only their sites; a group of k ranks trains its SAEs
data-parallel: every rank takes 1/k of each batch's rows, gradients and the statistics that steer
λ and θ are all-reduced, and the ranks step in lockstep (same init, same Adam updates). So each SAE
ends with the weights single-process training gives it, exactly (groups of one) or to float
rounding (DDP). BatchTopK picks its top k·B over the batch, which no split reproduces: it is
refused in groups of more than one rank.

Each rank trains (and checkpoints) in `<out>/.ranks/rank-NNNNN/`; the first rank of each group
moves the finished SAE folders to `<out>/<sae>/`. Resuming needs the same world size and plan.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lmscope.distributed.context import DistributedError, Ranks
from lmscope.errors import ConfigError
from lmscope.sae.formats import replace_folder
from lmscope.train import SAESpec, TrainConfig
from lmscope.train import checkpoint as ck
from lmscope.train.trainer import DataFactory, train_suite

RANKS_DIR = ".ranks"


@dataclass(frozen=True)
class Group:
    """Ranks that train `specs` together (data-parallel when there are several)."""

    ranks: tuple[int, ...]
    specs: tuple[SAESpec, ...]


def _cost(spec: SAESpec) -> int:
    # Steps cost ∝ width × (sites read): d is not known before the data is seen.
    return spec.width * len(spec.sites)


def plan_suite(
    specs: Sequence[SAESpec], world: int, ranks_per_sae: int | None = None
) -> list[Group]:
    """Split a suite over `world` ranks: `world / ranks_per_sae` groups of consecutive ranks,
    SAEs dealt to the least-loaded group, biggest first (deterministic: every rank plans alike).
    By default groups are single ranks, or as large as needed to leave no rank idle when there
    are fewer SAEs than ranks (one SAE on 4 ranks: DDP over all 4).

    >>> [g.ranks for g in plan_suite(specs_of_3, 4)]   # [(0, 1), (2, 3)]
    """
    if not specs:
        raise ConfigError("the suite has no SAEs to split among ranks")
    if ranks_per_sae is None:
        ranks_per_sae = next(g for g in range(1, world + 1) if world % g == 0 and world // g <= len(specs))  # fmt: skip
    if ranks_per_sae < 1 or world % ranks_per_sae:
        raise ConfigError(f"ranks per SAE ({ranks_per_sae}) must divide the {world} ranks")
    n = world // ranks_per_sae
    load, dealt = [0] * n, [[] for _ in range(n)]  # type: list[int], list[list[int]]
    for i in sorted(range(len(specs)), key=lambda i: -_cost(specs[i])):  # stable: ties by order
        g = min(range(n), key=lambda g: (load[g], g))
        load[g] += _cost(specs[i])
        dealt[g].append(i)
    groups = []
    for g, idx in enumerate(dealt):
        mine = tuple(specs[i] for i in sorted(idx))
        if ranks_per_sae > 1 and any(s.architecture.endswith("batchtopk") for s in mine):
            raise ConfigError("batchtopk selects over the whole batch: train it on one rank per SAE")  # fmt: skip
        groups.append(Group(tuple(range(g * ranks_per_sae, (g + 1) * ranks_per_sae)), mine))
    return groups


class DataParallel:
    """`trainer.StepSync` over one process group: rank i of k takes rows [i·B/k, (i+1)·B/k) of
    every batch. Each rank's gradient is of the mean over its rows, so weighting by its share of
    the rows and summing gives the gradient of the global mean, for any B."""

    def __init__(self, group: Any, index: int, size: int) -> None:
        self.group, self.index, self.size = group, index, size
        self._share = 1.0  # this rank's rows / global rows, of the current batch

    def batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        b = next(iter(batch.values())).shape[0]
        lo, hi = self.index * b // self.size, (self.index + 1) * b // self.size
        self._share = (hi - lo) / b
        return {k: v[lo:hi] for k, v in batch.items()}

    def grads(self, params: list[Tensor]) -> None:
        works = []
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self._share)
                works.append(dist.all_reduce(p.grad, group=self.group, async_op=True))
        for w in works:
            w.wait()

    def stats(self, vals: Tensor, fires: Tensor, rows: int) -> tuple[Tensor, Tensor, int]:
        vals = vals * self._share
        counts = torch.cat([fires.to(vals.dtype), vals.new_tensor([rows])])
        dist.all_reduce(vals, group=self.group)
        dist.all_reduce(counts, group=self.group)  # fire counts ≤ rows: exact in floating point
        return vals, counts[:-1].round().to(fires.dtype), int(counts[-1].round())


def rank_dir(out: Path, rank: int) -> Path:
    return out / RANKS_DIR / f"rank-{rank:05d}"


def train_parts(
    specs: Sequence[SAESpec],
    data_for: Callable[[list[str]], DataFactory],
    cfg: TrainConfig,
    out_dir: str | Path,
    ranks: Ranks,
    *,
    resume: bool = False,
    ranks_per_sae: int | None = None,
) -> list[Path]:
    """`train_suite` over all ranks; every rank calls it and gets every SAE's folder, in spec order.

    `data_for(sites)` makes the data factory of just those sites (each rank reads only its SAEs'
    sites); it must yield the same global batches on every rank (same seed). A world of one is a
    plain `train_suite`.
    """
    out = Path(out_dir)
    if ranks.world == 1:
        return train_suite(specs, data_for(sorted({x for s in specs for x in s.sites})), cfg, out,
                           resume=resume)  # fmt: skip
    plan = plan_suite(specs, ranks.world, ranks_per_sae)
    # new_group is collective: every rank creates every group, in the same order.
    handles = [dist.new_group(list(g.ranks)) if len(g.ranks) > 1 else None for g in plan]
    gi = next(i for i, g in enumerate(plan) if ranks.rank in g.ranks)
    group, mine = plan[gi], list(plan[gi].specs)
    lead = ranks.rank == group.ranks[0]
    done = resume and mine and all((out / s.folder / "config.json").is_file() for s in mine)
    work = rank_dir(out, ranks.rank)
    # A group must resume from one step, or its ranks would wait on each other forever.
    steps = ranks.gather(_checkpoint_step(work) if resume else None)
    if len({steps[r] for r in group.ranks}) > 1:
        got = [steps[r] for r in group.ranks]
        raise DistributedError(
            f"ranks {group.ranks} hold checkpoints of steps {got}; cannot resume"
        )
    if mine and not done:
        sync = None
        if len(group.ranks) > 1:
            sync = DataParallel(handles[gi], group.ranks.index(ranks.rank), len(group.ranks))
        rank_cfg = replace(cfg, device=ranks.device(cfg.device) or cfg.device,
                           progress=cfg.progress and lead)  # fmt: skip
        sites = sorted({x for s in mine for x in s.sites})
        folders = train_suite(mine, data_for(sites), rank_cfg, work, resume=resume, sync=sync)
        if lead:
            for f in folders:
                replace_folder(f, out / f.name)
    ranks.barrier()  # every SAE in place
    if ranks.leader and (out / RANKS_DIR).is_dir():
        shutil.rmtree(out / RANKS_DIR)
    ranks.barrier()
    return [out / s.folder for s in specs]


def _checkpoint_step(work: Path) -> int | None:
    rec = ck.read_commit(work)
    return None if rec is None else int(rec["step"])
