"""Can this Triton's CPU interpreter run our kernels? One tiny kernel answers, once.

Every retrieval kernel loops up to a bound loaded from memory (``kv_len``). Triton 3.6's
interpreter turns that bound into an int with ``int(array)`` on a 1-element array, which
NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
seen on the H100 box (triton 3.6, NumPy 2.5). Triton 3.8 squeezes the array first.
Imported only when TRITON_INTERPRET=1 asks for the interpreter.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _loop_bound_from_memory(BOUND, OUT):
    count = 0
    for _ in range(0, tl.load(BOUND), 1):
        count += 1
    tl.store(OUT, count)


def interpreter_refusal() -> Optional[str]:
    """None when the interpreter runs a loop whose bound is loaded from memory, else why not."""
    import numpy

    bound = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_from_memory[(1,)](bound, out)
    except Exception as exc:  # noqa: BLE001 - any failure means the kernels cannot run
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run a loop bound "
                f"loaded from memory with NumPy {numpy.__version__} ({type(exc).__name__}: "
                f"{str(exc)[:120]}); triton >= 3.8 can")
    if out.item() != 3:
        return (f"Triton {triton.__version__}'s CPU interpreter miscounts a loop bound loaded "
                f"from memory ({out.item()} iterations instead of 3)")
    return None

