"""Helpers shared by the Triton kernels and their launchers."""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Dict, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..launches import kernel_launch

#: True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: The GPU grid's limits (x; y and z): the launchers use 1-D grids, checked against x.
MAX_GRID_X = 2**31 - 1


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, FP32: tl.constexpr):
    """a @ b with fp32 accumulation.

    FP32 (fp32 operands): "tf32x3", three TF32 tensor-core products per product (hi*hi +
    hi*lo + lo*hi), ~1e-6 relative error where plain TF32 costs ~1e-3, ten times our fp32
    tolerance. IEEE fp32 dots run on FMA units with operand layouts that spilled 0.6-11 KB
    per thread at every tile tried (compile gate, sm_90); tf32x3 keeps tensor-core layouts.
    UPCAST (the CPU interpreter, any dtype): operands go through fp32 with exact products;
    the interpreter computes bf16/fp16 dots wrongly (triton 3.8), and bf16 x bf16 products
    are exact in fp32, so the result matches the GPU's MMA up to summation order.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif FP32:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


def dot_flags(dtype: torch.dtype) -> dict:
    """constexpr flags for ``mma`` given the operand dtype."""
    return dict(UPCAST=INTERPRET, FP32=dtype == torch.float32)


def dtype_class(dtype: torch.dtype) -> str:
    """The configuration tables' dtype key: "fp32" or "16bit" (fp16 and bf16)."""
    if dtype == torch.float32:
        return "fp32"
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")


def head_dim_problem(hd: int, multiple: int, largest: int) -> Optional[str]:
    """Why head dim ``hd`` is outside [multiple, largest] in steps of ``multiple``, or None."""
    if hd % multiple or not multiple <= hd <= largest:
        return (f"head_dim must be a multiple of {multiple} from {multiple} to {largest}, "
                f"got {hd}")
    return None


# Triton's CPU interpreter keeps the launch grid in process-global state, so two threads
# launching at once corrupt each other's grids; compiled GPU launches are thread-safe.
_INTERPRETER_LOCK = threading.Lock()


def _device_guard(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if INTERPRET:
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


@contextlib.contextmanager
def launch_guard(t: torch.Tensor):
    """Context for one kernel launch: the tensor's GPU as current device (Triton launches
    on the current device), or, in the CPU interpreter, one launch at a time; the launch is
    counted (pvm_kernels.launches)."""
    with _device_guard(t), kernel_launch():
        yield


# ---- the target GPU architecture --------------------------------------------------------

#: Per-architecture facts the launchers use: the SM count and the configuration table
#: (sm_80: A100, 108 SMs; sm_90: H100/H200, 132 SMs). Devices between or above pick the
#: newest table not above their capability (sm_86/89 -> sm80, sm_100 -> sm90).
ARCH_SMS = {80: 108, 90: 132}

_COMPILE_TARGET: contextvars.ContextVar = contextvars.ContextVar("pvm_compile_target",
                                                                 default=None)


@contextlib.contextmanager
def compile_target(capability: int):
    """Within the block, launchers fed CPU tensors choose tables and split counts for the
    GPU of compute capability ``capability`` (80 or 90): what the ahead-of-time compile
    gate compiles for. Outside it, CPU tensors (the interpreter) act as an H100's (90)."""
    if capability not in ARCH_SMS:
        raise ValueError(f"capability must be one of {sorted(ARCH_SMS)}, got {capability}")
    token = _COMPILE_TARGET.set(capability)
    try:
        yield
    finally:
        _COMPILE_TARGET.reset(token)


_CAPABILITY: Dict[int, int] = {}


def target_capability(device: torch.device) -> int:
    """The table architecture of ``device``: 80 or 90. A CUDA device's own capability
    (cached), rounded down to a known table; a CPU tensor's is the compile target (90
    outside ``compile_target``)."""
    if device.type != "cuda":
        cap = _COMPILE_TARGET.get()
        return 90 if cap is None else cap
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        major, minor = torch.cuda.get_device_capability(index)
        cap = _CAPABILITY[index] = max([a for a in ARCH_SMS if a <= 10 * major + minor] or [80])
    return cap


@contextlib.contextmanager
def descriptor_scratch(device: torch.device):
    """For one launch of a kernel that makes tensor descriptors in the program
    (tl.make_tensor_descriptor: 128 B of global scratch per descriptor per program, which
    Triton's launcher asks its allocator for), an allocator from torch's caching allocator
    on ``device`` (stream-ordered, CUDA-graph safe) unless the caller set one with
    triton.set_allocator, which is kept. Scoped to the launch (a context variable token),
    never left behind; nothing on CPU (the interpreter needs no scratch)."""
    if device.type != "cuda":
        yield
        return
    from triton.runtime import _allocation  # the ContextVar behind triton.set_allocator
    var = _allocation._allocator
    if not isinstance(var.get(), _allocation.NullAllocator):
        yield
        return
    token = var.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                               device=device))
    try:
        yield
    finally:
        var.reset(token)


def check_grid(grid: Sequence[int]) -> None:
    """ValueError before a launch whose 1-D grid exceeds the GPU's limit on grid x."""
    if grid[0] > MAX_GRID_X:
        raise ValueError(f"problem too large for one launch: {grid[0]} programs, the GPU "
                         f"allows {MAX_GRID_X}")


def pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


#: The layout every kernel may assume of its [..., hd] tensors (see retrieval.py): unit
#: stride along the last dim, other strides multiples of VECTOR elements, 16-byte aligned.
VECTOR = 8


def is_vector_layout(t: torch.Tensor) -> bool:
    """Unit last stride, other strides multiples of 8 elements, 16-byte aligned data.
    Strides of size-1 dims never move a pointer and are ignored."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    if any(s % VECTOR for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1):
        return False
    return t.data_ptr() % 16 == 0


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [rows, N] with unit last stride (a view whenever the layout allows): the
    layout of the row kernels (merge, rms_norm, swiglu)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def rows_aligned(N: int, *rows: torch.Tensor) -> bool:
    """The row kernels' ALIGNED flag: N and every [rows, N] tensor's row stride multiples
    of VECTOR elements (a single row's stride is never used) and 16-byte aligned data, so
    the vector-load hints hold."""
    return N % VECTOR == 0 and all(
        (t.stride(0) % VECTOR == 0 or t.shape[0] <= 1) and t.data_ptr() % 16 == 0 for t in rows)


def with_vector_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` if the kernels can read it as is, else a contiguous copy (a rare layout costs
    one copy; the kernels' vector-load hints stay true). Inner dims must be multiples of 8."""
    return t if is_vector_layout(t) else t.clone(memory_format=torch.contiguous_format)


# Stand-ins for an absent key_mask / kv_len, one per device, so that no kernel variant
# without them exists. Created outside CUDA-graph capture only: a tensor made during
# capture holds its value only once the graph replays, so it is never cached.
_STAND_INS: Dict[tuple, torch.Tensor] = {}


def _stand_in(kind: str, device: torch.device, make) -> torch.Tensor:
    key = (kind, device)
    t = _STAND_INS.get(key)
    if t is None:
        t = make()
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _STAND_INS[key] = t
    return t


def always_true(device: torch.device) -> torch.Tensor:
    """One True (bool [1]): read at stride 0 it keeps every row or key."""
    return _stand_in("true", device, lambda: torch.ones((1,), dtype=torch.bool, device=device))


def always_valid_keys(device: torch.device) -> torch.Tensor:
    """A key_mask that is True everywhere: one element, read with strides (0, 0)."""
    return always_true(device).as_strided((1, 1), (0, 0))


def unlimited_kv_len(device: torch.device) -> torch.Tensor:
    """A kv_len of 2^31 - 1 for every sample (clamped to Nv in the kernels), stride 0."""
    return _stand_in("len", device, lambda: torch.full((1,), 2**31 - 1, dtype=torch.int32,
                                                       device=device)).as_strided((1,), (0,))


def never_read_f32(device: torch.device) -> torch.Tensor:
    """A one-element fp32 tensor for a pointer argument the launch never dereferences (the
    partial buffers of an unsplit retrieval): cached, so a decode step allocates nothing."""
    return _stand_in("never-read", device, lambda: torch.empty((1,), dtype=torch.float32,
                                                               device=device))


def expect(name: str, t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype,
           device: torch.device) -> None:
    """ValueError/TypeError naming ``name`` unless ``t`` has this shape, dtype and device:
    a launcher's own check of what a direct op call hands it, before any launch."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
