"""Output allocation for kernel wrappers.

Every Python kernel wrapper allocates its outputs here (the C++ ops read the same switch
from the PVM_POISON_OUTPUTS environment variable). Tests switch on poisoning so that an
output element a kernel forgot to write shows up as NaN instead of passing by luck.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch

_POISON = False


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised tensor (while ``poisoned_outputs()`` is active: NaN-filled; integers
    hold their dtype's minimum and booleans True, values no kernel output here takes
    unwritten: a missed kv_len reads as negative, a missed has_visual of an empty sample as
    True)."""
    if _POISON:
        if dtype == torch.bool:
            fill = True
        elif dtype.is_floating_point or dtype.is_complex:
            fill = float("nan")
        else:
            fill = torch.iinfo(dtype).min
        return torch.full(tuple(shape), fill, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Fill kernel outputs with NaN before the kernels write them (testing aid)."""
    global _POISON
    old, _POISON = _POISON, True
    old_env = os.environ.get("PVM_POISON_OUTPUTS")
    os.environ["PVM_POISON_OUTPUTS"] = "1"  # read by the C++/CUDA ops (csrc/native_common.h)
    try:
        yield
    finally:
        _POISON = old
        if old_env is None:
            os.environ.pop("PVM_POISON_OUTPUTS", None)
        else:
            os.environ["PVM_POISON_OUTPUTS"] = old_env
