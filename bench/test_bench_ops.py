"""The two ops alone at decode shapes (8B: H 4, Hkv 1, hd 128, D 4096, T 1), every backend,
and the retrieval at the block bench's prefill shapes (T in TOKENS past 1, Nv in VISUAL),
forward and forward+backward.

Decode is where a fused path must beat the reference on CPU: the reference repeats K/V per
query head and materialises scores and several [N, D] temporaries. At prefill the
reference is a few large MKL matmuls, the bar the blocked kernels have to clear.
"""
import pytest
import torch

from conftest import (BACKENDS, BATCH, DECODE_BATCH, DECODE_VISUAL, DEVICE, DTYPE, TOKENS, VISUAL,
                      time_and_roofline)
from pvm_kernels import pvm_merge, pvm_retrieval
from pvm_kernels.roofline import merge_cost, retrieval_cost, retrieval_step_cost

ELEM = torch.finfo(DTYPE).bits // 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", DECODE_VISUAL)
@pytest.mark.parametrize("B", DECODE_BATCH)
def test_retrieval_decode(benchmark, backend, B, Nv):
    q = torch.randn(B, 1, 4, 128, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, Nv, 1, 128, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, Nv, 1, 128, device=DEVICE, dtype=DTYPE)
    mask = torch.ones(B, Nv, dtype=torch.bool, device=DEVICE)
    mask[:, Nv - Nv // 8:] = False  # padded, as in a mixed batch
    kv_len = torch.full((B,), Nv - Nv // 8, dtype=torch.int32, device=DEVICE)

    def work():
        with torch.no_grad():
            pvm_retrieval(q, k, v, mask, kv_len, backend=backend)

    benchmark.extra_info.update(backend=backend, B=B, Nv=Nv, op="retrieval")
    time_and_roofline(benchmark, work, retrieval_cost(B, 1, 4, 1, 128, Nv, ELEM))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("Nv", VISUAL)
@pytest.mark.parametrize("T", [t for t in TOKENS if t > 1])
def test_retrieval_prefill(benchmark, backend, T, Nv, backward):
    q, k, v = (torch.randn(BATCH, n, h, 128, device=DEVICE, dtype=DTYPE, requires_grad=backward)
               for n, h in ((T, 4), (Nv, 1), (Nv, 1)))
    grad = torch.randn(BATCH, T, 4, 128, device=DEVICE, dtype=DTYPE)

    def work():
        if backward:
            torch.autograd.grad(pvm_retrieval(q, k, v, backend=backend), (q, k, v), grad)
        else:
            with torch.no_grad():
                pvm_retrieval(q, k, v, backend=backend)

    benchmark.extra_info.update(backend=backend, B=BATCH, T=T, Nv=Nv, op="retrieval",
                                backward=backward)
    time_and_roofline(benchmark, work, retrieval_step_cost(BATCH, T, 4, 1, 128, Nv, ELEM, backward))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", DECODE_BATCH)
def test_merge_decode(benchmark, backend, B):
    e = torch.randn(B, 1, 4096, device=DEVICE, dtype=DTYPE)
    ffn = torch.randn_like(e)
    gate = torch.ones(1, device=DEVICE, dtype=DTYPE)
    keep = torch.ones(B, 1, dtype=torch.bool, device=DEVICE)

    def work():
        with torch.no_grad():
            pvm_merge(e, gate, keep, ffn, backend=backend)

    benchmark.extra_info.update(backend=backend, B=B, op="merge")
    time_and_roofline(benchmark, work, merge_cost(B, 4096, ELEM))
