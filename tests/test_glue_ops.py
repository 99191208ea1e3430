"""The block's fused glue (issue 24): the Qwen RMSNorm with a gain and SwiGLU, as custom ops
of the kernel backends that have them, against float64 (values and every gradient), every
output element written (outputs poisoned with NaN first), the weight gradient bit-identical
run to run, and opcheck."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from pvm_kernels import available_backends
from pvm_kernels._alloc import poisoned_outputs
from pvm_kernels.ops import glue_status, registration
from pvm_kernels.reference import rms_norm
from pvm_kernels.testing import TOLERANCE, max_rel_err

# (backend, device) pairs whose backend has the fused glue ops
GLUE = [pytest.param(b, d, id=f"{b}-{d}") for b in ("triton",) for d in DEVICES
        if b in available_backends(d)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# P of the 8B block, a head dim, an unaligned width, one row, no row
SHAPES = [(3, 5, 512), (40, 4, 128), (2, 3, 13), (1, 64), (0, 32)]


def op(backend, name):
    return registration.get_op(backend, name)


@pytest.mark.parametrize("backend,device", GLUE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_float64(backend, device, dtype, shape):
    x = torch.randn(*shape, device=device).mul(3).to(dtype).requires_grad_()
    w = (torch.rand(shape[-1], device=device) + 0.5).to(dtype).requires_grad_()
    with poisoned_outputs():
        y, rstd = op(backend, "rms_norm_fwd")(x, w, 1e-6)
        grad = torch.randn_like(y)
        y.backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = rms_norm(x64, w64, 1e-6)
    ref.backward(grad.double())
    tol = TOLERANCE[dtype]
    assert max_rel_err(y, ref) < tol
    assert max_rel_err(rstd, torch.rsqrt(x64.pow(2).mean(-1) + 1e-6).reshape(-1)) < 1e-6
    assert max_rel_err(x.grad, x64.grad) < tol
    assert max_rel_err(w.grad, w64.grad) < tol


@pytest.mark.parametrize("backend,device", GLUE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 1536), (7, 253), (0, 64)], ids=str)
def test_swiglu_matches_float64(backend, device, dtype, shape):
    g = torch.randn(*shape, device=device).mul(2).to(dtype).requires_grad_()
    u = torch.randn(*shape, device=device).to(dtype).requires_grad_()
    with poisoned_outputs():
        out = op(backend, "swiglu_fwd")(g, u)
        grad = torch.randn_like(out)
        out.backward(grad)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    ref = F.silu(g64) * u64
    ref.backward(grad.double())
    tol = TOLERANCE[dtype]
    assert max_rel_err(out, ref) < tol
    assert max_rel_err(g.grad, g64.grad) < tol and max_rel_err(u.grad, u64.grad) < tol


@pytest.mark.parametrize("backend,device", GLUE)
def test_swiglu_takes_the_two_halves_of_one_gemm_output(backend, device):
    """gate and up as column halves of one [rows, 2I] tensor (strided rows)."""
    gu = torch.randn(6, 2 * 96, device=device)
    out = op(backend, "swiglu_fwd")(gu[:, :96], gu[:, 96:])
    torch.testing.assert_close(out, F.silu(gu[:, :96]) * gu[:, 96:])


@pytest.mark.parametrize("backend,device", GLUE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_weight_gradient_is_deterministic(backend, device, dtype):
    """dw is reduced over rows in a fixed order in one launch: the same bits every run."""
    x = torch.randn(300, 512, device=device, dtype=dtype)  # 5 row steps of each dw program
    w = torch.rand(512, device=device, dtype=dtype)
    _, rstd = op(backend, "rms_norm_fwd")(x, w, 1e-6)
    grad = torch.randn_like(x)
    runs = [op(backend, "rms_norm_bwd")(grad, x, w, rstd) for _ in range(3)]
    for dx, dw in runs[1:]:
        assert torch.equal(dx, runs[0][0]) and torch.equal(dw, runs[0][1])


@pytest.mark.parametrize("backend,device", GLUE)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_glue_ops(backend, device, requires_grad):
    x = torch.randn(4, 3, 64, device=device, requires_grad=requires_grad)
    w = torch.rand(64, device=device, requires_grad=requires_grad)
    torch.library.opcheck(op(backend, "rms_norm_fwd"), (x, w, 1e-6))
    y, rstd = op(backend, "rms_norm_fwd")(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(op(backend, "rms_norm_bwd"), (torch.randn_like(y), x.detach(),
                                                        w.detach(), rstd))
    g = torch.randn(5, 48, device=device, requires_grad=requires_grad)
    u = torch.randn(5, 48, device=device, requires_grad=requires_grad)
    torch.library.opcheck(op(backend, "swiglu_fwd"), (g, u))
    torch.library.opcheck(op(backend, "swiglu_bwd"), (torch.randn(5, 48, device=device),
                                                      g.detach(), u.detach()))


def test_glue_status_says_which_backends_fuse_the_glue():
    status = glue_status()
    composite = "PyTorch composite"
    assert status["reference"] == {"rms_norm": composite, "swiglu": composite,
                                   "q_norm": composite, "k_norm": composite}
    assert status["triton"] == {"rms_norm": "fused", "swiglu": "fused",
                                "q_norm": "in the retrieval kernels",
                                "k_norm": "with the memory's metadata"}
    assert status["cpu"]["rms_norm"] == composite and status["cuda"]["q_norm"] == composite


@pytest.mark.parametrize("backend,device", GLUE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hd", [128, 40, 13])
def test_visual_kv_matches_float64(backend, device, dtype, hd):
    """k_norm of every key head and the memory's metadata in one launch: kv_len = one past
    the last valid token (holes inside count, an empty sample 0), has_visual = kv_len > 0;
    the k_norm gradient through the op. Every output poisoned first."""
    B, Nv, Hkv = 4, 9, 2
    k = torch.randn(B, Nv, Hkv, hd, device=device).mul(3).to(dtype).requires_grad_()
    w = (torch.rand(hd, device=device) + 0.5).to(dtype).requires_grad_()
    mask = torch.ones(B, Nv, dtype=torch.bool, device=device)
    mask[1, 6:] = False          # padded: kv_len 6
    mask[2, :] = False           # no visual token: kv_len 0
    mask[3, 2] = mask[3, 8] = False  # holes, the last one too: kv_len 8
    for m, lens in ((mask, [9, 6, 0, 8]), (None, [Nv] * B)):
        with poisoned_outputs():
            y, rstd, kv_len, has = op(backend, "visual_kv_fwd")(k, w, m, 1e-6)
        assert kv_len.tolist() == lens and has.tolist() == [n > 0 for n in lens]
        assert kv_len.dtype == torch.int32 and has.dtype == torch.bool
        k64, w64 = k.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = rms_norm(k64, w64, 1e-6)
        assert max_rel_err(y, ref) < TOLERANCE[dtype]
        assert max_rel_err(rstd, torch.rsqrt(k64.pow(2).mean(-1) + 1e-6).reshape(-1)) < 1e-6
        grad = torch.randn_like(y)
        y.backward(grad)
        ref.backward(grad.double())
        assert max_rel_err(k.grad, k64.grad) < TOLERANCE[dtype]
        assert max_rel_err(w.grad, w64.grad) < TOLERANCE[dtype]
        k.grad = w.grad = None


@pytest.mark.parametrize("backend,device", GLUE)
def test_visual_kv_checks_its_arguments(backend, device):
    k = torch.randn(2, 3, 1, 16, device=device)
    with pytest.raises(ValueError, match="mask"):
        op(backend, "visual_kv_fwd")(k, torch.ones(16, device=device),
                                     torch.ones(2, 4, dtype=torch.bool, device=device), 1e-6)
    with pytest.raises(ValueError, match="k: .*head dims of up to 256"):
        op(backend, "visual_kv_fwd")(torch.randn(1, 2, 1, 264, device=device),
                                     torch.ones(264, device=device), None, 1e-6)
    torch.library.opcheck(op(backend, "visual_kv_fwd"),
                          (k.requires_grad_(), torch.ones(16, device=device), None, 1e-6))


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs the interpreter")
def test_interpreter_rounds_bf16_to_nearest():
    """The kernels' float32 -> bfloat16 casts round to nearest even in the interpreter, as
    on a GPU (tests/interpreter_rounding.py): every element equal to torch's cast."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, tl.load(X + i).to(tl.bfloat16))

    x = torch.randn(4096) * 7
    y = torch.empty(4096, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(torch.bfloat16))
