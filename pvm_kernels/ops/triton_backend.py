"""The ``triton`` backend: the Triton launchers registered as torch.library custom ops.

Triton is imported on first call, not at registration, so ``import pvm_kernels`` never
imports triton and a user can still choose TRITON_INTERPRET after importing us.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .registration import define_python_backend, get_op
from .recompute import expand_merge, mlp_residual
from .registry import Backend, register_backend


def _kernels():
    from .. import triton_ops
    return triton_ops


def _retrieval_fwd(q, k, v, key_mask, kv_len, scale):
    return _kernels().retrieval_fwd(q, k, v, key_mask, kv_len, scale)


def _retrieval_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale):
    return _kernels().retrieval_bwd(grad_out, q, k, v, out, lse, key_mask, kv_len, scale)


def _retrieval_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          scale):
    return _kernels().retrieval_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, scale)


def _retrieval_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q, max_seqlen_k, scale):
    return _kernels().retrieval_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q,
                                           cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)


def _merge_fwd(expanded, gate, keep, ffn_output, eps):
    return _kernels().merge_fwd(expanded, gate, keep, ffn_output, eps)


def _merge_bwd(grad_out, expanded, gate, keep, rstd):
    return _kernels().merge_bwd(grad_out, expanded, gate, keep, rstd)


def _rms_norm_fwd(x, weight, eps):
    return _kernels().rms_norm_fwd(x, weight, eps)


def _rms_norm_bwd(grad_y, x, weight, rstd):
    return _kernels().rms_norm_bwd(grad_y, x, weight, rstd)


def _swiglu_fwd(gate, up):
    return _kernels().swiglu_fwd(gate, up)


def _swiglu_bwd(grad, gate, up):
    return _kernels().swiglu_bwd(grad, gate, up)


def _retrieval_qn_fwd(q, q_weight, k, v, key_mask, kv_len, scale, eps):
    return _kernels().retrieval_qn_fwd(q, q_weight, k, v, key_mask, kv_len, scale, eps)


def _retrieval_qn_bwd(grad_out, q, q_hat, q_weight, k, v, out, lse, key_mask, kv_len, scale,
                      eps):
    return _kernels().retrieval_qn_bwd(grad_out, q, q_hat, q_weight, k, v, out, lse, key_mask,
                                       kv_len, scale, eps)


def _retrieval_varlen_qn_fwd(q, q_weight, k, v, cu_q, cu_k, max_q, max_k, scale, eps):
    return _kernels().retrieval_varlen_qn_fwd(q, q_weight, k, v, cu_q, cu_k, max_q, max_k,
                                              scale, eps)


def _retrieval_varlen_qn_bwd(grad_out, q, q_hat, q_weight, k, v, out, lse, cu_q, cu_k, max_q,
                             max_k, scale, eps):
    return _kernels().retrieval_varlen_qn_bwd(grad_out, q, q_hat, q_weight, k, v, out, lse,
                                              cu_q, cu_k, max_q, max_k, scale, eps)


def _visual_kv_fwd(k, weight, mask, eps):
    return _kernels().visual_kv_fwd(k, weight, mask, eps)


def _paged_retrieval_fwd(q, kv, flags, block_visual, block_table, seq_lens, rows, scale):
    return _kernels().paged_retrieval_fwd(q, kv, flags, block_visual, block_table, seq_lens,
                                          rows, scale)


define_python_backend("triton", {
    "retrieval_fwd": _retrieval_fwd, "retrieval_bwd": _retrieval_bwd,
    "retrieval_varlen_fwd": _retrieval_varlen_fwd, "retrieval_varlen_bwd": _retrieval_varlen_bwd,
    "merge_fwd": _merge_fwd, "merge_bwd": _merge_bwd,
    "rms_norm_fwd": _rms_norm_fwd, "rms_norm_bwd": _rms_norm_bwd,
    "swiglu_fwd": _swiglu_fwd, "swiglu_bwd": _swiglu_bwd,
    "retrieval_qn_fwd": _retrieval_qn_fwd, "retrieval_qn_bwd": _retrieval_qn_bwd,
    "retrieval_varlen_qn_fwd": _retrieval_varlen_qn_fwd,
    "retrieval_varlen_qn_bwd": _retrieval_varlen_qn_bwd,
    "visual_kv_fwd": _visual_kv_fwd, "paged_retrieval_fwd": _paged_retrieval_fwd,
})


def triton_interpret_requested() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_check(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device_type == "cpu":
        if not triton_interpret_requested():
            return ("Triton compiles for GPUs; set TRITON_INTERPRET=1 before importing triton "
                    "to run its kernels on CPU tensors in the interpreter (slow, for testing)")
        from .triton_probe import interpreter_refusal
        return interpreter_refusal()
    return f"no Triton support for device type '{device_type}'"


def _triton_retrieval(q, k, v, key_mask, kv_len, scale):
    return get_op("triton", "retrieval_fwd")(q, k, v, key_mask, kv_len, scale)[0]


def _triton_retrieval_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale):
    return get_op("triton", "retrieval_varlen_fwd")(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                    max_seqlen_q, max_seqlen_k, scale)[0]


def _triton_merge(expanded, gate, keep, ffn_output, eps):
    return get_op("triton", "merge_fwd")(expanded, gate, keep, ffn_output, eps)[0]


def _triton_rms_norm(x, weight, eps):
    return get_op("triton", "rms_norm_fwd")(x, weight, eps)[0]


def _triton_swiglu(gate, up):
    return get_op("triton", "swiglu_fwd")(gate, up)


def _triton_visual_kv(k, weight, mask, eps):
    k_normed, _, kv_len, has_visual = get_op("triton", "visual_kv_fwd")(k, weight, mask, eps)
    return k_normed, kv_len, has_visual


def _triton_retrieval_qnorm(q, q_weight, eps, k, v, key_mask, kv_len, scale):
    return get_op("triton", "retrieval_qn_fwd")(q, q_weight, k, v, key_mask, kv_len, scale,
                                                eps)[0]


def _triton_retrieval_varlen_qnorm(q, q_weight, eps, k, v, cu_q, cu_k, max_q, max_k, scale):
    return get_op("triton", "retrieval_varlen_qn_fwd")(q, q_weight, k, v, cu_q, cu_k, max_q,
                                                       max_k, scale, eps)[0]


def _triton_paged_retrieval(q, kv, flags, block_visual, block_table, seq_lens, rows, scale):
    if _kernels().paged_retrieval.unsupported(q, kv, kv.shape[1]) is not None:
        return None
    return get_op("triton", "paged_retrieval_fwd")(q, kv, flags, block_visual, block_table,
                                                   seq_lens, rows, scale)


def _triton_head_dim(hd: int, dtype: torch.dtype) -> Optional[str]:
    return _kernels().retrieval.head_dim_unsupported(hd, dtype)


# On CPU the interpreter is far slower than the reference: usable there, never the default.
register_backend(Backend("triton", _triton_retrieval, _triton_merge, check=_triton_check,
                         default_rank={"cuda": 10}, head_dim_check=_triton_head_dim,
                         retrieval_varlen=_triton_retrieval_varlen, rms_norm=_triton_rms_norm,
                         swiglu=_triton_swiglu, retrieval_qnorm=_triton_retrieval_qnorm,
                         retrieval_varlen_qnorm=_triton_retrieval_varlen_qnorm,
                         visual_kv=_triton_visual_kv, expand_merge=expand_merge("triton"),
                         paged_retrieval=_triton_paged_retrieval,
                         mlp_residual=mlp_residual("triton")))
