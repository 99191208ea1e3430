"""Fused Triton kernels for PVM: one op per file, launch wrappers next to their kernels.

Kernel files know nothing of autograd, modules or transformers; ``pvm_kernels.ops`` wraps
them. Import this package only after deciding on ``TRITON_INTERPRET`` (it imports triton).
"""
from .merge import merge_bwd, merge_fwd
from .paged_retrieval import paged_retrieval_fwd
from .retrieval import (retrieval_bwd, retrieval_fwd, retrieval_qn_bwd, retrieval_qn_fwd,
                        retrieval_varlen_bwd, retrieval_varlen_fwd, retrieval_varlen_qn_bwd,
                        retrieval_varlen_qn_fwd)
from .rms_norm import rms_norm_bwd, rms_norm_fwd
from .swiglu import swiglu_bwd, swiglu_fwd
from .visual_kv import visual_kv_fwd

__all__ = ["retrieval_fwd", "retrieval_bwd", "retrieval_varlen_fwd", "retrieval_varlen_bwd",
           "merge_fwd", "merge_bwd", "rms_norm_fwd", "rms_norm_bwd", "swiglu_fwd", "swiglu_bwd",
           "retrieval_qn_fwd", "retrieval_qn_bwd", "retrieval_varlen_qn_fwd",
           "retrieval_varlen_qn_bwd", "visual_kv_fwd", "paged_retrieval_fwd"]
