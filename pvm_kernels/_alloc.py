"""Output allocation for kernel wrappers.

Every kernel wrapper allocates its outputs here. Tests switch on poisoning so that an
output element a kernel forgot to write shows up as NaN instead of passing by luck.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

_POISON = False


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised tensor (NaN-filled while ``poisoned_outputs()`` is active)."""
    if _POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill kernel outputs with NaN before the kernels write them (testing aid)."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old
