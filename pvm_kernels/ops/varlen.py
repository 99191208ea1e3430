"""Varlen retrieval: packed sequences described by cumulative lengths (flash-attention's
``flash_attn_varlen_func`` convention), the layout of serving engines and padding-free
training.

Sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of ``q`` and keys
``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of ``k``/``v``; its queries attend to its own keys
only, so a packed row never mixes samples, and each sequence costs what its own keys cost.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .checks import check_float, check_like, check_tensor
from .functional import check_backend_dtype, check_backend_head_dim
from .registry import resolve_backend


def check_cu_seqlens(name: str, cu, device: torch.device, length: Optional[int]) -> None:
    """An int32 [N + 1] tensor on ``device`` (of ``length`` entries when given): metadata
    only, no values read."""
    check_tensor(name, cu)
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [N + 1] (cumulative lengths starting at 0), "
                         f"got shape {tuple(cu.shape)}")
    if length is not None and cu.shape[0] != length:
        raise ValueError(f"{name} must have the length of cu_seqlens_q ({length}: one entry per "
                         f"sequence + 1), got {cu.shape[0]}")
    check_like(name, cu, cu.shape, device, torch.int32, "q")


def validate_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int,
                        max_name: str) -> None:
    """ValueError unless ``cu`` is non-decreasing, within [0, total], and no sequence is
    longer than ``max_seqlen``. Reads the values: CPU tensors only (on a GPU it would wait
    for the device; there the kernels clamp every bound instead, as flash-attention trusts
    its caller)."""
    bounds = cu.tolist()  # one read of N + 1 ints: cheaper than tensor ops at decode sizes
    if not bounds:
        return
    if bounds[0] < 0 or bounds[-1] > total:
        raise ValueError(f"{name} must lie within [0, {total}] (the packed tensor's rows), got "
                         f"first {bounds[0]} and last {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if lengths and min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {bounds}")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is below the longest sequence of {name} "
                         f"({max(lengths)})")


def pvm_retrieval_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: Optional[float] = None,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Retrieval over packed sequences: each sequence's queries attend to its own keys.

    q [total_q, H, hd]; k, v [total_k, Hkv, hd] (same dtype as q, H divisible by Hkv);
    cu_seqlens_q, cu_seqlens_k int32 [N + 1] on q's device, cumulative lengths (sequence b:
    query rows cu_seqlens_q[b]:cu_seqlens_q[b + 1], keys cu_seqlens_k[b]:cu_seqlens_k[b + 1]);
    max_seqlen_q / max_seqlen_k: the longest sequence of each (Python ints, as flash-attention
    takes them: they size the launch grids, so no value is read on the device). scale defaults
    to 1/sqrt(hd). A sequence with no key gets exactly 0, and rows of no sequence (past
    cu_seqlens_q[N]) stay 0 with zero gradient.

    On CPU tensors the lengths are validated (ValueError naming the argument); on a GPU they
    are not read (that would sync), and every bound the kernels use is clamped into the
    tensors, so a wrong value gives wrong numbers but never an out-of-bounds access.
    Returns [total_q, H, hd] in q.dtype, differentiable in q, k and v. Backends: reference,
    cpu, cuda and triton (``backend=None`` picks as for ``pvm_retrieval``).
    """
    check_float("q", q, 3, "[total_q, H, hd]")
    check_float("k", k, 3, "[total_k, Hkv, hd]")
    total_q, H, hd = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    check_like("k", k, (total_k, Hkv, hd), q.device, q.dtype, "q")
    check_like("v", v, (total_k, Hkv, hd), q.device, q.dtype, "q")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of k heads Hkv={Hkv}")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, None)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, cu_seqlens_q.shape[0])
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative Python int, got {value!r}")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        validate_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "max_seqlen_q")
        validate_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "max_seqlen_k")
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    impl = resolve_backend(backend, q.device)
    if impl.retrieval_varlen is None:
        raise ValueError(f"backend {impl.name!r} has no varlen retrieval")
    check_backend_dtype(impl, q.dtype)
    check_backend_head_dim(impl, hd, q.dtype)
    return impl.retrieval_varlen(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                 max_seqlen_q, max_seqlen_k, scale)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """int32 [N + 1] cumulative lengths (0 first) from per-sequence lengths [N] (any int
    dtype), on the same device: no host sync."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [N], got shape {tuple(lengths.shape)}")
    out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return out
