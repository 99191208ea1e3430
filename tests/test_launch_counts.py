"""Kernel launches per call of the PVM block, a contract (issue 24): on the GPU machines'
host every eager launch costs 30-100 us, so below T ~8192 the block's time is its launch
count. Counted on CPU with pvm_kernels.launches.LaunchCounter (every kernel-launching aten
op, and each custom op at the kernels it really launches), the triton backend running in
Triton's interpreter, at the Qwen3-VL-8B block layout (D 4096, P 512, H 4, Hkv 1, hd 128)."""
import pytest
import torch

from pvm_kernels import available_backends, pvm_retrieval
from pvm_kernels.launches import LaunchCounter, launches_a_kernel


def test_views_and_allocations_launch_nothing():
    x = torch.randn(4, 8)
    with LaunchCounter() as c:
        y = x.t().reshape(8, 4)[1:].unsqueeze(0).expand(2, 7, 4)
        torch.empty(3)
        x.new_empty(5)
    assert c.ops == [], c.ops
    with LaunchCounter() as c:
        (y * 2).contiguous().sum()  # y is a strided view: mul keeps its layout, so a copy
    assert [n for n, _ in c.ops] == ["aten.mul", "aten.clone", "aten.sum"], c.ops
    assert not launches_a_kernel(torch.ops.aten.view.default)
    assert launches_a_kernel(torch.ops.aten.mm.default)


@pytest.mark.skipif("triton" not in available_backends("cpu"), reason="needs the triton backend")
def test_a_split_retrieval_is_one_launch():
    """A decode step at batch 1 splits the keys (split-KV) and the last split of each row
    block merges the partials in the same launch: 1, as an unsplit launch."""
    from pvm_kernels.triton_ops import retrieval
    q, k = torch.randn(1, 1, 4, 128), torch.randn(1, 1024, 1, 128)
    assert retrieval.split_loop(1024, 64, 1, q.device)[0] > 1  # the launch does split
    pvm_retrieval(q, k, k, backend="triton")  # first call: the interpreter's own set-up
    with LaunchCounter() as c:
        pvm_retrieval(q, k, k, backend="triton")
    assert c.ops == [("pvm_kernels.triton_retrieval_fwd", 1)], c.ops
    k = k[:, :64]  # one key block: nothing to split
    with LaunchCounter() as c:
        pvm_retrieval(q, k, k, backend="triton")
    assert c.ops == [("pvm_kernels.triton_retrieval_fwd", 1)], c.ops


# ---- the contract: the 8B block on the default CUDA backend ------------------------------

needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="needs the triton backend")
CONTRACT = {"forward": 16, "forward+backward": 50, "decode": 12}


@pytest.fixture(scope="module")
def block8b():
    from pvm_kernels import PVMConfig
    from pvm_kernels.testing import live_block
    torch.manual_seed(0)
    return live_block(PVMConfig.qwen3_vl_8b(), torch.float32)


def _inputs(T, Nv, B=1):
    torch.manual_seed(1)
    h = torch.randn(B, T, 4096)
    visual, ffn = torch.randn(B, Nv, 4096), torch.randn(B, T, 4096)
    mask = torch.ones(B, Nv, dtype=torch.bool)
    mask[0, Nv - 3:] = False  # padded
    return h, visual, mask, ffn


def counted(fn, warm_up=True):
    """fn's launches, after a first call that builds what is built once (the stacked
    projection weights, the interpreter's set-up)."""
    if warm_up:
        fn()
    with LaunchCounter() as c:
        fn()
    return c


@needs_triton
def test_forward_on_raw_visual_embeddings(block8b):
    h, visual, mask, ffn = _inputs(33, 200)
    with torch.no_grad():
        c = counted(lambda: block8b(h, visual, mask, ffn_output=ffn, backend="triton"))
    assert c.by_op()["pvm_kernels.triton_retrieval_qn_fwd"] == 1, c.by_op()
    assert c.total <= CONTRACT["forward"], (c.total, c.by_op())


@needs_triton
def test_forward_and_backward(block8b):
    h, visual, mask, ffn = _inputs(9, 40)
    h.requires_grad_()
    grad = torch.randn_like(h)

    def step():
        h.grad = None
        for p in block8b.parameters():
            p.grad = None
        block8b(h, visual, mask, ffn_output=ffn, backend="triton").backward(grad)

    c = counted(step)
    assert c.total <= CONTRACT["forward+backward"], (c.total, c.by_op())
    assert all(p.grad is not None for p in block8b.parameters())


@needs_triton
def test_decode_step_with_a_cached_memory(block8b):
    h, visual, mask, ffn = _inputs(1, 1024)
    with torch.no_grad():
        memory = block8b.encode_visual(visual, mask, backend="triton")
        c = counted(lambda: block8b(h, memory, ffn_output=ffn, backend="triton"))
    assert c.by_op()["pvm_kernels.triton_retrieval_qn_fwd"] == 1, c.by_op()  # split-KV
    assert c.total <= CONTRACT["decode"], (c.total, c.by_op())


@needs_triton
def test_the_four_paired_weights_are_stacked_in_one_launch(block8b):
    """k/v and gate/up share their input width: one cat stacks all four per call (never
    cached: modules/paired_linear.py), and a decode step with a memory stacks none."""
    h, visual, mask, ffn = _inputs(5, 64)
    with torch.no_grad():
        c = counted(lambda: block8b(h, visual, mask, ffn_output=ffn, backend="triton"))
        assert c.by_op()["aten.cat"] == 1, c.by_op()
        memory = block8b.encode_visual(visual, mask, backend="triton")
        c = counted(lambda: block8b(h[:, :1], memory, ffn_output=ffn[:, :1], backend="triton"))
        assert "aten.cat" not in c.by_op(), c.by_op()


@needs_triton
def test_a_hooked_projection_is_called_not_read(block8b):
    """A module a tool wraps or hooks is run as a module: the fused path gives up the
    stacked GEMM for that pair (a launch more) rather than skip the tool."""
    import copy
    block = copy.deepcopy(block8b)
    calls = []
    block.mlp.gate_proj.register_forward_hook(lambda m, i, o: calls.append(1))
    h, visual, mask, ffn = _inputs(1, 64)
    with torch.no_grad():
        block(h, visual, mask, ffn_output=ffn, backend="triton")
    assert calls == [1]
