"""torch.library registration: opcheck on the kernel-backed ops and torch.compile tracing."""
import pytest
import torch

from conftest import backend_device_params, op_prefix
from pvm_kernels import FusedPVM, PVMConfig
from pvm_kernels.ops import registration
from pvm_kernels.testing import max_rel_err, random_mask

def op_backend_device_params():
    """The kernel backends only: the reference is plain PyTorch, not a custom op."""
    return [p for p in backend_device_params() if p.values[0] != "reference"]


def retrieval_args(device, dtype, requires_grad):
    B, T, H, Hkv, hd, Nv = 2, 5, 4, 2, 16, 13
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=requires_grad)  # noqa
    mask = random_mask(B, Nv, empty_rows=[1]).to(device)
    kv_len = (mask.int() * torch.arange(1, Nv + 1, device=device)).amax(1).int()
    return (mk(B, T, H, hd), mk(B, Nv, Hkv, hd), mk(B, Nv, Hkv, hd), mask, kv_len, 0.25)


@pytest.mark.parametrize("backend,device", op_backend_device_params())
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_retrieval(backend, device, requires_grad):
    args = retrieval_args(device, torch.float32, requires_grad)
    fwd = registration.get_op(op_prefix(backend), "retrieval_fwd")
    torch.library.opcheck(fwd, args)
    torch.library.opcheck(fwd, args[:3] + (None, None, 0.25))
    q, k, v, mask, kv_len, scale = [a.detach() if torch.is_tensor(a) else a for a in args]
    out, lse = fwd(q, k, v, mask, kv_len, scale)
    torch.library.opcheck(registration.get_op(op_prefix(backend), "retrieval_bwd"),
                          (torch.randn_like(out), q, k, v, out, lse, mask, kv_len, scale))


@pytest.mark.parametrize("backend,device", op_backend_device_params())
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_merge(backend, device, requires_grad):
    e = torch.randn(3, 4, 48, device=device, requires_grad=requires_grad)
    gate = torch.tensor([0.3], device=device, requires_grad=requires_grad)
    ffn = torch.randn(3, 4, 48, device=device, requires_grad=requires_grad)
    keep = torch.rand(3, 4, device=device) > 0.5
    fwd = registration.get_op(op_prefix(backend), "merge_fwd")
    torch.library.opcheck(fwd, (e, gate, keep, ffn, 1e-6))
    torch.library.opcheck(fwd, (e, gate, None, None, 1e-6))
    out, rstd = fwd(e.detach(), gate.detach(), keep, ffn.detach(), 1e-6)
    torch.library.opcheck(registration.get_op(op_prefix(backend), "merge_bwd"),
                          (torch.randn_like(out), e.detach(), gate.detach(), keep, rstd))


@pytest.mark.parametrize("backend,device", op_backend_device_params())
def test_compile_fullgraph_forward_and_backward(backend, device):
    """The whole block (with the kernels as custom ops) compiles without a graph break."""
    torch._dynamo.reset()
    cfg = PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, pvm_hidden_size=64)
    block = FusedPVM(cfg).to(device)
    with torch.no_grad():
        block.gate_alpha.fill_(0.5)
    h = torch.randn(2, 6, 64, device=device, requires_grad=True)
    visual = torch.randn(2, 10, 64, device=device)
    mask = random_mask(2, 10, pad_from={1: 4}).to(device)
    ffn = torch.randn(2, 6, 64, device=device)

    def step(h, visual, mask, ffn):
        return block(h, visual, mask, ffn_output=ffn, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(h, visual, mask, ffn)
    got.square().sum().backward()
    g_compiled = h.grad.clone()
    h.grad = None
    eager = step(h, visual, mask, ffn)
    eager.square().sum().backward()
    assert max_rel_err(got, eager) < 1e-6
    assert max_rel_err(g_compiled, h.grad) < 1e-6


def test_backend_checks_run_outside_a_compiled_trace():
    """A backend's availability and head-dim checks are asked once, eagerly, even when the
    first ask happens inside torch.compile: what they call (importlib's find_spec in the
    triton check) may be code dynamo refuses to trace, as torch 2.11's does. A check that
    forces a graph break stands in for that code here; with fullgraph=True it would fail
    the compile if it were traced."""
    import torch._dynamo
    from pvm_kernels.ops.registry import Backend, register_backend, resolve_backend, \
        head_dim_refusal, unregister_backend

    def untraceable(*_):
        torch._dynamo.graph_break()
        return None

    register_backend(Backend("untraceable", None, None, check=untraceable,
                             head_dim_check=untraceable))
    try:
        def step(x):
            impl = resolve_backend("untraceable", x.device)
            return x + (0 if head_dim_refusal(impl, 16, x.dtype) is None else 1)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(step, fullgraph=True)(torch.ones(3)), torch.ones(3))
    finally:
        unregister_backend("untraceable")


def test_importing_the_package_imports_neither_triton_nor_dynamo():
    """``import pvm_kernels`` leaves Triton unimported, so TRITON_INTERPRET can still be
    chosen after it (the CLI does so without a GPU). torch._dynamo imports triton: a
    decorator from torch.compiler at import time once broke the CLI demo's interpreter."""
    import subprocess
    import sys
    code = ("import sys, pvm_kernels; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
