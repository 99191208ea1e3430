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
