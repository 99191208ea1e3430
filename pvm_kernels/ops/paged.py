"""PVM's visual keys/values in a paged KV cache (a serving engine's block table).

A serving engine (vLLM) keeps one cache entry per token of each request in fixed-size
blocks; a request's token at position ``p`` lives in slot
``block_table[r, p // block_size] * block_size + p % block_size``. PVM stores, for every
token, the block's k-normed visual key and value in the PVM layer's entry, plus one flag
per slot saying whether the token is visual. Text tokens' entries hold whatever was written
(the flag is what excludes them), so a request's visual set is "the flagged slots below its
sequence length", whatever the order of text and images in its prompt: retrieval is not
causal, as the spec requires.

Layout of the cache (what vLLM 0.32 binds for a full-attention spec): ``kv_cache``
``[num_blocks, Hkv, block_size, 2 * hd]``, the key in channels ``:hd`` and the value in
``hd:``; it may be a strided view. ``visual_flags`` ``[num_blocks * block_size]`` bool;
``block_visual`` ``[num_blocks]`` bool, whether any slot of the block is flagged
(``mark_blocks``).

Two ways to retrieve: ``gather_paged_memory`` copies a batch's entries below its longest
length (text ones included, masked) into the padded ``VisualMemory`` the block's retrieval
takes: any backend, any shape, every position moved three times. ``paged_decode_retrieval``
runs the backend's in-place kernel for single-token queries where it has one (Triton:
text blocks skipped, roofline.paged_decode_cost), else that gather.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..memory import VisualMemory
from .backends import resolve_backend

_LOG = logging.getLogger(__name__)
_GATHER_NOTED = set()


def write_paged_kv(kv_cache: torch.Tensor, visual_flags: torch.Tensor,
                   slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   is_visual: torch.Tensor) -> None:
    """Store the step's keys/values and visual flags at their slots (in place).

    kv_cache [num_blocks, Hkv, block_size, 2 * hd]; visual_flags [num_blocks * block_size]
    bool; slot_mapping [T] int (negative: a padding token, not stored); key, value
    [T, Hkv, hd] in the cache's dtype; is_visual [T] bool.
    """
    num_blocks, hkv, block_size, channels = kv_cache.shape
    hd = channels // 2
    if key.shape[1:] != (hkv, hd) or value.shape != key.shape:
        raise ValueError(f"key/value must be [T, {hkv}, {hd}] for this cache, got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    T = key.shape[0]
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    slots, key, value, is_visual = slots[keep], key[keep], value[keep], is_visual[:T][keep]
    block, offset = slots // block_size, slots % block_size
    kv_cache[block, :, offset, :hd] = key.to(kv_cache.dtype)
    kv_cache[block, :, offset, hd:] = value.to(kv_cache.dtype)
    visual_flags[slots] = is_visual


def gather_paged_memory(kv_cache: torch.Tensor, visual_flags: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor,
                        max_seq_len: int) -> VisualMemory:
    """The visual memory of R requests from the paged cache: [R, L, Hkv, hd] keys and
    values and a [R, L] key mask (flagged and below the request's length), L =
    ``max_seq_len`` rounded up to whole blocks.

    block_table [R, max_blocks] int; seq_lens [R] int (tokens of each request in the cache,
    this step's included); max_seq_len (a Python int) at least ``seq_lens.max()``.
    Positions that are not visual keep whatever their slot held (NaN included): the key mask
    keeps every backend's retrieval from reading them (tests/test_paged_memory.py).
    """
    num_blocks, hkv, block_size, channels = kv_cache.shape
    hd = channels // 2
    R = block_table.shape[0]
    nblk = min(-(-max_seq_len // block_size), block_table.shape[1])
    blocks = block_table[:, :nblk].long()                                # [R, nblk]
    L = nblk * block_size
    pos = torch.arange(L, device=kv_cache.device)
    slots = (blocks[:, :, None] * block_size +
             torch.arange(block_size, device=kv_cache.device)).reshape(R, L)
    valid = visual_flags[slots] & (pos[None, :] < seq_lens[:, None].to(pos.device))
    entries = kv_cache[blocks]                                           # [R, nblk, Hkv, bs, 2hd]
    entries = entries.permute(0, 1, 3, 2, 4).reshape(R, L, hkv, channels)
    return VisualMemory.from_kv(entries[..., :hd].contiguous(), entries[..., hd:].contiguous(),
                                valid)


def mark_blocks(visual_flags: torch.Tensor, block_visual: torch.Tensor,
                slots: torch.Tensor, block_size: int) -> None:
    """Refresh the per-block summary (in place) of the blocks ``slots`` [N] touched:
    ``block_visual[b]`` = any of block b's slot flags. A slot past its request's length may
    still hold an earlier owner's True, which only makes the summary conservative (the
    retrieval masks by length); a block is always touched by its owner's first write."""
    if slots.numel() == 0:
        return
    # Padding tokens (negative slots) refresh block 0's summary from its own flags, which
    # is always right: no boolean mask, so no host sync in a decode step.
    blocks = torch.where(slots >= 0, slots, 0).long() // block_size
    block_visual[blocks] = visual_flags.view(-1, block_size)[blocks].any(dim=1)


def paged_decode_retrieval(q: torch.Tensor, kv_cache: torch.Tensor, visual_flags: torch.Tensor,
                           block_visual: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, rows: torch.Tensor, max_seq_len: int,
                           scale: float, backend: Optional[str] = None):
    """Retrieval of T single-token queries (a decode step) from the paged cache:
    (a [T, H, hd] in q's dtype, has_visual [T] bool).

    q [T, H, hd] q-normed; kv_cache, visual_flags as ``write_paged_kv``; block_visual
    [num_blocks] bool (``mark_blocks``); block_table [R, W] int32; seq_lens [R] int32;
    rows [T] int32, each query's request; max_seq_len (a Python int) at least the longest
    of them. The backend's in-place kernel (Triton: text blocks skipped) where it takes
    the launch, else the same math on the gathered memory (``gather_paged_memory``).
    """
    impl = resolve_backend(backend, q.device)
    if impl.paged_retrieval is not None:
        out = impl.paged_retrieval(q, kv_cache, visual_flags, block_visual, block_table,
                                   seq_lens, rows, scale)
        if out is not None:
            return out
        key = (impl.name, q.dtype, kv_cache.shape[2], q.shape[1] // kv_cache.shape[1])
        if key not in _GATHER_NOTED:  # a slower path, never a different result: said once
            _GATHER_NOTED.add(key)
            _LOG.info("PVM paged decode: the %s backend's kernel does not take %s, block size "
                      "%d, %d query heads per KV head; gathering the memory instead",
                      impl.name, str(q.dtype).replace("torch.", ""), key[2], key[3])
    rows = rows.long()
    memory = gather_paged_memory(kv_cache, visual_flags, block_table[rows], seq_lens[rows],
                                 max_seq_len)
    a = impl.retrieval(q[:, None], memory.key, memory.value, memory.key_mask, memory.kv_len,
                       scale)
    return a[:, 0], memory.has_visual
