"""The reference itself against a naive per-sample, per-head loop straight from the spec."""
import math

import torch

from pvm_kernels.reference import merge_reference, retrieval_reference, rms_norm
from pvm_kernels.testing import random_mask


def naive_retrieval(q, k, v, mask):
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        valid = mask[b].nonzero().flatten()
        if len(valid) == 0:
            continue
        for h in range(H):
            kh = k[b, valid, h // (H // Hkv)]
            vh = v[b, valid, h // (H // Hkv)]
            p = torch.softmax(q[b, :, h] @ kh.T / math.sqrt(hd), dim=-1)
            out[b, :, h] = p @ vh
    return out


def test_retrieval_reference_matches_naive_loop():
    q = torch.randn(3, 5, 6, 8, dtype=torch.float64)
    k = torch.randn(3, 11, 2, 8, dtype=torch.float64)
    v = torch.randn(3, 11, 2, 8, dtype=torch.float64)
    mask = random_mask(3, 11, empty_rows=[1], pad_from={2: 4}, holes=0.2)
    mask[0, 0] = True
    got = retrieval_reference(q, k, v, mask)
    torch.testing.assert_close(got, naive_retrieval(q, k, v, mask), rtol=1e-12, atol=1e-12)
    assert (got[1] == 0).all()


def test_retrieval_reference_gradients_finite_for_empty_sample():
    q = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 1, 4, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 5, empty_rows=[0])
    retrieval_reference(q, k, v, mask).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[0] == 0).all()


def test_rms_norm_formula_and_qwen_cast_order():
    x = torch.randn(4, 32, dtype=torch.bfloat16) * 3
    w = torch.randn(32, dtype=torch.bfloat16)
    xf = x.float()
    expected = w * (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-6), expected)


def test_merge_reference_silences_rows_exactly_even_if_not_finite():
    e = torch.randn(2, 3, 16, dtype=torch.float64)
    e[0, 1] = float("nan")
    keep = torch.ones(2, 3, dtype=torch.bool)
    keep[0, 1] = False
    ffn = torch.randn_like(e)
    gate = torch.tensor([0.5], dtype=torch.float64)
    out = merge_reference(e, gate, keep, ffn)
    assert torch.equal(out[0, 1], ffn[0, 1])
    n = e[1, 2] / torch.sqrt(e[1, 2].pow(2).mean() + 1e-6)
    torch.testing.assert_close(out[1, 2], ffn[1, 2] + 0.5 * n)
