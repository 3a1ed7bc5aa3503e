"""The one timing rule of the benchmarks: median milliseconds, timed round-robin."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def wall_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call by the wall clock."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2,
                        timer: Callable[[Callable[[], object]], float] = wall_ms) -> dict[str, float]:
    """Median milliseconds of each function over `repeat` rounds; each round runs every function once, so
    a load change on a shared machine hits all of them alike instead of whichever was being timed.
    `timer` times one call (the wall clock; bench_gpu.py passes CUDA events)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}
