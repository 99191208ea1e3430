"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

#: True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with fp32 accumulation.

    IEEE: fp32 operands use true fp32 products (TF32 would cost ~1e-3 relative error, ten
    times our fp32 tolerance). UPCAST: the CPU interpreter computes bf16/fp16 dots wrongly
    (triton 3.8), so operands go through fp32 there; bf16 x bf16 products are exact in
    fp32, so the result matches the GPU's MMA up to summation order.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


def dot_flags(dtype: torch.dtype) -> dict:
    """constexpr flags for ``mma`` given the operand dtype."""
    return dict(UPCAST=INTERPRET and dtype != torch.float32, IEEE=dtype == torch.float32)


# Triton's CPU interpreter keeps the launch grid in process-global state, so two threads
# launching at once corrupt each other's grids; compiled GPU launches are thread-safe.
_INTERPRETER_LOCK = threading.Lock()


def launch_guard(t: torch.Tensor):
    """Context for one kernel launch: the tensor's GPU as current device (Triton launches
    on the current device), or, in the CPU interpreter, one launch at a time."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if INTERPRET:
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


def pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))
