"""Varlen (packed, cu_seqlens) retrieval in the CUDA kernels, run on CPU by the CUDA emulator.

The varlen layout (csrc/pvm_params.h: q/out/dq [total_q, H, hd], k/v/dk/dv [total_k, Hkv,
hd], lse [H, total_q], sequence b's rows and keys from cu_seqlens_q / cu_seqlens_k, every
bound clamped) runs through the same kernel bodies as the padded one: the CUDA-core forward,
combine, dQ, dK/dV and partial sum (retrieval_kernels.cu) and the tensor-core forward and
backward (retrieval_tc_fwd.cu, retrieval_tc_bwd.cu). Here: the shared cases of
tests/varlen_cases.py (float64 reference, packed == padded) in fp32, bf16 and fp16, split
and unsplit, asserting which kernels ran; lse in flash-attention's [H, total_q] layout; and
cu_seqlens out of every range, which must never take a kernel outside the tensors (the
emulator's guarded buffers end at a guard page, so any such access fails the launch).
"""
import pytest
import torch

from emu_support import BACKEND, emulator

from pvm_kernels.ops.registration import get_op
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs
from varlen_cases import CASES, cu_seqlens, packed_and_padded, pad, run_varlen_case

pytestmark = [pytest.mark.cpu_verification, pytest.mark.usefixtures("emulated_backend")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASE_IDS = [c[0] for c in CASES]
TC_FWD, TC_BWD, CORE = "retrieval_tc_fwd.cu", "retrieval_tc_bwd.cu", "retrieval_kernels.cu"


def set_splits(monkeypatch, mode):
    """"plan": the host op's plan for 132 SMs (these small shapes split); an int: that many
    splits forced through PVM_CUDA_SPLITS (1: never split)."""
    for name in ("PVM_CUDA_SPLITS", "PVM_CUDA_SM_COUNT", "PVM_CUDA_TENSOR_CORES"):
        monkeypatch.delenv(name, raising=False)
    if mode != "plan":
        monkeypatch.setenv("PVM_CUDA_SPLITS", str(mode))


def launches(lib):
    return {f: lib.site_stats(f)["launches"] for f in (TC_FWD, TC_BWD, CORE)}


def takes_tensor_cores(dtype, hd):
    return dtype != torch.float32 and hd % 16 == 0 and hd <= 128


@pytest.mark.parametrize("mode", [1, 3, "plan"], ids=lambda m: f"splits-{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_varlen_matches_reference(lib, monkeypatch, case, dtype, mode):
    """Values and every gradient against float64, rows and keys of no sequence (NaN there)
    untouched; bf16 / fp16 at hd a multiple of 16 on the tensor-core kernels (one forward,
    dQ and dK/dV launch), everything else on the CUDA cores."""
    set_splits(monkeypatch, mode)
    torch.manual_seed(0)
    before = launches(lib)
    run_varlen_case(BACKEND, "cpu", dtype, case)
    ran = {f: n - before[f] for f, n in launches(lib).items()}
    if takes_tensor_cores(dtype, case[5]):
        assert (ran[TC_FWD], ran[TC_BWD]) == (1, 2), ran
    else:
        assert (ran[TC_FWD], ran[TC_BWD]) == (0, 0), ran
        assert ran[CORE] >= 3, ran  # forward, dQ, dK/dV


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_varlen_split_paths_run(lib, monkeypatch, dtype):
    """With 3 splits forced, the 8B case (keys up to 150, rows up to 280) runs the forward's
    combine and the dK/dV partials' sum in the varlen layout, and still matches float64."""
    case = next(c for c in CASES if c[0] == "8b")
    set_splits(monkeypatch, 1)
    before = launches(lib)
    run_varlen_case(BACKEND, "cpu", dtype, case)
    unsplit = launches(lib)[CORE] - before[CORE]
    set_splits(monkeypatch, 3)
    before = launches(lib)
    run_varlen_case(BACKEND, "cpu", dtype, case)
    split = launches(lib)[CORE] - before[CORE]
    assert split == unsplit + 2, (unsplit, split)  # + combine + sum of the partials


@pytest.mark.parametrize("mode", [1, 3], ids=lambda m: f"splits-{m}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("mixed", "decode", "8b")],
                         ids=["mixed", "decode", "8b"])
def test_cuda_packed_equals_padded(monkeypatch, case, dtype, mode):
    set_splits(monkeypatch, mode)
    torch.manual_seed(1)
    packed, padded = packed_and_padded(BACKEND, "cpu", dtype, case)
    for got, want, name in zip(packed, padded, ("out", "dq", "dk", "dv")):
        assert got.shape == want.shape, name
        assert max_rel_err(got, want) < TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_varlen_non_contiguous_inputs(monkeypatch, dtype):
    """q, k, v as views into wider projections (row strides 2 hd): the kernels' strides,
    on the tensor cores too (16-byte rows still)."""
    set_splits(monkeypatch, 3)
    case = ("strided", (3, 8, 1), (5, 0, 20), 4, 2, 32, (0, 0))

    def take_half(t):
        return torch.cat([t, torch.zeros_like(t)], dim=-1)[..., :t.shape[-1]]

    torch.manual_seed(2)
    run_varlen_case(BACKEND, "cpu", dtype, case, transform=take_half)


@pytest.mark.parametrize("mode", [1, 3], ids=lambda m: f"splits-{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_varlen_lse_layout(monkeypatch, dtype, mode):
    """lse is [H, total_q] (flash-attention's varlen lse): each sequence's rows equal the
    padded op's lse [B, H, T] of the same sequence (-inf for a sequence with no key)."""
    set_splits(monkeypatch, mode)
    _, q_lens, k_lens, H, Hkv, hd, _ = next(c for c in CASES if c[0] == "mixed")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(q_lens), H, hd, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), Hkv, hd, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), Hkv, hd, generator=g).to(dtype)
    cu_q, cu_k = cu_seqlens(q_lens, "cpu"), cu_seqlens(k_lens, "cpu")
    scale = hd ** -0.5
    with poisoned_outputs():
        _, lse = get_op(BACKEND, "retrieval_varlen_fwd")(q, k, v, cu_q, cu_k, max(q_lens),
                                                        max(k_lens), scale)
        qp, kp, vp = pad(q, q_lens, max(q_lens)), pad(k, k_lens, max(k_lens)), pad(v, k_lens, max(k_lens))
        mask = torch.arange(max(k_lens))[None] < torch.tensor(k_lens)[:, None]
        _, lse_p = get_op(BACKEND, "retrieval_fwd")(qp, kp, vp, mask, None, scale)
    assert lse.shape == (H, sum(q_lens))
    start = 0
    for b, n in enumerate(q_lens):
        got, want = lse[:, start:start + n], lse_p[b, :, :n]
        assert torch.equal(torch.isinf(got), torch.isinf(want)), b
        fin = torch.isfinite(want)
        assert torch.allclose(got[fin], want[fin], rtol=1e-5, atol=1e-5), b
        start += n


# cu_seqlens the op layer would refuse on CPU (the GPU path never reads them on the host):
# unsorted, negative, past the packed rows, sequences longer than max_seqlen. The kernels
# clamp every bound: no access outside the (guarded) tensors, nothing raised.
BAD_CU = {
    "unsorted": ([0, 9, 4, 12], [0, 30, 10, 40]),
    "negative": ([-5, 3, -1, 12], [-7, 20, 10, 40]),
    "past-end": ([0, 6, 40, 99], [0, 25, 70, 1000]),
    "too-long": ([0, 12, 12, 12], [0, 40, 40, 40]),
}


@pytest.mark.parametrize("mode", [1, 3], ids=lambda m: f"splits-{m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", list(BAD_CU))
def test_cuda_varlen_bounds_are_clamped(monkeypatch, bad, dtype, mode):
    set_splits(monkeypatch, mode)
    total_q, total_k, H, Hkv, hd = 12, 40, 4, 2, 32
    g = torch.Generator().manual_seed(4)
    q, go = (torch.randn(total_q, H, hd, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(total_k, Hkv, hd, generator=g).to(dtype) for _ in range(2))
    cu_q, cu_k = (torch.tensor(x, dtype=torch.int32) for x in BAD_CU[bad])
    max_q, max_k = 5, 16  # below some of the lengths above: clamped too
    with poisoned_outputs():
        out, lse = get_op(BACKEND, "retrieval_varlen_fwd")(q, k, v, cu_q, cu_k, max_q, max_k, 0.2)
        dq, dk, dv = get_op(BACKEND, "retrieval_varlen_bwd")(go, q, k, v, out, lse, cu_q, cu_k,
                                                            max_q, max_k, 0.2)
    assert out.shape == q.shape and lse.shape == (H, total_q)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
