"""Functional PVM ops: argument checks, then dispatch to the chosen backend."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .checks import check_float, check_like, check_tensor
from .registry import Backend, head_dim_refusal, resolve_backend


def check_backend_dtype(impl: Backend, dtype: torch.dtype) -> None:
    """TypeError unless ``impl`` runs ``dtype``."""
    if dtype not in impl.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in impl.dtypes)
        raise TypeError(f"backend {impl.name!r} supports {names}; got {dtype} "
                        f"(backend='reference' runs any float dtype)")


def check_backend_head_dim(impl: Backend, head_dim: int, dtype: torch.dtype) -> None:
    """ValueError unless ``impl``'s retrieval takes head dim ``head_dim`` in ``dtype``
    (checked before any launch)."""
    why = head_dim_refusal(impl, head_dim, dtype)
    if why is not None:
        raise ValueError(f"backend {impl.name!r}: {why} (backend='reference' takes any "
                         f"head_dim)")


def pvm_retrieval(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: Optional[torch.Tensor] = None,
                  kv_len: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T * scale over valid visual keys) v, GQA, empty rows exactly 0.

    q [B, T, H, hd]; k, v [B, Nv, Hkv, hd] (same dtype as q, H divisible by Hkv);
    key_mask [B, Nv] bool (True = valid) or None; kv_len [B] int32 (keys at index >= kv_len
    are invalid: a value above Nv means every key, 0 or below none; clamped inside the
    kernels, no host sync) or None; scale defaults to 1/sqrt(hd). Returns [B, T, H, hd] in
    q.dtype. Head dims: any on reference/cpu, up to 256 on cuda, multiples of 8 up to 256 on
    triton (128 in float32) (``backend_status`` and docs/backends.md list them).
    Differentiable in q, k, v.
    """
    check_float("q", q, 4, "[B, T, H, hd]")
    check_float("k", k, 4, "[B, Nv, Hkv, hd]")
    B, T, H, hd = q.shape
    Nv, Hkv = k.shape[1], k.shape[2]
    check_like("k", k, (B, Nv, Hkv, hd), q.device, q.dtype, "q")
    check_like("v", v, (B, Nv, Hkv, hd), q.device, q.dtype, "q")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of k heads Hkv={Hkv}")
    check_like("key_mask", key_mask, (B, Nv), q.device, torch.bool, "q")
    check_like("kv_len", kv_len, (B,), q.device, torch.int32, "q")
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    impl = resolve_backend(backend, q.device)
    check_backend_dtype(impl, q.dtype)
    check_backend_head_dim(impl, hd, q.dtype)
    return impl.retrieval(q, k, v, key_mask, kv_len, scale)


def pvm_merge(expanded: torch.Tensor, gate: torch.Tensor, keep: Optional[torch.Tensor] = None,
              ffn_output: Optional[torch.Tensor] = None, eps: float = 1e-6,
              backend: Optional[str] = None) -> torch.Tensor:
    """``ffn_output + keep * gate * rms(expanded)``; the update alone if ffn_output is None.

    expanded [..., D] float; gate [1] (any float dtype); keep [...] bool or None (False rows
    give exactly 0); ffn_output like expanded or None. rms is affine-free with float32
    statistics. Returns expanded's shape and dtype. Differentiable in expanded, gate, ffn.
    """
    check_tensor("expanded", expanded)
    if expanded.dim() < 1:
        raise ValueError("expanded must be [..., D], got a 0-dim tensor")
    check_float("expanded", expanded, expanded.dim())
    check_tensor("gate", gate)
    check_like("gate", gate, (1,), expanded.device, other="expanded")
    check_like("keep", keep, expanded.shape[:-1], expanded.device, torch.bool, "expanded")
    check_like("ffn_output", ffn_output, expanded.shape, expanded.device, expanded.dtype,
               "expanded")
    impl = resolve_backend(backend, expanded.device)
    check_backend_dtype(impl, expanded.dtype)
    return impl.merge(expanded, gate, keep, ffn_output, float(eps))
