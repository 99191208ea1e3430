"""pvm-kernels: fused kernels and modules for Persistent Visual Memory (arXiv 2605.00814).

Public API: ``FusedPVM``, ``PVMConfig``, ``VisualMemory``, ``available_backends``, the
functional ops ``pvm_retrieval`` / ``pvm_retrieval_varlen`` / ``pvm_merge``, and the Qwen3-VL integration
``apply_pvm_to_qwen3_vl`` / ``load_pvm_qwen3_vl`` / ``PVMQwen3VLForConditionalGeneration`` /
``PVMQwen3VLModel`` (transformers imported only when used).
"""
from .config import PVMConfig, PVMDims
from .memory import PackedVisualMemory, VisualMemory
from .modules import FusedPVM
from .ops import (available_backends, backend_status, cu_seqlens_from_lengths, pvm_merge,
                  pvm_retrieval, pvm_retrieval_varlen)


def apply_pvm_to_qwen3_vl(model, layers=None, pvm_hidden_size=None, backend=None):
    """Add PVM to a transformers Qwen3-VL model in place (see integrations.qwen3_vl)."""
    from .integrations.qwen3_vl import apply_pvm_to_qwen3_vl as apply
    return apply(model, layers=layers, pvm_hidden_size=pvm_hidden_size, backend=backend)


def load_pvm_qwen3_vl(path, **from_pretrained_kwargs):
    """Load a published PVM checkpoint into a stock Qwen3-VL (see integrations.training)."""
    from .integrations.training import load_pvm_qwen3_vl as load
    return load(path, **from_pretrained_kwargs)


_TRANSFORMERS_CLASSES = ("PVMQwen3VLForConditionalGeneration", "PVMQwen3VLModel")


def __getattr__(name):
    """The transformers classes, imported on first use (importing transformers takes
    seconds; the kernels and FusedPVM do not need it)."""
    if name in _TRANSFORMERS_CLASSES:
        from .integrations import qwen3_vl_model
        return getattr(qwen3_vl_model, name)
    raise AttributeError(f"module 'pvm_kernels' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["FusedPVM", "PVMConfig", "PVMDims", "VisualMemory", "PackedVisualMemory", "available_backends",
           "backend_status", "pvm_retrieval", "pvm_retrieval_varlen", "cu_seqlens_from_lengths",
           "pvm_merge", "apply_pvm_to_qwen3_vl", "load_pvm_qwen3_vl",
           "PVMQwen3VLForConditionalGeneration", "PVMQwen3VLModel",
           "__version__"]
