"""The vLLM plugin's decode retrieval from the paged cache: the in-place Triton kernel
(``triton_ops/paged_retrieval.py``, text blocks skipped) against gathering every position
into a padded memory first (``ops/paged.py``'s fallback), 8B layout (H 4, Hkv 1, hd 128),
bf16, 16-token blocks, a 1024-token image at the start of each request's context.

Cases: R requests of ``context`` tokens (R in {1, 16, 64}; context 1024 + {1024, 16384}
generated). Each timed case first checks the two paths agree (2% of the largest value).
Records: ``pvm_kernels.roofline.paged_decode_cost`` (flops, bytes: 0.53 MB per request for
the kernel against 26.8 MB gathered at 17k tokens), the CUDA-event median
(``conftest.time_and_roofline``) and launches per call. On CPU the counts only
(``test_paged_counts``): the kernel needs a GPU (Triton's interpreter times numpy).
"""
import pytest
import torch

from conftest import DEVICE, time_and_roofline
from pvm_kernels.roofline import paged_decode_cost

H, HKV, HD, BS, NV = 4, 1, 128, 16, 1024
DTYPE = torch.bfloat16
CASES = [pytest.param(R, NV + gen, id=f"R{R}-ctx{NV + gen}")
         for R in (1, 16, 64) for gen in (1024, 16384)]
PATHS = ["in-place", "gathered"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("R,context", CASES)
def test_paged_counts(benchmark, R, context, path):
    """FLOPs and bytes of each case and path (bf16), untimed: the CPU run's record."""
    cost = benchmark.pedantic(paged_decode_cost, args=(R, H, HKV, HD, NV, context, BS, 2,
                                                       path == "in-place"),
                              rounds=1, iterations=1)
    benchmark.extra_info.update(impl="counts", path=path, R=R, context=context, Nv=NV,
                                flops=cost.flops, bytes=cost.bytes,
                                h100_lower_bound_ms=cost.lower_bound_ms())


def _problem(R: int, context: int):
    """A cache holding R requests of ``context`` tokens in shuffled blocks, the first NV
    of each visual; decode queries, one per request."""
    from pvm_kernels.ops.paged import mark_blocks
    blocks = -(-context // BS)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    kv = torch.randn(R * blocks + 1, HKV, BS, 2 * HD, device=DEVICE, dtype=DTYPE, generator=g)
    flags = torch.zeros(kv.shape[0] * BS, dtype=torch.bool, device=DEVICE)
    block_visual = torch.zeros(kv.shape[0], dtype=torch.bool, device=DEVICE)
    order = torch.randperm(R * blocks, device=DEVICE, generator=g).to(torch.int32) + 1
    table = order.view(R, blocks)
    pos = torch.arange(context, device=DEVICE)
    slots = (table.long()[:, pos // BS] * BS + pos % BS)
    flags[slots[:, :NV].flatten()] = True
    mark_blocks(flags, block_visual, slots.flatten(), BS)
    seq_lens = torch.full((R,), context, dtype=torch.int32, device=DEVICE)
    q = torch.randn(R, H, HD, device=DEVICE, dtype=DTYPE, generator=g)
    rows = torch.arange(R, dtype=torch.int32, device=DEVICE)
    return q, kv, flags, block_visual, table, seq_lens, rows


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("R,context", CASES)
def test_paged_decode(benchmark, R, context, path):
    if DEVICE.type != "cuda":
        pytest.skip("the paged kernel runs on a GPU (test_paged_counts has the counts)")
    from pvm_kernels.ops.paged import gather_paged_memory, paged_decode_retrieval
    from pvm_kernels.ops import pvm_retrieval
    q, kv, flags, block_visual, table, seq_lens, rows = _problem(R, context)
    scale = HD ** -0.5

    def in_place():
        return paged_decode_retrieval(q, kv, flags, block_visual, table, seq_lens, rows,
                                      context, scale, backend="triton")[0]

    def gathered():
        memory = gather_paged_memory(kv, flags, table, seq_lens, context)
        return pvm_retrieval(q[:, None], memory.key, memory.value, memory.key_mask,
                             memory.kv_len, scale, backend="triton")[:, 0]

    a, b = in_place(), gathered()
    assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()
    work = in_place if path == "in-place" else gathered
    cost = paged_decode_cost(R, H, HKV, HD, NV, context, BS, 2, path == "in-place")
    benchmark.extra_info.update(path=path, R=R, context=context, Nv=NV)
    time_and_roofline(benchmark, work, cost)
