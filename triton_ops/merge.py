"""Merge: out = ffn_output + keep * gate * rms(expanded), forward and backward, one pass each.

rms is the affine-free RMSNorm over D with float32 statistics. One program per row:
the whole row (D <= 16384) sits in registers, so the RMS statistic, the gate and the FFN
add cost one read of each input and one write, instead of the four elementwise kernels
and their intermediate [N, D] tensors eager PyTorch launches.

Layouts: expanded / ffn_output / out [N, D] with unit last stride; gate [1]; keep [N]
(nonzero = keep); rstd [N] float32, saved by the forward for the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._alloc import new_output
from .common import launch_guard, pow2_at_least


@triton.jit
def merge_fwd_kernel(E, FFN, OUT, GATE, KEEP, RSTD, D, se, sf, so, eps,
                     HAS_FFN: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    e = tl.load(E + row * se + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(e * e, 0) / D + eps)
    u = e * (rstd * tl.load(GATE).to(tl.float32))
    if HAS_KEEP:
        # where, not multiply: a silenced row must be exactly 0 even if e is not finite.
        u = tl.where(tl.load(KEEP + row) != 0, u, 0.0)
    if HAS_FFN:
        u += tl.load(FFN + row * sf + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * so + cols, u.to(OUT.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def merge_bwd_kernel(GRAD, E, GATE, KEEP, RSTD, DE, DGATE_ROW, D, sg, se, sde,
                     HAS_KEEP: tl.constexpr, BLOCK_D: tl.constexpr):
    """de = gate * rstd * (g - n * mean(g * n)), n = e * rstd; per-row partial of d(gate)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    g = tl.load(GRAD + row * sg + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_KEEP:
        g = tl.where(tl.load(KEEP + row) != 0, g, 0.0)
    e = tl.load(E + row * se + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    n = e * rstd
    gn = tl.sum(g * n, 0)
    gate = tl.load(GATE).to(tl.float32)
    de = (gate * rstd) * (g - n * (gn / D))
    tl.store(DE + row * sde + cols, de.to(DE.dtype.element_ty), mask=ok)
    # Per-row partials summed by the wrapper: deterministic, no atomics on one scalar.
    tl.store(DGATE_ROW + row, gn)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [N, D] with unit last stride (a view whenever the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _num_warps(block_d: int) -> int:
    return 4 if block_d <= 2048 else (8 if block_d <= 8192 else 16)


def merge_fwd(expanded: torch.Tensor, gate: torch.Tensor, keep: Optional[torch.Tensor],
              ffn_output: Optional[torch.Tensor], eps: float
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns out (shape/dtype of expanded) and rstd [N] float32."""
    D = expanded.shape[-1]
    e2 = _rows(expanded)
    N = e2.shape[0]
    f2 = _rows(ffn_output) if ffn_output is not None else e2
    # contiguous(): an expanded keep (stride 0, e.g. one flag per sample) flattens to a
    # stride-0 view, but the kernel reads keep[row] at unit stride.
    k1 = keep.reshape(-1).contiguous() if keep is not None else e2
    out = new_output(expanded.shape, expanded.dtype, expanded.device)
    rstd = new_output((N,), torch.float32, expanded.device)
    if N == 0:
        return out, rstd
    o2 = out.view(N, D)
    block_d = pow2_at_least(D)
    with launch_guard(expanded):
        merge_fwd_kernel[(N,)](e2, f2, o2, gate, k1, rstd, D, e2.stride(0), f2.stride(0),
                               o2.stride(0), eps, HAS_FFN=ffn_output is not None,
                               HAS_KEEP=keep is not None, BLOCK_D=block_d,
                               num_warps=_num_warps(block_d))
    return out, rstd


def merge_bwd(grad_out: torch.Tensor, expanded: torch.Tensor, gate: torch.Tensor,
              keep: Optional[torch.Tensor], rstd: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns d_expanded (like expanded) and d_gate (like gate)."""
    D = expanded.shape[-1]
    e2 = _rows(expanded)
    g2 = _rows(grad_out)
    N = e2.shape[0]
    # contiguous(): an expanded keep (stride 0, e.g. one flag per sample) flattens to a
    # stride-0 view, but the kernel reads keep[row] at unit stride.
    k1 = keep.reshape(-1).contiguous() if keep is not None else e2
    de = new_output(expanded.shape, expanded.dtype, expanded.device)
    dgate_row = new_output((N,), torch.float32, expanded.device)
    if N == 0:
        return de, torch.zeros_like(gate)
    de2 = de.view(N, D)
    block_d = pow2_at_least(D)
    with launch_guard(expanded):
        merge_bwd_kernel[(N,)](g2, e2, gate, k1, rstd, de2, dgate_row, D, g2.stride(0),
                               e2.stride(0), de2.stride(0), HAS_KEEP=keep is not None,
                               BLOCK_D=block_d, num_warps=_num_warps(block_d))
    return de, dgate_row.sum().reshape(gate.shape).to(gate.dtype)
