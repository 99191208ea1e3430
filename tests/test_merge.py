"""pvm_merge on every backend against the float64 reference: values and gradients."""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import pvm_merge
from pvm_kernels.reference import merge_reference
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs

# (leading shape, D): odd D not a power of two, a single row, 8B-wide rows.
SHAPES = [((2, 5), 64), ((3, 7), 100), ((1, 1), 4096), ((4,), 33)]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_ffn", [True, False], ids=["ffn", "no_ffn"])
@pytest.mark.parametrize("with_keep", [True, False], ids=["keep", "all"])
def test_merge_matches_reference(backend, device, dtype, shape, with_ffn, with_keep):
    lead, D = shape
    e = (torch.randn(*lead, D, dtype=torch.float64) * 3).to(dtype)
    ffn = torch.randn(*lead, D, dtype=torch.float64).to(dtype) if with_ffn else None
    gate = torch.tensor([0.7], dtype=dtype)
    keep = (torch.rand(*lead) > 0.3) if with_keep else None
    leaves = [t for t in (e, gate, ffn) if t is not None]
    dev = [t.to(device).requires_grad_() for t in leaves]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    d_e, d_gate, d_ffn = dev[0], dev[1], dev[2] if with_ffn else None
    r_e, r_gate, r_ffn = ref[0], ref[1], ref[2] if with_ffn else None
    expected = merge_reference(r_e, r_gate, keep, r_ffn, 1e-6)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    with poisoned_outputs():
        out = pvm_merge(d_e, d_gate, None if keep is None else keep.to(device), d_ffn, 1e-6,
                        backend=backend)
        out.backward(grad.to(dtype).to(device))
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == e.shape
    assert max_rel_err(out, expected) < tol
    assert max_rel_err(d_e.grad, r_e.grad) < tol
    if with_ffn:
        assert max_rel_err(d_ffn.grad, r_ffn.grad) < tol
    # d gate is a sum of N * D signed terms that may cancel: measure its error against the
    # mass of those terms (a plain relative error would fail eager bf16 PyTorch itself).
    n = merge_reference(r_e.detach(), torch.ones(1, dtype=torch.float64), keep, None, 1e-6)
    mass = (grad * n).abs().sum().item()
    assert abs(d_gate.grad.double().item() - r_gate.grad.item()) <= tol * mass
    if keep is not None and not with_ffn:
        assert (out.detach().cpu()[~keep] == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_merge_gate_zero_is_exactly_inert(backend, device):
    e = torch.randn(3, 4, 128, device=device, dtype=torch.bfloat16)
    ffn = torch.randn_like(e)
    gate = torch.zeros(1, device=device, dtype=torch.bfloat16)
    assert torch.equal(pvm_merge(e, gate, None, ffn, backend=backend), ffn)
    assert (pvm_merge(e, gate, backend=backend) == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_merge_non_contiguous(backend, device):
    e = torch.randn(4, 6, 40, device=device).transpose(0, 1)
    ffn = torch.randn(40, 6, 4, device=device).permute(1, 2, 0)
    assert not e.is_contiguous() and not ffn.is_contiguous()
    gate = torch.tensor([1.3], device=device)
    got = pvm_merge(e, gate, None, ffn, backend=backend)
    assert max_rel_err(got, merge_reference(e.double(), gate.double(), None, ffn.double())) < 1e-5


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_merge_keep_broadcast_from_one_flag_per_sample(backend, device):
    """FusedPVM passes keep = has_visual[:, None].expand(B, T): at B 1 that flattens to a
    stride-0 view, which a kernel must not read at unit stride."""
    for keep_one in (True, False):
        e = torch.randn(1, 9, 40, device=device, requires_grad=True)
        keep = torch.tensor([[keep_one]], device=device).expand(1, 9)
        gate = torch.tensor([0.7], device=device, requires_grad=True)
        got = pvm_merge(e, gate, keep, backend=backend)
        e64, g64 = e.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
        want = merge_reference(e64, g64, keep.contiguous())
        assert max_rel_err(got, want) < 1e-5
        grad = torch.randn_like(want)
        got.backward(grad.float())
        want.backward(grad)
        assert max_rel_err(e.grad, e64.grad) < 1e-5 and max_rel_err(gate.grad, g64.grad) < 1e-5
