"""Two bias-free projections of one input as one GEMM, without merging the modules.

The PVM block projects one input two ways, twice: ``mlp.gate_proj`` / ``mlp.up_proj`` (of
post_attn_norm's output) and ``cross_attn.k_proj`` / ``cross_attn.v_proj`` (of the vision
reducer's output). As two ``nn.Linear`` calls each pair costs 2 GEMMs forward and 5
kernels backward (two dW GEMMs, two dX GEMMs and their sum). With the weights stacked,
``W = [W_a; W_b]``: 1 GEMM forward; backward one concatenation of the two output
gradients, one dW GEMM (``dW_a``, ``dW_b`` are its row halves: views, no copy) and one dX
GEMM, 3 kernels.

The published parameters stay what they are (``gate_proj.weight`` and ``up_proj.weight``
are separate ``nn.Linear`` weights, by name, for checkpoints, PEFT, FSDP2 and hooks). The
stacked weight is made by the call that uses it (``stack_weights``: one ``torch.cat``, 3.4
MB at the 8B layout for all four weights, which share their input width) and dropped
after its backward. It is never kept across calls: a weight can change without any trace
a cache could check (PEFT's merge does ``weight.data += delta``, which moves neither the
version counter nor the address), and a stale stacked weight would silently compute
with the old one. A module a tool has wrapped or hooked is not stacked: FusedPVM only
pairs plain modules (``plain``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def can_pair(a: nn.Linear, b: nn.Linear, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether (a(x), b(x)) for x of ``dtype`` on ``device`` may run as one GEMM:
    bias-free, both weights in x's dtype on x's device, one input width, eager (under
    torch.compile the compiler plans its own GEMMs). The caller checks that the modules
    are plain."""
    return (a.bias is None and b.bias is None and a.weight.dtype == dtype
            and b.weight.dtype == dtype and a.weight.device == device
            and b.weight.device == device and a.weight.shape[1] == b.weight.shape[1]
            and not torch.compiler.is_compiling())


def stack_weights(*linears: nn.Linear) -> torch.Tensor:
    """[W_1; W_2; ...] of Linears of one input width, detached: one launch. Row ranges of
    the result are the stacked weights ``paired_linear`` takes."""
    return torch.cat([lin.weight.detach() for lin in linears])


class _PairedLinearFunction(torch.autograd.Function):
    """(x @ W_a^T, x @ W_b^T) from one GEMM with the stacked weight (module docstring)."""

    @staticmethod
    def forward(ctx, x2, w_a, w_b, stacked):
        ctx.save_for_backward(x2, stacked)
        ctx.split = w_a.shape[0]
        y = x2 @ stacked.t()
        return y[:, :ctx.split], y[:, ctx.split:]

    @staticmethod
    def backward(ctx, dy_a, dy_b):
        x2, stacked = ctx.saved_tensors
        n = ctx.split
        if dy_a is None:
            dy_a = dy_b.new_zeros(dy_b.shape[0], n)
        if dy_b is None:
            dy_b = dy_a.new_zeros(dy_a.shape[0], stacked.shape[0] - n)
        dy = torch.cat([dy_a, dy_b], dim=1)
        dx = dy @ stacked if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw = dy.t() @ x2  # [Oa + Ob, K]: its row ranges are the two weights' gradients
        return (dx, None if dw is None else dw[:n], None if dw is None else dw[n:], None)


def paired_linear(x: torch.Tensor, a: nn.Linear, b: nn.Linear, stacked: torch.Tensor
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a(x), b(x)) for x [..., K] and bias-free a: K -> Oa, b: K -> Ob (``can_pair``),
    with ``stacked`` = [a.weight; b.weight] [Oa + Ob, K] (``stack_weights``, or a row range
    of it): [..., Oa] and [..., Ob], views of one [..., Oa + Ob] GEMM output (row stride
    Oa + Ob). Gradients reach x, a.weight and b.weight as the two Linears would give them."""
    x2 = x.reshape(-1, x.shape[-1])
    lead = x.shape[:-1]
    if torch.is_grad_enabled() and (x.requires_grad or a.weight.requires_grad
                                    or b.weight.requires_grad):
        ya, yb = _PairedLinearFunction.apply(x2, a.weight, b.weight, stacked)
    else:
        y = x2 @ stacked.t()
        n = a.weight.shape[0]
        ya, yb = y[:, :n], y[:, n:]
    return ya.view(*lead, ya.shape[-1]), yb.view(*lead, yb.shape[-1])
