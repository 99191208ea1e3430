"""Wall-clock timing that is honest on both CPU and GPU (synchronises around the work)."""
from __future__ import annotations

import time
from typing import Callable, List

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5,
              warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    times = sorted(times_ms(fn, device, repeats, warmup))
    return times[len(times) // 2]


def times_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5,
             warmup: int = 1) -> List[float]:
    """Wall time of each of ``repeats`` calls of ``fn()`` in ms, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times
