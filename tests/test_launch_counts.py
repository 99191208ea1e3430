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
