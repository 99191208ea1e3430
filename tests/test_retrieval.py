"""pvm_retrieval on every backend against the float64 reference: values and gradients."""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import pvm_retrieval
from pvm_kernels.reference import retrieval_reference
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs, random_mask

DTYPES = [torch.float32, torch.bfloat16]

# (B, T, H, Hkv, hd, Nv, mask kind): 8B-like head layout, MHA, odd sizes, Nv = 1, decode.
SHAPES = [
    (2, 9, 4, 1, 32, 70, "pad"),
    (3, 5, 4, 2, 16, 37, "mixed"),      # one sample with no visual token, one padded
    (1, 1, 4, 1, 32, 130, None),        # decode step, Nv past two key blocks
    (2, 67, 2, 2, 16, 1, None),         # Nv = 1, T past one row block
    (2, 3, 3, 1, 24, 19, "holes"),      # hd not a power of two, holes in the mask
]


def make_mask(kind, B, Nv):
    if kind is None:
        return None
    if kind == "pad":
        return random_mask(B, Nv, pad_from={b: Nv - 7 * (b + 1) for b in range(B)})
    if kind == "mixed":
        return random_mask(B, Nv, empty_rows=[1], pad_from={2: 5})
    return random_mask(B, Nv, holes=0.3)


def run_case(backend, device, dtype, B, T, H, Hkv, hd, Nv, mask, transform=lambda t: t,
             with_len=False):
    q64 = torch.randn(B, T, H, hd, dtype=torch.float64)
    k64 = torch.randn(B, Nv, Hkv, hd, dtype=torch.float64)
    v64 = torch.randn(B, Nv, Hkv, hd, dtype=torch.float64)
    # The reference sees the same rounded inputs: only the kernel's own error is measured.
    q, k, v = [transform(t.to(dtype)).to(device).requires_grad_() for t in (q64, k64, v64)]
    qr, kr, vr = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    expected = retrieval_reference(qr, kr, vr, mask)
    grad = torch.randn_like(expected)
    expected.backward(grad)

    kv_len = None
    if with_len and mask is not None:
        kv_len = (mask.int() * torch.arange(1, Nv + 1)).amax(1).int().to(device)
    dmask = None if mask is None else mask.to(device)
    with poisoned_outputs():
        out = pvm_retrieval(q, k, v, dmask, kv_len, backend=backend)
        out.backward(grad.to(dtype).to(device))
    tol = TOLERANCE[dtype]
    assert max_rel_err(out, expected) < tol
    for got, ref, name in ((q.grad, qr.grad, "dq"), (k.grad, kr.grad, "dk"), (v.grad, vr.grad, "dv")):
        assert max_rel_err(got, ref) < tol, name
    if mask is not None:
        empty = ~mask.any(1)
        assert (out.detach().cpu()[empty] == 0).all()
        assert (q.grad.cpu()[empty] == 0).all()
        # Gradients never reach invalid keys.
        assert (k.grad.cpu()[~mask] == 0).all() and (v.grad.cpu()[~mask] == 0).all()
    return out


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_retrieval_matches_reference(backend, device, dtype, shape):
    *dims, kind = shape
    B, T, H, Hkv, hd, Nv = dims
    run_case(backend, device, dtype, *dims, make_mask(kind, B, Nv), with_len=kind == "pad")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_non_contiguous_inputs(backend, device):
    # Transposed storage: q, k, v are views with permuted strides.
    swap = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    assert not swap(torch.randn(2, 3, 4, 5)).is_contiguous()
    run_case(backend, device, torch.float32, 2, 7, 4, 2, 16, 21,
             make_mask("mixed", 3, 21)[[1, 2]], transform=swap)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_kv_len_bounds_keys(backend, device):
    q = torch.randn(2, 3, 2, 16, device=device)
    k = torch.randn(2, 10, 1, 16, device=device)
    v = torch.randn(2, 10, 1, 16, device=device)
    kv_len = torch.tensor([4, 0], dtype=torch.int32, device=device)
    got = pvm_retrieval(q, k, v, None, kv_len, backend=backend)
    expected = retrieval_reference(q, k[:, :4], v[:, :4])
    assert max_rel_err(got[0], expected[0]) < 1e-5
    assert (got[1] == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_nan_in_padding_stays_out(backend, device):
    q = torch.randn(2, 4, 2, 16, device=device)
    k = torch.randn(2, 9, 1, 16, device=device)
    v = torch.randn(2, 9, 1, 16, device=device)
    mask = random_mask(2, 9, pad_from={0: 5}).to(device)
    k[0, 5:] = float("nan")
    v[0, 5:] = float("inf")
    got = pvm_retrieval(q, k, v, mask, backend=backend)
    expected = retrieval_reference(q, k[:, :5], v[:, :5])
    assert max_rel_err(got[0], expected[0]) < 1e-5


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_retrieval_rejects_bad_arguments(backend, device):
    q = torch.randn(1, 2, 4, 16, device=device)
    k = torch.randn(1, 5, 1, 16, device=device)
    with pytest.raises(ValueError, match="v must have shape"):
        pvm_retrieval(q, k, k[:, :4], backend=backend)
    with pytest.raises(TypeError, match="key_mask must have dtype torch.bool"):
        pvm_retrieval(q, k, k, torch.ones(1, 5, device=device), backend=backend)
    with pytest.raises(ValueError, match="multiple of k heads"):
        pvm_retrieval(q, torch.randn(1, 5, 3, 16, device=device),
                      torch.randn(1, 5, 3, 16, device=device), backend=backend)
