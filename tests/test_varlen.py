"""pvm_retrieval_varlen (packed sequences, cu_seqlens) on every backend: against the float64
reference, against the same sequences run padded, edges and argument checks. The emulated
CUDA kernels run the same cases in tests/test_cuda_varlen.py."""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import cu_seqlens_from_lengths, pvm_retrieval_varlen
from pvm_kernels.testing import TOLERANCE, max_rel_err
from varlen_cases import CASES, cu_seqlens, packed_and_padded, run_varlen_case

DTYPES = [torch.float32, torch.bfloat16]
CASE_IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_varlen_matches_reference(backend, device, dtype, case):
    run_varlen_case(backend, device, dtype, case)


# The 8B layout's packed-vs-padded case with the longest query sequence at 24 tokens
# (96 packed rows: prefill) instead of 70: the padded fp32 run of the full case took 31 s in
# the interpreter (3 x 280 rows of 16 x 32 tiles), this one a third; the full case runs
# against float64 in test_varlen_matches_reference.
PACKED_VS_PADDED = [c for c in CASES if c[0] in ("mixed", "decode")] + [
    ("8b", (9, 1, 24), (150, 3, 65), 4, 1, 128, (0, 0))]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PACKED_VS_PADDED, ids=["mixed", "decode", "8b"])
def test_packed_equals_padded(backend, device, dtype, case):
    packed, padded = packed_and_padded(backend, device, dtype, case)
    for got, want, name in zip(packed, padded, ("out", "dq", "dk", "dv")):
        assert got.shape == want.shape, name
        assert max_rel_err(got, want) < TOLERANCE[dtype], name


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_varlen_non_contiguous_inputs(backend, device):
    # q, k, v as views into packed projections, as a fused qkv / kv projection gives them.
    case = ("strided", (3, 8, 1), (5, 0, 20), 4, 2, 32, (0, 0))

    def take_half(t):
        wide = torch.cat([t, torch.zeros_like(t)], dim=-1)
        return wide[..., :t.shape[-1]]

    run_varlen_case(backend, device, torch.float32, case, transform=take_half)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_varlen_no_sequence(backend, device):
    q = torch.randn(3, 4, 16, device=device, requires_grad=True)
    k = torch.randn(2, 1, 16, device=device, requires_grad=True)
    v = torch.randn(2, 1, 16, device=device, requires_grad=True)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    out = pvm_retrieval_varlen(q, k, v, cu, cu, 0, 0, backend=backend)
    out.sum().backward()
    assert (out == 0).all() and (q.grad == 0).all()
    assert k.grad is None or (k.grad == 0).all()  # the reference never touches k


def _args(device="cpu"):
    q = torch.randn(6, 4, 16, device=device)
    k = torch.randn(5, 1, 16, device=device)
    return q, k, k.clone(), cu_seqlens((2, 4), device), cu_seqlens((3, 2), device)


@pytest.mark.parametrize("bad,error,match", [
    ("cu-dtype", TypeError, "cu_seqlens_q must have dtype torch.int32"),
    ("cu-2d", ValueError, "cu_seqlens_q must be 1-D"),
    ("cu-length", ValueError, "cu_seqlens_k must have the length of cu_seqlens_q"),
    ("decreasing", ValueError, "cu_seqlens_q must be non-decreasing"),
    ("past-end", ValueError, r"cu_seqlens_k must lie within \[0, 5\]"),
    ("max-small", ValueError, "max_seqlen_q=3 is below the longest sequence"),
    ("max-float", TypeError, "max_seqlen_k must be a non-negative Python int"),
    ("q-4d", ValueError, r"q must be \[total_q, H, hd\]"),
    ("heads", ValueError, "must be a multiple of k heads"),
])
def test_varlen_rejects_bad_arguments(bad, error, match):
    q, k, v, cu_q, cu_k = _args()
    max_q, max_k = 4, 3
    if bad == "cu-dtype":
        cu_q = cu_q.long()
    elif bad == "cu-2d":
        cu_q = cu_q[None]
    elif bad == "cu-length":
        cu_k = cu_k[:2]
    elif bad == "decreasing":
        cu_q = torch.tensor([0, 4, 2], dtype=torch.int32)
    elif bad == "past-end":
        cu_k = torch.tensor([0, 3, 6], dtype=torch.int32)
    elif bad == "max-small":
        max_q = 3
    elif bad == "max-float":
        max_k = 3.0
    elif bad == "q-4d":
        q = q[None]
    elif bad == "heads":
        k = torch.randn(5, 3, 16)
        v = k.clone()
    with pytest.raises(error, match=match):
        pvm_retrieval_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend="reference")


def test_cu_seqlens_from_lengths():
    got = cu_seqlens_from_lengths(torch.tensor([3, 0, 5]))
    assert got.dtype == torch.int32 and got.tolist() == [0, 3, 3, 8]
