"""torch.library registration of the PVM ops, shared by every compiled/kernel backend.

Each backend X provides ops in the ``pvm_kernels`` namespace with the schemas below:
``X_retrieval_fwd``, ``X_retrieval_bwd``, ``X_retrieval_varlen_fwd``,
``X_retrieval_varlen_bwd``, ``X_merge_fwd``, ``X_merge_bwd``. Whatever
implements them (Triton from Python here, C++ through TORCH_LIBRARY in csrc/), the fake
(meta) functions and the autograd formulas are the ones in this file, so torch.compile
traces every backend the same way.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

NAMESPACE = "pvm_kernels"

SCHEMAS: Dict[str, str] = {
    "retrieval_fwd": "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? kv_len, "
                     "float scale) -> (Tensor, Tensor)",
    "retrieval_bwd": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                     "Tensor? key_mask, Tensor? kv_len, float scale) -> (Tensor, Tensor, Tensor)",
    # Varlen (packed, flash-attention's cu_seqlens): q [total_q, H, hd], k/v [total_k, Hkv,
    # hd], lse [H, total_q]; sequence b's queries attend to its own keys only.
    "retrieval_varlen_fwd": "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
                            "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
                            "float scale) -> (Tensor, Tensor)",
    "retrieval_varlen_bwd": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
                            "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                            "int max_seqlen_q, int max_seqlen_k, float scale) "
                            "-> (Tensor, Tensor, Tensor)",
    "merge_fwd": "(Tensor expanded, Tensor gate, Tensor? keep, Tensor? ffn_output, float eps) "
                 "-> (Tensor, Tensor)",
    "merge_bwd": "(Tensor grad_out, Tensor expanded, Tensor gate, Tensor? keep, Tensor rstd) "
                 "-> (Tensor, Tensor)",
}


#: The block's glue around the retrieval, fused (issue 24): the Qwen RMSNorm with a gain
#: (rstd [rows] float32 saved for the backward) and SwiGLU. A backend defines these or
#: runs the PyTorch composite (the Backend fields rms_norm, swiglu, retrieval_qnorm,
#: visual_kv: registry.py; glue_status()).
GLUE_SCHEMAS: Dict[str, str] = {
    "rms_norm_fwd": "(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)",
    "rms_norm_bwd": "(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
    "swiglu_fwd": "(Tensor gate, Tensor up) -> Tensor",
    "swiglu_bwd": "(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)",
    # The visual side's k_norm with the memory's metadata: (k_norm(k), rstd, kv_len int32
    # [B], has_visual bool [B]); its backward is rms_norm_bwd.
    "visual_kv_fwd": "(Tensor k, Tensor weight, Tensor? mask, float eps) "
                     "-> (Tensor, Tensor, Tensor, Tensor)",
    # Single-token queries' retrieval read in place from a paged KV cache (ops/paged.py):
    # (a [T, H, hd], has_visual bool [T]). Inference only: no backward.
    "paged_retrieval_fwd": "(Tensor q, Tensor kv, Tensor flags, Tensor block_visual, "
                           "Tensor block_table, Tensor seq_lens, Tensor rows, float scale) "
                           "-> (Tensor, Tensor)",
    # The retrieval with q_norm fused: q is q_proj's output, q_weight the norm's gain [hd];
    # the forward also returns q_hat = q_norm(q) (what the backward's scores read), the
    # backward also the gain's gradient (dq, dq_weight, dk, dv).
    "retrieval_qn_fwd": "(Tensor q, Tensor q_weight, Tensor k, Tensor v, Tensor? key_mask, "
                        "Tensor? kv_len, float scale, float eps) -> (Tensor, Tensor, Tensor)",
    "retrieval_qn_bwd": "(Tensor grad_out, Tensor q, Tensor q_hat, Tensor q_weight, Tensor k, "
                        "Tensor v, Tensor out, Tensor lse, Tensor? key_mask, Tensor? kv_len, "
                        "float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    "retrieval_varlen_qn_fwd": "(Tensor q, Tensor q_weight, Tensor k, Tensor v, "
                               "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
                               "int max_seqlen_k, float scale, float eps) "
                               "-> (Tensor, Tensor, Tensor)",
    "retrieval_varlen_qn_bwd": "(Tensor grad_out, Tensor q, Tensor q_hat, Tensor q_weight, "
                               "Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
                               "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
                               "float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
}


def op_name(backend: str, op: str) -> str:
    return f"{NAMESPACE}::{backend}_{op}"


def get_op(backend: str, op: str):
    return getattr(getattr(torch.ops, NAMESPACE), f"{backend}_{op}").default


# ---- fake (meta) implementations: shapes and dtypes only -------------------------------

def retrieval_fwd_fake(q, k, v, key_mask, kv_len, scale):
    B, T, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, T), dtype=torch.float32)


def retrieval_bwd_fake(grad_out, q, k, v, out, lse, key_mask, kv_len, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def retrieval_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, scale):
    total_q, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, total_q), dtype=torch.float32)


def retrieval_varlen_bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q, max_seqlen_k, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def merge_fwd_fake(expanded, gate, keep, ffn_output, eps):
    n = expanded.numel() // expanded.shape[-1] if expanded.shape[-1] else 0
    return expanded.new_empty(expanded.shape), expanded.new_empty((n,), dtype=torch.float32)


def merge_bwd_fake(grad_out, expanded, gate, keep, rstd):
    return expanded.new_empty(expanded.shape), gate.new_empty(gate.shape)


def rms_norm_fwd_fake(x, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32)


def rms_norm_bwd_fake(grad_y, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def swiglu_fwd_fake(gate, up):
    return gate.new_empty(gate.shape)


def swiglu_bwd_fake(grad, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def visual_kv_fwd_fake(k, weight, mask, eps):
    rows = k.numel() // k.shape[-1] if k.shape[-1] else 0
    return (k.new_empty(k.shape), k.new_empty((rows,), dtype=torch.float32),
            k.new_empty((k.shape[0],), dtype=torch.int32),
            k.new_empty((k.shape[0],), dtype=torch.bool))


def retrieval_qn_fwd_fake(q, q_weight, k, v, key_mask, kv_len, scale, eps):
    return (*retrieval_fwd_fake(q, k, v, key_mask, kv_len, scale), q.new_empty(q.shape))


def retrieval_qn_bwd_fake(grad_out, q, q_hat, q_weight, k, v, out, lse, key_mask, kv_len,
                          scale, eps):
    return (q.new_empty(q.shape), q_weight.new_empty(q_weight.shape), k.new_empty(k.shape),
            v.new_empty(v.shape))


def retrieval_varlen_qn_fwd_fake(q, q_weight, k, v, cu_q, cu_k, max_q, max_k, scale, eps):
    return (*retrieval_varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, scale),
            q.new_empty(q.shape))


def retrieval_varlen_qn_bwd_fake(grad_out, q, q_hat, q_weight, k, v, out, lse, cu_q, cu_k,
                                 max_q, max_k, scale, eps):
    return retrieval_qn_bwd_fake(grad_out, q, q_hat, q_weight, k, v, out, lse, None, None,
                                 scale, eps)


def paged_retrieval_fwd_fake(q, kv, flags, block_visual, block_table, seq_lens, rows, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[0],), dtype=torch.bool)


FAKES: Dict[str, Callable] = {
    "paged_retrieval_fwd": paged_retrieval_fwd_fake,
    "rms_norm_fwd": rms_norm_fwd_fake, "rms_norm_bwd": rms_norm_bwd_fake,
    "swiglu_fwd": swiglu_fwd_fake, "swiglu_bwd": swiglu_bwd_fake,
    "visual_kv_fwd": visual_kv_fwd_fake,
    "retrieval_qn_fwd": retrieval_qn_fwd_fake, "retrieval_qn_bwd": retrieval_qn_bwd_fake,
    "retrieval_varlen_qn_fwd": retrieval_varlen_qn_fwd_fake,
    "retrieval_varlen_qn_bwd": retrieval_varlen_qn_bwd_fake,
    "retrieval_fwd": retrieval_fwd_fake, "retrieval_bwd": retrieval_bwd_fake,
    "retrieval_varlen_fwd": retrieval_varlen_fwd_fake,
    "retrieval_varlen_bwd": retrieval_varlen_bwd_fake,
    "merge_fwd": merge_fwd_fake, "merge_bwd": merge_bwd_fake,
}


# ---- autograd ----------------------------------------------------------------------------

def _autograd_for(backend: str):
    """setup_context/backward pairs for ``backend``'s forward ops (backward calls its bwd op)."""

    # Outputs that only the backward reads (lse, rstd) get no gradient: not materialised
    # as zeros, which would be a kernel launch per op and backward.
    def retrieval_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        q, k, v, key_mask, kv_len, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_mask, kv_len)
        ctx.scale = scale

    def retrieval_backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return None, None, None, None, None, None
        q, k, v, out, lse, key_mask, kv_len = ctx.saved_tensors
        dq, dk, dv = get_op(backend, "retrieval_bwd")(
            grad_out, q, k, v, out, lse, key_mask, kv_len, ctx.scale)
        return dq, dk, dv, None, None, None

    def varlen_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale

    def varlen_backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return None, None, None, None, None, None, None, None
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = get_op(backend, "retrieval_varlen_bwd")(
            grad_out, q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale)
        return dq, dk, dv, None, None, None, None, None

    def merge_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        expanded, gate, keep, ffn_output, eps = inputs
        ctx.save_for_backward(expanded, gate, keep, output[1])
        ctx.has_ffn = ffn_output is not None

    def merge_backward(ctx, grad_out, _grad_rstd):
        if grad_out is None:
            return None, None, None, None, None
        expanded, gate, keep, rstd = ctx.saved_tensors
        d_expanded, d_gate = get_op(backend, "merge_bwd")(grad_out, expanded, gate, keep, rstd)
        return d_expanded, d_gate, None, (grad_out if ctx.has_ffn else None), None

    def rms_norm_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        x, weight, _eps = inputs
        ctx.save_for_backward(x, weight, output[1])

    def rms_norm_backward(ctx, grad_y, _grad_rstd):
        if grad_y is None:
            return None, None, None
        x, weight, rstd = ctx.saved_tensors
        dx, dw = get_op(backend, "rms_norm_bwd")(grad_y, x, weight, rstd)
        return dx, dw, None

    def swiglu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # gate and up only: silu(gate) is recomputed

    def swiglu_backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return get_op(backend, "swiglu_bwd")(grad, gate, up)

    def visual_kv_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        k, weight, _mask, _eps = inputs
        ctx.save_for_backward(k, weight, output[1])

    def visual_kv_backward(ctx, grad_k, _grad_rstd, _grad_len, _grad_has):
        if grad_k is None:
            return None, None, None, None
        k, weight, rstd = ctx.saved_tensors
        dk, dw = get_op(backend, "rms_norm_bwd")(grad_k, k, weight, rstd)
        return dk, dw, None, None

    def qn_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        q, q_weight, k, v, key_mask, kv_len, scale, eps = inputs
        out, lse, q_hat = output
        ctx.save_for_backward(q, q_hat, q_weight, k, v, out, lse, key_mask, kv_len)
        ctx.scale, ctx.eps = scale, eps

    def qn_backward(ctx, grad_out, _grad_lse, _grad_q_hat):
        if grad_out is None:
            return (None,) * 8
        q, q_hat, q_weight, k, v, out, lse, key_mask, kv_len = ctx.saved_tensors
        dq, dqw, dk, dv = get_op(backend, "retrieval_qn_bwd")(
            grad_out, q, q_hat, q_weight, k, v, out, lse, key_mask, kv_len, ctx.scale, ctx.eps)
        return dq, dqw, dk, dv, None, None, None, None

    def varlen_qn_setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        q, q_weight, k, v, cu_q, cu_k, max_q, max_k, scale, eps = inputs
        out, lse, q_hat = output
        ctx.save_for_backward(q, q_hat, q_weight, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale, ctx.eps = max_q, max_k, scale, eps

    def varlen_qn_backward(ctx, grad_out, _grad_lse, _grad_q_hat):
        if grad_out is None:
            return (None,) * 10
        q, q_hat, q_weight, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dqw, dk, dv = get_op(backend, "retrieval_varlen_qn_bwd")(
            grad_out, q, q_hat, q_weight, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k,
            ctx.scale, ctx.eps)
        return dq, dqw, dk, dv, None, None, None, None, None, None

    return {"rms_norm_fwd": (rms_norm_setup, rms_norm_backward),
            "visual_kv_fwd": (visual_kv_setup, visual_kv_backward),
            "retrieval_qn_fwd": (qn_setup, qn_backward),
            "retrieval_varlen_qn_fwd": (varlen_qn_setup, varlen_qn_backward),
            "swiglu_fwd": (swiglu_setup, swiglu_backward),
            "retrieval_fwd": (retrieval_setup, retrieval_backward),
            "retrieval_varlen_fwd": (varlen_setup, varlen_backward),
            "merge_fwd": (merge_setup, merge_backward)}


def attach_fake_and_autograd(backend: str, ops=None) -> None:
    """Give ``backend``'s already-defined ops (``ops``: those names only, default all of
    SCHEMAS) their fake impls and autograd formulas."""
    ops = set(SCHEMAS) if ops is None else set(ops)
    for op, fake in FAKES.items():
        if op in ops:
            torch.library.register_fake(op_name(backend, op), fake)
    for op, (setup, backward) in _autograd_for(backend).items():
        if op in ops:
            torch.library.register_autograd(op_name(backend, op), backward,
                                            setup_context=setup)


#: {"<backend>_<op>": the Python function implementing that custom op}: what
#: pvm_kernels.launches.LaunchCounter runs to see the aten ops inside an op.
PYTHON_IMPLS: Dict[str, Callable] = {}


def define_python_backend(backend: str, impls: Dict[str, Callable],
                          device_types: Optional[str] = None) -> None:
    """Define ``backend``'s ops (any of SCHEMAS) from Python implementations (e.g. Triton
    launchers), with their fake impls and autograd formulas."""
    for op, fn in impls.items():
        PYTHON_IMPLS[f"{backend}_{op}"] = fn
        torch.library.custom_op(op_name(backend, op), fn, mutates_args=(),
                                device_types=device_types,
                                schema=SCHEMAS[op] if op in SCHEMAS else GLUE_SCHEMAS[op])
    attach_fake_and_autograd(backend, impls)
