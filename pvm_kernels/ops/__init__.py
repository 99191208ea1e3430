"""Ops layer: functional PVM ops, custom-op registration and backend dispatch."""
from .backends import (Backend, available_backends, backend_status, glue_status,
                       register_backend, resolve_backend)
from .functional import check_backend_dtype, check_backend_head_dim, pvm_merge, pvm_retrieval
from .varlen import cu_seqlens_from_lengths, pvm_retrieval_varlen

__all__ = ["pvm_retrieval", "pvm_retrieval_varlen", "cu_seqlens_from_lengths", "pvm_merge", "available_backends", "backend_status",
           "resolve_backend", "register_backend", "Backend", "check_backend_dtype",
           "check_backend_head_dim", "glue_status"]
