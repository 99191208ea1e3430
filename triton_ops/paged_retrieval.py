"""PVM's retrieval for single-token queries, read in place from a serving engine's paged KV
cache (vLLM's decode steps), skipping every block that holds no visual token.

The cache is what pvm_kernels/ops/paged.py describes: ``kv [num_blocks, Hkv, BS, 2 hd]``
(key channels, then value channels; any strides with a unit last one), ``flags
[num_blocks * BS]`` (the slot holds a visual token) and ``block_visual [num_blocks]`` (the
block holds one: a summary the writer keeps). Each program takes one query token and one
KV head (its G query heads as the tile's rows), walks its request's block table up to the
request's length and loads keys/values only of blocks whose summary is set, masking slots
that are not flagged or lie past the length.

Why: in a long generation nearly every block is text. Gathering a request's entries into
a padded memory first (the torch path) moves every position's entry three times (read,
write, read) per PVM layer and step; here only the visual blocks' are read once. 8B
layout, a 16k-token generation after a 1k-token image, bf16: 16384 x 512 B x 3 = 25 MB per
request against 1024 x 512 B = 0.5 MB.

16-bit only (fp32 spills: CONFIGS). Tiles: BLOCK_M = G padded to 16 query rows (tl.dot
needs 16), BLOCK_N = the cache block size BS (16 or 32 keys), BLOCK_D = hd padded to a
power of two. The online softmax is the retrieval kernels'
(``retrieval._softmax_step``, scores in the log2 domain). Variants: CONFIGS (dtype class x
BLOCK_D) x dtype x BS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import check_grid, dot_flags, dtype_class, expect, launch_guard, pow2_at_least
from .retrieval import MAX_HEAD_DIM, _softmax_step, head_dim_unsupported

#: The cache block sizes the kernel is compiled for (vLLM's default is 16); other sizes,
#: or more than 16 query heads per KV head, take the gather path (ops/paged.py).
BLOCK_SIZES = (16, 32)
MAX_GROUP = 16
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileConfig:
    num_warps: int
    num_stages: int


#: (kernel, dtype class, BLOCK_D) -> TileConfig for every head dim the retrieval takes in
#: 16 bits (up to 256): 4 warps and 2 stages, 8 warps at BLOCK_D 256 (4 spilled 64 B per
#: thread on sm_80 with 32-key blocks). fp32 is not compiled: its tf32x3 products spilled
#: 16-480 B per thread at every BLOCK_D from 16 to 128 with 4 or 8 warps and 1-3 stages
#: (compile gate, triton 3.8), so fp32 caches take the gather path.
CONFIGS: Dict[Tuple[str, str, int], TileConfig] = {
    ("fwd", "16bit", bd): TileConfig(8 if bd == 256 else 4, 2)
    for bd in (16, 32, 64, 128, 256) if bd <= MAX_HEAD_DIM["16bit"]}


def config_key(dtype: torch.dtype, hd: int) -> Tuple[str, str, int]:
    """The CONFIGS key of a launch on ``dtype`` queries of head dim ``hd``."""
    return ("fwd", dtype_class(dtype), pow2_at_least(hd, 16))


@triton.jit(do_not_specialize=["HKV", "G", "HD", "sqt", "sqh", "skb", "skh", "skn", "sbr",
                               "sot", "soh", "n_queries"],
            do_not_specialize_on_alignment=["FLAGS", "BLOCK_VIS", "BT", "SEQ", "ROW", "HAS"])
def paged_retrieval_fwd_kernel(Q, KV, FLAGS, BLOCK_VIS, BT, SEQ, ROW, OUT, HAS,
                               n_queries: tl.int32, HKV: tl.int32, G: tl.int32, HD: tl.int32,
                               sqt: tl.int64, sqh: tl.int64, skb: tl.int64, skh: tl.int64,
                               skn: tl.int64, sbr: tl.int64, sot: tl.int64, soh: tl.int64,
                               qk_scale_log2, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                               FP32: tl.constexpr):
    pid = tl.program_id(0)
    t = pid // HKV
    kvh = pid % HKV
    r = tl.load(ROW + t).to(tl.int64)
    seq = tl.load(SEQ + r)
    g = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    g_ok = g < G
    d_ok = d < HD
    q = tl.load(Q + t * sqt + (kvh * G + g)[:, None] * sqh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.cdiv(seq, BLOCK_N)):
        blk = tl.load(BT + r * sbr + j).to(tl.int64)
        if tl.load(BLOCK_VIS + blk) != 0:   # a text-only block: nothing to read
            ok = (tl.load(FLAGS + blk * BLOCK_N + n) != 0) & (j * BLOCK_N + n < seq)
            base = KV + blk * skb + kvh * skh + n[:, None] * skn + d[None, :]
            nd_ok = ok[:, None] & d_ok[None, :]
            # Unflagged slots are not loaded: a text token's entry holds whatever was there.
            k = tl.load(base, mask=nd_ok, other=0.0)
            v = tl.load(base + HD, mask=nd_ok, other=0.0)
            m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale_log2, ok, True,
                                          UPCAST, FP32)
    # No valid key (a request without images): l == 0, the output 0 and HAS False.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + t * sot + (kvh * G + g)[:, None] * soh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    if kvh == 0:
        tl.store(HAS + t, tl.max(l_i, 0) > 0)


def unsupported(q: torch.Tensor, kv: torch.Tensor, num_kv_heads: int) -> Optional[str]:
    """Why the kernel cannot take this launch (None if it can): the caller then gathers."""
    T, H, hd = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"{str(q.dtype).replace('torch.', '')} (compiled for float16 and bfloat16)"
    why = head_dim_unsupported(hd, q.dtype)
    if why:
        return why
    if kv.shape[2] not in BLOCK_SIZES:
        return f"cache block size {kv.shape[2]} (compiled for {BLOCK_SIZES})"
    if H % num_kv_heads or H // num_kv_heads > MAX_GROUP:
        return f"{H} query heads over {num_kv_heads} KV heads (at most {MAX_GROUP} per KV head)"
    if kv.stride(-1) != 1 or kv.data_ptr() % 16 or any(s % 8 for s in kv.stride()[:-1]):
        return "a cache view without 16-byte aligned rows"
    return None


def paged_retrieval_fwd(q: torch.Tensor, kv: torch.Tensor, flags: torch.Tensor,
                        block_visual: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, rows: torch.Tensor,
                        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Retrieval of T single-token queries from the paged cache.

    q [T, H, hd] (q-normed; fp16/bf16); kv [num_blocks, Hkv, BS,
    2 hd] in q's dtype; flags [num_blocks * BS] bool; block_visual [num_blocks] bool;
    block_table [R, W] int32; seq_lens [R] int32; rows [T] int32 (each query's request).
    Returns (a [T, H, hd] in q's dtype, has_visual [T] bool). Check ``unsupported`` first.
    """
    T, H, hd = q.shape
    num_blocks, hkv, bs, channels = kv.shape
    why = unsupported(q, kv, hkv)
    if why:
        raise ValueError(f"paged_retrieval_fwd cannot take this launch: {why}")
    expect("kv", kv, (num_blocks, hkv, bs, 2 * hd), q.dtype, q.device)
    expect("flags", flags, (num_blocks * bs,), torch.bool, q.device)
    expect("block_visual", block_visual, (num_blocks,), torch.bool, q.device)
    expect("seq_lens", seq_lens, (block_table.shape[0],), torch.int32, q.device)
    expect("rows", rows, (T,), torch.int32, q.device)
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"block_table must be a 2-D int32 tensor, got {block_table.dtype} "
                        f"{tuple(block_table.shape)}")
    if q.stride(-1) != 1 or q.data_ptr() % 16:  # the compiled variants assume both
        q = q.contiguous() if q.stride(-1) != 1 else q.clone()
    out = new_output((T, H, hd), q.dtype, q.device)
    has = new_output((T,), torch.bool, q.device)
    if T == 0:
        return out, has
    cfg = CONFIGS[config_key(q.dtype, hd)]
    grid = (T * hkv,)
    check_grid(grid)
    with launch_guard(q):
        paged_retrieval_fwd_kernel[grid](
            q, kv, flags, block_visual, block_table, seq_lens, rows, out, has, T, hkv,
            H // hkv, hd, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv.stride(2),
            block_table.stride(0), out.stride(0), out.stride(1), scale * _LOG2E, BLOCK_N=bs,
            BLOCK_M=16, BLOCK_D=pow2_at_least(hd, 16), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **dot_flags(q.dtype))
    return out, has
