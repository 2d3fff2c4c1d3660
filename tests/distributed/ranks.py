"""Launch N ranks on this machine (CPU, gloo, loopback) the way torchrun would, for tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables torchrun gives each worker."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _entry(
    rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ.update(rank_env(rank, world, port))
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    from lmscope.distributed import session

    with session() as ranks:
        fn(ranks, *args)


def launch(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run `fn(ranks, *args)` in `world` spawned processes joined by a gloo group; a failing rank
    fails the call. `fn` must be importable (module level)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
