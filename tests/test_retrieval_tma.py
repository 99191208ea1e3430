"""The retrieval's tensor-descriptor (TMA) path (issue 25), in Triton's interpreter (CPU
tensors act as an H100's, sm_90): which launches take it, and that they match the float64
reference at the 8B layout and its edges (a kv_len tail tile, an empty sample, kv_len past
Nv, NaN past kv_len, partial row blocks, key splits, varlen with an empty sequence, q_norm
fused, head dims 64 / 72 / 128, G == 1), every output poisoned first. The compile side
(PTX with cp.async.bulk.tensor and wgmma) is tests/test_compile_gate.py's."""
import threading

import pytest
import torch

from pvm_kernels import pvm_retrieval, pvm_retrieval_varlen
from pvm_kernels._alloc import poisoned_outputs
from pvm_kernels.reference import retrieval_reference, retrieval_varlen_reference, rms_norm
from pvm_kernels.testing import TOLERANCE, max_rel_err
from pvm_kernels.triton_ops import retrieval as R



#: Where the kernels run: the GPU where there is one (sm_90 takes the TMA path; older GPUs
#: skip the tests that expect it), else Triton's interpreter on the CPU.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_sm90 = pytest.mark.skipif(DEV.type == "cuda" and torch.cuda.get_device_capability() < (9, 0),
                                reason="the TMA path is sm_90's (this GPU takes pointer loads)")


@pytest.fixture
def tma_taken(monkeypatch):
    """The uses_tma answers of the launches run in the test, in order."""
    answers = []
    real = R.uses_tma

    def spy(*args, **kwargs):
        answers.append(real(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(R, "uses_tma", spy)
    return answers


def _padded(B, T, H, Hkv, hd, Nv, dtype, kv_len=None, nan_past_len=False, q_norm=False):
    """(out and grads of the triton op, of the float64 reference)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, n, h, hd).to(dtype) for n, h in ((T, H), (Nv, Hkv), (Nv, Hkv)))
    w = (1.0 + 0.1 * torch.randn(hd)).to(dtype)
    lens = None if kv_len is None else torch.tensor(kv_len, dtype=torch.int32)
    valid = torch.ones(B, Nv, dtype=torch.bool) if lens is None else \
        torch.arange(Nv)[None, :] < lens.clamp(0, Nv)[:, None]
    if nan_past_len:  # never read: the descriptors stop at kv_len
        k[~valid] = float("nan")
        v[~valid] = float("inf")
    grad = torch.randn(B, T, H, hd).to(dtype)
    qt, kt, vt, wt = (t.clone().to(DEV).requires_grad_() for t in (q, k, v, w))
    lens_d = None if lens is None else lens.to(DEV)
    with poisoned_outputs():
        if q_norm:
            out = torch.ops.pvm_kernels.triton_retrieval_qn_fwd(qt, wt, kt, vt, None, lens_d,
                                                                hd ** -0.5, 1e-6)[0]
        else:
            out = pvm_retrieval(qt, kt, vt, None, lens_d, backend="triton")
        out.backward(grad.to(DEV))
    q64, k64, v64, w64 = (t.double().where(t.isfinite(), 0).requires_grad_()
                          for t in (q, k, v, w))
    qr = rms_norm(q64, w64, 1e-6) if q_norm else q64
    ref = retrieval_reference(qr, k64, v64, valid)
    ref.backward(grad.double())
    got = {name: None if t is None else t.cpu() for name, t in
           dict(out=out, dq=qt.grad, dk=kt.grad, dv=vt.grad,
                dw=wt.grad if q_norm else None).items()}
    want = dict(out=ref, dq=q64.grad, dk=k64.grad, dv=v64.grad, dw=w64.grad if q_norm else None)
    return got, want, valid


def _assert_close(got, want, dtype):
    for name in got:
        if got[name] is not None:
            assert torch.isfinite(got[name]).all(), name
            assert max_rel_err(got[name], want[name]) < TOLERANCE[dtype], name


# (B, T, H, Hkv, hd, Nv, kv_len): the 8B layout (H 4, Hkv 1) in partial row blocks (T 21:
# 84 rows, of 128 forward and dQ rows, 64 dK/dV rows) and key tiles of 64 (a tail tile of
# 22 keys; a sample of none; kv_len past Nv; kv_len a multiple of the tile: no tail), G == 1
# (MHA rows: token stride), hd 64 and 72 (BLOCK_D 128 with lanes past hd).
CASES = [
    (3, 21, 4, 1, 128, 150, [150, 77, 0]),
    (2, 21, 4, 1, 128, 192, [128, 2**20]),
    (1, 150, 2, 2, 64, 70, None),
    (2, 20, 4, 1, 72, 33, [33, 5]),
]


@needs_sm90
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_tma_path_matches_float64(case, tma_taken):
    *dims, kv_len = case
    got, want, valid = _padded(*dims, torch.bfloat16, kv_len, nan_past_len=kv_len is not None)
    assert tma_taken == [True, True]  # the forward's launch, then the backward's
    _assert_close(got, want, torch.bfloat16)
    empty = ~valid.any(1)
    assert (got["out"][empty] == 0).all() and (got["dq"][empty] == 0).all()
    assert (got["dk"][~valid] == 0).all() and (got["dv"][~valid] == 0).all()


@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tma_path_with_q_norm_fused_matches_float64(dtype, tma_taken):
    got, want, _ = _padded(2, 21, 4, 1, 128, 150, dtype, [150, 64], q_norm=True)
    assert tma_taken == [True, True]
    _assert_close(got, want, dtype)


@needs_sm90
def test_tma_and_pointer_paths_agree(tma_taken):
    """The same problem with pointer loads forced: the same numbers up to summation order
    (the TMA path skips the select on full tiles, nothing else)."""
    got, _, _ = _padded(2, 21, 4, 1, 128, 150, torch.bfloat16, [150, 77])
    with R.tensor_descriptors(False):
        ptr, _, _ = _padded(2, 21, 4, 1, 128, 150, torch.bfloat16, [150, 77])
    assert tma_taken == [True, True, False, False]
    for name in ("out", "dq", "dk", "dv"):
        assert max_rel_err(got[name], ptr[name].double()) < 1e-2, name


def test_the_switch_reaches_autograds_threads(tma_taken):
    """tensor_descriptors(False) holds in other threads too: CUDA tensors' backward runs on
    autograd's device threads (here: a forward and backward run on a thread of its own)."""
    with R.tensor_descriptors(False):
        worker = threading.Thread(
            target=lambda: _padded(1, 21, 4, 1, 128, 70, torch.bfloat16, [70]))
        worker.start()
        worker.join()
    assert tma_taken == [False, False]


@needs_sm90
def test_tma_varlen_matches_float64(tma_taken):
    """Packed sequences of 37, 0 and 20 tokens over 150, 9 and 0 keys, then rows and keys
    of no sequence (NaN, never read)."""
    torch.manual_seed(1)
    H, Hkv, hd = 4, 1, 128
    q_lens, k_lens = [37, 0, 20], [150, 9, 0]
    cu_q = torch.tensor([0, 37, 37, 57], dtype=torch.int32)
    cu_k = torch.tensor([0, 150, 159, 159], dtype=torch.int32)
    q = torch.randn(60, H, hd).bfloat16()
    k, v = (torch.randn(162, Hkv, hd).bfloat16() for _ in range(2))
    k[159:], v[159:] = float("nan"), float("nan")
    grad = torch.randn(60, H, hd).bfloat16()
    qt, kt, vt = (t.clone().to(DEV).requires_grad_() for t in (q, k, v))
    with poisoned_outputs():
        out = pvm_retrieval_varlen(qt, kt, vt, cu_q.to(DEV), cu_k.to(DEV), max(q_lens),
                                   max(k_lens), backend="triton")
        out.backward(grad.to(DEV))
    assert tma_taken == [True, True]
    out, qt, kt, vt = out.cpu(), qt.grad.cpu(), kt.grad.cpu(), vt.grad.cpu()
    q64, k64, v64 = (t.double().nan_to_num(0.0).requires_grad_() for t in (q, k, v))
    ref = retrieval_varlen_reference(q64, k64, v64, cu_q, cu_k)
    ref.backward(grad.double())
    rows, keys = slice(0, 57), slice(0, 159)
    for g, r in ((out[rows], ref[rows]), (qt[rows], q64.grad[rows]),
                 (kt[keys], k64.grad[keys]), (vt[keys], v64.grad[keys])):
        assert max_rel_err(g, r) < TOLERANCE[torch.bfloat16]
    assert (out[37:57] == 0).all() and (kt[150:159] == 0).all()  # no keys / no rows


def _eligible(q, k, key_mask=None):
    lay = R._padded_layout(q, k, key_mask)
    G = q.shape[2] // k.shape[2]
    return R.uses_tma(lay, q.shape[1] * G, q.shape[-1], G, (q,), (k, k))


def test_which_launches_take_the_tma_path():
    q = torch.randn(1, 37, 4, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 150, 1, 128, dtype=torch.bfloat16)
    assert _eligible(q, k)
    assert not _eligible(q, k, torch.ones(1, 150, dtype=torch.bool))  # a key_mask
    assert not _eligible(q.float(), k.float())  # fp32 keeps pointer loads
    assert not _eligible(q[:, :4], k)  # 16 rows: the decode tile
    assert not _eligible(q[..., :32], k[..., :32])  # BLOCK_D 32
    # H 4 over Hkv 2: a KV group's rows (t, g) are not one stride apart in [B, T, H, hd]
    assert not _eligible(q, torch.randn(1, 150, 2, 128, dtype=torch.bfloat16))
    with R.tensor_descriptors(False):
        assert not _eligible(q, k)
    from pvm_kernels.triton_ops.common import compile_target
    with compile_target(80):  # the A100's table: pointer loads
        assert not _eligible(q, k)
