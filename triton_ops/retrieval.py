"""Retrieval: softmax(q k^T * scale over valid visual keys) v, forward and backward.

Flash-style: keys are visited in blocks with an online softmax, so the [B, H, T, Nv] score
matrix never exists; the forward keeps only the per-row log-sum-exp for the backward.

GQA packing: a program owns one (sample, KV head) and a block of rows of the flattened
(query token, head-in-group) axis, so all G = H / Hkv query heads that share a KV head are
served by one read of its keys and values. At the 8B shape (H 4, Hkv 1) this reads K/V
4x less than one program per query head; at decode (T = 1) it also fills the 16-row
minimum of a tensor-core tile with 4 real rows instead of 1.

Layouts: q/out [B, T, H, hd]; k/v [B, Nv, Hkv, hd]; lse [B, H, T] float32 (natural log,
-inf for a row with no valid key); key_mask [B, Nv] (nonzero = valid); kv_len [B] int32,
clamped to [0, Nv] in the kernels (above Nv: every key; 0 or below: none).

Varlen (packed, flash-attention's cu_seqlens; ``VARLEN=True``, csrc/pvm_params.h's
contract): q/out [total_q, H, hd]; k/v [total_k, Hkv, hd]; N sequences, sequence b owning
query rows [cu_q[b], cu_q[b + 1]) and keys [cu_k[b], cu_k[b + 1]), every bound clamped
into [0, total] and to at most max_seqlen_q / max_seqlen_k rows; lse [H, total_q]; no
key_mask or kv_len. The same kernel bodies serve both layouts: where a sequence lives
(its base offsets, row count, key end, statistics index) comes from small helpers with a
constexpr branch, and T / NV are max_seqlen_q / max_seqlen_k, which size the grids.
Programs whose block starts past their sequence's rows (or keys) do nothing: the forward
returns at once, the others loop over nothing with every access masked off (_none_past:
an early return made ptxas spill there); rows and keys of no sequence are never visited
(the launchers allocate those outputs zeroed).

Specialisation is closed: every runtime integer is passed unspecialised (sizes int32,
strides int64), so the compiled variants are exactly the constexpr combinations of
``CONFIGS`` x dtype, a finite set the ahead-of-time compile gate (tools/compile_gate.py)
compiles in full for sm_80 and sm_90. What Triton would have learnt from specialising, the
launcher guarantees instead and the kernels state as hints: unit stride along hd, every
other stride and hd a multiple of 8 elements, 16-byte aligned pointers. That is what
16-byte vector loads need (checked in the PTX: ld.global.v4 with the hints, 2-byte loads
without).

Tensor descriptors (issue 25; ``TMA=True``): on sm_90, 16-bit prefill launches without a
key_mask whose KV-group rows are evenly strided (``uses_tma``; the 8B layout's) load their
Q, K, V and dO tiles as TMA boxes from descriptors each program makes for its own sample
(tl.make_tensor_descriptor): a box's rows past the sample's key or row count arrive as
zeros, so full key tiles run without any mask and one tail tile per sample is masked, and
the loads need no registers or address arithmetic (the PTX carries cp.async.bulk.tensor
and wgmma: tests/test_compile_gate.py). A key_mask keeps pointer loads: a masked key inside
a box would reach the MMA (NaN padding times a zero probability is NaN). sm_80 keeps
pointer loads too (no TMA unit). The softmax runs in exp2 with scale * log2(e) folded into
the scores on both paths. ``tensor_descriptors(False)`` forces pointer loads, process-wide
(it must reach autograd's threads).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import (ARCH_SMS, always_valid_keys, check_grid, descriptor_scratch, dot_flags,
                     dtype_class, expect, head_dim_problem, launch_guard, mma, never_read_f32, pow2_at_least,
                     target_capability, unlimited_kv_len, with_vector_layout)
from .tile_tables import ARCHS, load_table

LOG2E = 1.4426950408889634

#: Head dims the Triton retrieval kernels take: multiples of 8 from 8 up to 256 in bf16 and
#: fp16, up to 128 in fp32 (fp32's dK/dV at hd 256 spilled at every tile tried, 16 x 16
#: included: the compile gate's sweep). hd pads to BLOCK_D, the next power of two (at least
#: 16: tl.dot's smallest K). Qwen3-VL's head dim is 128 at every size.
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = {"16bit": 256, "fp32": 128}
BLOCK_D_CHOICES = (16, 32, 64, 128, 256)

#: Packed query rows (T * G) up to this use the "decode" tile (16 rows: the MMA minimum).
DECODE_ROWS = 16

# Runtime integers: never specialised (see the module docstring).
_RUNTIME_INTS = ["sqb", "sqt", "sqh", "skb", "skn", "skh", "svb", "svn", "svh", "sob", "sot",
                 "soh", "smb", "smn", "slb", "sgb", "sgn", "sgh", "sgt", "T", "G", "NV", "HD",
                 "HKV", "H", "SPLITS", "SPLIT_KEYS", "SPLIT_ROWS", "N_STATS", "PART_STRIDE",
                 "TOTAL_Q", "TOTAL_K"]
# The varlen cumulative lengths are read as scalars: their alignment buys nothing, and not
# specialising on it keeps the set of compiled variants closed (a cu_seqlens view at any
# offset compiles to the same kernel).
_UNALIGNED = ["CU_Q", "CU_K"]


@dataclass(frozen=True)
class TileConfig:
    """One compiled tile shape: BLOCK_M packed query rows x BLOCK_N keys per step;
    ``warp_specialize``: the key loop of a tensor-descriptor (TMA) launch warp-specialised
    (tile_tables.py), unused by pointer-load launches."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False


_T = TileConfig


def _tile_table(arch: str) -> Dict[Tuple[str, str, int, str], TileConfig]:
    """The tile table of ``arch`` ("sm80": A100, "sm90": H100/H200) from its file,
    triton_ops/configs/<arch>.json (tile_tables.py): (kernel, dtype class, BLOCK_D, row
    class) -> TileConfig. Why each tile is what it is stands in the file's notes; the
    compile gate recompiles every entry in make test (docs/kernel_resources.md lists
    their registers, shared memory and occupancy)."""
    return {key: _T(*values) for key, values in load_table(arch).items()}


def _with_row_kernels(table: Dict[Tuple[str, str, int, str], TileConfig]):
    """The table plus the backward's row kernels around the tile kernels, memory-bound, no
    MMA, the same tile on every architecture: the row term ("delta": rowsum(dO * O),
    BLOCK_M rows a program) and the finish ("finish": block_m elements of dk and dv a
    program summing the split partials, and q_norm's gain gradient). The split forward
    merges its partials itself (_merge_splits): no row kernel."""
    rows = lambda key: _T(16, 16, 8 if key[2] == 256 else 4, 1)  # noqa: E731
    return {**table, **{("delta",) + key[1:]: rows(key) for key in table if key[0] == "dq"},
            **{("finish",) + key[1:]: _T(1024, 16, 4, 1) for key in table
               if key[0] == "dkdv"}}


#: (architecture, kernel, dtype class, BLOCK_D, row class) -> TileConfig: the only source
#: of launch shapes. One table per architecture ("sm80", "sm90"), chosen by the device's
#: compute capability (triton_ops.common.target_capability).
CONFIGS: Dict[Tuple[str, str, str, int, str], TileConfig] = {
    (arch,) + key: cfg for arch in ARCHS for key, cfg in _with_row_kernels(_tile_table(arch)).items()}


def block_d_for(hd: int) -> int:
    return max(16, triton.next_power_of_2(hd))


def row_class(rows: int) -> str:
    return "decode" if rows <= DECODE_ROWS else "prefill"


def arch_of(device: torch.device) -> str:
    """The CONFIGS architecture of ``device``: "sm80" or "sm90" (CPU tensors: "sm90", or
    the compile gate's target)."""
    return f"sm{target_capability(device)}"


def config_key(kernel: str, dtype: torch.dtype, rows: int, hd: int, device: torch.device
               ) -> Tuple[str, str, str, int, str]:
    """The CONFIGS key of a launch of ``kernel`` on ``device`` for T * G = ``rows`` and
    head dim ``hd``."""
    return (arch_of(device), kernel, dtype_class(dtype), block_d_for(hd), row_class(rows))


def select_config(kernel: str, dtype: torch.dtype, rows: int, hd: int,
                  device: torch.device) -> TileConfig:
    """The table entry a launch of ``kernel`` on ``device`` uses for T * G = ``rows`` and
    head dim ``hd``."""
    return CONFIGS[config_key(kernel, dtype, rows, hd, device)]


def head_dim_unsupported(hd: int, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton retrieval cannot take head dim ``hd`` in ``dtype`` (None if it can)."""
    largest = MAX_HEAD_DIM[dtype_class(dtype)]
    why = head_dim_problem(hd, HEAD_DIM_MULTIPLE, largest)
    return None if why is None else f"{why} in {str(dtype).replace('torch.', '')}"


# ---- kernels -----------------------------------------------------------------------------

@triton.jit
def _clamped_range(CU, b, TOTAL, LONGEST, VOLATILE: tl.constexpr):
    """(begin, length) of sequence b in cumulative lengths CU: begin = cu[b] clamped to
    [0, TOTAL], end = cu[b + 1] clamped to [begin, TOTAL], length = end - begin at most
    LONGEST (csrc/pvm_params.h: seq_q_begin / seq_q_len, seq_k_begin / seq_k_len).
    VOLATILE: a read never merged with an earlier one (_reread_seq_q)."""
    begin = tl.minimum(tl.maximum(tl.load(CU + b, volatile=VOLATILE).to(tl.int64), 0), TOTAL)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1, volatile=VOLATILE).to(tl.int64), begin),
                     TOTAL)
    return begin, tl.minimum(end - begin, LONGEST).to(tl.int32)


@triton.jit
def _seq_q(CU_Q, b, TOTAL_Q, T, VARLEN: tl.constexpr):
    """(first query row, query tokens) of sample b: (0, T) padded; varlen, its clamped
    range in the packed q."""
    if VARLEN:
        return _clamped_range(CU_Q, b, TOTAL_Q, T, False)
    else:
        return 0, T


@triton.jit
def _reread_seq_q(CU_Q, b, TOTAL_Q, T, q_begin, q_len, VARLEN: tl.constexpr):
    """Varlen: sample b's query range read again (volatile, so never merged with the first
    read) for the forward's epilogue, whose q_begin then need not stay live across the key
    loop: kept live, ptxas capped the sm_80 forward's 64 x 64 x 32 tile at 128 registers
    and spilled 16 B (compile gate, triton 3.6 and 3.8); re-read, it takes 138-143 as the
    padded one does. (Re-reading q_len too made other tiles spill.) Padded: (q_begin,
    q_len) as they are."""
    if VARLEN:
        return _clamped_range(CU_Q, b, TOTAL_Q, T, True)
    else:
        return q_begin, q_len


@triton.jit
def _seq_k(CU_K, KV_LEN, b, slb, TOTAL_K, NV, VARLEN: tl.constexpr):
    """(first key row, one past the last key to visit) of sample b: padded (0, kv_len
    clamped to [0, Nv]); varlen, its clamped key range in the packed k (key_end <= NV =
    max_seqlen_k)."""
    if VARLEN:
        return _clamped_range(CU_K, b, TOTAL_K, NV, False)
    else:
        return 0, _kv_end(KV_LEN, b, slb, NV)


@triton.jit
def _none_past(end, first, count, VARLEN: tl.constexpr):
    """The main loop's end for a program whose block starts at row ``first`` of its
    sample's ``count``: varlen, 0 when the block starts past a short sequence's rows, so
    the loop runs no step and every load and store is masked off (the program does
    nothing). The dQ kernel's "return at once" (the forward has an early `return`): with
    one there, ptxas spilled where the padded kernel does not (compile gate, sm_80: dQ fp32
    at 255 registers + 16-64 B, a since removed combine kernel 8 B of stack), while the
    zero-trip loop compiles as the padded kernel does. The forward is the other way round
    (64 x 64 x 32 on sm_80: 8-16 B of spill with the zero-trip loop under triton 3.6 or
    3.8, none with the return and _reread_seq_q)."""
    if VARLEN:
        return tl.where(first < count, end, 0)
    else:
        return end


@triton.jit
def _base(b, begin, sb, sr, VARLEN: tl.constexpr):
    """Element offset of row 0 of sample b: b * sb padded ([B, rows, heads, hd]); varlen,
    its first packed row begin * sr ([total, heads, hd]) (pvm_params.h: row_base /
    key_base)."""
    if VARLEN:
        return begin * sr
    else:
        return b * sb


@triton.jit
def _row_offsets(base, rows, kvh, G, st, sh):
    """Element offsets of packed rows r = t * G + g (token t, head kvh * G + g) of a sample
    starting at element base of a q-like tensor; multiples of 8 by the launcher's layout
    guarantee."""
    t = (rows // G).to(tl.int64)
    h = (kvh * G + rows % G).to(tl.int64)
    return tl.multiple_of(base + t * st + h * sh, 8)


@triton.jit
def _key_offsets(base, kvh, n, sn, sh):
    """Element offsets of keys n of KV head kvh of a sample starting at element base of a
    k-like tensor (multiples of 8)."""
    return tl.multiple_of(base + kvh * sh + n.to(tl.int64) * sn, 8)


@triton.jit
def _dims(HD, BLOCK_D: tl.constexpr):
    """Head-dim lanes and their mask. hd is a multiple of 8, so the mask is constant over
    each run of 8 lanes, which keeps 16-byte vector loads (d < HD alone would not)."""
    d = tl.arange(0, BLOCK_D)
    return d, (d // 8) < (HD // 8)


@triton.jit
def _kv_end(KV_LEN, b, slb, NV):
    """One past the last key to visit for sample b: kv_len clamped to [0, Nv]."""
    return tl.minimum(tl.maximum(tl.load(KV_LEN + b * slb), 0), NV)


@triton.jit
def _key_valid(KEY_MASK, b, n, n_end, smb, smn):
    """Keys n of sample b to attend to: below n_end and set in key_mask. Varlen has no
    key_mask: the launcher passes the always-True stand-in, read as in a padded launch
    without one. Not a constexpr branch to the bare `n < n_end`: with that mask the
    compiler laid the loads out differently and spilled (compile gate, sm_90: the forward
    at 64 x 64 x 256 took 255 registers + 16-80 B, 246 with the mask read)."""
    ok = n < n_end
    return ok & (tl.load(KEY_MASK + b * smb + n.to(tl.int64) * smn, mask=ok, other=0) != 0)


@triton.jit
def _mask_row(b, VARLEN: tl.constexpr):
    """The key_mask row the forward reads for sample b: varlen's stand-in (stride 0) at row
    0, so no b * smb stays live across the key loop (ptxas capped the sm_80 forward's
    64 x 64 x 16 tile at 96 registers and spilled 8 B with it, triton 3.6)."""
    if VARLEN:
        return 0
    else:
        return b


@triton.jit
def _stored_keys(NV, n_end, VARLEN: tl.constexpr):
    """Keys below this get their dK/dV stored: padded every key of the sample (zeros past
    kv_len, NV); varlen its own keys only (n_end), the packed k's next rows being another
    sequence's."""
    if VARLEN:
        return n_end
    else:
        return NV


@triton.jit
def _program(T, G, HKV, n_items, BLOCK: tl.constexpr):
    """Split the 1-D grid into (block of n_items, sample, KV head), blocks fastest, so the
    programs sharing one KV head run side by side (L2 reuse of its K/V). A 1-D grid has no
    65,535 limit on B x Hkv (grid y and z do)."""
    n_blocks = (n_items + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    bh = pid // n_blocks
    return pid % n_blocks, (bh // HKV).to(tl.int64), bh % HKV


@triton.jit
def _program_split(HKV, n_items, BLOCK: tl.constexpr, SPLITS):
    """As _program, with a split index between the blocks and the (sample, KV head):
    (block, split, sample, KV head), blocks fastest, then splits."""
    n_blocks = (n_items + BLOCK - 1) // BLOCK
    pid = tl.program_id(0)
    rest = pid // n_blocks
    bh = rest // SPLITS
    return pid % n_blocks, rest % SPLITS, (bh // HKV).to(tl.int64), bh % HKV


@triton.jit
def _stat_index(b, q_begin, rows, kvh, T, G, HKV, TOTAL_Q, VARLEN: tl.constexpr):
    """Index of packed rows' statistics (lse, delta, the forward's partials): [B, H, T]
    contiguous, (b * H + h) * T + t; varlen [H, total_q], h * total_q + q_begin + t
    (pvm_params.h: stat_row)."""
    t = (rows // G).to(tl.int64)
    h = (kvh * G + rows % G).to(tl.int64)
    if VARLEN:
        return h * TOTAL_Q + q_begin + t
    else:
        return (b * HKV * G + h) * T + t


@triton.jit
def _row_stats(LSE, DELTA, b, q_begin, rows, row_ok, kvh, T, G, HKV, TOTAL_Q,
               VARLEN: tl.constexpr):
    """log2-domain lse and delta of packed rows."""
    stat = _stat_index(b, q_begin, rows, kvh, T, G, HKV, TOTAL_Q, VARLEN)
    lse2 = tl.load(LSE + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    return lse2, tl.load(DELTA + stat, mask=row_ok, other=0.0)


@triton.jit
def _chunked_dot(A, a_off, a_ok, B, b_off, b_ok, HD, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 FP32: tl.constexpr):
    """[BLOCK_M, BLOCK_N] = a @ b^T over the head dim, loaded and multiplied 32 dims at a
    time (rows of a at offsets a_off, of b at b_off)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    CHUNK: tl.constexpr = min(BLOCK_D, 32)
    for c in tl.static_range(0, BLOCK_D, CHUNK):
        dc = c + tl.arange(0, CHUNK)
        dc_ok = (dc // 8) < (HD // 8)
        a = tl.load(A + a_off[:, None] + dc[None, :], mask=a_ok[:, None] & dc_ok[None, :],
                    other=0.0)
        b = tl.load(B + b_off[:, None] + dc[None, :], mask=b_ok[:, None] & dc_ok[None, :],
                    other=0.0)
        acc += mma(a, tl.trans(b), UPCAST, FP32)
    return acc


@triton.jit
def _q_normed(q, QW, d, d_ok, HD, eps):
    """q_norm fused into the retrieval (issue 24): each packed row of the q tile (one query
    head's hd values) RMS-normalised with float32 statistics, rounded to q's dtype, times
    the gain QW [hd], as the Qwen RMSNorm does; and the rows' rstd. Rows and dims outside
    the problem are 0 in q and stay 0."""
    qf = q.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(qf * qf, 1) / HD + eps)
    w = tl.load(QW + d, mask=d_ok, other=0.0).to(tl.float32)
    return ((qf * rstd[:, None]).to(q.dtype).to(tl.float32) * w[None, :]).to(q.dtype), rstd


@triton.jit
def _row_rstd(Q, q_off, row_ok, HD, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rstd of q rows read 32 dims at a time (the fp32 kernels never hold q whole)."""
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    CHUNK: tl.constexpr = min(BLOCK_D, 32)
    for c in tl.static_range(0, BLOCK_D, CHUNK):
        dc = c + tl.arange(0, CHUNK)
        dc_ok = (dc // 8) < (HD // 8)
        a = tl.load(Q + q_off[:, None] + dc[None, :], mask=row_ok[:, None] & dc_ok[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(a * a, 1)
    return 1.0 / tl.sqrt(ss / HD + eps)


@triton.jit
def _q_norm_backward(DQ, Q_RAW, QW, DQW_PART, g_off, q_off, row_ok, HD, eps,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """q_norm's backward for a dQ program's rows, 32 dims at a time: DQ holds dL/dq_hat in
    float32 (q_hat = w * cast(x * rstd), x = Q_RAW); it gets dL/dx = rstd * (g - xhat *
    mean(g * xhat)), g = dq_hat * w, xhat = x * rstd; the program's partial of the gain's
    gradient, sum over its rows of dq_hat * cast(xhat), goes to its row of DQW_PART."""
    rstd = _row_rstd(Q_RAW, q_off, row_ok, HD, eps, BLOCK_M, BLOCK_D)
    gx = tl.zeros([BLOCK_M], dtype=tl.float32)
    CHUNK: tl.constexpr = min(BLOCK_D, 32)
    for c in tl.static_range(0, BLOCK_D, CHUNK):
        dc = c + tl.arange(0, CHUNK)
        dc_ok = (dc // 8) < (HD // 8)
        m = row_ok[:, None] & dc_ok[None, :]
        dqh = tl.load(DQ + g_off[:, None] + dc[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(Q_RAW + q_off[:, None] + dc[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(QW + dc, mask=dc_ok, other=0.0).to(tl.float32)
        gx += tl.sum(dqh * w[None, :] * (x * rstd[:, None]), 1)
    mean = gx / HD
    part = tl.program_id(0).to(tl.int64) * HD
    for c in tl.static_range(0, BLOCK_D, CHUNK):
        dc = c + tl.arange(0, CHUNK)
        dc_ok = (dc // 8) < (HD // 8)
        m = row_ok[:, None] & dc_ok[None, :]
        dqh = tl.load(DQ + g_off[:, None] + dc[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(Q_RAW + q_off[:, None] + dc[None, :], mask=m, other=0.0)
        xhat = x.to(tl.float32) * rstd[:, None]
        w = tl.load(QW + dc, mask=dc_ok, other=0.0).to(tl.float32)
        dx = (dqh * w[None, :] - xhat * mean[:, None]) * rstd[:, None]
        tl.store(DQ + g_off[:, None] + dc[None, :], dx.to(DQ.dtype.element_ty), mask=m)
        tl.store(DQW_PART + part + dc, tl.sum(dqh * xhat.to(x.dtype).to(tl.float32), 0),
                 mask=dc_ok)


@triton.jit
def _tile_desc(base_ptr, n, stride, HD, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tensor descriptor (TMA on sm_90) over n rows of hd elements, ``stride`` apart,
    from base_ptr, read BLOCK x BLOCK_D at a time: rows at or past n and lanes past hd
    load as 0 (the hardware's zero padding), so a tile at a sample's end needs no mask on
    its loads. Made in the program (tl.make_tensor_descriptor), so n is this sample's own
    row or key count (kv_len, varlen lengths); at least 1 row, never an empty box."""
    return tl.make_tensor_descriptor(base_ptr, shape=[tl.maximum(n, 1), HD],
                                     strides=[stride, 1], block_shape=[BLOCK, BLOCK_D])


@triton.jit
def _softmax_step(q, k, v, m_i, l_i, acc, qk_scale_log2, n_ok, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, FP32: tl.constexpr):
    """One key tile of the online softmax (scores in the log2 domain: scale * log2(e) is
    folded into qk_scale_log2, so exp2 is the only exponential): the running max m_i,
    sum l_i and unnormalised output acc updated. MASKED: keys where n_ok is False score
    -inf (a sample's tail tile); a full tile skips the select."""
    s = mma(q, tl.trans(k), UPCAST, FP32) * qk_scale_log2
    if MASKED:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, FP32)
    return m_new, l_i, acc


@triton.jit
def _attend_tma(q, K, V, k_base, v_base, skn, svn, n_start, n_end, HD, qk_scale_log2,
                m_i, l_i, acc, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, FP32: tl.constexpr, WS: tl.constexpr):
    """The forward's key loop over keys [n_start, n_end) through tensor descriptors bounded
    at n_end: every full tile unmasked (a K and a V box each, no select), then at most one
    tail tile whose keys past n_end load as 0 and score -inf. K, V: the KV head's first
    key at k_base / v_base. WS: the full-tile loop warp-specialised (the table's
    warp_specialize)."""
    k_desc = _tile_desc(K + k_base, n_end, skn, HD, BLOCK_N, BLOCK_D)
    v_desc = _tile_desc(V + v_base, n_end, svn, HD, BLOCK_N, BLOCK_D)
    n_full = n_start + tl.maximum(n_end - n_start, 0) // BLOCK_N * BLOCK_N
    for n0 in tl.range(n_start, n_full, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale_log2, m_i, False,
                                      UPCAST, FP32)
    if n_full < n_end:
        n = n_full + tl.arange(0, BLOCK_N)
        k = k_desc.load([n_full, 0])
        v = v_desc.load([n_full, 0])
        m_i, l_i, acc = _softmax_step(q, k, v, m_i, l_i, acc, qk_scale_log2, n < n_end, True,
                                      UPCAST, FP32)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def retrieval_fwd_kernel(
    Q, K, V, O, LSE, KEY_MASK, KV_LEN, O_PART, LSE_PART, TICKETS, CU_Q, CU_K, QW, QHAT,
    sqb: tl.int64, sqt: tl.int64, sqh: tl.int64,
    skb: tl.int64, skn: tl.int64, skh: tl.int64,
    svb: tl.int64, svn: tl.int64, svh: tl.int64,
    sob: tl.int64, sot: tl.int64, soh: tl.int64,
    smb: tl.int64, smn: tl.int64, slb: tl.int64,
    T: tl.int32, G: tl.int32, NV: tl.int32, HD: tl.int32, HKV: tl.int32, qk_scale_log2,
    SPLITS: tl.int32, SPLIT_KEYS: tl.int32, N_STATS: tl.int64,
    TOTAL_Q: tl.int64, TOTAL_K: tl.int64, qn_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32: tl.constexpr, VARLEN: tl.constexpr, QN: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr,
):
    """One program per (row block, key split, sample, KV head). TMA (sm_90, 16-bit, no
    key_mask, evenly strided rows: the launcher's uses_tma): Q, K and V tiles come through
    tensor descriptors, full key tiles unmasked and one tail tile masked (_attend_tma). With SPLITS == 1 it writes
    out and lse; otherwise its split's normalised partial output and lse go to O_PART
    [SPLITS, N_STATS, hd] / LSE_PART [SPLITS, N_STATS] (fp32, indexed like lse), and the
    last split of a row block to finish merges them (_merge_splits): one launch where a
    separate combine kernel took two (issue 24: a launch costs 30-100 us of host time on
    the GPU machines, more than the whole decode-step retrieval). TICKETS: one int32 per
    (row block, sample, KV head), 0 on entry, left 0. Splitting the keys is what fills the
    GPU at decode: B x Hkv programs alone are 1 at batch 1 (of 132 SMs), each walking all
    Nv keys in sequence."""
    rb, split, b, kvh = _program_split(HKV, T * G, BLOCK_M, SPLITS)
    q_begin, q_len = _seq_q(CU_Q, b, TOTAL_Q, T, VARLEN)
    if VARLEN:
        if rb * BLOCK_M >= q_len * G:  # past a short sequence's rows: nothing to do
            return
    k_begin, kv_end = _seq_k(CU_K, KV_LEN, b, slb, TOTAL_K, NV, VARLEN)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * G
    d, d_ok = _dims(HD, BLOCK_D)
    rd_ok = row_ok[:, None] & d_ok[None, :]
    q_off = _row_offsets(_base(b, q_begin, sqb, sqt, VARLEN), rows, kvh, G, sqt, sqh)
    if TMA:
        # The KV group's rows (t, g) evenly strided (sqt == G * sqh, or G == 1): one box.
        q = _tile_desc(Q + _base(b, q_begin, sqb, sqt, VARLEN) + kvh * G * sqh, q_len * G,
                       sqt // G, HD, BLOCK_M, BLOCK_D).load([rb * BLOCK_M, 0])
    else:
        q = tl.load(Q + q_off[:, None] + d[None, :], mask=rd_ok, other=0.0)
    if QN:
        # q arrives as q_proj's output: q_norm here, as it is loaded. The result goes to
        # QHAT (laid out like q: the backward's scores read it; the splits of a row block
        # write the same bits) and is read back, so the key loop holds a loaded tile as the
        # plain kernel does: the computed one, kept in registers, spilled 8-40 B (sm_90,
        # 128 x 64 x 128 and 64 x 64 x 256).
        qn, _ = _q_normed(q, QW, d, d_ok, HD, qn_eps)
        tl.store(QHAT + q_off[:, None] + d[None, :], qn, mask=rd_ok)
        tl.debug_barrier()
        q = tl.load(QHAT + q_off[:, None] + d[None, :], mask=rd_ok, other=0.0)
    k_base = _base(b, k_begin, skb, skn, VARLEN)
    v_base = _base(b, k_begin, svb, svn, VARLEN)
    n_start = split * SPLIT_KEYS
    n_end = tl.minimum(kv_end, n_start + SPLIT_KEYS)

    # Finite start for the running max: an all-masked block then gives exp2(-inf) = 0
    # and a rescale factor of exactly 1 instead of NaN from (-inf) - (-inf).
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TMA:
        m_i, l_i, acc = _attend_tma(q, K, V, k_base + kvh * skh, v_base + kvh * svh, skn, svn,
                                    n_start, n_end, HD, qk_scale_log2, m_i, l_i, acc,
                                    BLOCK_N, BLOCK_D, UPCAST, FP32, WS)
    else:
        for n0 in range(n_start, n_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = _key_valid(KEY_MASK, _mask_row(b, VARLEN), n, n_end, smb, smn)
            # Invalid keys are never read: padding may hold anything, and 0 * NaN would leak
            # into valid rows through the dot. A masked load (zero fill) instead of a
            # tl.where on the tile also lets the compiler stream K and V straight to shared
            # memory (cp.async): the where kept V in registers, 40-408 B of spill at 64x64x128.
            nd_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + _key_offsets(k_base, kvh, n, skn, skh)[:, None] + d[None, :],
                        mask=nd_ok, other=0.0)
            s = mma(q, tl.trans(k), UPCAST, FP32) * qk_scale_log2
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + _key_offsets(v_base, kvh, n, svn, svh)[:, None] + d[None, :],
                        mask=nd_ok, other=0.0)
            acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, FP32)
            m_i = m_new

    # Empty only when nothing was summed (l == 0, no valid key); a NaN l (NaN or Inf in
    # this sample's keys/values) must come out as NaN like the reference, never as 0.
    has = l_i != 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    q_begin, _ = _reread_seq_q(CU_Q, b, TOTAL_Q, T, q_begin, q_len, VARLEN)  # see there
    stat = _stat_index(b, q_begin, rows, kvh, T, G, HKV, TOTAL_Q, VARLEN)
    if SPLITS == 1:
        o_off = _row_offsets(_base(b, q_begin, sob, sot, VARLEN), rows, kvh, G, sot, soh)
        tl.store(O + o_off[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=rd_ok)
        tl.store(LSE + stat, lse, mask=row_ok)
    else:
        part = split * N_STATS + stat
        tl.store(O_PART + tl.multiple_of(part * HD, 8)[:, None] + d[None, :], out, mask=rd_ok)
        tl.store(LSE_PART + part, lse, mask=row_ok)
        # A ticket per row block: the split that draws the last one merges. The CTA barrier
        # orders every thread's partial stores before the ticket, whose acq_rel (GPU scope)
        # publishes them to, and acquires the others' for, the merging program (the "last
        # block" reduction of CUDA's threadFenceReduction sample).
        tl.debug_barrier()
        n_blocks = (T * G + BLOCK_M - 1) // BLOCK_M
        slot = rb + n_blocks * (b * HKV + kvh)
        ticket = tl.atomic_add(TICKETS + slot, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:
            tl.debug_barrier()
            o_off = _row_offsets(_base(b, q_begin, sob, sot, VARLEN), rows, kvh, G, sot, soh)
            _merge_splits(O, LSE, O_PART, LSE_PART, stat, row_ok, o_off, d, d_ok, SPLITS,
                          N_STATS, HD, BLOCK_M, BLOCK_D)
            tl.store(TICKETS + slot, 0)  # for the slot's next launch on this stream


@triton.jit
def _merge_splits(O, LSE, O_PART, LSE_PART, stat, ok, o_off, d, d_ok, SPLITS, N_STATS, HD,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse), lse = log sum exp,
    over the splits in order (deterministic): the partials of rows ``stat`` merged. A row
    no split saw a key of stays 0 with lse -inf; a NaN partial stays NaN. The partials
    are read from L2 (.cg): other SMs wrote them, and L1 is not coherent."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, SPLITS):
        m = tl.maximum(m, tl.load(LSE_PART + s * N_STATS + stat, mask=ok,
                                  other=float("-inf"), cache_modifier=".cg"))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, SPLITS):
        part = s * N_STATS + stat
        w = tl.exp(tl.load(LSE_PART + part, mask=ok, other=float("-inf"),
                           cache_modifier=".cg") - m_safe)
        o = tl.load(O_PART + tl.multiple_of(part * HD, 8)[:, None] + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        l_sum += w
        acc += w[:, None] * o
    has = l_sum != 0.0
    l_safe = tl.where(has, l_sum, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    tl.store(O + o_off[:, None] + d[None, :], out.to(O.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])
    tl.store(LSE + stat, tl.where(has, m_safe + tl.log(l_safe), float("-inf")), mask=ok)


@triton.jit
def _stat_rows(CU_Q, T, H, TOTAL_Q, N_STATS, sob, sot, soh, BLOCK_M: tl.constexpr,
                  VARLEN: tl.constexpr):
    """This row program's rows (delta): (their statistics index, in range, their element
    offsets in out, the first row's position and the count it is checked against).
    Padded: BLOCK_M consecutive indices of [B, H, T] of the N_STATS. Varlen: a program per
    (block of (token, head) rows r = t * H + h, sequence b), its rows those of b's own
    tokens only (the rows of no sequence were never computed)."""
    pid = tl.program_id(0)
    if VARLEN:
        n_blocks = (T * H + BLOCK_M - 1) // BLOCK_M
        b = pid // n_blocks
        first = (pid % n_blocks) * BLOCK_M
        q_begin, q_len = _clamped_range(CU_Q, b, TOTAL_Q, T, False)
        r = first + tl.arange(0, BLOCK_M)
        t = q_begin + (r // H).to(tl.int64)
        h = (r % H).to(tl.int64)
        ok = r < q_len * H
        return h * TOTAL_Q + t, ok, tl.multiple_of(t * sot + h * soh, 8), first, q_len * H
    else:
        stat = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        t = stat % T
        h = (stat // T) % H
        b = stat // (T * H)
        o_off = tl.multiple_of(b * sob + t * sot + h * soh, 8)
        return stat, stat < N_STATS, o_off, 0, 1


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def retrieval_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KEY_MASK, KV_LEN, DK_PART, DV_PART, CU_Q, CU_K,
    sqb: tl.int64, sqt: tl.int64, sqh: tl.int64,
    skb: tl.int64, skn: tl.int64, skh: tl.int64,
    svb: tl.int64, svn: tl.int64, svh: tl.int64,
    sob: tl.int64, sot: tl.int64, soh: tl.int64,
    smb: tl.int64, smn: tl.int64, slb: tl.int64,
    sgb: tl.int64, sgn: tl.int64, sgh: tl.int64,
    T: tl.int32, G: tl.int32, NV: tl.int32, HD: tl.int32, HKV: tl.int32, qk_scale_log2, scale,
    SPLITS: tl.int32, SPLIT_ROWS: tl.int32, PART_STRIDE: tl.int64,
    TOTAL_Q: tl.int64, TOTAL_K: tl.int64,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr,
):
    """One program per (key block, row split, sample, KV head): sums over its split's
    packed query rows into fp32 partials at split * PART_STRIDE of DK_PART / DV_PART
    (laid out like dk), which the launcher sums in a fixed order and casts: deterministic,
    no atomics. Without splits a batch-1 backward had Nv / BLOCK_N programs (32 at Nv
    2048, of 132 SMs) each walking all T * G rows. One fp32 epilogue, not a branch between
    it and a dk-dtype store: the branch cost 200-280 B of spill at hd 256 (compile gate).
    do's strides are the so*/sot/soh slots (grad_out plays out's role). Varlen: a program
    whose key block starts past its sequence's keys stores nothing, one whose row split
    starts past its rows loops over none (as padded: row_end), and only the sequence's own
    keys are stored (the next sequence's follow in the packed k; the launcher zeroes the
    partials, so keys of no sequence sum to 0). TMA (uses_tma): K, V, and each step's Q
    and dO tiles through tensor descriptors; rows past the sample's load as 0, so they add
    exactly 0 (q = dO = 0 there, and their lse and delta read as 0) without a row mask."""
    kb, split, b, kvh = _program_split(HKV, NV, BLOCK_N, SPLITS)
    q_begin, q_len = _seq_q(CU_Q, b, TOTAL_Q, T, VARLEN)
    k_begin, n_end = _seq_k(CU_K, KV_LEN, b, slb, TOTAL_K, NV, VARLEN)
    n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < _stored_keys(NV, n_end, VARLEN)
    d, d_ok = _dims(HD, BLOCK_D)
    nd_ok = n_in[:, None] & d_ok[None, :]
    k_off = _key_offsets(_base(b, k_begin, skb, skn, VARLEN), kvh, n, skn, skh)
    v_off = _key_offsets(_base(b, k_begin, svb, svn, VARLEN), kvh, n, svn, svh)
    if TMA:
        n_ok = n < n_end  # no key_mask on this path
        k_first = _base(b, k_begin, skb, skn, VARLEN) + kvh * skh
        v_first = _base(b, k_begin, svb, svn, VARLEN) + kvh * svh
        k = _tile_desc(K + k_first, n_end, skn, HD, BLOCK_N, BLOCK_D).load([kb * BLOCK_N, 0])
        v = _tile_desc(V + v_first, n_end, svn, HD, BLOCK_N, BLOCK_D).load([kb * BLOCK_N, 0])
    else:
        n_ok = _key_valid(KEY_MASK, b, n, n_end, smb, smn)
        valid_nd = n_ok[:, None] & d_ok[None, :]
        if not FP32:
            k = tl.load(K + k_off[:, None] + d[None, :], mask=valid_nd, other=0.0)
            v = tl.load(V + v_off[:, None] + d[None, :], mask=valid_nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # A key block wholly past this sample's last valid key has zero gradient: skip the loop.
    row_start = split * SPLIT_ROWS
    q_base = _base(b, q_begin, sqb, sqt, VARLEN)
    do_base = _base(b, q_begin, sob, sot, VARLEN)
    row_end = tl.where(kb * BLOCK_N < n_end, tl.minimum(q_len * G, row_start + SPLIT_ROWS), 0)
    if TMA:
        q_desc = _tile_desc(Q + q_base + kvh * G * sqh, q_len * G, sqt // G, HD, BLOCK_M,
                            BLOCK_D)
        do_desc = _tile_desc(DO + do_base + kvh * G * soh, q_len * G, sot // G, HD, BLOCK_M,
                             BLOCK_D)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len * G
        lse2, delta = _row_stats(LSE, DELTA, b, q_begin, rows, row_ok, kvh, T, G, HKV, TOTAL_Q,
                                 VARLEN)
        if TMA:
            q = q_desc.load([r0, 0])
            do = do_desc.load([r0, 0])
        else:
            rd_ok = row_ok[:, None] & d_ok[None, :]
            q_off = _row_offsets(q_base, rows, kvh, G, sqt, sqh)
            do_off = _row_offsets(do_base, rows, kvh, G, sot, soh)
            q = tl.load(Q + q_off[:, None] + d[None, :], mask=rd_ok, other=0.0)
            do = tl.load(DO + do_off[:, None] + d[None, :], mask=rd_ok, other=0.0)
        if FP32:
            # As in the dQ kernel: K and V re-read 32 dims at a time instead of held whole
            # (with tf32x3 splits they spilled at hd 256 even on 16 x 16 tiles).
            s = _chunked_dot(Q, q_off, row_ok, K, k_off, n_ok, HD, BLOCK_M, BLOCK_N, BLOCK_D,
                             UPCAST, FP32)
            dp = _chunked_dot(DO, do_off, row_ok, V, v_off, n_ok, HD, BLOCK_M, BLOCK_N,
                              BLOCK_D, UPCAST, FP32)
        else:
            s = mma(q, tl.trans(k), UPCAST, FP32)
            dp = mma(do, tl.trans(v), UPCAST, FP32)
        s = s * qk_scale_log2
        if TMA:  # rows past the sample: q = dO = 0 and lse = delta = 0, so they add 0
            p = tl.where(n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.where(row_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dv += mma(tl.trans(p.to(do.dtype)), do, UPCAST, FP32)
        ds = p * (dp - delta[:, None])
        dk += mma(tl.trans(ds.to(q.dtype)), q, UPCAST, FP32)

    dk = dk * scale
    # dk and dv (and their partials) are allocated alike (contiguous): shared strides sg*.
    g_off = _key_offsets(_base(b, k_begin, sgb, sgn, VARLEN), kvh, n, sgn, sgh)[:, None] + \
        d[None, :]
    p_off = split * PART_STRIDE + g_off
    tl.store(DK_PART + p_off, dk, mask=nd_ok)
    tl.store(DV_PART + p_off, dv, mask=nd_ok)


@triton.jit
def _dq_step(q, do, k, v, lse2, delta, dq, qk_scale_log2, n_ok, MASKED: tl.constexpr,
             UPCAST: tl.constexpr, FP32: tl.constexpr):
    """dq += dS k for one key tile, P recomputed from the log2-domain lse. Rows past the
    sample need no mask: their dq is never stored. MASKED: keys where n_ok is False get
    P = 0 (the tail tile)."""
    s = mma(q, tl.trans(k), UPCAST, FP32) * qk_scale_log2
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(n_ok[None, :], p, 0.0)
    dp = mma(do, tl.trans(v), UPCAST, FP32)
    ds = p * (dp - delta[:, None])
    return dq + mma(ds.to(k.dtype), k, UPCAST, FP32)


@triton.jit
def _dq_tma(q, do, K, V, k_base, v_base, skn, svn, n_end, HD, qk_scale_log2, lse2, delta, dq,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
            FP32: tl.constexpr):
    """The dQ kernel's key loop over [0, n_end) through tensor descriptors bounded at
    n_end: full tiles unmasked, then at most one masked tail tile (keys past n_end load
    as 0 and get P = 0)."""
    k_desc = _tile_desc(K + k_base, n_end, skn, HD, BLOCK_N, BLOCK_D)
    v_desc = _tile_desc(V + v_base, n_end, svn, HD, BLOCK_N, BLOCK_D)
    n_full = n_end // BLOCK_N * BLOCK_N
    for n0 in range(0, n_full, BLOCK_N):
        dq = _dq_step(q, do, k_desc.load([n0, 0]), v_desc.load([n0, 0]), lse2, delta, dq,
                      qk_scale_log2, lse2, False, UPCAST, FP32)
    if n_full < n_end:
        n = n_full + tl.arange(0, BLOCK_N)
        dq = _dq_step(q, do, k_desc.load([n_full, 0]), v_desc.load([n_full, 0]), lse2, delta,
                      dq, qk_scale_log2, n < n_end, True, UPCAST, FP32)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def retrieval_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KEY_MASK, KV_LEN, CU_Q, CU_K, Q_RAW, QW, DQW_PART,
    sqb: tl.int64, sqt: tl.int64, sqh: tl.int64,
    skb: tl.int64, skn: tl.int64, skh: tl.int64,
    svb: tl.int64, svn: tl.int64, svh: tl.int64,
    sob: tl.int64, sot: tl.int64, soh: tl.int64,
    smb: tl.int64, smn: tl.int64, slb: tl.int64,
    sgb: tl.int64, sgt: tl.int64, sgh: tl.int64,
    T: tl.int32, G: tl.int32, NV: tl.int32, HD: tl.int32, HKV: tl.int32, qk_scale_log2, scale,
    TOTAL_Q: tl.int64, TOTAL_K: tl.int64, qn_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, FP32: tl.constexpr, VARLEN: tl.constexpr, QN: tl.constexpr,
    TMA: tl.constexpr,
):
    """One program per (row block, sample, KV head): loops over the valid keys. TMA
    (uses_tma): Q, dO, K and V through tensor descriptors, full key tiles unmasked, one
    masked tail tile (_dq_tma).

    Split from dK/dV so that neither needs atomics: results are deterministic. QN: Q is
    the forward's q_norm(q) and the gradient goes on through q_norm to Q_RAW, q_proj's
    output (laid out like Q); the gain's gradient, a partial per program at DQW_PART
    [programs, hd], is summed by the finish kernel.
    """
    rb, b, kvh = _program(T, G, HKV, T * G, BLOCK_M)
    q_begin, q_len = _seq_q(CU_Q, b, TOTAL_Q, T, VARLEN)
    k_begin, n_end = _seq_k(CU_K, KV_LEN, b, slb, TOTAL_K, NV, VARLEN)
    n_end = _none_past(n_end, rb * BLOCK_M, q_len * G, VARLEN)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len * G
    d, d_ok = _dims(HD, BLOCK_D)
    rd_ok = row_ok[:, None] & d_ok[None, :]
    q_off = _row_offsets(_base(b, q_begin, sqb, sqt, VARLEN), rows, kvh, G, sqt, sqh)
    do_off = _row_offsets(_base(b, q_begin, sob, sot, VARLEN), rows, kvh, G, sot, soh)
    if TMA:
        q = _tile_desc(Q + _base(b, q_begin, sqb, sqt, VARLEN) + kvh * G * sqh, q_len * G,
                       sqt // G, HD, BLOCK_M, BLOCK_D).load([rb * BLOCK_M, 0])
        do = _tile_desc(DO + _base(b, q_begin, sob, sot, VARLEN) + kvh * G * soh, q_len * G,
                        sot // G, HD, BLOCK_M, BLOCK_D).load([rb * BLOCK_M, 0])
    elif not FP32:
        q = tl.load(Q + q_off[:, None] + d[None, :], mask=rd_ok, other=0.0)
        do = tl.load(DO + do_off[:, None] + d[None, :], mask=rd_ok, other=0.0)
    lse2, delta = _row_stats(LSE, DELTA, b, q_begin, rows, row_ok, kvh, T, G, HKV, TOTAL_Q,
                             VARLEN)
    k_base = _base(b, k_begin, skb, skn, VARLEN)
    v_base = _base(b, k_begin, svb, svn, VARLEN)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if TMA:
        dq = _dq_tma(q, do, K, V, k_base + kvh * skh, v_base + kvh * svh, skn, svn, n_end, HD,
                     qk_scale_log2, lse2, delta, dq, BLOCK_N, BLOCK_D, UPCAST, FP32)
    else:
        for n0 in range(0, n_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = _key_valid(KEY_MASK, b, n, n_end, smb, smn)
            nd_ok = n_ok[:, None] & d_ok[None, :]
            k_off = _key_offsets(k_base, kvh, n, skn, skh)
            v_off = _key_offsets(v_base, kvh, n, svn, svh)
            k = tl.load(K + k_off[:, None] + d[None, :], mask=nd_ok, other=0.0)
            if FP32:
                # Every row of an MMA's A operand lives in every warp, and tf32x3 holds each
                # fp32 operand twice (hi, lo): q and dO whole ([16, 128] at hd 128) took 255
                # registers and spilled 16-72 B at every tile tried (compile gate). In chunks
                # of 32 head dims, re-read from L1 each step, only dq stays live.
                s = _chunked_dot(Q, q_off, row_ok, K, k_off, n_ok, HD, BLOCK_M, BLOCK_N, BLOCK_D,
                                 UPCAST, FP32)
                dp = _chunked_dot(DO, do_off, row_ok, V, v_off, n_ok, HD, BLOCK_M, BLOCK_N,
                                  BLOCK_D, UPCAST, FP32)
            else:
                v = tl.load(V + v_off[:, None] + d[None, :], mask=nd_ok, other=0.0)
                s = mma(q, tl.trans(k), UPCAST, FP32)
                dp = mma(do, tl.trans(v), UPCAST, FP32)
            s = s * qk_scale_log2
            p = tl.where(row_ok[:, None] & n_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dq += mma(ds.to(k.dtype), k, UPCAST, FP32)
    dq = dq * scale
    g_off = _row_offsets(_base(b, q_begin, sgb, sgt, VARLEN), rows, kvh, G, sgt, sgh)
    if QN:
        # dq is the gradient of q_norm(q): through q_norm now, 32 dims at a time, reading
        # it back from DQ (the accumulator is dead by then: whole-tile temporaries here
        # spilled 208-216 B at 128 x 64 x 128 on sm_90).
        tl.store(DQ + g_off[:, None] + d[None, :], dq.to(DQ.dtype.element_ty), mask=rd_ok)
        tl.debug_barrier()
        _q_norm_backward(DQ, Q_RAW, QW, DQW_PART, g_off, q_off, row_ok, HD, qn_eps, BLOCK_M,
                         BLOCK_D)
    else:
        tl.store(DQ + g_off[:, None] + d[None, :], dq.to(DQ.dtype.element_ty), mask=rd_ok)


@triton.jit(do_not_specialize=_RUNTIME_INTS, do_not_specialize_on_alignment=_UNALIGNED)
def retrieval_delta_kernel(
    O, DO, DELTA, CU_Q,
    sob: tl.int64, sot: tl.int64, soh: tl.int64,
    sgb: tl.int64, sgt: tl.int64, sgh: tl.int64,
    T: tl.int32, H: tl.int32, HD: tl.int32, N_STATS: tl.int64, TOTAL_Q: tl.int64,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32, laid out like lse: the softmax backward's row
    term, BLOCK_M statistics rows a program (_stat_rows' row mapping; dO's strides
    in the sg* slots). One launch where PyTorch took a cast, a product, a sum and a copy."""
    stat, ok, o_off, first, count = _stat_rows(CU_Q, T, H, TOTAL_Q, N_STATS, sob, sot, soh,
                                                  BLOCK_M, VARLEN)
    _, _, g_off, _, _ = _stat_rows(CU_Q, T, H, TOTAL_Q, N_STATS, sgb, sgt, sgh, BLOCK_M,
                                      VARLEN)
    d, d_ok = _dims(HD, BLOCK_D)
    m = ok[:, None] & d_ok[None, :]
    o = tl.load(O + o_off[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(DO + g_off[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + stat, tl.sum(o * g, 1), mask=ok)


@triton.jit(do_not_specialize=["N_ELEM", "SPLITS", "PARTS", "HD", "elem_programs"])
def retrieval_bwd_finish_kernel(
    DK, DV, PART, QW_PART, DQW, N_ELEM: tl.int64, SPLITS: tl.int32, PARTS: tl.int32,
    HD: tl.int32, elem_programs: tl.int32,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, QN: tl.constexpr,
):
    """The backward's last launch. Element programs: dk and dv, the dK/dV kernel's fp32
    split partials (PART [SPLITS, 2, N_ELEM]: dk then dv) summed in split order and cast.
    With QN, one more program: q_norm's gain gradient, the dQ kernel's per-program
    partials (QW_PART [PARTS, HD]) summed in program order. Deterministic, no atomics."""
    pid = tl.program_id(0)
    if pid < elem_programs:
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N_ELEM
        acc_k = tl.zeros([BLOCK], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, SPLITS):
            acc_k += tl.load(PART + (2 * s) * N_ELEM + i, mask=ok, other=0.0)
            acc_v += tl.load(PART + (2 * s + 1) * N_ELEM + i, mask=ok, other=0.0)
        tl.store(DK + i, acc_k.to(DK.dtype.element_ty), mask=ok)
        tl.store(DV + i, acc_v.to(DV.dtype.element_ty), mask=ok)
    else:
        if QN:
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HD
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for p in range(0, PARTS):
                acc += tl.load(QW_PART + p * HD + d, mask=d_ok, other=0.0)  # < 2^31: programs x hd
            tl.store(DQW + d, acc.to(DQW.dtype.element_ty), mask=d_ok)


# ---- launchers ---------------------------------------------------------------------------

def _strides3(t: torch.Tensor) -> Tuple[int, int, int]:
    """The three outer strides (sample, row, head) of a 4-D tensor whose last stride is 1;
    of a packed (varlen) 3-D one (0, row, head), as csrc/pvm_params.h stores them."""
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass(frozen=True)
class _Layout:
    """Where a launch's samples live, as the kernels take it: n samples (varlen: sequences)
    of t query tokens and nv keys (varlen: max_seqlen_q / max_seqlen_k, which size the
    grids); varlen's int32 cumulative lengths (padded: a never-read stand-in) and the
    packed tensors' rows (padded: 0, unused)."""
    varlen: bool
    n: int
    t: int
    nv: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    total_q: int = 0
    total_k: int = 0
    key_mask: bool = False  # a key_mask was given (padded only): no tensor-descriptor path

    def args(self, with_k: bool = True) -> tuple:
        return (self.total_q, self.total_k) if with_k else (self.total_q,)


def _masks(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor],
           kv_len: Optional[torch.Tensor]):
    """key_mask and kv_len (checked), or stand-ins meaning "every key" (so no kernel variant
    exists without them): a stride-0 True mask, a stride-0 kv_len of 2^31 - 1 (clamped to
    Nv in the kernels)."""
    B, Nv = k.shape[0], k.shape[1]
    expect("k", k, (B, Nv, k.shape[2], q.shape[3]), q.dtype, q.device)
    if key_mask is not None:
        expect("key_mask", key_mask, (B, Nv), torch.bool, q.device)
    if kv_len is not None:
        expect("kv_len", kv_len, (B,), torch.int32, q.device)
    mask = key_mask if key_mask is not None else always_valid_keys(q.device)
    lens = kv_len if kv_len is not None else unlimited_kv_len(q.device)
    return mask, lens


def _check_head_dim(hd: int, dtype: torch.dtype) -> None:
    why = head_dim_unsupported(hd, dtype)
    if why is not None:
        raise ValueError(f"the triton backend's retrieval: {why}")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device. CPU tensors count as the target GPU's
    (an H100's 132, an A100's 108 under the compile gate's sm_80 target), so that the
    interpreter and the gate take the split paths a GPU takes."""
    if device.type != "cuda":
        return ARCH_SMS[target_capability(device)]
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _SM_COUNT.get(index)
    if count is None:
        count = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


_SM_COUNT: Dict[int, int] = {}

#: A launch is split until it has this many programs per SM (or each split is one block):
#: 2 per SM keeps every SM busy while one program of the pair waits on memory.
PROGRAMS_PER_SM = 2
#: Most splits of one loop: bounds the fp32 partial buffers (64 x B x H x T x hd x 4 bytes
#: for the forward, 64 x B x Nv x Hkv x hd x 8 for dK/dV).
MAX_SPLITS = 64


def split_loop(n_items: int, block: int, programs: int, device: torch.device) -> Tuple[int, int]:
    """(splits, items per split) for a loop over ``n_items`` in blocks of ``block`` run by
    ``programs`` programs: split until the launch has PROGRAMS_PER_SM programs per SM,
    never into pieces smaller than one block. Items per split is a multiple of ``block``."""
    n_blocks = triton.cdiv(max(n_items, 1), block)
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), max(programs, 1))
    splits = max(1, min(want, n_blocks, MAX_SPLITS))
    per_split = triton.cdiv(n_blocks, splits) * block
    return triton.cdiv(max(n_items, 1), per_split), per_split


def _launch(kernel, cfg: TileConfig, programs: int, q: torch.Tensor, args, hd: int,
            varlen: bool, tile: bool = True, **flags) -> None:
    """Launch ``programs`` programs of a tile kernel (BLOCK_M/N/D and the dot flags), or with
    ``tile=False`` of a row kernel (BLOCK_M and BLOCK_D only: delta), for the
    padded or the varlen layout; ``flags``: more constexprs (QN)."""
    grid = (programs,)
    check_grid(grid)
    meta = dict(BLOCK_N=cfg.block_n, **dot_flags(q.dtype)) if tile else {}
    # Only a tensor-descriptor launch needs the scratch allocator: a decode step (host-
    # bound, 12 launches) enters no generator context for it.
    scratch = descriptor_scratch(q.device) if flags.get("TMA") else contextlib.nullcontext()
    with launch_guard(q), scratch:
        kernel[grid](*args, BLOCK_M=cfg.block_m, BLOCK_D=block_d_for(hd), **meta,
                     VARLEN=varlen, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     **flags)


#: q_norm fused into the retrieval: (gain [hd] in q's dtype, eps), or None.
QNorm = Optional[Tuple[torch.Tensor, float]]


def _qn_args(q: torch.Tensor, qn: QNorm):
    """(gain pointer, eps, QN): the gain, or a never-read stand-in without q_norm."""
    if qn is None:
        return never_read_f32(q.device), 0.0, False
    return qn[0], float(qn[1]), True


def _padded_layout(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor]
                   ) -> _Layout:
    stand_in = unlimited_kv_len(q.device)  # CU_Q / CU_K: never read without VARLEN
    return _Layout(False, q.shape[0], q.shape[1], k.shape[1], stand_in, stand_in,
                   key_mask=key_mask is not None)


#: Head-dim buckets (BLOCK_D) of the tensor-descriptor path: 64 and 128, Qwen3-VL's head
#: dim at every size and the tuning runs' (other buckets keep pointer loads, and the
#: compile gate 40 fewer variants per Triton version).
TMA_BLOCK_D = (64, 128)

#: Whether qualifying launches take the tensor-descriptor path (tensor_descriptors()).
_TMA_ENABLED = True


@contextlib.contextmanager
def tensor_descriptors(enabled: bool):
    """Within the block, sm_90 launches that qualify for the tensor-descriptor (TMA) path
    take it (``enabled``, the default) or keep pointer loads: for benchmarks comparing the
    two and tests of each. Results agree either way (tests/test_retrieval_tma.py).
    Process-wide, not per thread or context: the backward of CUDA tensors runs on
    autograd's device threads, which a context variable set here would not reach (a
    forward with pointer loads would have been timed with a TMA backward)."""
    global _TMA_ENABLED
    previous, _TMA_ENABLED = _TMA_ENABLED, bool(enabled)
    try:
        yield
    finally:
        _TMA_ENABLED = previous


def _rows_evenly_strided(t: torch.Tensor, G: int) -> bool:
    """The packed rows (token, head in group) of one KV group of t ([..., tokens, H, hd])
    sit one stride apart: G == 1, or a token's stride is G head strides (q of
    [B, T, H, hd] with H == G, the 8B layout's one KV head). Their tile is then one box."""
    return G == 1 or t.stride(-3) == G * t.stride(-2)


def uses_tma(lay: _Layout, rows: int, hd: int, G: int, row_tensors, key_tensors) -> bool:
    """Whether a tile launch loads through tensor descriptors (TMA): sm_90, fp16/bf16, the
    prefill row class, BLOCK_D in TMA_BLOCK_D, no key_mask (a masked key inside a tile
    would reach the MMA from a box; a kv_len or varlen end is the box's own bound), every
    row tensor (q, dO) with evenly strided rows and every descriptor stride a multiple of
    16 bytes. Otherwise pointer loads, same results."""
    t0 = row_tensors[0]  # the decode check first: it ends every decode step's call
    if not (row_class(rows) == "prefill" and _TMA_ENABLED and not lay.key_mask
            and dtype_class(t0.dtype) == "16bit" and block_d_for(hd) in TMA_BLOCK_D
            and target_capability(t0.device) == 90):
        return False
    if not all(_rows_evenly_strided(t, G) for t in row_tensors):
        return False
    strides = [t.stride(-3) // G for t in row_tensors] + [t.stride(-3) for t in key_tensors]
    return all(st % 8 == 0 for st in strides)


def _forward(q, k, v, out, lse, mask, lens, lay: _Layout, scale: float, qn: QNorm = None,
             q_hat: Optional[torch.Tensor] = None) -> None:
    """The forward's launches (q, k, v in the kernels' vector layout; out and lse
    allocated), for either layout: the table entry by rows = T * G (varlen: max_seqlen_q
    * G), the key split planned over Nv (varlen: max_seqlen_k); ``qn``: q_norm fused, the
    normalised q written to ``q_hat`` (strided like q)."""
    qw, qn_eps, has_qn = _qn_args(q, qn)
    H, hd = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    G = H // Hkv
    rows = lay.t * G
    cfg = select_config("fwd", q.dtype, rows, hd, q.device)
    tma = uses_tma(lay, rows, hd, G, (q,), (k, v))
    programs = triton.cdiv(rows, cfg.block_m) * lay.n * Hkv
    splits, split_keys = split_loop(lay.nv, cfg.block_n, programs, q.device)
    n_stats = lse.numel()  # B * H * T, or H * total_q
    if splits > 1:
        o_part = torch.empty((splits, n_stats, hd), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, n_stats), dtype=torch.float32, device=q.device)
        tickets = split_tickets(q.device, programs)
    else:
        o_part = lse_part = never_read_f32(q.device)
        tickets = unlimited_kv_len(q.device)  # an int32 never read without splits
    args = (q, k, v, out, lse, mask, lens, o_part, lse_part, tickets, lay.cu_q, lay.cu_k, qw,
            q_hat if has_qn else q, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *mask.stride(),
            lens.stride(0), lay.t, G, lay.nv, hd, Hkv, scale * LOG2E, splits, split_keys,
            n_stats, *lay.args(), qn_eps)
    _launch(retrieval_fwd_kernel, cfg, programs * splits, q, args, hd, lay.varlen, QN=has_qn,
            TMA=tma, WS=tma and cfg.warp_specialize)


#: (device, stream) -> int32 tickets of the split forward's in-kernel merge, all 0 between
#: launches (the merging program resets its own). Per stream: launches on one stream run
#: in order, so they never share a slot at the same time; two streams get two buffers.
_TICKETS: Dict[tuple, torch.Tensor] = {}


def split_tickets(device: torch.device, slots: int) -> torch.Tensor:
    """At least ``slots`` zeroed int32 tickets for a split forward on ``device``'s current
    stream: allocated (one memset) the first time, or when a launch needs more; then
    reused without any launch."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < slots:
        # grown to a power of two: a few sizes ever, each zeroed once
        buf = _TICKETS[key] = torch.zeros(pow2_at_least(max(slots, 256)), dtype=torch.int32,
                                          device=device)
    return buf


def _backward(grad_out, q, k, v, out, lse, dq, dk, dv, mask, lens, lay: _Layout,
              scale: float, qn: QNorm = None, dq_weight: Optional[torch.Tensor] = None,
              q_hat: Optional[torch.Tensor] = None) -> None:
    """The backward's launches (inputs in the kernels' vector layout, dq / dk / dv (and
    with ``qn`` q_norm's gain gradient dq_weight) allocated contiguous), for either layout:
    delta = rowsum(dO * O), dK/dV (its row splits into fp32 partials), dQ (with ``qn``
    through q_norm, its gain's gradient in per-program partials), then one finish kernel
    summing both kinds of partials in a fixed order: four launches, deterministic. With
    ``qn`` the forward's ``q_hat`` (q_norm(q), strided like q) is what the scores read."""
    H, hd = q.shape[-2], q.shape[-1]
    q_raw = q
    if qn is not None:
        q = q_hat
    Hkv = k.shape[-2]
    G = H // Hkv
    qw, qn_eps, has_qn = _qn_args(q, qn)
    rows = lay.t * G
    n_stats = lse.numel()
    delta = new_output(lse.shape, torch.float32, q.device)
    cfg = select_config("delta", q.dtype, rows, hd, q.device)
    _launch(retrieval_delta_kernel, cfg, triton.cdiv(lay.t * H, cfg.block_m) * lay.n
            if lay.varlen else triton.cdiv(n_stats, cfg.block_m), q,
            (out, grad_out, delta, lay.cu_q, *_strides3(out), *_strides3(grad_out), lay.t, H,
             hd, n_stats, lay.total_q), hd, lay.varlen, tile=False)
    common = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out),
              *mask.stride(), lens.stride(0))
    sizes = (lay.t, G, lay.nv, hd, Hkv, scale * LOG2E, scale)
    tma = uses_tma(lay, rows, hd, G, (q, grad_out), (k, v))
    cfg = select_config("dkdv", q.dtype, rows, hd, q.device)
    programs = triton.cdiv(lay.nv, cfg.block_n) * lay.n * Hkv
    splits, split_rows = split_loop(rows, cfg.block_m, programs, q.device)
    # [splits, 2, *dk.shape] fp32: dk's then dv's partial of each split, contiguous like dk
    # so dk's strides address them. Padded: keys past a sample's kv_len still get their
    # zeros written (the kernel stores whole key blocks). Varlen: keys of no sequence are
    # never visited, so the partials start zeroed.
    alloc = torch.zeros if lay.varlen else torch.empty
    part = alloc((splits, 2, *dk.shape), dtype=torch.float32, device=q.device)
    _launch(retrieval_bwd_dkdv_kernel, cfg, programs * splits, q,
            (q, k, v, grad_out, lse, delta, mask, lens, part[:, 0], part[:, 1], lay.cu_q,
             lay.cu_k, *common, *_strides3(dk), *sizes, splits, split_rows, 2 * dk.numel(),
             *lay.args()), hd, lay.varlen, TMA=tma)
    cfg = select_config("dq", q.dtype, rows, hd, q.device)
    dq_programs = triton.cdiv(rows, cfg.block_m) * lay.n * Hkv
    qw_part = (new_output((dq_programs, hd), torch.float32, q.device) if has_qn
               else never_read_f32(q.device))
    _launch(retrieval_bwd_dq_kernel, cfg, dq_programs, q,
            (q, k, v, grad_out, lse, delta, dq, mask, lens, lay.cu_q, lay.cu_k, q_raw, qw, qw_part,
             *common, *_strides3(dq), *sizes, *lay.args(), qn_eps), hd, lay.varlen,
            QN=has_qn, TMA=tma)
    cfg = select_config("finish", q.dtype, rows, hd, q.device)
    elem_programs = triton.cdiv(dk.numel(), cfg.block_m)
    grid = (elem_programs + (1 if has_qn else 0),)
    check_grid(grid)
    with launch_guard(q):
        retrieval_bwd_finish_kernel[grid](
            dk, dv, part, qw_part, dq_weight if has_qn else dk, dk.numel(), splits,
            dq_programs, hd, elem_programs, BLOCK=cfg.block_m, BLOCK_D=block_d_for(hd),
            QN=has_qn, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _q_norm_of(q: torch.Tensor, q_weight: Optional[torch.Tensor], eps: float) -> QNorm:
    """(gain, eps) of a fused q_norm after the launcher's own check, or None."""
    if q_weight is None:
        return None
    expect("q_weight", q_weight, (q.shape[-1],), q.dtype, q.device)
    return with_vector_layout(q_weight), eps


def _padded_fwd(q, k, v, key_mask, kv_len, scale, qn: QNorm):
    """(out, lse, q_hat: q_norm(q) with ``qn``, else None)."""
    B, T, H, hd = q.shape
    _check_head_dim(hd, q.dtype)
    out = new_output((B, T, H, hd), q.dtype, q.device)
    lse = new_output((B, H, T), torch.float32, q.device)
    q_hat = None
    if B * T * H == 0:
        if qn is not None:
            q_hat = q.new_empty(q.shape)
        return out.zero_(), lse.fill_(float("-inf")), q_hat
    q, k, v = (with_vector_layout(t) for t in (q, k, v))
    if qn is not None:
        q_hat = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device)
    mask, lens = _masks(q, k, key_mask, kv_len)
    _forward(q, k, v, out, lse, mask, lens, _padded_layout(q, k, key_mask), scale, qn, q_hat)
    return out, lse, q_hat


def _padded_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale, qn: QNorm, q_hat=None):
    B, T, H, hd = q.shape
    Nv = k.shape[1]
    _check_head_dim(hd, q.dtype)
    for name, t in (("grad_out", grad_out), ("out", out)):
        expect(name, t, q.shape, q.dtype, q.device)
    expect("lse", lse, (B, H, T), torch.float32, q.device)
    if qn is not None:
        expect("q_hat", q_hat, q.shape, q.dtype, q.device)
    lse = lse.contiguous()  # indexed as [B, H, T] contiguous; a no-op for the forward's own
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    dqw = new_output((hd,), q.dtype, q.device) if qn is not None else None
    if B * T * H == 0 or Nv == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dqw.zero_() if dqw is not None else None
    q, k, v, grad_out, out = (with_vector_layout(t) for t in (q, k, v, grad_out, out))
    if qn is not None:  # read with q's strides
        q_hat = q_hat if q_hat.stride() == q.stride() else \
            torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device).copy_(q_hat)
    mask, lens = _masks(q, k, key_mask, kv_len)
    _backward(grad_out, q, k, v, out, lse, dq, dk, dv, mask, lens,
              _padded_layout(q, k, key_mask),
              scale, qn, dqw, q_hat)
    return dq, dk, dv, dqw


def retrieval_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_mask: Optional[torch.Tensor], kv_len: Optional[torch.Tensor],
                  scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. q [B, T, H, hd], k/v [B, Nv, Hkv, hd] (fp16/bf16/fp32, hd a
    multiple of 8 up to 256), key_mask [B, Nv] bool or None, kv_len [B] int32 or None.
    Returns out [B, T, H, hd] (q.dtype) and lse [B, H, T] float32.

    When B x Hkv x row blocks is under PROGRAMS_PER_SM programs per SM (decode: 1 program
    at batch 1), the keys are split among programs (split-KV) and a second kernel merges
    the splits' fp32 partials by their log-sum-exp."""
    return _padded_fwd(q, k, v, key_mask, kv_len, scale, None)[:2]


def retrieval_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, key_mask: Optional[torch.Tensor],
                  kv_len: Optional[torch.Tensor], scale: float
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. grad_out/out like q, lse [B, H, T] float32 contiguous (from the
    forward). Returns dq, dk, dv with the shapes and dtypes of q, k, v."""
    return _padded_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale, None)[:3]


def retrieval_qn_fwd(q: torch.Tensor, q_weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: Optional[torch.Tensor], kv_len: Optional[torch.Tensor],
                     scale: float, eps: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """retrieval_fwd of q_norm(q): q is q_proj's output [B, T, H, hd], normalised per head
    as the kernels load it (q_weight [hd], q's dtype, the gain; eps the norm's). Returns
    out, lse and q_hat = q_norm(q) (what the backward's scores read)."""
    return _padded_fwd(q, k, v, key_mask, kv_len, scale, _q_norm_of(q, q_weight, eps))


def retrieval_qn_bwd(grad_out: torch.Tensor, q: torch.Tensor, q_hat: torch.Tensor,
                     q_weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, key_mask: Optional[torch.Tensor],
                     kv_len: Optional[torch.Tensor], scale: float, eps: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of retrieval_qn_fwd: (dq of q_proj's output, dq_weight, dk, dv)."""
    dq, dk, dv, dqw = _padded_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale,
                                  _q_norm_of(q, q_weight, eps), q_hat)
    return dq, dqw, dk, dv


# ---- varlen (packed, flash-attention's cu_seqlens) ----------------------------------------

def _varlen_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int
                   ) -> _Layout:
    """The varlen launches' layout after the launcher's own checks: q [total_q, H, hd], k/v
    [total_k, Hkv, hd], cu_seqlens_q / cu_seqlens_k int32 [N + 1] on q's device. The
    lengths' values are not read here (no device sync): the kernels clamp every bound."""
    for name, t, shape in (("q", q, "[total_q, H, hd]"), ("k", k, "[total_k, Hkv, hd]")):
        if t.dim() != 3:
            raise ValueError(f"{name} must be {shape}, got shape {tuple(t.shape)}")
    total_q, H, hd = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    expect("k", k, (total_k, Hkv, hd), q.dtype, q.device)
    expect("v", v, (total_k, Hkv, hd), q.dtype, q.device)
    if Hkv <= 0 or H % Hkv:
        raise ValueError(f"q heads H={H} must be a multiple of k heads Hkv={Hkv}")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q must be 1-D [N + 1], got shape "
                         f"{tuple(cu_seqlens_q.shape)}")
    n = cu_seqlens_q.shape[0] - 1
    expect("cu_seqlens_q", cu_seqlens_q, (n + 1,), torch.int32, q.device)
    expect("cu_seqlens_k", cu_seqlens_k, (n + 1,), torch.int32, q.device)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not 0 <= value < 2**31:
            raise ValueError(f"{name} must be in [0, 2^31), got {value}")
    return _Layout(True, n, int(max_seqlen_q), int(max_seqlen_k), cu_seqlens_q.contiguous(),
                   cu_seqlens_k.contiguous(), total_q, total_k)


def _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                qn: QNorm):
    """(out, lse, q_hat: q_norm(q) with ``qn``, else None)."""
    lay = _varlen_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    total_q, H, hd = q.shape
    _check_head_dim(hd, q.dtype)
    out = torch.zeros((total_q, H, hd), dtype=q.dtype, device=q.device)  # rows of none: 0
    lse = new_output((H, total_q), torch.float32, q.device)
    q_hat = None
    if lay.n * lay.t * H * total_q == 0:
        if qn is not None:
            q_hat = q.new_zeros(q.shape)
        return out, lse.fill_(float("-inf")), q_hat
    q, k, v = (with_vector_layout(t) for t in (q, k, v))
    if qn is not None:  # rows of no sequence are never normalised: 0
        q_hat = torch.zeros_like(q, memory_format=torch.preserve_format)
    _forward(q, k, v, out, lse, always_valid_keys(q.device), unlimited_kv_len(q.device), lay,
             scale, qn, q_hat)
    return out, lse, q_hat


def _varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, scale, qn: QNorm, q_hat=None):
    lay = _varlen_layout(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    total_q, H, hd = q.shape
    _check_head_dim(hd, q.dtype)
    for name, t in (("grad_out", grad_out), ("out", out)):
        expect(name, t, q.shape, q.dtype, q.device)
    expect("lse", lse, (H, total_q), torch.float32, q.device)
    if qn is not None:
        expect("q_hat", q_hat, q.shape, q.dtype, q.device)
    lse = lse.contiguous()  # indexed as [H, total_q] contiguous
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows of none: 0
    # dk / dv are the sums of zeroed partials: 0 at keys of no sequence.
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    dqw = new_output((hd,), q.dtype, q.device) if qn is not None else None
    if lay.n * lay.t * lay.nv * H * total_q * k.shape[0] == 0:
        return dq, dk.zero_(), dv.zero_(), dqw.zero_() if dqw is not None else None
    q, k, v, grad_out, out = (with_vector_layout(t) for t in (q, k, v, grad_out, out))
    if qn is not None:  # read with q's strides
        q_hat = q_hat if q_hat.stride() == q.stride() else \
            torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device).copy_(q_hat)
    _backward(grad_out, q, k, v, out, lse, dq, dk, dv, always_valid_keys(q.device),
              unlimited_kv_len(q.device), lay, scale, qn, dqw, q_hat)
    return dq, dk, dv, dqw


def retrieval_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the varlen forward (csrc/pvm_params.h's contract). q [total_q, H, hd], k/v
    [total_k, Hkv, hd], cu_seqlens_q / cu_seqlens_k int32 [N + 1]; sequence b's query rows
    [cu_q[b], cu_q[b + 1]) attend to its keys [cu_k[b], cu_k[b + 1]) only (bounds clamped
    into the tensors and to max_seqlen_q / max_seqlen_k rows). Returns out [total_q, H, hd]
    (q.dtype; 0 in rows of no sequence and of a sequence with no key) and lse [H, total_q]
    float32 (-inf for a row with no key; unspecified in rows of no sequence). The grids,
    the table entry (rows = max_seqlen_q * G) and the key split are those of a padded
    launch of N samples of max_seqlen_q tokens and max_seqlen_k keys."""
    return _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       None)[:2]


def retrieval_varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the varlen backward. grad_out/out like q, lse [H, total_q] float32 (from the
    forward). Returns dq, dk, dv with the shapes and dtypes of q, k, v: exactly 0 in the
    rows and keys of no sequence."""
    return _varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, scale, None)[:3]


def retrieval_varlen_qn_fwd(q: torch.Tensor, q_weight: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                            scale: float, eps: float
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """retrieval_varlen_fwd of q_norm(q) (as retrieval_qn_fwd): out, lse, q_hat."""
    return _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                       _q_norm_of(q, q_weight, eps))


def retrieval_varlen_qn_bwd(grad_out: torch.Tensor, q: torch.Tensor, q_hat: torch.Tensor,
                            q_weight: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                            scale: float, eps: float
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of retrieval_varlen_qn_fwd: (dq, dq_weight, dk, dv)."""
    dq, dk, dv, dqw = _varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, scale,
                                  _q_norm_of(q, q_weight, eps), q_hat)
    return dq, dqw, dk, dv
