"""Merge: out = ffn_output + keep * gate * rms(expanded), forward and backward, one pass each.

rms is the affine-free RMSNorm over D with float32 statistics. One program per row:
the whole row (D <= 16384) sits in registers, so the RMS statistic, the gate and the FFN
add cost one read of each input and one write, instead of the four elementwise kernels
and their intermediate [N, D] tensors eager PyTorch launches.

Layouts: expanded / ffn_output / out [N, D] with unit last stride; gate [1]; keep [N]
(nonzero = keep); rstd [N] float32, saved by the forward for the backward.

Specialisation is closed as in retrieval.py: row strides and D are unspecialised, so the
variants are ``CONFIGS`` x dtype x HAS_FFN x ALIGNED. ALIGNED (D and every row stride a
multiple of 8 elements, 16-byte aligned pointers: every real model width) turns on the
hints that give 16-byte vector loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import (always_true, as_rows, check_grid, dtype_class, expect, launch_guard,
                     pow2_at_least, rows_aligned)

#: Widest row the merge kernels take (the row lives in registers).
MAX_D = 16384
BLOCK_D_CHOICES = tuple(2**i for i in range(4, 15))  # 16 .. 16384


@dataclass(frozen=True)
class RowConfig:
    """One compiled row shape: BLOCK_D lanes over num_warps warps."""
    num_warps: int


def _configs() -> Dict[Tuple[str, str, int], RowConfig]:
    # 4 warps up to 2048 lanes (<= 16 fp32 values per thread), then 8 and 16 warps keep a
    # thread's share of the row at <= 32 values: no spill at D 16384 (compile gate).
    warps = lambda bd: 4 if bd <= 2048 else (8 if bd <= 8192 else 16)  # noqa: E731
    return {(kernel, dc, bd): RowConfig(warps(bd)) for kernel in ("fwd", "bwd")
            for dc in ("16bit", "fp32") for bd in BLOCK_D_CHOICES}


#: (kernel, dtype class, BLOCK_D) -> RowConfig: the only source of merge launch shapes.
CONFIGS: Dict[Tuple[str, str, int], RowConfig] = _configs()


def block_d_for(D: int) -> int:
    return pow2_at_least(D)


def config_key(kernel: str, dtype: torch.dtype, D: int) -> Tuple[str, str, int]:
    """The CONFIGS key of a launch of ``kernel`` ("fwd" / "bwd") on rows of width D."""
    return (kernel, dtype_class(dtype), block_d_for(D))


@triton.jit
def _row(row, s, D, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Offsets of a row's lanes and their mask; with ALIGNED the hints for vector loads
    (a mask constant over runs of 8 lanes, 8-element aligned row starts)."""
    cols = tl.arange(0, BLOCK_D)
    if ALIGNED:
        return tl.multiple_of(row * s, 8) + cols, (cols // 8) < (D // 8)
    return row * s + cols, cols < D


@triton.jit(do_not_specialize=["se", "sf", "so", "D"])
def merge_fwd_kernel(E, FFN, OUT, GATE, KEEP, RSTD, D: tl.int32, se: tl.int64, sf: tl.int64,
                     so: tl.int64, skeep: tl.int64, eps,
                     HAS_FFN: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    e_off, ok = _row(row, se, D, BLOCK_D, ALIGNED)
    e = tl.load(E + e_off, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(e * e, 0) / D + eps)
    u = e * (rstd * tl.load(GATE).to(tl.float32))
    # where, not multiply: a silenced row must be exactly 0 even if e is not finite.
    u = tl.where(tl.load(KEEP + row * skeep) != 0, u, 0.0)
    if HAS_FFN:
        f_off, _ = _row(row, sf, D, BLOCK_D, ALIGNED)
        u += tl.load(FFN + f_off, mask=ok, other=0.0).to(tl.float32)
    o_off, _ = _row(row, so, D, BLOCK_D, ALIGNED)
    tl.store(OUT + o_off, u.to(OUT.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=["sg", "se", "sde", "D"])
def merge_bwd_kernel(GRAD, E, GATE, KEEP, RSTD, DE, DGATE_ROW, D: tl.int32, sg: tl.int64,
                     se: tl.int64, sde: tl.int64, skeep: tl.int64,
                     BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """de = gate * rstd * (g - n * mean(g * n)), n = e * rstd; per-row partial of d(gate)."""
    row = tl.program_id(0).to(tl.int64)
    g_off, ok = _row(row, sg, D, BLOCK_D, ALIGNED)
    g = tl.load(GRAD + g_off, mask=ok, other=0.0).to(tl.float32)
    g = tl.where(tl.load(KEEP + row * skeep) != 0, g, 0.0)
    e_off, _ = _row(row, se, D, BLOCK_D, ALIGNED)
    e = tl.load(E + e_off, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    n = e * rstd
    gn = tl.sum(g * n, 0)
    gate = tl.load(GATE).to(tl.float32)
    de = (gate * rstd) * (g - n * (gn / D))
    de_off, _ = _row(row, sde, D, BLOCK_D, ALIGNED)
    tl.store(DE + de_off, de.to(DE.dtype.element_ty), mask=ok)
    # Per-row partials summed by the wrapper: deterministic, no atomics on one scalar.
    tl.store(DGATE_ROW + row, gn)


def _keep_rows(keep: Optional[torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, int]:
    """keep as [N] (any stride: an expanded per-sample flag reads at stride 0 where the
    flattening allows a view), or a stride-0 True for "keep every row"."""
    if keep is None:
        return always_true(device), 0
    k1 = keep.reshape(-1)
    return k1, k1.stride(0)


def _gate(gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gate as the kernels read it: in the rows' dtype or float32 (a module cast to the
    compute dtype, or an fp32 master weight under autocast); any other dtype converts, so
    those two are the only variants compiled."""
    return gate if gate.dtype in (dtype, torch.float32) else gate.float()


def _check_width(D: int) -> None:
    if D > MAX_D:
        raise ValueError(f"the triton backend's merge takes rows of up to {MAX_D} elements, "
                         f"got D={D}")


def _launch(kernel, kind: str, e2: torch.Tensor, rows, args, **flags) -> None:
    """One program per row of e2 [N, D], shaped by the table entry for (kind, dtype, D)."""
    N, D = e2.shape
    cfg = CONFIGS[config_key(kind, e2.dtype, D)]
    check_grid((N,))
    with launch_guard(e2):
        kernel[(N,)](*args, BLOCK_D=block_d_for(D), ALIGNED=rows_aligned(D, *rows),
                     num_warps=cfg.num_warps, **flags)


def merge_fwd(expanded: torch.Tensor, gate: torch.Tensor, keep: Optional[torch.Tensor],
              ffn_output: Optional[torch.Tensor], eps: float
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. expanded [..., D] (fp16/bf16/fp32, D <= 16384), gate [1], keep
    [...] bool or None, ffn_output like expanded or None. Returns out (shape/dtype of
    expanded) and rstd [N] float32."""
    D = expanded.shape[-1]
    _check_width(D)
    e2 = as_rows(expanded)
    N = e2.shape[0]
    f2 = as_rows(ffn_output) if ffn_output is not None else e2
    out = new_output(expanded.shape, expanded.dtype, expanded.device)
    rstd = new_output((N,), torch.float32, expanded.device)
    if N == 0:
        return out, rstd
    k1, skeep = _keep_rows(keep, expanded.device)
    o2 = out.view(N, D)
    _launch(merge_fwd_kernel, "fwd", e2, (e2, f2, o2),
            (e2, f2, o2, _gate(gate, e2.dtype), k1, rstd, D, e2.stride(0), f2.stride(0),
             o2.stride(0), skeep, eps), HAS_FFN=ffn_output is not None)
    return out, rstd


def merge_bwd(grad_out: torch.Tensor, expanded: torch.Tensor, gate: torch.Tensor,
              keep: Optional[torch.Tensor], rstd: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. grad_out like expanded, rstd [N] float32 from the forward.
    Returns d_expanded (like expanded) and d_gate (like gate)."""
    D = expanded.shape[-1]
    _check_width(D)
    expect("grad_out", grad_out, expanded.shape, expanded.dtype, expanded.device)
    e2 = as_rows(expanded)
    g2 = as_rows(grad_out)
    N = e2.shape[0]
    de = new_output(expanded.shape, expanded.dtype, expanded.device)
    dgate_row = new_output((N,), torch.float32, expanded.device)
    if N == 0:
        return de, torch.zeros_like(gate)
    expect("rstd", rstd, (N,), torch.float32, expanded.device)
    k1, skeep = _keep_rows(keep, expanded.device)
    de2 = de.view(N, D)
    _launch(merge_bwd_kernel, "bwd", e2, (g2, e2, de2),
            (g2, e2, _gate(gate, e2.dtype), k1, rstd, de2, dgate_row, D, g2.stride(0),
             e2.stride(0), de2.stride(0), skeep))
    return de, dgate_row.sum().reshape(gate.shape).to(gate.dtype)
