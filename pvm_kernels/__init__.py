"""pvm-kernels: fused kernels and modules for Persistent Visual Memory (arXiv 2605.00814).

Public API: ``FusedPVM``, ``PVMConfig``, ``VisualMemory``, ``available_backends`` and the
functional ops ``pvm_retrieval`` / ``pvm_merge``.
"""
from .config import PVMConfig, PVMDims
from .memory import VisualMemory
from .modules import FusedPVM
from .ops import available_backends, backend_status, pvm_merge, pvm_retrieval

__version__ = "0.1.0"

__all__ = ["FusedPVM", "PVMConfig", "PVMDims", "VisualMemory", "available_backends",
           "backend_status", "pvm_retrieval", "pvm_merge", "__version__"]
