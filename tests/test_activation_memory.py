"""Training memory: what the block saves for backward has no T x Nv term on the fused path.

Measured device-independently by summing the bytes of every tensor autograd saves.
"""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import FusedPVM, PVMConfig
from pvm_kernels.testing import saved_tensor_bytes


def saved_bytes(backend, device, T, Nv):
    cfg = PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, pvm_hidden_size=64)
    block = FusedPVM(cfg).to(device)
    h = torch.randn(1, T, 64, device=device, requires_grad=True)
    visual = torch.randn(1, Nv, 64, device=device, requires_grad=True)
    return saved_tensor_bytes(lambda: block(h, visual, backend=backend))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_saved_memory_is_additive_in_T_and_Nv(backend, device):
    # f(T, Nv) = a*T + b*Nv + c has a zero mixed difference; any T*Nv term makes it grow.
    T, Nv = 64, 96
    mixed = (saved_bytes(backend, device, 2 * T, 2 * Nv) - saved_bytes(backend, device, 2 * T, Nv)
             - saved_bytes(backend, device, T, 2 * Nv) + saved_bytes(backend, device, T, Nv))
    if backend == "reference":
        # The materialised [B, H, T, Nv] scores: the check does see a T x Nv term.
        assert mixed >= 4 * T * Nv * 4
    else:
        assert mixed == 0
