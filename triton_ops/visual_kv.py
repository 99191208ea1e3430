"""The visual side's last step, one launch: k_norm over each key's head and the memory's
metadata (VisualMemory.kv_len, has_visual) from the visual mask.

PyTorch took five launches for the metadata alone (arange, a cast, a product, amax, a
comparison) and one fused RMSNorm for k_norm. Here the grid's first programs normalise
BLOCK_R rows of k [rows, hd] as rms_norm.py's forward does (saving rstd for its backward:
the backward of k_norm is rms_norm_bwd), and B more programs each walk one sample's mask:
kv_len[b] = one past its last valid token (0 when none; Nv without a mask), has_visual[b] =
kv_len[b] > 0. Variants: rms_norm's forward CONFIGS (the key's head dim) x dtype x ALIGNED
x HAS_MASK, for head dims up to MAX_HEAD_DIM.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import always_true, check_grid, expect, launch_guard, rows_aligned
from .rms_norm import CONFIGS, block_n_for, config_key, norm_rows

#: Mask tokens a metadata program reads per step.
MASK_BLOCK = 1024
#: Widest key head the launcher takes: the retrieval's (k_norm is over one head's hd). Wider
#: rows would also reach rms_norm entries that spill here (BLOCK_N 4096 with the mask walk:
#: 8 B on sm_90, compile gate).
MAX_HEAD_DIM = 256


@triton.jit(do_not_specialize=["n_rows", "N", "sx", "sy", "B", "NV", "smb", "smn",
                               "norm_programs"])
def visual_kv_fwd_kernel(X, W, Y, RSTD, MASK, KV_LEN, HAS, n_rows: tl.int32, N: tl.int32,
                         sx: tl.int64, sy: tl.int64, eps, B: tl.int32, NV: tl.int32,
                         smb: tl.int64, smn: tl.int64, norm_programs: tl.int32,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
                         HAS_MASK: tl.constexpr, MASK_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < norm_programs:
        norm_rows(pid, X, W, Y, RSTD, n_rows, N, sx, sy, eps, BLOCK_R, BLOCK_N, ALIGNED)
    else:
        b = (pid - norm_programs).to(tl.int64)
        if HAS_MASK:
            last = tl.zeros([MASK_BLOCK], dtype=tl.int32)
            for start in range(0, NV, MASK_BLOCK):
                n = start + tl.arange(0, MASK_BLOCK)
                ok = n < NV
                valid = tl.load(MASK + b * smb + n.to(tl.int64) * smn, mask=ok, other=0) != 0
                last = tl.maximum(last, tl.where(valid, n + 1, 0))
            kv_len = tl.max(last, 0)
        else:
            kv_len = NV
        tl.store(KV_LEN + b, kv_len)
        tl.store(HAS + b, kv_len > 0)


def visual_kv_fwd(k: torch.Tensor, weight: torch.Tensor, mask: Optional[torch.Tensor],
                  eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [B, Nv, Hkv, hd] (k_proj's output; fp16/bf16/fp32), weight [hd] (k_norm's gain, k's
    dtype), mask [B, Nv] bool or None. Returns k_norm(k) (like k), rstd [B * Nv * Hkv]
    float32 (for rms_norm_bwd), kv_len [B] int32 and has_visual [B] bool."""
    if k.dim() != 4:
        raise ValueError(f"k must be [B, Nv, Hkv, hd], got shape {tuple(k.shape)}")
    B, Nv, Hkv, hd = k.shape
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"k: the triton backend's visual K/V takes head dims of up to "
                         f"{MAX_HEAD_DIM}, got {hd}")
    expect("weight", weight, (hd,), k.dtype, k.device)
    if mask is not None:
        expect("mask", mask, (B, Nv), torch.bool, k.device)
    x2 = k.reshape(-1, hd)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows = x2.shape[0]
    y = new_output(k.shape, k.dtype, k.device)
    rstd = new_output((n_rows,), torch.float32, k.device)
    kv_len = new_output((B,), torch.int32, k.device)
    has = new_output((B,), torch.bool, k.device)
    if B == 0:
        return y, rstd, kv_len, has
    y2 = y.view(n_rows, hd)
    cfg = CONFIGS[config_key("fwd", k.dtype, hd)]
    norm_programs = triton.cdiv(n_rows, cfg.block_r)
    grid = (norm_programs + B,)
    check_grid(grid)
    m = mask if mask is not None else always_true(k.device).as_strided((1, 1), (0, 0))
    with launch_guard(k):
        visual_kv_fwd_kernel[grid](x2, weight, y2, rstd, m, kv_len, has, n_rows, hd,
                                   x2.stride(0), y2.stride(0), eps, B, Nv, *m.stride(),
                                   norm_programs, BLOCK_R=cfg.block_r, BLOCK_N=block_n_for(hd),
                                   ALIGNED=rows_aligned(hd, x2, y2), HAS_MASK=mask is not None,
                                   MASK_BLOCK=MASK_BLOCK, num_warps=cfg.num_warps)
    return y, rstd, kv_len, has
