"""The tensor-core CUDA retrieval on the layouts and sizes real callers hand it, in the
emulator against float64: head dims between the powers of two, a head group (G = 3) that
straddles the 64-row tiles, q sliced from a packed qkv or transposed, K and V as views of
larger caches with their own strides (and a broadcast batch), a strided mask with whole
tiles masked, kv_len past Nv and negative, a scale other than hd^-1/2. Values and every
gradient; each case asserts that the tensor-core forward really ran (the emulator's
launch-site counters), so a dispatch change cannot quietly test the CUDA-core kernel.
"""
import pytest
import torch

from emu_support import emulator

from pvm_kernels import pvm_retrieval
from pvm_kernels.reference import retrieval_reference
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs

pytestmark = [pytest.mark.cpu_verification, pytest.mark.usefixtures("emulated_backend")]
TC_FWD = "retrieval_tc_fwd.cu"


def check(q, k, v, mask=None, kv_len=None, scale=None):
    """Forward and backward through the emulated CUDA backend against float64; returns the
    tensor-core forward launches the call made."""
    lib = emulator.kernel_lib()
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    before = lib.site_stats(TC_FWD)["launches"]
    with poisoned_outputs():
        out = pvm_retrieval(q, k, v, mask, kv_len, scale=scale, backend=emulator.BACKEND)
        grad = torch.randn_like(out)
        out.backward(grad)
    launches = lib.site_stats(TC_FWD)["launches"] - before
    valid = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool) if mask is None else mask.clone()
    if kv_len is not None:
        valid &= torch.arange(k.shape[1])[None, :] < kv_len.long().clamp(0, k.shape[1])[:, None]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = retrieval_reference(q64, k64, v64, valid, scale=scale)
    ref.backward(grad.double())
    tol = TOLERANCE[q.dtype]
    for name, got, want in (("out", out, ref), ("dq", q.grad, q64.grad),
                            ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert max_rel_err(got, want) < tol, name
    return launches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hd", [48, 80, 96, 112])
def test_head_dims_between_powers_of_two_with_three_heads_per_group(dtype, hd):
    torch.manual_seed(hd)
    B, T, H, Hkv, Nv = 2, 30, 6, 2, 150  # 90 packed rows: a group straddles rows 63/64
    q, k, v = (torch.randn(B, n, h, hd).to(dtype) for n, h in ((T, H), (Nv, Hkv), (Nv, Hkv)))
    mask = torch.rand(B, Nv) > 0.3
    assert check(q, k, v, mask, torch.tensor([140, 70], dtype=torch.int32)) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_views_of_packed_and_cached_tensors(dtype):
    """q from a packed qkv projection; K and V from caches with different strides; a mask
    read with stride 2 that blanks whole 64-key tiles; kv_len past Nv and negative."""
    torch.manual_seed(1)
    B, T, H, Hkv, hd, Nv = 2, 21, 4, 1, 64, 200
    qkv = torch.randn(B, T, 3, H, hd).to(dtype)
    q = qkv[:, :, 0]
    k = torch.randn(B, 256, 2, Hkv, hd).to(dtype)[:, :Nv, 0]  # a packed K/V cache's K
    v = torch.randn(B, 320, Hkv, hd).to(dtype)[:, 40:40 + Nv]  # its own cache: other strides
    mask_big = torch.rand(B, 2 * Nv) > 0.2
    mask = mask_big[:, ::2]
    mask[:, 0:64] = False
    mask[:, 128:192] = False
    assert check(q, k, v, mask, torch.tensor([10**6, 150], dtype=torch.int32)) == 1
    assert check(q, k, v, mask, torch.tensor([10**6, -5], dtype=torch.int32), scale=3.0) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_transposed_query_and_broadcast_keys(dtype):
    """q stored [B, H, T, hd] and transposed; K and V broadcast over the batch (stride 0)."""
    torch.manual_seed(2)
    B, T, H, Hkv, hd, Nv = 3, 17, 4, 2, 32, 90
    q = torch.randn(B, H, T, hd).to(dtype).transpose(1, 2)
    k = torch.randn(1, Nv, Hkv, hd).to(dtype).expand(B, -1, -1, -1)
    v = torch.randn(1, Nv, Hkv, hd).to(dtype).expand(B, -1, -1, -1)
    assert check(q, k, v) == 1
