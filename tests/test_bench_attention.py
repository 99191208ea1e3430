"""The set-ups of bench/test_bench_attention.py (bench/attention_impls.py), on CPU and cheap:

- the FLOP / byte counts the bench records: pvm_kernels.roofline.retrieval_cost at every
  key valid, only valid keys (clamped like the kernels) with kv_len, forward+backward 3.5x
  the forward;
- FlexAttention as the bench builds it (enable_gqa, a block mask from kv_len, the lse
  returned), run eagerly in float64, against pvm_kernels.reference, a sample with kv_len 0
  included: the same output (0 on the empty rows, as ours) and the same lse on rows with a
  valid key; on an empty row flex returns lse -inf (ours keeps no lse for it);
- SDPA as the bench builds it (enable_gqa, transpose views, a kv_len attn_mask for cuDNN),
  on the math backend, against the reference;
- the checks that guard the GPU timings fail on a wrong output or lse.

H 4 with Hkv 2 (not the 8B's Hkv 1), so a wrong GQA mapping changes the result.
"""
import importlib.util
import math
import os
import sys
import warnings

import pytest
import torch

from pvm_kernels.reference import retrieval_probabilities, retrieval_reference
from pvm_kernels.roofline import retrieval_cost

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                     "attention_impls.py")
_spec = importlib.util.spec_from_file_location("pvm_bench_attention_impls", _PATH)
ai = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(ai)  # registered first: its dataclass looks its module up

B, T, H, HKV, HD, NV = 3, 130, 4, 2, 16, 200
KV_LEN = (200, 129, 0)  # all keys; a partial second key block of 128; none


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, HD, generator=g, dtype=dtype)
    k = torch.randn(B, NV, HKV, HD, generator=g, dtype=dtype)
    v = torch.randn(B, NV, HKV, HD, generator=g, dtype=dtype)
    return q, k, v


def _mask(kv_len):
    return torch.arange(NV)[None, :] < torch.tensor(kv_len)[:, None]


def _scores(q, k):
    """[B, H, T, Nv] scaled scores, head by head: query head i reads KV head i // (H/Hkv)."""
    group = q.shape[2] // k.shape[2]
    heads = [torch.einsum("btd,bnd->btn", q[:, :, i], k[:, :, i // group]) for i in range(H)]
    return torch.stack(heads, dim=1) / math.sqrt(q.shape[3])


# ---- counts ----------------------------------------------------------------------------------

def test_counts_every_key_valid():
    for case in (c for c in ai.CASES if c.kv_len is None):
        fwd, both = case.cost(2), case.cost(2, backward=True)
        assert fwd.flops == 4 * case.B * case.T * 4 * case.Nv * 128
        assert fwd == retrieval_cost(case.B, case.T, 4, 1, 128, case.Nv, 2)
        assert both == fwd + retrieval_cost(case.B, case.T, 4, 1, 128, case.Nv, 2, backward=True)
        assert both.flops == 3.5 * fwd.flops  # backward 2.5x the forward
    assert ai.AttentionCase(1, 8192, 2048).cost(2).flops == 34359738368.0


def test_counts_valid_keys_only():
    (case,) = [c for c in ai.CASES if c.kv_len is not None]
    assert (case.B, case.T, case.Nv, case.kv_len) == (4, 2048, 2048, (2048, 1500, 1024, 700))
    keys = 2048 + 1500 + 1024 + 700
    fwd = case.cost(2)
    assert fwd.flops == 4 * case.T * 4 * 128 * keys
    # per sample: q and out rows (bf16), its valid K and V (bf16), its fp32 lse
    assert fwd.bytes == 4 * (2 * 2 * case.T * 4 * 128 + 4 * 4 * case.T) + 2 * 2 * 128 * keys
    assert case.cost(2, backward=True).flops == 3.5 * fwd.flops
    assert fwd.flops < ai.AttentionCase(4, 2048, 2048).cost(2).flops
    # clamped as the kernels clamp kv_len: 0 or below costs no flops, above Nv is Nv
    odd = ai.AttentionCase(3, 64, 32, (0, -5, 99))
    assert odd.lengths() == [0, 0, 32]
    assert odd.cost(2).flops == retrieval_cost(1, 64, 4, 1, 128, 32, 2).flops
    assert odd.cost(2).bytes == (retrieval_cost(1, 64, 4, 1, 128, 32, 2).bytes
                                 + 2 * retrieval_cost(1, 64, 4, 1, 128, 0, 2).bytes)
    assert ai.retrieval_kv_len_cost(64, (0, -5, 99), 32, 2) == odd.cost(2)


# ---- FlexAttention -------------------------------------------------------------------------

def _flex_eager(q, k, v, kv_len):
    pytest.importorskip("torch.nn.attention.flex_attention",
                        reason="this torch has no FlexAttention")
    fn = ai.make_flex(torch.tensor(kv_len, dtype=torch.int32), T, NV, compiled=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": intended here
            return fn(q, k, v)
    except (NotImplementedError, RuntimeError) as exc:
        pytest.skip(f"flex_attention does not run eagerly on CPU with this torch: {exc}")


def test_flex_setup_matches_reference():
    q, k, v = _inputs()
    out, lse = _flex_eager(q, k, v, KV_LEN)
    mask = _mask(KV_LEN)
    want = retrieval_reference(q, k, v, mask)
    assert out.shape == want.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # the kv_len-0 sample: output exactly 0, as ours and the reference; lse -inf there
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert lse.shape == (B, H, T)
    assert torch.isneginf(lse[2]).all() and torch.isfinite(lse[:2]).all()
    # lse against the bench's reference_lse, and against the reference's probabilities
    ai.assert_lse_matches("flex", lse, ai.reference_lse(q, k, torch.tensor(KV_LEN)), atol=1e-10)
    p = retrieval_probabilities(q, k, mask)
    valid = mask[:2, None, None, :].expand(2, H, T, NV)
    from_lse = torch.exp(_scores(q, k)[:2] - lse[:2, :, :, None])
    torch.testing.assert_close(from_lse[valid], p[:2][valid], rtol=1e-10, atol=1e-12)


def test_flex_setup_passes_the_bench_check_against_ours():
    """The bench's own check (assert_matches) of flex against ours on CPU: ours' reference
    backend stands in for the GPU kernels."""
    q, k, v = _inputs()
    out, _ = _flex_eager(q, k, v, KV_LEN)
    ours, none = ai.make_ours("reference", torch.tensor(KV_LEN, dtype=torch.int32))(q, k, v)
    assert none is None
    assert ai.assert_matches("flex", "output", out, ours) < 1e-12


# ---- SDPA -------------------------------------------------------------------------------------

def test_sdpa_setup_matches_reference_every_key_valid():
    q, k, v = _inputs()
    out, lse = ai.make_sdpa("math")(q, k, v)
    assert lse is None
    torch.testing.assert_close(out, retrieval_reference(q, k, v), rtol=1e-10, atol=1e-10)


def test_sdpa_masked_setup_matches_reference():
    """The cuDNN kv_len variant (a boolean attn_mask) on the math backend: the reference on
    every row, the kv_len-0 sample's rows 0 (the math backend's safe softmax)."""
    q, k, v = _inputs()
    out, _ = ai.make_sdpa("math", torch.tensor(KV_LEN, dtype=torch.int32), NV)(q, k, v)
    torch.testing.assert_close(out, retrieval_reference(q, k, v, _mask(KV_LEN)),
                               rtol=1e-10, atol=1e-10)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_sdpa_refusal_is_a_reason_and_other_errors_propagate():
    def refused(*_):
        raise RuntimeError("No available kernel. Aborting execution.")

    def broken(*_):
        raise RuntimeError("shape mismatch")
    why, result = ai.sdpa_refusal(refused)
    assert result is None and "No available kernel" in why and torch.__version__ in why
    assert ai.sdpa_refusal(lambda: 3) == (None, 3)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ai.sdpa_refusal(broken)


# ---- the checks and the skip reasons -------------------------------------------------------

def test_checks_fail_on_a_wrong_result():
    want = torch.randn(2, 8, 4, 16, dtype=torch.float64)
    scale = float(want.abs().max())
    ai.assert_matches("x", "output", want + 0.01 * scale, want)
    for bad in (want + 0.03 * scale, want[:, :, :2], torch.full_like(want, math.nan)):
        with pytest.raises(AssertionError, match="x: output differs from ours"):
            ai.assert_matches("x", "output", bad, want)
    lse = torch.randn(2, 4, 8, dtype=torch.float64)
    lse[1, :, 3] = -math.inf
    ai.assert_lse_matches("x", lse + 0.01, lse)
    with pytest.raises(AssertionError, match="differs from the reference"):
        ai.assert_lse_matches("x", lse + 0.05, lse)
    with pytest.raises(AssertionError, match="-inf exactly"):
        ai.assert_lse_matches("x", torch.nan_to_num(lse, neginf=0.0), lse)


def test_unavailable_reasons():
    every, kvlen = ai.AttentionCase(1, 8, 8), ai.AttentionCase(2, 8, 8, (8, 3))
    cpu = torch.device("cpu")
    for name in ai.IMPLEMENTATIONS:
        assert ai.unavailable_reason(name, cpu, every)  # nothing is timed on CPU
    cuda = torch.device("cuda")
    assert "no attn_mask" in ai.unavailable_reason("sdpa-flash", cuda, kvlen)
    for name in ("sdpa-flash", "sdpa-cudnn", "flex"):
        assert ai.unavailable_reason(name, cuda, every) is None
    assert ai.unavailable_reason("sdpa-cudnn", cuda, kvlen) is None
    with pytest.raises(ValueError, match="unknown implementation"):
        ai.unavailable_reason("sdpa-math", cpu, every)
