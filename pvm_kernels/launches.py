"""Kernel-launch accounting: how many kernels a call of the PVM block launches.

On the GPU machines' host each eager launch costs 30-100 us, so at small and medium shapes
the block's time is its launch count (bench/NOTES.md). The count is a contract, asserted on
CPU in tests/test_launch_counts.py with ``LaunchCounter``:

- an aten op that launches a kernel counts 1 (views, allocations and other metadata-only
  ops count 0);
- a ``pvm_kernels`` custom op counts the kernels it really launches: its Triton kernels
  (each launch registers itself here through ``kernel_launch``) plus the aten ops it runs
  inside (a copy, a reduction), so a launch followed by a separate combine kernel counts 2. A compiled
  (C++) op whose launches cannot be seen counts 1, or what ``extra_sources`` report (the
  CUDA emulator's launch statistics).

The package imports nothing of this at run time but ``kernel_launch``'s counter; the dispatch
mode is a testing and benchmarking aid.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils._python_dispatch import TorchDispatchMode

_STATE = threading.local()
_TOTAL = [0]  # every registered kernel launch of the process (a list: shared, mutable)
_LOCK = threading.Lock()


def kernel_launches() -> int:
    """Kernel launches registered so far in this process (Triton launchers)."""
    return _TOTAL[0]


@contextlib.contextmanager
def kernel_launch() -> Iterator[None]:
    """Wrap one kernel launch: counts it, and marks the thread as inside a kernel so that
    torch ops Triton's CPU interpreter issues while running the kernel are not counted as
    launches of their own."""
    with _LOCK:
        _TOTAL[0] += 1
    depth = getattr(_STATE, "in_kernel", 0)
    _STATE.in_kernel = depth + 1
    try:
        yield
    finally:
        _STATE.in_kernel = depth


def _inside_kernel() -> bool:
    return getattr(_STATE, "in_kernel", 0) > 0


# Ops that allocate or only change metadata: no kernel runs. Views are recognised from
# their schema (OpOverload.is_view).
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
    "lift_fresh_copy", "detach", "alias", "_unsafe_view", "set_", "resize_", "_reshape_alias",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_has_compatible_shallow_copy_type", "result_type", "promote_types",
    # a Python number wrapped as a CPU scalar operand (torch.where(mask, x, 0.0)): no
    # device kernel, whatever device the other operands are on
    "scalar_tensor",
}


def _short(func) -> str:
    return getattr(func, "_opname", None) or str(func).split(".")[-2]


def launches_a_kernel(func) -> bool:
    """Whether an aten op runs a kernel on the device (False for views and allocations)."""
    if getattr(func, "is_view", False):
        return False
    return _short(func) not in _NO_KERNEL


class LaunchCounter(TorchDispatchMode):
    """Count the kernels the code run under it launches (module docstring).

    ``with LaunchCounter() as c: block(...)``; then ``c.total`` and ``c.ops`` (a list of
    (op name, kernels) in call order). ``python_impls``: {custom op name: the Python function
    implementing it} (registration.PYTHON_IMPLS): such ops are run through that function
    under the counter, so their inner aten ops count. ``extra_sources``: callables returning
    a running launch total of kernels the counter cannot see (e.g. the CUDA emulator's).
    """

    def __init__(self, python_impls: Optional[Dict[str, Callable]] = None,
                 extra_sources: Sequence[Callable[[], int]] = ()):
        super().__init__()
        if python_impls is None:
            from .ops.registration import PYTHON_IMPLS
            python_impls = PYTHON_IMPLS
        self.python_impls = python_impls
        self.extra_sources = list(extra_sources)
        self.ops: List[Tuple[str, int]] = []

    @property
    def total(self) -> int:
        return sum(n for _, n in self.ops)

    def by_op(self) -> Dict[str, int]:
        """{op name: kernels}, summed over calls."""
        out: Dict[str, int] = {}
        for name, n in self.ops:
            out[name] = out.get(name, 0) + n
        return out

    def _others(self) -> int:
        return kernel_launches() + sum(src() for src in self.extra_sources)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _inside_kernel():  # the interpreter moving data for a kernel being counted
            return func(*args, **kwargs)
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if getattr(func, "namespace", None) == "pvm_kernels":
            impl = self.python_impls.get(name.split(".", 1)[-1])
            before, mark = self._others(), len(self.ops)
            if impl is not None:
                with self:  # its own aten ops count too
                    out = impl(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
            inner = sum(n for _, n in self.ops[mark:])
            del self.ops[mark:]
            seen = self._others() - before
            self.ops.append((name, inner + (seen if seen or impl is not None else 1)))
            return out
        if launches_a_kernel(func):
            self.ops.append((name, 1))
        return func(*args, **kwargs)
