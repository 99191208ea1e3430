"""Argument checks shared by the functional ops and FusedPVM.

Each raises before any kernel launch: TypeError for a wrong type or dtype, ValueError for a
wrong shape or device, always naming the argument with the expected and the actual value.
They read tensor metadata only (never values), so they cost no device synchronisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t, dims: int, layout: Optional[str] = None) -> None:
    """A floating tensor of ``dims`` dimensions (``layout`` such as "[B, T, D]" for the
    message)."""
    check_tensor(name, t)
    if t.dim() != dims:
        want = layout or f"{dims} dims"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}"
                         if layout else f"{name} must have {want}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, "
                        f"float64), got dtype {_dtype(t.dtype)}")


def check_device(name: str, t: torch.Tensor, device: torch.device, other: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, {other} on {device}: all tensors must be "
                         f"on one device")


def check_like(name: str, t, shape: Sequence[int], device: torch.device,
               dtype: Optional[torch.dtype] = None, other: str = "the inputs") -> None:
    """None, or a tensor of exactly ``shape`` on ``device`` (and of ``dtype`` if given)."""
    if t is None:
        return
    check_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check_device(name, t, device, other)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {_dtype(t.dtype)}")


def check_embeddings(name: str, t, width: int, length: str) -> None:
    """A floating [B, <length>, width] tensor (e.g. hidden_states [B, T, D])."""
    layout = f"[B, {length}, {width}]"
    check_float(name, t, 3, layout)
    if t.shape[-1] != width:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
