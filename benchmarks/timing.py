"""The one timing loop of the speed benchmarks (imports nothing heavy: importing
openmm_cgml.models pulls in torchmdnet, and with it the 100-monomer chain's OpenMM MD ran
3.5x slower in the same process, 17 against 59 tau/s)."""
from __future__ import annotations

import time


def timed(run, min_seconds: float) -> tuple[int, float]:
    """Call run(n) with growing n until it takes min_seconds; return (calls, seconds)."""
    n = 1
    while True:
        start = time.perf_counter()
        run(n)
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return n, seconds
        n *= 2 if seconds < min_seconds / 4 else 1
        n = max(n, int(n * min_seconds / max(seconds, 1e-3)))
