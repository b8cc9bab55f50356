"""Timing helpers every part of the bench shares: best-of-n timers, percentiles, rounding, the load.

On a shared machine the fastest of a few calls is the least disturbed figure, and the load average
at the start and the end says how shared the machine was.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .report import Stage

#: Progress callback: each part names what it is about to measure.
StepFn = Callable[[str], None]


def no_steps(_message: str) -> None:
    """A ``StepFn`` that reports nothing."""


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny test models have tiny figures; none rounds to 0)."""
    return float(f"{x:.{digits}g}")


def _percentile_ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q) * 1e3)


def stage(values: Sequence[float]) -> Stage:
    """p50 and p95 of durations in seconds, in milliseconds."""
    return Stage(sig(_percentile_ms(values, 50)), sig(_percentile_ms(values, 95)))


def best_time(fn: Callable[[], object], reps: int, warmup: Callable[[], object] | None = None) -> float:
    """The fastest of ``reps`` timed calls, after one untimed call of ``warmup`` (default: ``fn``).

    On a shared machine the minimum is the least disturbed figure.
    """
    (warmup or fn)()
    synchronize()
    best = math.inf
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def synchronize() -> None:
    """Wait for queued GPU work, so that a timer around a CUDA call measures the call."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages, rounded (zeros where the OS has none)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
    return (round(one, 2), round(five, 2), round(fifteen, 2))
