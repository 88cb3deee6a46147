"""Timing of repeated calls for the micro-benchmarks (transport, kernels)."""
from __future__ import annotations

import time
from typing import Callable


def call_times_ms(fn: Callable[[], object], iters: int, warmup: int = 5) -> list[float]:
    """Milliseconds of each of `iters` calls, after `warmup` untimed ones (first-call costs stay out)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_times_ms(fns: list[Callable[[], object]], iters: int, warmup: int = 2) -> list[list[float]]:
    """Like `call_times_ms` for several functions, timed round-robin (one call of each per iteration), so that a
    drift of the machine's speed during the run falls on all of them alike and their ratios stay fair."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return times
