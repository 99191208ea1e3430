"""SwiGLU, the activation of the PVM block's MLP: out = cast(silu(gate)) * up, forward and
backward, one launch each.

PyTorch's ``F.silu(gate) * up`` launches two kernels forward and three backward, and saves
silu(gate) besides the two inputs; here the backward recomputes silu from the saved gate,
so only the two inputs are kept. The roundings follow the PyTorch composite: silu(gate) is
rounded to the input dtype before the product, and so are the product's gradients.

Layouts: gate, up, out and their gradients [rows, I] with unit last stride and any row
stride (gate and up may be two halves of one [rows, 2I] GEMM output). Tiles of BLOCK_R x
BLOCK_C on a 1-D grid; ALIGNED (I and every row stride multiples of 8 elements, 16-byte
aligned data) turns on the vector-load hints. Variants: CONFIGS x dtype x ALIGNED.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import as_rows, check_grid, dtype_class, expect, launch_guard, rows_aligned


@dataclass(frozen=True)
class TileConfig:
    block_r: int
    block_c: int
    num_warps: int


#: (kernel, dtype class) -> TileConfig: 4096 elements per program (16 per thread).
CONFIGS: Dict[Tuple[str, str], TileConfig] = {
    (kernel, dc): TileConfig(16, 256, 8) for kernel in ("fwd", "bwd") for dc in ("16bit", "fp32")}


@triton.jit
def _tile(pid, n_rows, I, s, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          ALIGNED: tl.constexpr):
    col_blocks = tl.cdiv(I, BLOCK_C)
    rows = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_r = rows < n_rows
    if ALIGNED:
        off = tl.multiple_of(rows.to(tl.int64) * s, 8)[:, None] + cols[None, :]
        return off, ok_r[:, None] & ((cols // 8) < (I // 8))[None, :]
    return rows.to(tl.int64)[:, None] * s + cols[None, :], ok_r[:, None] & (cols < I)[None, :]


@triton.jit(do_not_specialize=["n_rows", "I", "sg", "su", "so"])
def swiglu_fwd_kernel(G, U, OUT, n_rows: tl.int32, I: tl.int32, sg: tl.int64, su: tl.int64,
                      so: tl.int64, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    g_off, ok = _tile(pid, n_rows, I, sg, BLOCK_R, BLOCK_C, ALIGNED)
    u_off, _ = _tile(pid, n_rows, I, su, BLOCK_R, BLOCK_C, ALIGNED)
    o_off, _ = _tile(pid, n_rows, I, so, BLOCK_R, BLOCK_C, ALIGNED)
    g = tl.load(G + g_off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + u_off, mask=ok, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + o_off, (s * u).to(OUT.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_rows", "I", "sd", "sg", "su", "sdg", "sdu"])
def swiglu_bwd_kernel(D, G, U, DG, DU, n_rows: tl.int32, I: tl.int32, sd: tl.int64,
                      sg: tl.int64, su: tl.int64, sdg: tl.int64, sdu: tl.int64,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
    """dg = cast(d * u) * silu'(g), du = d * cast(silu(g))."""
    pid = tl.program_id(0)
    d_off, ok = _tile(pid, n_rows, I, sd, BLOCK_R, BLOCK_C, ALIGNED)
    g_off, _ = _tile(pid, n_rows, I, sg, BLOCK_R, BLOCK_C, ALIGNED)
    u_off, _ = _tile(pid, n_rows, I, su, BLOCK_R, BLOCK_C, ALIGNED)
    d = tl.load(D + d_off, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + g_off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + u_off, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    s = (g * sig).to(DU.dtype.element_ty).to(tl.float32)
    ds = (d * u).to(DG.dtype.element_ty).to(tl.float32)
    dg = ds * sig * (1.0 + g * (1.0 - sig))
    dg_off, _ = _tile(pid, n_rows, I, sdg, BLOCK_R, BLOCK_C, ALIGNED)
    du_off, _ = _tile(pid, n_rows, I, sdu, BLOCK_R, BLOCK_C, ALIGNED)
    tl.store(DG + dg_off, dg.to(DG.dtype.element_ty), mask=ok)
    tl.store(DU + du_off, (d * s).to(DU.dtype.element_ty), mask=ok)


def _launch(kernel, kind: str, like: torch.Tensor, rows, args) -> None:
    n_rows, I = rows[0].shape
    cfg = CONFIGS[(kind, dtype_class(like.dtype))]
    grid = (triton.cdiv(n_rows, cfg.block_r) * triton.cdiv(I, cfg.block_c),)
    check_grid(grid)
    with launch_guard(like):
        kernel[grid](*args, BLOCK_R=cfg.block_r, BLOCK_C=cfg.block_c,
                     ALIGNED=rows_aligned(I, *rows), num_warps=cfg.num_warps)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] (fp16/bf16/fp32, same shape and dtype). Returns silu(gate) * up."""
    expect("up", up, gate.shape, gate.dtype, gate.device)
    out = new_output(gate.shape, gate.dtype, gate.device)
    if gate.numel() == 0:
        return out
    g2, u2, o2 = as_rows(gate), as_rows(up), out.view(-1, gate.shape[-1])
    _launch(swiglu_fwd_kernel, "fwd", gate, (g2, u2, o2),
            (g2, u2, o2, g2.shape[0], g2.shape[1], g2.stride(0), u2.stride(0), o2.stride(0)))
    return out


def swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad like gate. Returns (d_gate, d_up), like gate."""
    expect("up", up, gate.shape, gate.dtype, gate.device)
    expect("grad", grad, gate.shape, gate.dtype, gate.device)
    dg = new_output(gate.shape, gate.dtype, gate.device)
    du = new_output(gate.shape, gate.dtype, gate.device)
    if gate.numel() == 0:
        return dg, du
    I = gate.shape[-1]
    d2, g2, u2 = as_rows(grad), as_rows(gate), as_rows(up)
    dg2, du2 = dg.view(-1, I), du.view(-1, I)
    _launch(swiglu_bwd_kernel, "bwd", gate, (d2, g2, u2, dg2, du2),
            (d2, g2, u2, dg2, du2, g2.shape[0], I, d2.stride(0), g2.stride(0), u2.stride(0),
             dg2.stride(0), du2.stride(0)))
    return dg, du
