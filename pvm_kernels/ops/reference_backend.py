"""The ``reference`` backend: the plain PyTorch spec, any device and float dtype."""
from __future__ import annotations

import torch

from .. import reference
from .registry import Backend, register_backend


def _reference_retrieval(q, k, v, key_mask, kv_len, scale):
    if kv_len is not None:
        in_len = torch.arange(k.shape[1], device=k.device)[None, :] < kv_len[:, None]
        key_mask = in_len if key_mask is None else key_mask & in_len
    return reference.retrieval_reference(q, k, v, key_mask, scale)


def _reference_retrieval_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                scale):
    return reference.retrieval_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)


def _reference_merge(expanded, gate, keep, ffn_output, eps):
    return reference.merge_reference(expanded, gate, keep, ffn_output, eps)


register_backend(Backend("reference", _reference_retrieval, _reference_merge,
                         check=lambda device_type: None,
                         default_rank={"cpu": 100, "cuda": 100},
                         dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                         retrieval_varlen=_reference_retrieval_varlen,
                         stacked_projections=False))
