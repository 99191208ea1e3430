"""The compiled backends: ``cpu`` (pvm_kernels._C) and ``cuda`` (pvm_kernels._C_cuda).

Both run the same ops, ``pvm_kernels::native_*``, defined once in csrc/ops.cpp with a CPU
and a CUDA implementation; their fake implementations and autograd formulas are attached
here from registration.py, exactly as for the Triton ops. A missing build, or one made
for another torch that cannot be rebuilt (native_loader.py), makes the backend unavailable,
with the reason in ``backend_status()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .native_loader import load_all
from .recompute import expand_merge
from .registration import attach_fake_and_autograd, get_op
from .registry import Backend, register_backend

#: How each extension was loaded (native_loader.ExtensionLoad), by name: "_C", "_C_cuda".
EXTENSION_LOADS = load_all()
CPU_LOAD_ERROR = EXTENSION_LOADS["_C"].error
CUDA_LOAD_ERROR = EXTENSION_LOADS["_C_cuda"].error
if CPU_LOAD_ERROR is None:
    attach_fake_and_autograd("native")


def _native_retrieval(q, k, v, key_mask, kv_len, scale):
    return get_op("native", "retrieval_fwd")(q, k, v, key_mask, kv_len, scale)[0]


def _native_retrieval_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             scale):
    return get_op("native", "retrieval_varlen_fwd")(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                    max_seqlen_q, max_seqlen_k, scale)[0]


def _native_merge(expanded, gate, keep, ffn_output, eps):
    return get_op("native", "merge_fwd")(expanded, gate, keep, ffn_output, eps)[0]


def _cpu_check(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"the cpu backend runs on CPU tensors, not '{device_type}'"
    return CPU_LOAD_ERROR


def _cuda_check(device_type: str) -> Optional[str]:
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not '{device_type}'"
    if CUDA_LOAD_ERROR is not None:
        return CUDA_LOAD_ERROR
    return None if torch.cuda.is_available() else "CUDA is not available"


#: Largest head dim of the CUDA retrieval kernels (csrc/cuda/launch.h kMaxHeadDim).
CUDA_MAX_HEAD_DIM = 256


def _cuda_head_dim(hd: int, dtype: torch.dtype) -> Optional[str]:
    return None if 1 <= hd <= CUDA_MAX_HEAD_DIM else \
        f"head_dim must be from 1 to {CUDA_MAX_HEAD_DIM}, got {hd}"


# cpu beats the reference at decode shapes (bench/test_bench_native.py): the CPU default.
# cuda ranks after triton until GPU measurements show it faster (bench/results).
register_backend(Backend("cpu", _native_retrieval, _native_merge, check=_cpu_check,
                         default_rank={"cpu": 1}, retrieval_varlen=_native_retrieval_varlen,
                         expand_merge=expand_merge("native")))
register_backend(Backend("cuda", _native_retrieval, _native_merge, check=_cuda_check,
                         default_rank={"cuda": 20}, head_dim_check=_cuda_head_dim,
                         retrieval_varlen=_native_retrieval_varlen,
                         expand_merge=expand_merge("native")))
