"""PVM's visual memory in a paged KV cache (pvm_kernels/ops/paged.py, what the vLLM plugin
stores and retrieves through), against float64 on the requests' memories laid out densely.

Requests hold text and visual tokens in any order (text before the image too) in shuffled
physical blocks of a strided cache view; stale entries (NaN, and visual flags of an earlier
owner past a request's length) must never reach the output; a request without visual
tokens gets exactly 0.
"""
import math

import pytest
import torch

from pvm_kernels.config import PVMConfig
from pvm_kernels.modules import FusedPVM
from pvm_kernels.ops.paged import gather_paged_memory, write_paged_kv
from pvm_kernels.reference import pvm_block_reference

BLOCK = 4


def pvm_reference(block, hidden, visual):
    """The float64 reference block on dense visual embeddings [B, Nv, D]."""
    return pvm_block_reference(block.state_dict(), block.dims, hidden, visual)

D, P, HEADS, KV_HEADS, HD = 64, 64, 4, 2, 16


def _block(dtype=torch.float64):
    torch.manual_seed(0)
    config = PVMConfig(hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=HD, intermediate_size=128, pvm_hidden_size=P)
    block = FusedPVM(config).to(dtype)
    with torch.no_grad():
        block.gate_alpha.fill_(0.7)
    return block


#: Each request: (length, visual positions). Request 1 has text before its image and text
#: after; request 2 is text only; request 3 has two images.
REQUESTS = [(7, [0, 1, 2]), (11, [4, 5, 6, 7]), (5, []), (10, [1, 2, 7, 8])]


def _paged(block, embeds, num_blocks=16):
    """A cache [num_blocks, Hkv, BLOCK, 2 hd] (a strided view), poisoned with NaN, the
    requests written into shuffled blocks; returns cache, flags, block_table, seq_lens."""
    g = torch.Generator().manual_seed(1)
    backing = torch.full((num_blocks, BLOCK, KV_HEADS, 2 * HD), float("nan"), dtype=embeds.dtype)
    cache = backing.permute(0, 2, 1, 3)              # vLLM may bind a strided view
    flags = torch.ones(num_blocks * BLOCK, dtype=torch.bool)   # an earlier owner's flags
    order = torch.randperm(num_blocks, generator=g).tolist()
    per = max(-(-n // BLOCK) for n, _ in REQUESTS)
    table = torch.zeros(len(REQUESTS), per, dtype=torch.int32)
    for r, (n, visual) in enumerate(REQUESTS):
        blocks = [order.pop() for _ in range(-(-n // BLOCK))]
        table[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        is_visual = torch.zeros(n, dtype=torch.bool)
        is_visual[visual] = True
        k, v = block.visual_keys_values(embeds[r][:n])
        # The plugin writes K/V for visual tokens and a False flag for every other token.
        flags[slots] = False
        write_paged_kv(cache, flags, slots[is_visual], k[is_visual], v[is_visual],
                       is_visual[is_visual])
    seq_lens = torch.tensor([n for n, _ in REQUESTS], dtype=torch.int32)
    return cache, flags, table, seq_lens


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("cpu", torch.float32)])
def test_paged_retrieval_equals_float64_on_each_requests_visual_tokens(backend, dtype):
    """Text slots never written (NaN) and an earlier owner's flags past a request's length
    never reach the output, in the reference and the compiled CPU backend."""
    from pvm_kernels.ops import available_backends
    if backend not in available_backends(torch.device("cpu")):
        pytest.skip(f"{backend} backend not built")
    block = _block(dtype)
    reference_block = _block()
    g = torch.Generator().manual_seed(2)
    longest = max(n for n, _ in REQUESTS)
    embeds = torch.randn(len(REQUESTS), longest, D, generator=g, dtype=torch.float64)
    cache, flags, table, seq_lens = _paged(block, embeds.to(dtype))
    hidden = torch.randn(len(REQUESTS), 3, D, generator=g, dtype=torch.float64)
    memory = gather_paged_memory(cache, flags, table, seq_lens, longest)
    assert memory.key.shape == (len(REQUESTS), math.ceil(longest / BLOCK) * BLOCK, KV_HEADS, HD)
    got = block(hidden.to(dtype), memory, backend=backend).double()
    assert torch.isfinite(got).all()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for r, (n, visual) in enumerate(REQUESTS):
        if not visual:
            assert torch.equal(got[r], torch.zeros_like(got[r])), r
        else:
            want = pvm_reference(reference_block, hidden[r:r + 1], embeds[r:r + 1, visual])
            torch.testing.assert_close(got[r:r + 1], want, **tol)


def test_a_shorter_length_hides_later_flagged_slots():
    """seq_lens bounds what a request sees: request 3 cut before its second image."""
    block = _block()
    g = torch.Generator().manual_seed(3)
    longest = max(n for n, _ in REQUESTS)
    embeds = torch.randn(len(REQUESTS), longest, D, generator=g, dtype=torch.float64)
    cache, flags, table, seq_lens = _paged(block, embeds)
    seq_lens[3] = 5
    memory = gather_paged_memory(cache, flags, table[3:], seq_lens[3:], longest)
    assert memory.key_mask[0].nonzero().flatten().tolist() == [1, 2]
    hidden = torch.randn(1, 2, D, generator=g, dtype=torch.float64)
    torch.testing.assert_close(block(hidden, memory, backend="reference"),
                               pvm_reference(block, hidden, embeds[3:, [1, 2]]),
                               rtol=1e-10, atol=1e-12)


def test_write_rejects_keys_of_another_layout():
    cache = torch.zeros(2, KV_HEADS, BLOCK, 2 * HD)
    flags = torch.zeros(2 * BLOCK, dtype=torch.bool)
    with pytest.raises(ValueError, match="key/value must be"):
        write_paged_kv(cache, flags, torch.tensor([0]), torch.zeros(1, 1, HD),
                       torch.zeros(1, 1, HD), torch.tensor([True]))


# ---- the in-place paged retrieval (triton_ops/paged_retrieval.py) -----------------------

#: Where the kernel runs: the GPU where there is one, else Triton's interpreter on the CPU.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

def _decode_problem(dtype, block_size, hd, seed=4):
    """Queries of 6 decode tokens over 4 requests (``rows`` picks each one's request), their
    paged cache with block summaries on KERNEL_DEVICE, and the float64 answer on the CPU:
    (q, kv, flags, block_visual, table, seq_lens, rows, want [T, H, hd], want_has [T],
    scale)."""
    from pvm_kernels.ops.paged import mark_blocks
    from pvm_kernels.reference import retrieval_reference
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = 4, 2
    num_blocks = 24
    backing = torch.full((num_blocks, block_size, kv_heads, 2 * hd), float("nan"), dtype=dtype)
    kv = backing.permute(0, 2, 1, 3)
    flags = torch.ones(num_blocks * block_size, dtype=torch.bool)
    block_visual = torch.ones(num_blocks, dtype=torch.bool)
    order = torch.randperm(num_blocks, generator=g).tolist()
    lengths = [3 * block_size + 5, 2 * block_size + 1, block_size - 3, 4 * block_size]
    visual_sets = [list(range(2, 9)), [block_size + 2, block_size + 3, 2 * block_size],
                   [], list(range(block_size, block_size + 4)) + [3 * block_size + 7]]
    table = torch.zeros(len(lengths), 5, dtype=torch.int32)
    keys, values = [], []
    for r, (n, visual) in enumerate(zip(lengths, visual_sets)):
        blocks = [order.pop() for _ in range(-(-n // block_size))]
        table[r, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size
                              for p in range(n)])
        k = torch.randn(n, kv_heads, hd, generator=g, dtype=torch.float64)
        v = torch.randn(n, kv_heads, hd, generator=g, dtype=torch.float64)
        is_visual = torch.zeros(n, dtype=torch.bool)
        is_visual[visual] = True
        flags[slots] = False
        write_paged_kv(kv, flags, slots[is_visual], k[is_visual].to(dtype),
                       v[is_visual].to(dtype), is_visual[is_visual])
        mark_blocks(flags, block_visual, slots, block_size)
        keys.append(k[is_visual].to(dtype).double())
        values.append(v[is_visual].to(dtype).double())
    rows = torch.tensor([1, 0, 3, 2, 1, 3], dtype=torch.int32)
    q = torch.randn(len(rows), heads, hd, generator=g, dtype=torch.float64).to(dtype)
    scale = hd ** -0.5
    want = torch.zeros(len(rows), heads, hd, dtype=torch.float64)
    for t, r in enumerate(rows.tolist()):
        if len(keys[r]):
            want[t] = retrieval_reference(q[t].double()[None, None], keys[r][None],
                                          values[r][None], None, scale=scale)[0, 0]
    want_has = torch.tensor([bool(visual_sets[r]) for r in rows.tolist()])
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    dev = [t.to(KERNEL_DEVICE) for t in (q, kv, flags, block_visual, table, seq_lens, rows)]
    return (*dev, want, want_has, scale)


@pytest.mark.parametrize("dtype,block_size,hd", [(torch.bfloat16, 16, 16),
                                                 (torch.bfloat16, 32, 72),
                                                 (torch.float16, 16, 128)])
def test_the_paged_kernel_reads_only_visual_slots_and_matches_float64(dtype, block_size, hd):
    from pvm_kernels._alloc import poisoned_outputs
    from pvm_kernels.launches import kernel_launches
    from pvm_kernels.ops.paged import paged_decode_retrieval
    from pvm_kernels.testing import TOLERANCE, max_rel_err
    q, kv, flags, block_visual, table, seq_lens, rows, want, want_has, scale = \
        _decode_problem(dtype, block_size, hd)
    before = kernel_launches()
    with poisoned_outputs():
        a, has = paged_decode_retrieval(q, kv, flags, block_visual, table, seq_lens, rows,
                                        int(seq_lens.max()), scale, backend="triton")
    assert kernel_launches() - before == 1  # in place: one launch, no gather
    a, has = a.cpu(), has.cpu()
    assert torch.equal(has, want_has)
    assert torch.equal(a[~want_has], torch.zeros_like(a[~want_has]))  # exactly 0, not NaN
    assert max_rel_err(a, want) < TOLERANCE[dtype]
    # The gather path (any backend) agrees.
    b, has_b = paged_decode_retrieval(q, kv, flags, block_visual, table, seq_lens, rows,
                                      int(seq_lens.max()), scale, backend="reference")
    b, has_b = b.cpu(), has_b.cpu()
    assert torch.equal(has_b, want_has)
    assert max_rel_err(b, want) < TOLERANCE[dtype]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max
def test_the_paged_kernel_skips_blocks_whose_summary_is_clear():
    """What makes a long generation cheap: a block the summary calls text-only is never
    read (here it holds NaN keys flagged visual, which would poison the output)."""
    from pvm_kernels.ops.paged import paged_decode_retrieval
    from pvm_kernels.testing import TOLERANCE, max_rel_err
    q, kv, flags, block_visual, table, seq_lens, rows, want, want_has, scale = \
        _decode_problem(torch.bfloat16, 16, 16)
    free = [b for b in range(kv.shape[0]) if b not in table.flatten().tolist()][0]
    table[0, 3] = free                      # request 0's last block: positions 48..52
    kv[free] = float("nan")
    flags[free * 16:(free + 1) * 16] = True
    block_visual[free] = False
    a, _ = paged_decode_retrieval(q, kv, flags, block_visual, table, seq_lens, rows,
                                  int(seq_lens.max()), scale, backend="triton")
    assert max_rel_err(a.cpu(), want) < TOLERANCE[torch.bfloat16]
    block_visual[free] = True               # read: the NaN keys reach request 0's queries
    a, _ = paged_decode_retrieval(q, kv, flags, block_visual, table, seq_lens, rows,
                                  int(seq_lens.max()), scale, backend="triton")
    assert torch.isnan(a[rows == 0]).all().item()


@pytest.mark.parametrize("dtype,block_size,why", [(torch.bfloat16, 8, "block size 8"),
                                                  (torch.float32, 16, "float32")])
def test_launches_the_kernel_does_not_take_gather_instead(dtype, block_size, why):
    """A cache block size the kernel is not compiled for, or fp32 (whose tile spills): the
    same math on the gathered memory (the padded retrieval kernel)."""
    from pvm_kernels.ops.paged import paged_decode_retrieval
    from pvm_kernels.testing import TOLERANCE, max_rel_err
    from pvm_kernels.triton_ops.paged_retrieval import unsupported
    q, kv, flags, block_visual, table, seq_lens, rows, want, want_has, scale = \
        _decode_problem(dtype, block_size, 16)
    assert why in unsupported(q, kv, kv.shape[1])
    a, has = paged_decode_retrieval(q, kv, flags, block_visual, table, seq_lens, rows,
                                    int(seq_lens.max()), scale, backend="triton")
    assert torch.equal(has.cpu(), want_has)
    assert max_rel_err(a.cpu(), want) < TOLERANCE[dtype]


def test_queries_and_update_from_retrieval_compose_to_the_block():
    """What the vLLM plugin's decode path runs (queries, its own retrieval, the update)
    equals the block's forward, keep rules included (a visual query, a sample without
    visual tokens: exactly 0)."""
    from pvm_kernels.reference import retrieval_reference
    block = _block()
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 2, D, generator=g, dtype=torch.float64)
    visual = torch.randn(3, 5, D, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    query_is_visual = torch.tensor([[False, True], [False, False], [False, False]])
    want = block(hidden, visual, visual_mask=mask, query_is_visual=query_is_visual,
                 backend="reference")
    k, v = block.visual_keys_values(visual)
    q = block.queries(hidden, backend="reference")
    a = retrieval_reference(q, k, v, mask, scale=HD ** -0.5)
    keep = mask.any(1)[:, None] & ~query_is_visual
    got = block.update_from_retrieval(a, keep, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[2], torch.zeros_like(got[2])) and torch.equal(got[0, 1], 0 * got[0, 1])
    with pytest.raises(ValueError, match="a must be"):
        block.update_from_retrieval(a[..., :8], keep)


def test_the_paged_op_passes_opcheck():
    """The registered op's schema, fake impl and dispatch agree (torch.library.opcheck)."""
    import pvm_kernels.ops.triton_backend  # noqa: F401 - registers the triton ops
    q, kv, flags, block_visual, table, seq_lens, rows, _, _, scale = \
        _decode_problem(torch.bfloat16, 16, 16)
    torch.library.opcheck(torch.ops.pvm_kernels.triton_paged_retrieval_fwd,
                          (q, kv, flags, block_visual, table, seq_lens, rows, scale),
                          test_utils=("test_schema", "test_faketensor"))
