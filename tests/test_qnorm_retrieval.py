"""The retrieval with q_norm fused (issue 24): q arrives as q_proj's output and each head's
row is RMS-normalised with its gain as the kernels load it; the backward goes on through
q_norm inside the dQ kernel and returns the gain's gradient. Against float64 (values, dq,
dq_weight, dk, dv), padded and packed, with masks, kv_len, empty samples and NaN padding;
16-bit dtypes within 1.5 times the error of the same kernels unfused (the backend's RMSNorm
op, then its plain retrieval) in the same dtype: fusing must not cost precision."""
import pytest
import torch

from conftest import DEVICES
from pvm_kernels import available_backends
from pvm_kernels._alloc import poisoned_outputs
from pvm_kernels.ops import registration
from pvm_kernels.reference import retrieval_reference, retrieval_varlen_reference, rms_norm
from pvm_kernels.testing import TOLERANCE, max_rel_err, random_mask

QN = [pytest.param(b, d, id=f"{b}-{d}") for b in ("triton",) for d in DEVICES
      if b in available_backends(d)]
EPS = 1e-6
# (B, T, H, Hkv, hd, Nv): the 8B layout at decode and prefill, GQA, a small head dim
SHAPES = [(2, 1, 4, 1, 128, 300), (2, 9, 4, 1, 128, 70), (3, 5, 8, 2, 64, 33), (1, 7, 2, 2, 16, 5)]


def op(backend, name):
    return registration.get_op(backend, name)


def _inputs(shape, dtype, device):
    B, T, H, Hkv, hd, Nv = shape
    g = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()  # noqa: E731
    q = (torch.randn(B, T, H, hd, device=device) * 3).to(dtype).requires_grad_()
    w = (torch.rand(hd, device=device) + 0.5).to(dtype).requires_grad_()
    return q, w, g(B, Nv, Hkv, hd), g(B, Nv, Hkv, hd)


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _reference(q, w, k, v, mask, lens, scale):
    """The float64 composite: q_norm (the Qwen RMSNorm), then the retrieval; keys the kernels
    never read (masked, past kv_len) are zeroed first, so their NaN padding cannot reach the
    reference's own gradients (0 * NaN)."""
    if lens is not None:
        inside = torch.arange(k.shape[1], device=k.device)[None, :] < lens[:, None]
        mask = inside if mask is None else mask & inside
    clean = (lambda t: t) if mask is None else \
        (lambda t: torch.where(mask[:, :, None, None], t, torch.zeros((), dtype=t.dtype)))
    q, w, k, v = (t.detach().double().requires_grad_() for t in (q, w, clean(k), clean(v)))
    return retrieval_reference(rms_norm(q, w, EPS), k, v, mask, scale), (q, w, k, v)


def _unfused(backend, q, w, k, v, mask, lens, scale, grad):
    """Output and gradients of the backend's RMSNorm op followed by its plain retrieval."""
    qd, wd, kd, vd = (t.detach().requires_grad_() for t in (q, w, k, v))
    q_hat = op(backend, "rms_norm_fwd")(qd, wd, EPS)[0]
    out = op(backend, "retrieval_fwd")(q_hat, kd, vd, mask, lens, scale)[0]
    return (out,) + _grads(out, (qd, wd, kd, vd), grad)


@pytest.mark.parametrize("backend,device", QN)
# fp32 and bf16 on every shape; fp16 (bf16's code path, another rounding) on the 8B decode
# shape only: the interpreter's time is make test's budget
@pytest.mark.parametrize("dtype,shape", [(dt, sh) for dt in (torch.float32, torch.bfloat16)
                                         for sh in SHAPES] + [(torch.float16, SHAPES[0])],
                         ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
def test_fused_q_norm_retrieval_matches_float64(backend, device, dtype, shape, masked):
    B, T, H, Hkv, hd, Nv = shape
    q, w, k, v = _inputs(shape, dtype, device)
    mask = lens = None
    if masked:  # an empty sample, padding, NaN in the padding
        mask = random_mask(B, Nv, empty_rows=[B - 1], holes=0.2).to(device)
        lens = torch.full((B,), Nv - 2, dtype=torch.int32, device=device)
        with torch.no_grad():
            k[:, -1] = float("nan")
            v[:, -1] = float("nan")
    scale = hd ** -0.5
    with poisoned_outputs():
        out, lse, q_hat = op(backend, "retrieval_qn_fwd")(q, w, k, v, mask, lens, scale, EPS)
        grad = torch.randn_like(out)
        got = (out,) + _grads(out, (q, w, k, v), grad)
    ref, ref_in = _reference(q, w, k, v, mask, lens, scale)
    want = (ref,) + _grads(ref, ref_in, grad.double())
    tol = TOLERANCE[dtype]
    if dtype != torch.float32:  # q_norm rounds to the dtype: judged against that error
        unfused = _unfused(backend, q, w, k, v, mask, lens, scale, grad)
        tol = max(tol, 1.5 * max(max_rel_err(a, b) for a, b in zip(unfused, want)))
    for name, a, b in zip(("out", "dq", "dq_weight", "dk", "dv"), got, want):
        assert max_rel_err(a, b) < tol, (name, max_rel_err(a, b), tol)
    q_ref = rms_norm(q.detach().double(), w.detach().double(), EPS)
    assert max_rel_err(q_hat, q_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend,device", QN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_q_norm_varlen_matches_float64(backend, device, dtype):
    q_lens, k_lens, H, Hkv, hd = (9, 1, 70, 0), (150, 3, 0, 65), 4, 1, 128
    cu_q = torch.tensor([0, 9, 10, 80, 80], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 150, 153, 153, 218], dtype=torch.int32, device=device)
    total_q, total_k = 80 + 3, 218 + 4  # rows and keys of no sequence at the end
    q = (torch.randn(total_q, H, hd, device=device) * 2).to(dtype).requires_grad_()
    w = (torch.rand(hd, device=device) + 0.5).to(dtype).requires_grad_()
    k = torch.randn(total_k, Hkv, hd, device=device).to(dtype).requires_grad_()
    v = torch.randn(total_k, Hkv, hd, device=device).to(dtype).requires_grad_()
    scale = hd ** -0.5
    with poisoned_outputs():
        out, _, _ = op(backend, "retrieval_varlen_qn_fwd")(q, w, k, v, cu_q, cu_k, 70, 150,
                                                            scale, EPS)
        grad = torch.randn_like(out)
        got = (out,) + _grads(out, (q, w, k, v), grad)

    def reference(dt):
        qd, wd, kd, vd = (t.detach().to(dt).requires_grad_() for t in (q, w, k, v))
        r = retrieval_varlen_reference(rms_norm(qd, wd, EPS), kd, vd, cu_q, cu_k, scale)
        return (r,) + _grads(r, (qd, wd, kd, vd), grad.to(dt))

    want = reference(torch.float64)
    tol = TOLERANCE[dtype]
    if dtype != torch.float32:  # against the same kernels unfused (as the padded test)
        qd, wd, kd, vd = (t.detach().requires_grad_() for t in (q, w, k, v))
        q_hat = op(backend, "rms_norm_fwd")(qd, wd, EPS)[0]
        unf = op(backend, "retrieval_varlen_fwd")(q_hat, kd, vd, cu_q, cu_k, 70, 150, scale)[0]
        unfused = (unf,) + _grads(unf, (qd, wd, kd, vd), grad)
        tol = max(tol, 1.5 * max(max_rel_err(a, b) for a, b in zip(unfused, want)))
    for name, a, b in zip(("out", "dq", "dq_weight", "dk", "dv"), got, want):
        assert max_rel_err(a, b) < tol, (name, max_rel_err(a, b), tol)
    assert torch.equal(out[80:], torch.zeros_like(out[80:]))  # rows of no sequence


@pytest.mark.parametrize("backend,device", QN)
def test_fused_q_norm_gradients_are_deterministic(backend, device):
    q, w, k, v = _inputs((2, 40, 4, 1, 128, 90), torch.bfloat16, device)
    out, lse, q_hat = op(backend, "retrieval_qn_fwd")(q, w, k, v, None, None, 0.1, EPS)
    grad = torch.randn_like(out)
    runs = [op(backend, "retrieval_qn_bwd")(grad, q.detach(), q_hat, w.detach(), k.detach(),
                                            v.detach(), out, lse, None, None, 0.1, EPS)
            for _ in range(3)]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, runs[0]))


@pytest.mark.parametrize("backend,device", QN)
def test_opcheck_fused_q_norm_retrieval(backend, device):
    q, w, k, v = _inputs((2, 3, 4, 2, 16, 7), torch.float32, device)
    mask = random_mask(2, 7, empty_rows=[1]).to(device)
    torch.library.opcheck(op(backend, "retrieval_qn_fwd"), (q, w, k, v, mask, None, 0.25, EPS))
    cu = torch.tensor([0, 3, 6], dtype=torch.int32, device=device)
    torch.library.opcheck(op(backend, "retrieval_varlen_qn_fwd"),
                          (q.detach()[0].requires_grad_(), w, k.detach()[0].requires_grad_(),
                           v.detach()[0].requires_grad_(), cu, cu, 3, 3, 0.25, EPS))
