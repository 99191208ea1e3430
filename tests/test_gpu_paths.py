"""What only a GPU shows: inductor-compiled training steps, a CUDA-graph decode step with a
cached VisualMemory, and launch grids past the 65,535 limit of grid y and z.

Each test takes the device as a parameter and runs wherever its backend can: the GPU paths
on CUDA (``make gpu-check``), the device-independent parts of the logic on CPU as well, so
the test code itself is exercised by CI.
"""
import pytest
import torch

from conftest import DEVICES, HOME_DEVICES
from pvm_kernels import PVMConfig, pvm_retrieval
from pvm_kernels.ops import available_backends
from pvm_kernels.reference import retrieval_reference
from pvm_kernels.testing import live_block, max_rel_err, random_mask

KERNEL_BACKENDS = ["triton", "cuda", "cpu"]


def kernel_backend_params(devices=("cuda",), exclude=()):
    out = []
    for be in KERNEL_BACKENDS:
        for dev in HOME_DEVICES[be]:
            if dev not in devices or f"{be}-{dev}" in exclude:
                continue
            usable = dev in DEVICES and be in available_backends(dev)
            marks = [] if usable else [pytest.mark.skip(reason=f"{be} not usable on {dev} here")]
            out.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return out


CFG = PVMConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                intermediate_size=512, pvm_hidden_size=128)


@pytest.mark.parametrize("backend,device", kernel_backend_params(("cuda",)))
def test_inductor_compiled_training_step_matches_eager(backend, device):
    """torch.compile with inductor (the default backend) around the block, forward and
    backward: the kernels stay opaque custom ops inside generated code."""
    torch._dynamo.reset()
    block = live_block(CFG, device=device)
    h = torch.randn(2, 9, 256, device=device, requires_grad=True)
    visual = torch.randn(2, 21, 256, device=device)
    mask = random_mask(2, 21, pad_from={1: 13}).to(device)
    ffn = torch.randn(2, 9, 256, device=device)

    def step(h):
        return block(h, visual, mask, ffn_output=ffn, backend=backend).square().sum()

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    loss = compiled(h)
    loss.backward()
    grads = [h.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    h.grad = None
    block.zero_grad(set_to_none=True)
    eager = step(h)
    eager.backward()
    assert max_rel_err(loss, eager) < 1e-5
    for got, want in zip(grads, [h.grad] + [p.grad for p in block.parameters()]):
        assert max_rel_err(got, want) < 1e-4


@pytest.mark.parametrize("backend,device", kernel_backend_params(("cuda",)))
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_cuda_graph_replays_a_decode_step(backend, device, with_mask):
    """A decode step (T = 1) against a VisualMemory encoded once, captured in a CUDA graph
    and replayed on new hidden states: same result as eager, no host sync in the step."""
    block = live_block(CFG, device=device).eval()
    B = 3
    visual = torch.randn(B, 40, 256, device=device)
    mask = random_mask(B, 40, empty_rows=[2], pad_from={0: 31}).to(device) if with_mask else None
    with torch.no_grad():
        memory = block.encode_visual(visual, mask)
        h_static = torch.randn(B, 1, 256, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up (compiles, allocates) outside capture
            for _ in range(3):
                block(h_static, memory, backend=backend)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = block(h_static, memory, backend=backend)
        for _ in range(3):
            h = torch.randn(B, 1, 256, device=device)
            h_static.copy_(h)
            graph.replay()
            eager = block(h, memory, backend=backend)
            assert torch.equal(out_static, eager)
    if with_mask:
        assert (out_static[2] == 0).all()


def big_grid_problem(device, B, Hkv):
    """B x Hkv (sample, KV head) pairs with T 1, G 2, Nv 3, hd 16: a grid of B * Hkv
    programs along one axis; the reference is cheap at this size."""
    q = torch.randn(B, 1, 2 * Hkv, 16, device=device, requires_grad=True)
    k = torch.randn(B, 3, Hkv, 16, device=device, requires_grad=True)
    v = torch.randn(B, 3, Hkv, 16, device=device, requires_grad=True)
    mask = torch.rand(B, 3, device=device) > 0.3
    return q, k, v, mask


# The interpreter would run the 70,002 Triton programs one by one in Python: on CPU the
# Triton launch grid is checked below instead, and on a GPU the kernels run.
@pytest.mark.parametrize("backend,device",
                         kernel_backend_params(("cuda", "cpu"), exclude=("triton-cpu",)))
def test_more_than_65535_sample_head_pairs(backend, device):
    """B x Hkv = 70,002: above the 65,535 limit of grid y, which B x Hkv used to occupy."""
    q, k, v, mask = big_grid_problem(device, B=35_001, Hkv=2)
    out = pvm_retrieval(q, k, v, mask, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    qr, kr, vr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = retrieval_reference(qr, kr, vr, mask)
    ref.backward(grad.double())
    assert max_rel_err(out, ref) < 1e-4
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert max_rel_err(got, want) < 1e-4


def test_triton_launch_grids_are_one_dimensional_within_the_x_limit(monkeypatch):
    """The Triton launchers put (block, sample, KV head) on grid x alone (limit 2^31 - 1):
    the grid each kernel is launched with, recorded instead of run."""
    from pvm_kernels.triton_ops import retrieval as launchers
    grids = {}

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids[self.name] = grid
            return lambda *args, **kwargs: None

    for name in ("retrieval_fwd_kernel", "retrieval_bwd_dq_kernel", "retrieval_bwd_dkdv_kernel"):
        monkeypatch.setattr(launchers, name, Spy(name))
    B, Hkv, G, T, Nv = 35_001, 2, 2, 1, 3
    q, k, v, mask = (t.detach() for t in big_grid_problem("cpu", B, Hkv))
    out, lse = launchers.retrieval_fwd(q, k, v, mask, None, 0.25)
    launchers.retrieval_bwd(torch.randn_like(out), q, k, v, out, lse, mask, None, 0.25)
    rows = launchers.select_config("fwd", q.dtype, T * G, 16, q.device).block_m
    keys = launchers.select_config("dkdv", q.dtype, T * G, 16, q.device).block_n
    assert grids["retrieval_fwd_kernel"] == (-(-T * G // rows) * B * Hkv,)
    assert grids["retrieval_bwd_dq_kernel"] == (-(-T * G // rows) * B * Hkv,)
    assert grids["retrieval_bwd_dkdv_kernel"] == (-(-Nv // keys) * B * Hkv,)
    assert all(len(g) == 1 and g[0] > 65_535 for g in grids.values())


def _edge_cases_16bit(backend, device, dtype, hd):
    """bf16 / fp16 at the head dims the tensor-core kernels take: NaN and inf in padded K/V
    stay out, a sample with no visual token gets exactly 0 (and zero gradients), kv_len past
    Nv and negative are clamped, a NaN query row is NaN and poisons nothing else."""
    torch.manual_seed(hd)
    B, T, H, Hkv, Nv = 3, 20, 4, 1, 130
    q, k, v = (torch.randn(B, n, h, hd, dtype=torch.float64) for n, h in ((T, H), (Nv, Hkv), (Nv, Hkv)))
    mask = torch.ones(B, Nv, dtype=torch.bool)
    mask[0, 100:] = False
    mask[1] = False                                    # no visual token
    kv_len = torch.tensor([10**6, 7, -5], dtype=torch.int32)  # sample 2: no key either
    k[0, 100:] = float("nan")
    v[0, 100:] = float("inf")
    q[0, 3, 1] = float("nan")                          # one NaN query row
    qd, kd, vd = (t.to(dtype).to(device).requires_grad_() for t in (q, k, v))
    out = pvm_retrieval(qd, kd, vd, mask.to(device), kv_len.to(device), backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = out.detach().cpu().double()
    assert torch.isnan(got[0, 3, 1]).all()
    nan_row = torch.zeros_like(got, dtype=torch.bool)
    nan_row[0, 3, 1] = True
    assert not torch.isnan(got[~nan_row]).any()
    assert (got[1:] == 0).all() and (kd.grad.cpu()[1:] == 0).all() and (vd.grad.cpu()[1:] == 0).all()
    # sample 0 without its NaN row, against float64 on its 100 valid keys
    q0 = q[0:1].clone()
    q0[0, 3, 1] = 0
    qr = q0.to(dtype).double().requires_grad_()
    kr, vr = (t[0:1, :100].to(dtype).double().requires_grad_() for t in (k, v))
    ref = retrieval_reference(qr, kr, vr)
    keep = ~nan_row[0:1]
    assert max_rel_err(got[0:1][keep], ref.detach()[keep]) < 2e-2


@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", kernel_backend_params(("cuda",)))
def test_16bit_edge_cases_on_the_gpu(backend, device, dtype, hd):
    """On a GPU these run the tensor-core CUDA kernels and the 16-bit Triton tiles, whose
    edge cases the rest of the suite checks on the GPU only in fp32."""
    _edge_cases_16bit(backend, device, dtype, hd)


def test_16bit_edge_cases_run_in_the_emulator(request):
    """The same checks on the emulated CUDA kernels (CPU), so CI exercises the test code."""
    request.getfixturevalue("emulated_backend")
    from emu_support import BACKEND
    for dtype in (torch.bfloat16, torch.float16):
        _edge_cases_16bit(BACKEND, "cpu", dtype, 64)
