"""Backend registry and selection: which implementation runs the PVM ops, and why not.

A backend supplies ``retrieval`` and ``merge`` callables (autograd-capable) and says, per
device type, whether it can run there and how it ranks as the default. Asking for a
backend that cannot run raises; nothing falls back silently to another implementation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch


@dataclass(frozen=True)
class Backend:
    """One implementation of the PVM ops.

    retrieval(q, k, v, key_mask, kv_len, scale) -> out;  merge(expanded, gate, keep,
    ffn_output, eps) -> out. ``check(device_type)`` returns None when usable there, else
    the reason. ``default_rank[device_type]``: lower is preferred by ``backend=None``.
    ``head_dim_check(hd, dtype)`` returns None when the retrieval takes head dim ``hd`` in
    ``dtype``, else why. ``retrieval_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, scale) -> out``: the packed layout (``pvm_retrieval_varlen``),
    None where the backend has none. The block's glue (``rms_norm(x, weight, eps) -> y``,
    ``swiglu(gate, up) -> out``, autograd-capable): the backend's fused ops, or None where
    it runs the PyTorch composites (``glue_status()``).
    """

    name: str
    retrieval: Callable
    merge: Callable
    check: Callable[[str], Optional[str]]
    default_rank: Dict[str, int] = field(default_factory=dict)
    dtypes: Tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    head_dim_check: Callable[[int, torch.dtype], Optional[str]] = lambda hd, dtype: None
    retrieval_varlen: Optional[Callable] = None
    rms_norm: Optional[Callable] = None
    swiglu: Optional[Callable] = None
    # The retrieval with q_norm fused: (q_raw, q_weight, eps, k, v, key_mask, kv_len, scale)
    # and the varlen one (q_raw, q_weight, eps, k, v, cu_q, cu_k, max_q, max_k, scale).
    retrieval_qnorm: Optional[Callable] = None
    retrieval_varlen_qnorm: Optional[Callable] = None
    # The padded memory's k_norm and metadata: (k [B, Nv, Hkv, hd], weight, mask or None,
    # eps) -> (k_norm(k), kv_len int32 [B], has_visual bool [B]).
    visual_kv: Optional[Callable] = None
    # Single-token queries' retrieval in place from a paged KV cache (ops/paged.py):
    # (q, kv, flags, block_visual, block_table, seq_lens, rows, scale) -> (a, has_visual),
    # or None when this launch is not one the backend takes (the caller then gathers).
    paged_retrieval: Optional[Callable] = None
    # The expander and the merge, saving the expander's input instead of its [N, D] output
    # (recompute.py): (m2, w_e, gate, keep, ffn_output, eps) -> out.
    expand_merge: Optional[Callable] = None
    # ``m + down(swiglu(gate(n), up(n)))`` saving only n (recompute.py):
    # (m, n, w_gate, w_up, w_down, stacked [w_gate; w_up]) -> out.
    mlp_residual: Optional[Callable] = None
    # gate/up and k/v as one GEMM each with stacked weights (modules/paired_linear.py); the
    # reference computes the block as written, one module at a time.
    stacked_projections: bool = True


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend (used by pvm_kernels itself and by extensions)."""
    _REGISTRY[backend.name] = backend
    _CHECKS.clear()
    _HEAD_DIM_CHECKS.clear()


def unregister_backend(name: str) -> None:
    """Remove a backend added with register_backend (KeyError naming it if unknown)."""
    if name not in _REGISTRY:
        raise KeyError(f"no backend named {name!r}")
    del _REGISTRY[name]
    _CHECKS.clear()
    _HEAD_DIM_CHECKS.clear()


# A plain dict, not functools.lru_cache: torch.compile reads it as a constant instead of
# tracing through the cache wrapper.
_CHECKS: Dict[tuple, Optional[str]] = {}


# (backend, head dim, dtype) -> why not, or None: FusedPVM asks on every decode step and
# the answer never changes.
_HEAD_DIM_CHECKS: Dict[tuple, Optional[str]] = {}


def _constant_under_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does (torch 2.11-2.14: it sets this
    one attribute), without its ``import torch._dynamo``, which imports triton: at
    ``import pvm_kernels`` that would fix Triton's mode before a user (or our CLI) sets
    TRITON_INTERPRET, and the interpreter then failed mid-kernel ("Cannot call
    @triton.jit'd outside of the scope of a kernel"). tests/test_custom_ops.py checks that
    dynamo still runs the function eagerly."""
    fn._dynamo_marked_constant = True
    return fn


# The checks themselves run outside any torch.compile trace: their answers are constants,
# and what they call (importlib.util.find_spec in the triton check) is code torch 2.11's
# dynamo refuses to trace ("Attempted to call function marked as skipped"), which broke
# the first compiled call of a process on the H100 box.
@_constant_under_compile
def _backend_check(name: str, device_type: str) -> Optional[str]:
    return _REGISTRY[name].check(device_type)


@_constant_under_compile
def _head_dim_check(name: str, head_dim: int, dtype: torch.dtype) -> Optional[str]:
    return _REGISTRY[name].head_dim_check(head_dim, dtype)


def head_dim_refusal(impl: Backend, head_dim: int, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl``'s retrieval refuses head dim ``head_dim`` in ``dtype`` (None: it takes
    it), asked once per combination."""
    key = (impl.name, head_dim, dtype)
    if key not in _HEAD_DIM_CHECKS:
        _HEAD_DIM_CHECKS[key] = _head_dim_check(impl.name, head_dim, dtype)
    return _HEAD_DIM_CHECKS[key]


def _check_cached(name: str, device_type: str) -> Optional[str]:
    key = (name, device_type)
    if key not in _CHECKS:
        _CHECKS[key] = _backend_check(name, device_type)
    return _CHECKS[key]


def _machine_device_types() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_status(device: Union[str, torch.device, None] = None) -> Dict[str, Optional[str]]:
    """{backend name: None if usable on ``device`` (default: on a device of this machine),
    else why not, per device type}. Which of the block's glue (norms, SwiGLU) a usable
    backend fuses and which it leaves to PyTorch: ``glue_status()``."""
    here = [torch.device(device).type] if device is not None else _machine_device_types()
    shown = here if device is not None else ["cpu", "cuda"]
    status = {}
    for name in _REGISTRY:
        usable = any(_check_cached(name, t) is None for t in here)
        status[name] = None if usable else "; ".join(
            f"{t}: {_check_cached(name, t)}" for t in shown if _check_cached(name, t))
    return status


def glue_status() -> Dict[str, Dict[str, str]]:
    """{backend: {glue op: how it runs}} for the block's glue around the retrieval: its
    fused kernels ("fused") or the PyTorch composite ("PyTorch composite"). The glue ops are
    ``rms_norm`` (input_norm, post_attn_norm, k_norm), ``swiglu`` (the MLP) and
    ``q_norm`` (inside the retrieval kernels, or an rms_norm before them)."""
    how = lambda fn: "fused" if fn is not None else "PyTorch composite"  # noqa: E731
    return {name: {"rms_norm": how(b.rms_norm), "swiglu": how(b.swiglu),
                   "q_norm": ("in the retrieval kernels" if b.retrieval_qnorm is not None
                              else how(b.rms_norm)),
                   "k_norm": ("with the memory's metadata" if b.visual_kv is not None
                              else how(b.rms_norm))}
            for name, b in _REGISTRY.items()}


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Names of the backends usable on ``device`` (default: on any device of this machine)."""
    return [name for name, why in backend_status(device).items() if why is None]


def resolve_backend(name: Optional[str], device: torch.device) -> Backend:
    """The backend called ``name`` (or the preferred one for ``device`` when None).

    Raises ValueError naming the backend and the reason when it cannot run on ``device``.
    """
    dtype_ = device.type
    if name is None:
        ranked = sorted((b.default_rank[dtype_], b.name) for b in _REGISTRY.values()
                        if dtype_ in b.default_rank and _check_cached(b.name, dtype_) is None)
        if not ranked:
            raise ValueError(f"no PVM backend can run on device '{device}'")
        return _REGISTRY[ranked[0][1]]
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; known backends: {sorted(_REGISTRY)}")
    why = _check_cached(name, dtype_)
    if why is not None:
        raise ValueError(f"backend={name!r} cannot run on device '{device}': {why}")
    return _REGISTRY[name]
