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
