"""A PVM layer's visual K/V in vLLM's paged KV cache: the cache layer, its backend and metadata.

Each PVM decoder layer owns a :class:`PVMCacheLayer`, registered in vLLM's forward context
like an attention layer, so the engine allocates, frees, preempts and schedules its cache
with the rest: one entry per token of every request, ``[num_blocks, Hkv, block_size,
2 * hd]`` (the k-normed visual key, then the value), plus a flag per slot saying whether
the token is visual and one per block saying whether any of its slots is
(``visual_flags``, ``block_visual``: kept beside the cache and written with it, so they
are exactly as valid as the entries they describe).

Its spec says ``non_causal=True``: retrieval at a text token reads every visual token of
its request, those placed after it in the prompt included. vLLM's engine core turns off
chunked prefill and prefix caching for such a model (vllm/v1/engine/core.py), in whichever
process builds the scheduler. A prompt can still be cut before an image when the encoder
cache or budget is full; :func:`check_whole_prompt` refuses that step rather than let the
text before the image miss it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport,
                                       AttentionMetadataBuilder, CommonAttentionMetadata,
                                       MultipleOf)
from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass
class PVMPagedMetadata:
    """What a PVM layer needs of one engine step (built from vLLM's common metadata).

    slot_mapping [T] int64 (cache slot of each scheduled token); block_table [R, max_blocks]
    int32; seq_lens [R] int32 (tokens in the cache after this step); query_start_loc [R + 1]
    int32; query_lens / seq_lens_host / token_starts: the same as Python ints (host copies
    vLLM keeps). Sorted once per step for every PVM layer: decode_requests (one token),
    prompt_requests (a whole prompt in this step), continuing_requests (more tokens of a
    prompt begun earlier); decode_rows [len(decode_requests)] int32 and decode_tokens
    (their tokens, int64) on the device; token_owner [T] int64, each token's request (only
    in a step with prompts).
    """

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    query_lens: List[int]
    seq_lens_host: List[int]
    num_actual_tokens: int
    token_starts: List[int] = field(default_factory=list)
    decode_requests: List[int] = field(default_factory=list)
    prompt_requests: List[int] = field(default_factory=list)
    continuing_requests: List[int] = field(default_factory=list)
    decode_rows: Optional[torch.Tensor] = None
    decode_tokens: Optional[torch.Tensor] = None
    token_owner: Optional[torch.Tensor] = None


class PVMMetadataBuilder(AttentionMetadataBuilder[PVMPagedMetadata]):
    """Builds :class:`PVMPagedMetadata`. The retrieval reads host-side lengths and gathers
    a step-dependent number of keys, so it cannot be replayed from a CUDA graph: NEVER
    (vLLM then captures only the pieces around it)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> PVMPagedMetadata:
        m = common_attn_metadata
        starts = m.query_start_loc_cpu[:m.num_reqs + 1].tolist()
        host = m.seq_lens_cpu_upper_bound
        seq_lens_host = [int(x) for x in
                         (host if host is not None else m.seq_lens)[:m.num_reqs].tolist()]
        query_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        decode = [r for r, q in enumerate(query_lens) if q == 1]
        prompts = [r for r, q in enumerate(query_lens) if q > 1 and seq_lens_host[r] == q]
        continuing = [r for r, q in enumerate(query_lens) if q > 1 and seq_lens_host[r] > q]
        device = m.query_start_loc.device
        decode_rows = decode_tokens = token_owner = None
        if len(decode) == m.num_reqs:  # a decode-only step: request r is token r
            decode_rows = torch.arange(m.num_reqs, dtype=torch.int32, device=device)
            decode_tokens = decode_rows.long()
        elif decode:
            decode_rows = torch.tensor(decode, dtype=torch.int32, device=device)
            decode_tokens = m.query_start_loc[decode_rows.long()].long()
        if prompts:
            token_owner = torch.repeat_interleave(
                torch.arange(m.num_reqs, device=device),
                torch.tensor(query_lens, device=device))
        return PVMPagedMetadata(
            slot_mapping=m.slot_mapping[:m.num_actual_tokens],
            block_table=m.block_table_tensor[:m.num_reqs],
            seq_lens=m.seq_lens[:m.num_reqs],
            query_start_loc=m.query_start_loc[:m.num_reqs + 1],
            query_lens=query_lens, seq_lens_host=seq_lens_host,
            num_actual_tokens=m.num_actual_tokens, token_starts=starts,
            decode_requests=decode, prompt_requests=prompts, continuing_requests=continuing,
            decode_rows=decode_rows, decode_tokens=decode_tokens, token_owner=token_owner)


class PVMCacheBackend(AttentionBackend):
    """The backend vLLM pairs with :class:`PVMCacheLayer`: the metadata builder only (PVM's
    retrieval runs in the layer, through pvm_kernels' own backends)."""

    supported_dtypes: ClassVar[List[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]

    @staticmethod
    def get_name() -> str:
        return "PVM_VISUAL_MEMORY"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("PVM's cache layer has no attention impl: the PVM layer "
                                  "retrieves from it itself")

    @staticmethod
    def get_builder_cls():
        return PVMMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]


class PVMCacheLayer(nn.Module, AttentionLayerBase):
    """One PVM layer's paged visual K/V: ``Hkv`` heads of ``head_dim`` per token, registered
    in the forward context under ``name``. ``kv_cache`` is bound by vLLM
    (``[num_blocks, Hkv, block_size, 2 * head_dim]``); ``visual_flags`` is made on first use
    with one bool per slot of it."""

    def __init__(self, name: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.layer_name = name
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.kv_cache = torch.tensor([])
        self.visual_flags: Optional[torch.Tensor] = None
        self.block_visual: Optional[torch.Tensor] = None
        # (token rows, k, v) of this step's visual tokens, set before the decoder runs
        self.step_visual: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        config = get_current_vllm_config()
        self.block_size = config.cache_config.block_size
        context = config.compilation_config.static_forward_context
        if name in context:
            raise ValueError(f"duplicate layer name in vLLM's forward context: {name}")
        context[name] = self

    def get_attn_backend(self) -> type[AttentionBackend]:
        return PVMCacheBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> FullAttentionSpec:
        return FullAttentionSpec(block_size=vllm_config.cache_config.block_size,
                                 num_kv_heads=self.num_kv_heads, head_size=self.head_dim,
                                 dtype=self.dtype, non_causal=True)

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache
        self.visual_flags = self.block_visual = None

    def flags(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(visual_flags [num_blocks * block_size], block_visual [num_blocks]) bool, all
        False when first made: a flag per slot and its block's summary (any flag set:
        ops/paged.py's mark_blocks), which lets the decode kernel skip text blocks."""
        blocks = self.kv_cache.shape[0]
        if self.block_visual is None or self.block_visual.numel() != blocks:
            device = self.kv_cache.device
            slots = blocks * self.kv_cache.shape[2]
            # One slot more than the cache: where clear_flags sends padding tokens.
            self._flag_storage = torch.zeros(slots + 1, dtype=torch.bool, device=device)
            self.visual_flags = self._flag_storage[:slots]
            self.block_visual = torch.zeros(blocks, dtype=torch.bool, device=device)
        return self.visual_flags, self.block_visual

    def clear_flags(self, slots: torch.Tensor) -> None:
        """Set the flags of ``slots`` [N] (negative: a padding token) to False, without a
        host sync (a boolean mask would ask the device for its count every step): padding
        tokens write the spare slot past the cache."""
        self.flags()
        sink = self._flag_storage.numel() - 1
        self._flag_storage[torch.where(slots >= 0, slots, sink).long()] = False

    def metadata(self) -> Optional[PVMPagedMetadata]:
        """This step's metadata (None in a profiling or dummy run without a KV cache)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available
        if not is_forward_context_available() or self.kv_cache.numel() == 0:
            return None
        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):  # micro-batches: not used by PVM models
            raise NotImplementedError("PVM's vLLM layers do not run micro-batched steps")
        if not isinstance(meta, dict) or self.layer_name not in meta:
            return None
        return meta[self.layer_name]


def check_whole_prompt(meta: PVMPagedMetadata, request: int, has_visual: bool) -> None:
    """Refuse a step that writes a request's visual tokens after part of its prompt was
    computed in an earlier step: that part's text retrieved without these images, which
    PVM's (non-causal) semantics forbid. vLLM disables chunked prefill and prefix caching
    for PVM models; this happens only when the encoder cache or budget forces a cut."""
    computed = meta.seq_lens_host[request] - meta.query_lens[request]
    if has_visual and computed > 0:
        raise RuntimeError(
            f"PVM: a prompt was split before one of its images ({computed} tokens computed "
            "in an earlier step). The text before an image must retrieve from it, so the "
            "whole prompt has to be computed in one step: raise the encoder cache and "
            "budget (--max-num-batched-tokens, limit_mm_per_prompt) so that every "
            "prompt's images fit one step.")
