"""Testing aids shared by the test suites and benchmarks of every backend.

``poisoned_outputs`` (NaN-filled kernel outputs), ``max_rel_err`` (the error metric the
tolerances are stated in) and builders of random PVM inputs.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch

from ._alloc import poisoned_outputs

__all__ = ["poisoned_outputs", "max_rel_err", "TOLERANCE", "random_mask", "double_params",
           "saved_tensor_bytes", "block_saved_bytes", "live_block"]

#: max_rel_err allowed per compute dtype against a float64 reference.
TOLERANCE: Dict[torch.dtype, float] = {
    torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10,
}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over every element (NaN anywhere -> inf).

    Normalising by the largest reference magnitude, not element-wise, keeps near-zero
    elements from dominating while still checking every element.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    if a.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def random_mask(batch: int, length: int, *, empty_rows=(), pad_from: Optional[Dict[int, int]] = None,
                holes: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[batch, length] bool mask: rows in ``empty_rows`` all False, ``pad_from[b] = n`` masks
    tokens n.. of row b, and a fraction ``holes`` of the remaining tokens is masked at random."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    if holes > 0:
        mask &= torch.rand(batch, length, generator=generator) >= holes
    for b, n in (pad_from or {}).items():
        mask[b, n:] = False
    for b in empty_rows:
        mask[b] = False
    return mask


def double_params(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The module's state as float64 CPU leaf tensors requiring grad (for reference
    gradients): the float64 reference runs on the CPU whatever device the module is on."""
    return {k: v.detach().to("cpu", torch.float64, copy=True).requires_grad_(v.is_floating_point())
            for k, v in module.state_dict().items()}


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs: the
    activation memory of a forward, measured the same way on any device, and under
    FakeTensorMode (no memory at all: shapes only). A storage saved through several views
    counts once, whole (it is what stays allocated). ``exclude``: tensors whose storages
    are not counted (the block's inputs and parameters, which exist anyway)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def live_block(config, dtype: torch.dtype = torch.float32, device="cpu", gate: float = 0.8,
               weight_std: float = 0.2):
    """A FusedPVM with a non-zero gate, norm gains in [0.5, 1.5] and weights ~ N(0,
    weight_std) (default larger than init so activations are O(1)): every path matters."""
    from .modules import FusedPVM
    block = FusedPVM(config)
    with torch.no_grad():
        block.gate_alpha.fill_(gate)
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0, weight_std)
    return block.to(device=device, dtype=dtype)


def block_saved_bytes(config, backend: str, T: int, Nv: int, dtype: torch.dtype = torch.bfloat16,
                      batch: int = 1, device: str = "cpu") -> int:
    """What a FusedPVM at ``config`` saves for backward (``saved_tensor_bytes``) in one
    forward on [batch, T, D] hidden states requiring grad, [batch, Nv, D] visual embeddings
    with a mask, and an FFN output, on ``backend``, not counting those inputs or the
    parameters (the call's stacked projection weights count: they live until the
    backward). Runs under
    FakeTensorMode: any size, no memory, no kernel (each op's fake implementation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from .modules import FusedPVM
    from .ops import resolve_backend
    resolve_backend(backend, torch.device(device))  # its usability probe runs real kernels
    old = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)  # parameters made fake in dtype and place: fake
        try:                            # parameters cannot be swapped by .to()
            with torch.device(device):
                block = FusedPVM(config)
        finally:
            torch.set_default_dtype(old)
        D = block.dims.hidden_size
        h = torch.randn(batch, T, D, dtype=dtype, device=device, requires_grad=True)
        visual = torch.randn(batch, Nv, D, dtype=dtype, device=device)
        ffn = torch.randn(batch, T, D, dtype=dtype, device=device)
        mask = torch.ones(batch, Nv, dtype=torch.bool, device=device)
        inputs = [h, visual, ffn, mask, *block.parameters()]
        return saved_tensor_bytes(
            lambda: block(h, visual, mask, ffn_output=ffn, backend=backend), inputs)
