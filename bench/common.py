"""Shared helpers for the benchmarks: threads, timing, and this machine's matmul throughput."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from experts.device import set_threads

THREADS = 2


def setup(threads: int = THREADS, seed: int = 0) -> dict[str, Any]:
    """Pin torch's thread count and seed; return a description of the environment for the JSON."""
    n = set_threads(threads)
    torch.manual_seed(seed)
    return {"torch": torch.__version__, "threads": n, "machine": platform.machine(),
            "python": platform.python_version(),
            "caveat": "shared, noisy machine unless re-run on a quiet one"}


def run_times(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` runs of ``fn()``, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return statistics.median(run_times(fn, repeats=repeats, warmup=warmup))


def matmul_gflops(m: int = 1024, k: int = 1024, n: int = 1024, *, repeats: int = 15) -> float:
    """fp32 GFLOP/s of an (m, k) @ (k, n) matmul on this machine: median of ``repeats`` runs."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    inner = 4  # several matmuls per timing so the timer's resolution does not matter
    sec = median_time(lambda: [torch.mm(a, b, out=out) for _ in range(inner)], repeats=repeats, warmup=3)
    return 2.0 * m * k * n * inner / sec / 1e9
