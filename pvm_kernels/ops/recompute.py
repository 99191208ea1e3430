"""The block's two widest activations, recomputed in backward instead of saved (issue 24).

At the 8B layout (bf16, T 8192, Nv 2048) the fused block saved 220 MiB for backward, 136 of
them in two places (measured with FakeTensor: tests/test_saved_bytes.py):

- the expansion ``e = output_expander(m2)`` [N, D], D = 4096: 64 MiB, kept only for the
  merge's backward. ``expand_merge`` keeps m2 [N, P] (P = 512, already kept by the
  expander's own backward) and recomputes e with one GEMM (2 N P D FLOPs: 34 GFLOP, ~0.1 ms
  on an H100) before the merge's backward.
- the MLP's SwiGLU inputs [N, 2I] and output [N, I], I = 1536: 72 MiB. ``mlp_residual``
  keeps its input n [N, P] and recomputes gate/up (one GEMM, 2 N P 2I FLOPs) and SwiGLU.

Launches: expand_merge backward is 4 (recompute, merge backward, dW, dX) against 3; the
MLP's 8 against 6. Both are autograd Functions over a backend's registered forward and
backward ops, so any backend with those ops gets them. Under torch.compile the module takes
the plain path (the compiler plans its own recomputation).
"""
from __future__ import annotations

from typing import Callable

import torch

from .registration import get_op


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _ExpandMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m2, w_e, gate, keep, ffn_output, eps, backend):
        e = (_rows(m2) @ w_e.t()).view(*m2.shape[:-1], w_e.shape[0])
        out, rstd = get_op(backend, "merge_fwd")(e, gate, keep, ffn_output, eps)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(m2, w_e, gate, keep, rstd)
        ctx.backend, ctx.has_ffn = backend, ffn_output is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 7
        m2, w_e, gate, keep, rstd = ctx.saved_tensors
        m2r = _rows(m2)
        e = (m2r @ w_e.t()).view(*m2.shape[:-1], w_e.shape[0])  # recomputed: not saved
        d_e, d_gate = get_op(ctx.backend, "merge_bwd")(grad_out, e, gate, keep, rstd)
        d_e = _rows(d_e)
        d_m2 = (d_e @ w_e).view(m2.shape) if ctx.needs_input_grad[0] else None
        d_w = d_e.t() @ m2r if ctx.needs_input_grad[1] else None
        return (d_m2, d_w, d_gate if ctx.needs_input_grad[2] else None, None,
                grad_out if ctx.has_ffn else None, None, None)


def expand_merge(backend: str) -> Callable:
    """``merge(m2 @ w_e^T, gate, keep, ffn_output, eps)`` of ``backend``'s merge ops,
    saving m2 instead of the expansion: (m2 [..., P], w_e [D, P], gate [1], keep [...] bool
    or None, ffn_output [..., D] or None, eps) -> [..., D] in m2's dtype."""
    def run(m2, w_e, gate, keep, ffn_output, eps):
        return _ExpandMerge.apply(m2, w_e, gate, keep, ffn_output, eps, backend)
    return run


class _MLPResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, n, w_gate, w_up, w_down, stacked, backend):
        inter = w_gate.shape[0]
        gu = _rows(n) @ stacked.t()
        s = get_op(backend, "swiglu_fwd")(gu[:, :inter], gu[:, inter:])
        out = torch.addmm(_rows(m), s, w_down.t()).view(m.shape)
        ctx.save_for_backward(n, stacked, w_down)
        ctx.backend, ctx.inter = backend, inter
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n, stacked, w_down = ctx.saved_tensors
        inter, backend = ctx.inter, ctx.backend
        n2, d = _rows(n), _rows(grad_out)
        gu = n2 @ stacked.t()  # recomputed: gate and up were not saved
        g, u = gu[:, :inter], gu[:, inter:]
        ds = d @ w_down
        d_down = None
        if ctx.needs_input_grad[4]:
            d_down = d.t() @ get_op(backend, "swiglu_fwd")(g, u)
        dg, du = get_op(backend, "swiglu_bwd")(ds, g, u)
        dgu = torch.cat([dg, du], dim=1)
        d_n = (dgu @ stacked).view(n.shape) if ctx.needs_input_grad[1] else None
        d_gate = d_up = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            d_w = dgu.t() @ n2  # [2I, P]: its row halves are the two weights' gradients
            d_gate, d_up = d_w[:inter], d_w[inter:]
        return grad_out, d_n, d_gate, d_up, d_down, None, None


def mlp_residual(backend: str) -> Callable:
    """``m + down(silu(gate(n)) * up(n))`` with ``backend``'s SwiGLU ops, saving only n:
    (m [..., P], n [..., P], w_gate [I, P], w_up [I, P], w_down [P, I], stacked
    [w_gate; w_up] [2I, P] (a cache: paired_linear.StackedWeightCache)) -> [..., P]."""
    def run(m, n, w_gate, w_up, w_down, stacked):
        return _MLPResidual.apply(m, n, w_gate, w_up, w_down, stacked, backend)
    return run
