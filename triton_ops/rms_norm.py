"""RMSNorm with a gain (Qwen convention), forward and backward, one launch each.

    y = w * cast(x * rstd),   rstd = 1 / sqrt(mean(x^2) + eps)   (statistics in float32)

The PVM block runs four of these (input_norm and post_attn_norm over P; k_norm and, where
the retrieval does not fuse it, q_norm over each head's hd). Written as PyTorch each costs
six kernels forward (cast, pow, mean, add, rsqrt, mul, mul) and about as many backward,
which is most of the block's launches at small and medium T (bench/NOTES.md). Here:

- forward: one launch; programs of BLOCK_R rows, each row whole in registers. Saves the
  input (a tensor of the caller's, not a copy) and one float32 rstd per row: nothing else.
- backward: one launch with two kinds of programs. Row programs compute
  dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, from the saved x and rstd.
  Column programs (after them in the grid) each own BLOCK_C columns of dw and walk every
  row in order: dw = sum_rows dy * cast(x * rstd). They need only the saved x and rstd, not
  the row programs' results, so the reduction over rows is complete in the same launch,
  deterministic (a fixed order, no atomics) and without the partial buffer and extra sum
  kernel of the usual two-pass scheme (Liger-Kernel's).

Layouts: x, y, dy, dx [rows, N] with unit last stride (rows at any stride); w [N]; rstd
[rows] float32. ALIGNED (N and the row strides multiples of 8 elements, 16-byte aligned
data) turns on the hints for 16-byte vector loads. Variants: CONFIGS x dtype x ALIGNED.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import as_rows, check_grid, dtype_class, expect, launch_guard, pow2_at_least, rows_aligned

#: Widest row the kernels take (a row lives in registers).
MAX_N = 8192
BLOCK_N_CHOICES = tuple(2**i for i in range(4, 14))  # 16 .. 8192


@dataclass(frozen=True)
class NormConfig:
    """One compiled shape: BLOCK_R rows of BLOCK_N lanes per program on num_warps warps;
    the backward's column programs own BLOCK_C columns and read ROWS rows per step."""
    block_r: int
    num_warps: int
    block_c: int = 32
    rows: int = 64


def _configs() -> Dict[Tuple[str, str, int], NormConfig]:
    def config(kernel, bn):
        # Rows per program: ~4096 elements forward (hd 128: 32 rows; P 512: 8), half that
        # backward, which holds more fp32 tiles at once (64 x 64 spilled 8 B on sm_80).
        # 4 warps up to 2048 lanes, then 8 (4 warps at 4096 lanes spilled on sm_90).
        block_r = max(1, min(64, (4096 if kernel == "fwd" else 2048) // bn))
        warps = 4 if bn <= 2048 else 8
        return NormConfig(block_r, warps)
    return {(kernel, dc, bn): config(kernel, bn) for kernel in ("fwd", "bwd")
            for dc in ("16bit", "fp32") for bn in BLOCK_N_CHOICES}


#: (kernel, dtype class, BLOCK_N) -> NormConfig: the only source of launch shapes.
CONFIGS: Dict[Tuple[str, str, int], NormConfig] = _configs()


def block_n_for(N: int) -> int:
    return pow2_at_least(N)


def config_key(kernel: str, dtype: torch.dtype, N: int) -> Tuple[str, str, int]:
    """The CONFIGS key of a launch of ``kernel`` ("fwd" / "bwd") on rows of width N."""
    return (kernel, dtype_class(dtype), block_n_for(N))


@triton.jit
def _tile(rows, s, N, cols, n_rows, ALIGNED: tl.constexpr):
    """Offsets and mask of a [rows, cols] tile; with ALIGNED the vector-load hints (row
    starts multiples of 8 elements, a mask constant over runs of 8 lanes)."""
    ok_r = rows < n_rows
    if ALIGNED:
        off = tl.multiple_of(rows.to(tl.int64) * s, 8)[:, None] + cols[None, :]
        return off, ok_r[:, None] & ((cols // 8) < (N // 8))[None, :]
    off = rows.to(tl.int64)[:, None] * s + cols[None, :]
    return off, ok_r[:, None] & (cols < N)[None, :]


@triton.jit(do_not_specialize=["n_rows", "N", "sx", "sy"])
def rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows: tl.int32, N: tl.int32, sx: tl.int64,
                        sy: tl.int64, eps, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        ALIGNED: tl.constexpr):
    norm_rows(tl.program_id(0), X, W, Y, RSTD, n_rows, N, sx, sy, eps, BLOCK_R, BLOCK_N,
              ALIGNED)


@triton.jit
def norm_rows(pid, X, W, Y, RSTD, n_rows, N, sx, sy, eps, BLOCK_R: tl.constexpr,
              BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """The forward of program ``pid``'s BLOCK_R rows (also the k-norm of visual_kv.py)."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    x_off, ok = _tile(rows, sx, N, cols, n_rows, ALIGNED)
    x = tl.load(X + x_off, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
    # cast before the gain, as the Qwen RMSNorm does (bit-identical to it in 16 bits)
    xhat = (x * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y_off, _ = _tile(rows, sy, N, cols, n_rows, ALIGNED)
    tl.store(Y + y_off, (xhat * w[None, :]).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _dx_rows(pid, DY, X, W, RSTD, DX, n_rows, N, sdy, sx, sdx, BLOCK_R: tl.constexpr,
             BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """dx of the BLOCK_R rows of row program ``pid``."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    dy_off, ok = _tile(rows, sdy, N, cols, n_rows, ALIGNED)
    x_off, _ = _tile(rows, sx, N, cols, n_rows, ALIGNED)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    g = tl.load(DY + dy_off, mask=ok, other=0.0).to(tl.float32) * w[None, :]
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    xhat = tl.load(X + x_off, mask=ok, other=0.0).to(tl.float32) * rstd[:, None]
    dx = (g - xhat * (tl.sum(g * xhat, 1) / N)[:, None]) * rstd[:, None]
    dx_off, _ = _tile(rows, sdx, N, cols, n_rows, ALIGNED)
    tl.store(DX + dx_off, dx.to(DX.dtype.element_ty), mask=ok)


@triton.jit
def _dw_columns(block, DY, X, RSTD, DW, n_rows, N, sdy, sx, BLOCK_C: tl.constexpr,
                ROWS: tl.constexpr):
    """dw of column block ``block``: every row, in order."""
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = cols < N
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for start in range(0, n_rows, ROWS):
        rows = start + tl.arange(0, ROWS)
        ok = (rows < n_rows)[:, None] & ok_c[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * sdy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        x = tl.load(X + r64 * sx + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        xhat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        acc += tl.sum(dy * xhat, 0)
    tl.store(DW + cols, acc.to(DW.dtype.element_ty), mask=ok_c)


@triton.jit(do_not_specialize=["n_rows", "N", "sdy", "sx", "sdx", "row_programs"])
def rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW, n_rows: tl.int32, N: tl.int32, sdy: tl.int64,
                        sx: tl.int64, sdx: tl.int64, row_programs: tl.int32,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """Row programs (the first ``row_programs``) write dx; the rest each write BLOCK_C
    columns of dw (module docstring)."""
    pid = tl.program_id(0)
    if pid < row_programs:
        _dx_rows(pid, DY, X, W, RSTD, DX, n_rows, N, sdy, sx, sdx, BLOCK_R, BLOCK_N, ALIGNED)
    else:
        _dw_columns(pid - row_programs, DY, X, RSTD, DW, n_rows, N, sdy, sx, BLOCK_C, ROWS)


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    N = x.shape[-1]
    if N > MAX_N:
        raise ValueError(f"the triton backend's RMSNorm takes rows of up to {MAX_N} elements, "
                         f"got {N}")
    expect("weight", weight, (N,), x.dtype, x.device)
    return N


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [..., N] (fp16/bf16/fp32, N <= 8192), weight [N] of x's dtype. Returns y (shape and
    dtype of x) and rstd [rows] float32."""
    N = _check(x, weight)
    x2 = as_rows(x)
    n_rows = x2.shape[0]
    y = new_output(x.shape, x.dtype, x.device)
    rstd = new_output((n_rows,), torch.float32, x.device)
    if n_rows == 0:
        return y, rstd
    y2 = y.view(n_rows, N)
    cfg = CONFIGS[config_key("fwd", x.dtype, N)]
    grid = (triton.cdiv(n_rows, cfg.block_r),)
    check_grid(grid)
    with launch_guard(x2):
        rms_norm_fwd_kernel[grid](x2, weight, y2, rstd, n_rows, N, x2.stride(0), y2.stride(0),
                                  eps, BLOCK_R=cfg.block_r, BLOCK_N=block_n_for(N),
                                  ALIGNED=rows_aligned(N, x2, y2), num_warps=cfg.num_warps)
    return y, rstd


def rms_norm_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad_y like x, rstd [rows] float32 from the forward. Returns grad_x (like x) and
    grad_weight (like weight), in one launch."""
    N = _check(x, weight)
    expect("grad_y", grad_y, x.shape, x.dtype, x.device)
    x2, dy2 = as_rows(x), as_rows(grad_y)
    n_rows = x2.shape[0]
    expect("rstd", rstd, (n_rows,), torch.float32, x.device)
    dx = new_output(x.shape, x.dtype, x.device)
    dw = new_output(weight.shape, weight.dtype, x.device)
    if n_rows == 0:
        return dx, dw.zero_()
    dx2 = dx.view(n_rows, N)
    cfg = CONFIGS[config_key("bwd", x.dtype, N)]
    row_programs = triton.cdiv(n_rows, cfg.block_r)
    grid = (row_programs + triton.cdiv(N, cfg.block_c),)
    check_grid(grid)
    with launch_guard(x2):
        rms_norm_bwd_kernel[grid](dy2, x2, weight, rstd, dx2, dw, n_rows, N, dy2.stride(0),
                                  x2.stride(0), dx2.stride(0), row_programs,
                                  BLOCK_R=cfg.block_r, BLOCK_N=block_n_for(N),
                                  BLOCK_C=cfg.block_c, ROWS=cfg.rows,
                                  ALIGNED=rows_aligned(N, x2, dy2, dx2), num_warps=cfg.num_warps)
    return dx, dw
