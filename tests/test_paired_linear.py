"""Two Linears as one GEMM (pvm_kernels/modules/paired_linear.py): the same values and
gradients as the two modules, and a block that follows every change of its weights
(in place, through ``.data`` as PEFT's merge does, optimizer steps): the stacked weight
is made per call, never kept."""
import copy

import pytest
import torch
from torch import nn

from pvm_kernels import FusedPVM, PVMConfig, available_backends
from pvm_kernels.launches import LaunchCounter
from pvm_kernels.modules.paired_linear import paired_linear, stack_weights
from pvm_kernels.testing import live_block


# the compiled CPU backend stacks projections (the reference computes the block as written)
BACKEND = "cpu"
needs_cpu_backend = pytest.mark.skipif(BACKEND not in available_backends("cpu"),
                                       reason="needs the compiled cpu backend")


def pair(k=24, oa=16, ob=8, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Linear(k, oa, bias=False).to(dtype), nn.Linear(k, ob, bias=False).to(dtype)


@pytest.mark.parametrize("use", ["both", "a", "b"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_values_and_gradients_are_the_two_linears(use, x_grad):
    a, b = pair()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=x_grad)
    ya, yb = paired_linear(x, a, b, stack_weights(a, b))
    assert ya.shape == (3, 5, 16) and yb.shape == (3, 5, 8)
    torch.testing.assert_close(ya, a(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(yb, b(x), rtol=0, atol=1e-12)
    ga, gb = torch.randn_like(ya), torch.randn_like(yb)
    loss = {"both": (ya * ga).sum() + (yb * gb).sum(), "a": (ya * ga).sum(),
            "b": (yb * gb).sum()}[use]
    got = torch.autograd.grad(loss, [t for t in (x, a.weight, b.weight) if t.requires_grad],
                              allow_unused=True)
    ra, rb = a(x), b(x)
    ref_loss = {"both": (ra * ga).sum() + (rb * gb).sum(), "a": (ra * ga).sum(),
                "b": (rb * gb).sum()}[use]
    ref = torch.autograd.grad(ref_loss, [t for t in (x, a.weight, b.weight) if t.requires_grad],
                              allow_unused=True)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=0,
                                   atol=1e-12)


def test_one_gemm_forward_and_three_kernels_backward():
    a, b = pair(dtype=torch.float32)
    x = torch.randn(10, 24, requires_grad=True)
    stacked = stack_weights(a, b)
    with LaunchCounter() as c:
        ya, yb = paired_linear(x, a, b, stacked)
    assert c.by_op() == {"aten.mm": 1}, c.ops
    grads = [torch.ones_like(ya), torch.ones_like(yb)]
    with LaunchCounter() as c:
        torch.autograd.backward([ya, yb], grads)
    assert c.by_op() == {"aten.cat": 1, "aten.mm": 2}, c.ops  # dy, then dx and dW


def _cfg():
    return PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=96, pvm_hidden_size=32)


@needs_cpu_backend
@pytest.mark.parametrize("foreach", [False, True])
def test_block_after_optimizer_steps_matches_an_unpaired_copy(foreach):
    """Training: every step changes the weights in place (per tensor or with _foreach
    kernels); the stacked GEMMs must follow."""
    block = live_block(_cfg(), torch.float32)
    twin = copy.deepcopy(block)
    for mod in (twin.mlp.gate_proj, twin.cross_attn.k_proj):  # a hook: not plain, unpaired
        mod.register_forward_hook(lambda m, i, o: None)
    opt = torch.optim.SGD(block.parameters(), lr=0.5, foreach=foreach)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.5, foreach=foreach)
    h, v = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    for _ in range(2):
        out = block(h, v, backend=BACKEND)
        torch.testing.assert_close(out, twin(h, v, backend=BACKEND), rtol=1e-5, atol=1e-5)
        out.square().sum().backward()  # a real backward through the stacked GEMMs ...
        for p, q in zip(block.parameters(), twin.parameters()):
            p.grad = q.grad = 0.1 * torch.randn_like(p)  # ... then a large, known step
        opt.step()
        opt_twin.step()
    torch.testing.assert_close(block(h, v, backend=BACKEND), twin(h, v, backend=BACKEND),
                               rtol=1e-5, atol=1e-5)


@needs_cpu_backend
def test_weights_edited_through_data_are_seen():
    """``weight.data += delta`` (PEFT's merge) moves neither the version counter nor the
    address: only a stacked weight made per call can follow it."""
    block = live_block(_cfg(), torch.float32)
    twin = copy.deepcopy(block)
    for mod in (twin.mlp.gate_proj, twin.cross_attn.k_proj):  # a hook: not plain, unpaired
        mod.register_forward_hook(lambda m, i, o: None)
    h, v = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    with torch.no_grad():
        block(h, v, backend=BACKEND)
        for m in (block, twin):
            for lin in (m.mlp.up_proj, m.cross_attn.v_proj):
                lin.weight.data += 0.5
        torch.testing.assert_close(block(h, v, backend=BACKEND), twin(h, v, backend=BACKEND),
                                   rtol=1e-5, atol=1e-5)


def test_the_reference_backend_computes_the_block_as_written():
    block = FusedPVM(_cfg())
    with LaunchCounter() as c:
        block(torch.randn(1, 3, 64), torch.randn(1, 4, 64), backend="reference")
    assert "aten.cat" not in c.by_op()
