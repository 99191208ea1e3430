"""The ``triton`` backend: the Triton launchers registered as torch.library custom ops.

Triton is imported on first call, not at registration, so ``import pvm_kernels`` never
imports triton and a user can still choose TRITON_INTERPRET after importing us.
"""
from __future__ import annotations

from .registration import define_python_backend


def _kernels():
    from .. import triton_ops
    return triton_ops


def _retrieval_fwd(q, k, v, key_mask, kv_len, scale):
    return _kernels().retrieval_fwd(q, k, v, key_mask, kv_len, scale)


def _retrieval_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale):
    return _kernels().retrieval_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale)


def _merge_fwd(expanded, gate, keep, ffn_output, eps):
    return _kernels().merge_fwd(expanded, gate, keep, ffn_output, eps)


def _merge_bwd(grad_out, expanded, gate, keep, rstd):
    return _kernels().merge_bwd(grad_out, expanded, gate, keep, rstd)


define_python_backend("triton", {
    "retrieval_fwd": _retrieval_fwd, "retrieval_bwd": _retrieval_bwd,
    "merge_fwd": _merge_fwd, "merge_bwd": _merge_bwd,
})
