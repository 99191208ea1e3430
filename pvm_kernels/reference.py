"""Plain PyTorch reference of the PVM spec (``docs/spec.md``): the ground truth.

Everything here is written for clarity, not speed: the score matrix is materialised and
nothing is fused. Statistics (RMS, softmax) run in ``float32`` or the input dtype if wider,
so a float64 call is an exact-as-possible oracle for the kernels.

Layouts used throughout the package:
    q          [B, T, H, hd]        queries, already q-normed
    k, v       [B, Nv, Hkv, hd]     visual keys (k-normed) and values
    key_mask   [B, Nv] bool         True = valid visual token (None: all valid)
    keep       [B, T] bool          False = silence the PVM update at that query
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .config import PVMDims


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input dtype when it is wider (float64 reference runs)."""
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Qwen RMSNorm: statistics in float32, cast back to ``x.dtype``, then the gain.

    x: [..., n] any float dtype; weight: [n] or None (affine-free). Returns x.dtype.
    """
    xs = x.to(stat_dtype(x.dtype))
    y = (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def retrieval_probabilities(q: torch.Tensor, k: torch.Tensor,
                            key_mask: Optional[torch.Tensor] = None,
                            scale: Optional[float] = None) -> torch.Tensor:
    """Attention weights of the retrieval: softmax(q k^T * scale) over valid keys, with GQA.

    q [B, T, H, hd], k [B, Nv, Hkv, hd], key_mask [B, Nv] bool or None. Returns
    [B, H, T, Nv] in float32 (or float64 for a float64 q); masked keys get weight 0 and a
    sample with no valid key gets an all-zero row. Query head i reads KV head i // (H // Hkv).
    """
    H, hd = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    acc = stat_dtype(q.dtype)
    kx = k.to(acc).repeat_interleave(H // k.shape[2], dim=2)
    s = torch.einsum("bthd,bnhd->bhtn", q.to(acc), kx) * scale
    if key_mask is None:
        return torch.softmax(s, dim=-1)
    valid = key_mask[:, None, None, :]
    # A finite fill keeps the softmax of an all-masked row finite (uniform), and its
    # backward NaN-free; multiplying by the mask afterwards makes that row exactly 0.
    s = s.masked_fill(~valid, torch.finfo(acc).min)
    return torch.softmax(s, dim=-1) * valid


def retrieval_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale over valid keys) v with GQA; rows with no valid key give 0.

    q [B, T, H, hd], k/v [B, Nv, Hkv, hd], key_mask [B, Nv] bool or None.
    Returns [B, T, H, hd] in q.dtype. Query head i reads KV head i // (H // Hkv).
    """
    p = retrieval_probabilities(q, k, key_mask, scale)
    vx = v.to(p.dtype).repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    if key_mask is not None:
        vx = vx.masked_fill(~key_mask[:, :, None, None], 0.0)
    return torch.einsum("bhtn,bnhd->bthd", p, vx).to(q.dtype)


def retrieval_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                               scale: Optional[float] = None) -> torch.Tensor:
    """The packed (varlen) retrieval, one sequence at a time through ``retrieval_reference``.

    q [total_q, H, hd]; k, v [total_k, Hkv, hd]; cu_seqlens_q / cu_seqlens_k int32 [N + 1]
    (flash-attention's cumulative lengths). Query rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]
    attend to keys cu_seqlens_k[b]:cu_seqlens_k[b + 1] only; a sequence with no key, and
    rows of no sequence, give exactly 0. Returns [total_q, H, hd] in q.dtype. Reads the
    lengths on the host (a device sync): a specification, not a kernel.
    """
    # Zeros that still belong to q's graph (zero gradient, NaN-safe): rows no sequence owns.
    out = torch.where(torch.zeros_like(q, dtype=torch.bool), q, 0.0)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if q1 > q0 and k1 > k0:
            out[q0:q1] = retrieval_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                             None, scale)[0]
    return out


def merge_reference(expanded: torch.Tensor, gate: torch.Tensor,
                    keep: Optional[torch.Tensor] = None,
                    ffn_output: Optional[torch.Tensor] = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """``ffn_output + keep * gate * rms(expanded)`` (affine-free RMSNorm over the last dim).

    expanded [..., D]; gate [1]; keep [...] bool or None; ffn_output [..., D] or None.
    Returns the update (ffn_output is None) or ffn_output + update, in expanded.dtype.
    """
    u = gate * rms_norm(expanded, None, eps)
    if keep is not None:
        u = torch.where(keep[..., None], u, torch.zeros((), dtype=u.dtype, device=u.device))
    return u if ffn_output is None else ffn_output + u


def _linear(params: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, params[f"{name}.weight"], params.get(f"{name}.bias"))


def pvm_block_reference(params: Mapping[str, torch.Tensor], dims: PVMDims,
                        hidden_states: torch.Tensor, visual: Optional[torch.Tensor],
                        visual_mask: Optional[torch.Tensor] = None,
                        query_is_visual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole PVM block from a state dict with the published key names.

    hidden_states [B, T, D]; visual [B, Nv, D] or None; visual_mask [B, Nv] bool;
    query_is_visual [B, T] bool. Returns the update u [B, T, D] (dtype of hidden_states).
    """
    B, T, _ = hidden_states.shape
    if visual is None or visual.shape[1] == 0:
        return torch.zeros_like(hidden_states)
    hd, H, Hkv = dims.head_dim, dims.num_heads, dims.num_kv_heads
    Nv = visual.shape[1]
    if visual_mask is not None:
        visual = visual.masked_fill(~visual_mask[..., None], 0.0)

    x = rms_norm(_linear(params, "text_reducer", hidden_states), params["input_norm.weight"], dims.eps)
    q = rms_norm(_linear(params, "cross_attn.q_proj", x).view(B, T, H, hd),
                 params["cross_attn.q_norm.weight"], dims.eps)
    y = _linear(params, "vision_reducer", visual)
    k = rms_norm(_linear(params, "cross_attn.k_proj", y).view(B, Nv, Hkv, hd),
                 params["cross_attn.k_norm.weight"], dims.eps)
    v = _linear(params, "cross_attn.v_proj", y).view(B, Nv, Hkv, hd)
    a = retrieval_reference(q, k, v, visual_mask)
    m = _linear(params, "cross_attn.o_proj", a.reshape(B, T, H * hd))
    n = rms_norm(m, params["post_attn_norm.weight"], dims.eps)
    m = m + _linear(params, "mlp.down_proj",
                    F.silu(_linear(params, "mlp.gate_proj", n)) * _linear(params, "mlp.up_proj", n))
    e = _linear(params, "output_expander", m)

    keep = torch.ones(B, T, dtype=torch.bool, device=hidden_states.device)
    if visual_mask is not None:
        keep = keep & visual_mask.any(dim=1)[:, None]
    if query_is_visual is not None:
        keep = keep & ~query_is_visual
    return merge_reference(e, params["gate_alpha"], keep, None, dims.eps)
