"""Backend registry and selection: which implementation runs the PVM ops, and why not.

A backend supplies ``retrieval`` and ``merge`` callables (autograd-capable) and says, per
device type, whether it can run there and how it ranks as the default. Asking for a
backend that cannot run raises; nothing falls back silently to another implementation.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch

from .. import reference
from . import triton_backend  # noqa: F401  (defines the triton ops; imports no triton)
from .registration import get_op


@dataclass(frozen=True)
class Backend:
    """One implementation of the PVM ops.

    retrieval(q, k, v, key_mask, kv_len, scale) -> out;  merge(expanded, gate, keep,
    ffn_output, eps) -> out. ``check(device_type)`` returns None when usable there, else
    the reason. ``default_rank[device_type]``: lower is preferred by ``backend=None``.
    """

    name: str
    retrieval: Callable
    merge: Callable
    check: Callable[[str], Optional[str]]
    default_rank: Dict[str, int] = field(default_factory=dict)


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend (used by pvm_kernels itself and by extensions)."""
    _REGISTRY[backend.name] = backend
    _CHECKS.clear()


# A plain dict, not functools.lru_cache: torch.compile reads it as a constant instead of
# tracing through the cache wrapper.
_CHECKS: Dict[tuple, Optional[str]] = {}


def _check_cached(name: str, device_type: str) -> Optional[str]:
    key = (name, device_type)
    if key not in _CHECKS:
        _CHECKS[key] = _REGISTRY[name].check(device_type)
    return _CHECKS[key]


def _machine_device_types() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_status(device: Union[str, torch.device, None] = None) -> Dict[str, Optional[str]]:
    """{backend name: None if usable on ``device`` (default: any device here), else why not}."""
    types = [torch.device(device).type] if device is not None else _machine_device_types()
    status = {}
    for name in _REGISTRY:
        reasons = [_check_cached(name, t) for t in types]
        status[name] = None if any(r is None for r in reasons) else "; ".join(
            f"{t}: {r}" for t, r in zip(types, reasons))
    return status


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Names of the backends usable on ``device`` (default: on any device of this machine)."""
    return [name for name, why in backend_status(device).items() if why is None]


def resolve_backend(name: Optional[str], device: torch.device) -> Backend:
    """The backend called ``name`` (or the preferred one for ``device`` when None).

    Raises ValueError naming the backend and the reason when it cannot run on ``device``.
    """
    dtype_ = device.type
    if name is None:
        ranked = sorted((b.default_rank[dtype_], b.name) for b in _REGISTRY.values()
                        if dtype_ in b.default_rank and _check_cached(b.name, dtype_) is None)
        if not ranked:
            raise ValueError(f"no PVM backend can run on device '{device}'")
        return _REGISTRY[ranked[0][1]]
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; known backends: {sorted(_REGISTRY)}")
    why = _check_cached(name, dtype_)
    if why is not None:
        raise ValueError(f"backend={name!r} cannot run on device '{device}': {why}")
    return _REGISTRY[name]


# ---- the reference backend ---------------------------------------------------------------

def _reference_retrieval(q, k, v, key_mask, kv_len, scale):
    if kv_len is not None:
        in_len = torch.arange(k.shape[1], device=k.device)[None, :] < kv_len[:, None]
        key_mask = in_len if key_mask is None else key_mask & in_len
    return reference.retrieval_reference(q, k, v, key_mask, scale)


def _reference_merge(expanded, gate, keep, ffn_output, eps):
    return reference.merge_reference(expanded, gate, keep, ffn_output, eps)


register_backend(Backend("reference", _reference_retrieval, _reference_merge,
                         check=lambda device_type: None,
                         default_rank={"cpu": 100, "cuda": 100}))


# ---- the triton backend ------------------------------------------------------------------

def triton_interpret_requested() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors in its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_check(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device_type == "cpu":
        return None if triton_interpret_requested() else (
            "Triton compiles for GPUs; set TRITON_INTERPRET=1 before importing triton to run "
            "its kernels on CPU tensors in the interpreter (slow, for testing)")
    return f"no Triton support for device type '{device_type}'"


def _triton_retrieval(q, k, v, key_mask, kv_len, scale):
    return get_op("triton", "retrieval_fwd")(q, k, v, key_mask, kv_len, scale)[0]


def _triton_merge(expanded, gate, keep, ffn_output, eps):
    return get_op("triton", "merge_fwd")(expanded, gate, keep, ffn_output, eps)[0]


# On CPU the interpreter is far slower than the reference: usable there, never the default.
register_backend(Backend("triton", _triton_retrieval, _triton_merge, check=_triton_check,
                         default_rank={"cuda": 10}))
