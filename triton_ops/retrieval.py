"""Retrieval: softmax(q k^T * scale over valid visual keys) v, forward and backward.

Flash-style: keys are visited in blocks with an online softmax, so the [B, H, T, Nv] score
matrix never exists; the forward keeps only the per-row log-sum-exp for the backward.

GQA packing: a program owns one (sample, KV head) and a block of rows of the flattened
(query token, head-in-group) axis, so all G = H / Hkv query heads that share a KV head are
served by one read of its keys and values. At the 8B shape (H 4, Hkv 1) this reads K/V
4x less than one program per query head; at decode (T = 1) it also fills the 16-row
minimum of a tensor-core tile with 4 real rows instead of 1.

Layouts: q/out [B, T, H, hd]; k/v [B, Nv, Hkv, hd]; lse [B, H, T] float32 (natural log,
-inf for a row with no valid key); key_mask [B, Nv] (nonzero = valid); kv_len [B] int32.
Any strides are accepted; offsets are computed in int64.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import launch_guard, dot_flags, mma, pow2_at_least

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _row_tile(PTR, b, rows, row_ok, kvh, d, d_ok, G: tl.constexpr, sb, st, sh, sd):
    """Pointers and mask of a [BLOCK_M, BLOCK_D] tile of packed rows r = t * G + g
    (query token t, head kvh * G + g) in a [B, T, H, hd] tensor."""
    t = (rows // G).to(tl.int64)
    h = (kvh * G + rows % G).to(tl.int64)
    ptrs = PTR + b * sb + (t * st + h * sh)[:, None] + d[None, :] * sd
    return ptrs, row_ok[:, None] & d_ok[None, :]


@triton.jit
def _key_tile(PTR, b, kvh, n, n_in, d, d_ok, sb, sn, sh, sd, TRANSPOSED: tl.constexpr):
    """Pointers and mask of a key-block tile of a [B, Nv, Hkv, hd] tensor:
    [BLOCK_N, BLOCK_D], or [BLOCK_D, BLOCK_N] when TRANSPOSED (ready for q @ k^T)."""
    base = PTR + b * sb + kvh * sh
    n64 = n.to(tl.int64)
    if TRANSPOSED:
        return base + n64[None, :] * sn + d[:, None] * sd, n_in[None, :] & d_ok[:, None]
    return base + n64[:, None] * sn + d[None, :] * sd, n_in[:, None] & d_ok[None, :]


@triton.jit
def _row_stats(LSE, DELTA, b, rows, row_ok, kvh, T, G: tl.constexpr, HKV):
    """log2-domain lse and delta of packed rows, both stored [B, H, T]."""
    t = (rows // G).to(tl.int64)
    h = (kvh * G + rows % G).to(tl.int64)
    stat = (b * (HKV * G) + h) * T + t
    lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    return lse2, tl.load(DELTA + stat, mask=row_ok, other=0.0)


@triton.jit
def _kv_end(KV_LEN, b, NV, HAS_LEN: tl.constexpr):
    """One past the last key to visit for sample b."""
    if HAS_LEN:
        return tl.load(KV_LEN + b)
    return NV


@triton.jit
def _key_valid(KEY_MASK, b, n, n_end, smb, smn, HAS_MASK: tl.constexpr):
    ok = n < n_end
    if HAS_MASK:
        ok = ok & (tl.load(KEY_MASK + b * smb + n.to(tl.int64) * smn, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _row_program(T, HD, HKV, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (sample, KV head) from grid axis 1 and its block of packed query rows
    (t * G + head in group) from axis 0, with the head-dim lanes and their masks."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = pid_bh % HKV
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    return b, kvh, rows, rows < T * G, d, d < HD


@triton.jit
def retrieval_fwd_kernel(
    Q, K, V, O, LSE, KEY_MASK, KV_LEN,
    sqb, sqt, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sob, sot, soh, sod,
    smb, smn,
    T, NV, HD, HKV, qk_scale_log2,
    G: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    b, kvh, rows, row_ok, d, d_ok = _row_program(T, HD, HKV, G, BLOCK_M, BLOCK_D)
    q_ptrs, q_mask = _row_tile(Q, b, rows, row_ok, kvh, d, d_ok, G, sqb, sqt, sqh, sqd)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    n_end = _kv_end(KV_LEN, b, NV, HAS_LEN)

    # Finite start for the running max: an all-masked block then gives exp2(-inf) = 0
    # and a rescale factor of exactly 1 instead of NaN from (-inf) - (-inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_in = n < n_end
        n_ok = _key_valid(KEY_MASK, b, n, n_end, smb, smn, HAS_MASK)
        kt_ptrs, kt_mask = _key_tile(K, b, kvh, n, n_in, d, d_ok, skb, skn, skh, skd, True)
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        s = mma(q, kt, UPCAST, IEEE) * qk_scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs, v_mask = _key_tile(V, b, kvh, n, n_in, d, d_ok, svb, svn, svh, svd, False)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        # Padding may hold anything; 0 * NaN would leak into valid rows through the dot.
        v = tl.where(n_ok[:, None], v, 0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new

    # Empty only when nothing was summed (l == 0, no valid key); a NaN l (NaN or Inf in
    # this sample's keys/values) must come out as NaN like the reference, never as 0.
    has = l_i != 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    o_ptrs, o_mask = _row_tile(O, b, rows, row_ok, kvh, d, d_ok, G, sob, sot, soh, sod)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    t = (rows // G).to(tl.int64)
    h = (kvh * G + rows % G).to(tl.int64)
    tl.store(LSE + (b * (HKV * G) + h) * T + t, lse, mask=row_ok)


@triton.jit
def retrieval_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KEY_MASK, KV_LEN,
    sqb, sqt, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sdob, sdot, sdoh, sdod,
    smb, smn,
    sgb, sgn, sgh, sgd,
    T, NV, HD, HKV, qk_scale_log2, scale,
    G: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per (key block, sample, KV head): loops over every packed query row."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = pid_bh % HKV
    n_end = _kv_end(KV_LEN, b, NV, HAS_LEN)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < NV
    n_ok = _key_valid(KEY_MASK, b, n, n_end, smb, smn, HAS_MASK)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    k_ptrs, kv_mask = _key_tile(K, b, kvh, n, n_in, d, d_ok, skb, skn, skh, skd, False)
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v_ptrs, _ = _key_tile(V, b, kvh, n, n_in, d, d_ok, svb, svn, svh, svd, False)
    v = tl.where(n_ok[:, None], tl.load(v_ptrs, mask=kv_mask, other=0.0), 0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # A key block wholly past this sample's last valid key has zero gradient: skip the loop.
    row_end = tl.where(pid_n * BLOCK_N < n_end, T * G, 0)
    for r0 in range(0, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < T * G
        q_ptrs, r_mask = _row_tile(Q, b, rows, row_ok, kvh, d, d_ok, G, sqb, sqt, sqh, sqd)
        q = tl.load(q_ptrs, mask=r_mask, other=0.0)
        do_ptrs, _ = _row_tile(DO, b, rows, row_ok, kvh, d, d_ok, G, sdob, sdot, sdoh, sdod)
        do = tl.load(do_ptrs, mask=r_mask, other=0.0)
        lse2, delta = _row_stats(LSE, DELTA, b, rows, row_ok, kvh, T, G, HKV)
        s = mma(q, tl.trans(k), UPCAST, IEEE) * qk_scale_log2
        p = tl.where(row_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dv += mma(tl.trans(p.to(do.dtype)), do, UPCAST, IEEE)
        dp = mma(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dk += mma(tl.trans(ds.to(q.dtype)), q, UPCAST, IEEE)

    dk = dk * scale
    # dk and dv are allocated alike (contiguous), so they share the strides sg*.
    dk_ptrs, _ = _key_tile(DK, b, kvh, n, n_in, d, d_ok, sgb, sgn, sgh, sgd, False)
    dv_ptrs, _ = _key_tile(DV, b, kvh, n, n_in, d, d_ok, sgb, sgn, sgh, sgd, False)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def retrieval_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_MASK, KV_LEN,
    sqb, sqt, sqh, sqd,
    skb, skn, skh, skd,
    svb, svn, svh, svd,
    sdob, sdot, sdoh, sdod,
    smb, smn,
    sgb, sgt, sgh, sgd,
    T, NV, HD, HKV, qk_scale_log2, scale,
    G: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per (row block, sample, KV head): loops over the valid keys.

    Split from dK/dV so that neither needs atomics: results are deterministic.
    """
    b, kvh, rows, row_ok, d, d_ok = _row_program(T, HD, HKV, G, BLOCK_M, BLOCK_D)
    q_ptrs, r_mask = _row_tile(Q, b, rows, row_ok, kvh, d, d_ok, G, sqb, sqt, sqh, sqd)
    q = tl.load(q_ptrs, mask=r_mask, other=0.0)
    do_ptrs, _ = _row_tile(DO, b, rows, row_ok, kvh, d, d_ok, G, sdob, sdot, sdoh, sdod)
    do = tl.load(do_ptrs, mask=r_mask, other=0.0)
    lse2, delta = _row_stats(LSE, DELTA, b, rows, row_ok, kvh, T, G, HKV)
    n_end = _kv_end(KV_LEN, b, NV, HAS_LEN)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_in = n < n_end
        n_ok = _key_valid(KEY_MASK, b, n, n_end, smb, smn, HAS_MASK)
        kt_ptrs, kt_mask = _key_tile(K, b, kvh, n, n_in, d, d_ok, skb, skn, skh, skd, True)
        kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
        vt_ptrs, _ = _key_tile(V, b, kvh, n, n_in, d, d_ok, svb, svn, svh, svd, True)
        vt = tl.where(n_ok[None, :], tl.load(vt_ptrs, mask=kt_mask, other=0.0), 0.0)
        s = mma(q, kt, UPCAST, IEEE) * qk_scale_log2
        p = tl.where(row_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = mma(do, vt, UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += mma(ds.to(kt.dtype), tl.trans(kt), UPCAST, IEEE)
    dq = dq * scale
    dq_ptrs, _ = _row_tile(DQ, b, rows, row_ok, kvh, d, d_ok, G, sgb, sgt, sgh, sgd)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=r_mask)


def _blocks(rows: int, hd: int) -> Tuple[int, int, int]:
    # 64x64 tiles with hd <= 128 keep q, k, v and the accumulator in registers at 4 warps
    # (the FA2 forward shape); short row counts (decode: T * G = 4) use a 16-row tile.
    block_m = 64 if rows >= 64 else pow2_at_least(rows)
    return block_m, 64, pow2_at_least(hd)


def _common_args(q, k, v, key_mask, kv_len):
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    mask_t = key_mask if key_mask is not None else q.new_empty((1, 1), dtype=torch.bool)
    len_t = kv_len if kv_len is not None else q.new_empty((1,), dtype=torch.int32)
    return B, T, H, hd, Hkv, mask_t, len_t


def retrieval_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: Optional[torch.Tensor], kv_len: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns out [B, T, H, hd] (q.dtype) and lse [B, H, T] float32."""
    B, T, H, hd, Hkv, mask_t, len_t = _common_args(q, k, v, key_mask, kv_len)
    G = H // Hkv
    out = new_output((B, T, H, hd), q.dtype, q.device)
    lse = new_output((B, H, T), torch.float32, q.device)
    if B * T * H == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_m, block_n, block_d = _blocks(T * G, hd)
    grid = (triton.cdiv(T * G, block_m), B * Hkv)
    with launch_guard(q):
        retrieval_fwd_kernel[grid](
            q, k, v, out, lse, mask_t, len_t,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_t.stride(),
            T, k.shape[1], hd, Hkv, scale * LOG2E,
            G=G, HAS_MASK=key_mask is not None, HAS_LEN=kv_len is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **dot_flags(q.dtype),
            num_warps=4)
    return out, lse


def retrieval_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, key_mask: Optional[torch.Tensor],
                  kv_len: Optional[torch.Tensor], scale: float
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dq, dk, dv with the shapes and dtypes of q, k, v."""
    B, T, H, hd, Hkv, mask_t, len_t = _common_args(q, k, v, key_mask, kv_len)
    G, Nv = H // Hkv, k.shape[1]
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    if B * T * H == 0 or Nv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta_r = <dO_r, O_r>, the softmax-backward row term, laid out like lse.
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    block_m, block_n, block_d = _blocks(T * G, hd)
    common = dict(G=G, HAS_MASK=key_mask is not None, HAS_LEN=kv_len is not None,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **dot_flags(q.dtype),
                  num_warps=4)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_t.stride())
    sizes = (T, Nv, hd, Hkv, scale * LOG2E, scale)
    with launch_guard(q):
        retrieval_bwd_dkdv_kernel[(triton.cdiv(Nv, block_n), B * Hkv)](
            q, k, v, grad_out, lse, delta, dk, dv, mask_t, len_t, *strides, *dk.stride(),
            *sizes, **common)
        retrieval_bwd_dq_kernel[(triton.cdiv(T * G, block_m), B * Hkv)](
            q, k, v, grad_out, lse, delta, dq, mask_t, len_t, *strides, *dq.stride(),
            *sizes, **common)
    return dq, dk, dv
