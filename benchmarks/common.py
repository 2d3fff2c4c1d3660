"""Helpers shared by the benchmarks: machine description, interleaved timing, matmul FLOP/s."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine_info() -> dict[str, object]:
    """What the numbers were measured on; the load average says how shared the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, round-robin so that a busy spell on a shared machine
    hits every contender alike (compare ratios within one run, not across runs)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summarise(samples: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "n": len(samples)}


def matmul_call(B: int, d: int, W: int, dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    """A [B, d] @ [d, W] matmul (2·B·d·W flops), the SAE encoder's shape."""
    a = torch.randn(B, d, dtype=dtype)
    b = torch.randn(d, W, dtype=dtype)
    out = torch.empty(B, W, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)
