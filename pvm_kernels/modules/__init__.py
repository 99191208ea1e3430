"""nn.Module wrappers around the PVM ops."""
from .fused_pvm import FusedPVM

__all__ = ["FusedPVM"]
