"""Qwen3-VL for vLLM with Persistent Visual Memory (imported by vLLM through the plugin).

For a config without ``text_config.pvm_layers`` the class is vLLM's own Qwen3-VL, unchanged.
With PVM layers, each listed decoder layer gets

- ``pvm_block``: the package's :class:`~pvm_kernels.FusedPVM` (the published parameter
  names, so ``load_weights`` takes the checkpoint's and TRL's HF names as they are);
- ``pvm_cache``: a :class:`~.paged_cache.PVMCacheLayer`, the layer's visual K/V in vLLM's
  paged KV cache (one entry per token, a visual flag per slot and per block);
- a forward that adds the PVM update to the FFN's output:
  ``out = h + FFN(post_attention_layernorm(h)) + PVM(h, V)``.

A step of the engine: ``embed_input_ids`` records which scheduled tokens are visual; before
the decoder runs, every PVM layer stores the k-normed keys and values of the step's visual
embeddings (``inputs_embeds`` at those tokens: after the merger, before DeepStack) and a
flag for every token; in the layer, each request's queries retrieve from all flagged slots
of its request, whatever their position (decode tokens in place from the cache,
:func:`pvm_kernels.ops.paged.paged_decode_retrieval`; whole prompts in one varlen call on
the step's own visual keys, a whole prompt holding all of its request's images).
Visual query tokens and requests without images get exactly 0 (the block's own rules).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from ...memory import PackedVisualMemory
from ...modules import FusedPVM
from ...ops.paged import (gather_paged_memory, mark_blocks, paged_decode_retrieval,
                          write_paged_kv)
from . import version_problem, vllm_version
from .paged_cache import PVMCacheLayer, check_whole_prompt

PVM_KEY = ".pvm_block."
#: HF checkpoint prefix of the language model -> this class's module path.
_HF_TEXT_PREFIX, _VLLM_TEXT_PREFIX = "model.language_model.", "language_model.model."


def has_pvm_layers(config) -> bool:
    """Whether a Qwen3-VL config lists PVM layers (``text_config.pvm_layers``), as
    pvm_kernels.integrations.qwen3_vl_model decides (not imported: it needs transformers'
    model classes, which a vLLM process never loads)."""
    return bool(getattr(getattr(config, "text_config", config), "pvm_layers", None))


class PVMStep:
    """Which of the step's tokens are visual, shared by the model and its PVM layers:
    ``is_visual`` [max_tokens] bool, set by ``embed_input_ids`` for the scheduled tokens
    (False beyond them)."""

    def __init__(self, max_tokens: int, device: torch.device):
        self.is_visual = torch.zeros(max_tokens, dtype=torch.bool, device=device)

    def record(self, num_tokens: int, is_visual: Optional[torch.Tensor]) -> None:
        if num_tokens > self.is_visual.numel():
            self.is_visual = torch.zeros(num_tokens, dtype=torch.bool,
                                         device=self.is_visual.device)
        self.is_visual.zero_()
        if is_visual is not None:
            self.is_visual[:num_tokens] = is_visual[:num_tokens]

    def mask(self, num_tokens: int) -> torch.Tensor:
        if num_tokens > self.is_visual.numel():
            self.record(num_tokens, None)
        return self.is_visual[:num_tokens]


def visual_rows(meta, is_visual: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows of the step's visual tokens (None when it has none), once per step for every
    PVM layer. Visual tokens come only in prompts (more than one token of a request): a
    decode-only step skips the nonzero, a host sync on a GPU."""
    if meta is None or not (meta.prompt_requests or meta.continuing_requests):
        return None
    rows = is_visual[:meta.num_actual_tokens].nonzero().flatten()
    return rows if rows.numel() else None


def store_visual(block: FusedPVM, cache: PVMCacheLayer, inputs_embeds: torch.Tensor,
                 rows: Optional[torch.Tensor]) -> None:
    """Write the step's visual keys/values (at ``rows``) and every scheduled token's flag
    into ``cache``, and keep this step's (rows, k, v) on it for the prompts' retrieval."""
    cache.step_visual = None
    meta = cache.metadata()
    if meta is None:
        return
    flags, block_visual = cache.flags()
    slots = meta.slot_mapping[:meta.num_actual_tokens]
    # Text tokens: only their flag (False), so a slot's earlier owner cannot leak in.
    cache.clear_flags(slots)
    if rows is not None:
        k, v = block.visual_keys_values(inputs_embeds[rows])
        write_paged_kv(cache.kv_cache, flags, slots[rows], k, v,
                       torch.ones_like(rows, dtype=torch.bool))
        cache.step_visual = (rows, k, v)
    mark_blocks(flags, block_visual, slots, cache.kv_cache.shape[2])


def _prompt_update(block: FusedPVM, cache: PVMCacheLayer, hidden: torch.Tensor,
                   visual: torch.Tensor, meta, u: torch.Tensor) -> None:
    """``u`` at the tokens of the step's whole prompts (``meta.prompt_requests``): all of
    them in one varlen call, each retrieving from its own visual tokens of this step
    (computed by ``store_visual``: a whole prompt holds all of its request's images)."""
    if cache.step_visual is None:  # no image in the step: every update is 0
        return
    device = hidden.device
    prompts, starts = meta.prompt_requests, meta.token_starts
    tokens = torch.cat([torch.arange(starts[r], starts[r + 1], device=device)
                        for r in prompts])
    lengths = [meta.query_lens[r] for r in prompts]
    cu_q = torch.tensor([0] + lengths, device=device, dtype=torch.int32).cumsum(0,
                                                                               dtype=torch.int32)
    rows, k, v = cache.step_visual
    owner = meta.token_owner[rows]
    chosen = torch.zeros(len(meta.query_lens), dtype=torch.bool, device=device)
    chosen[prompts] = True
    keep = chosen[owner]
    counts = torch.zeros(len(meta.query_lens), dtype=torch.int32, device=device)
    counts.index_add_(0, owner[keep], torch.ones_like(owner[keep], dtype=torch.int32))
    counts = counts[prompts]
    cu_k = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)])
    memory = PackedVisualMemory.from_kv(k[keep], v[keep], cu_k, int(counts.max()))
    u[tokens] = block.forward_varlen(hidden[tokens], cu_q, max(lengths), memory,
                                     query_is_visual=visual[tokens])


def pvm_update(block: FusedPVM, cache: PVMCacheLayer, hidden: torch.Tensor,
               is_visual: torch.Tensor) -> Optional[torch.Tensor]:
    """The PVM update u [T, D] of the step's tokens (h = ``hidden`` [T, D]), or None in a
    run without metadata (vLLM's profiling and dummy runs). Decode tokens retrieve in one
    call read in place from the cache (``paged_decode_retrieval``); whole prompts in one
    varlen call from the step's own visual keys (``_prompt_update``); a prompt continuing
    an earlier step on its gathered memory, after :func:`check_whole_prompt`."""
    meta = cache.metadata()
    if meta is None:
        return None
    u = torch.zeros_like(hidden)
    if not meta.query_lens:
        return u
    flags, block_visual = cache.flags()
    visual = is_visual[:meta.num_actual_tokens]
    starts = meta.token_starts
    if meta.decode_requests:
        tokens = meta.decode_tokens
        q = block.queries(hidden[tokens])
        a, has = paged_decode_retrieval(
            q, cache.kv_cache, flags, block_visual, meta.block_table, meta.seq_lens,
            meta.decode_rows, max(meta.seq_lens_host[r] for r in meta.decode_requests),
            1.0 / math.sqrt(block.dims.head_dim))
        u[tokens] = block.update_from_retrieval(a, has & ~visual[tokens])
    if meta.prompt_requests:
        _prompt_update(block, cache, hidden, visual, meta, u)
    # A prompt continuing an earlier step may not bring images (its earlier text retrieved
    # without them); its images, if any, came before and are in the cache.
    for r in meta.continuing_requests:
        span = slice(starts[r], starts[r + 1])
        check_whole_prompt(meta, r, bool(visual[span].any()))
        memory = gather_paged_memory(cache.kv_cache, flags, meta.block_table[r:r + 1],
                                     meta.seq_lens[r:r + 1], meta.seq_lens_host[r])
        u[span] = block(hidden[None, span], memory, query_is_visual=visual[None, span])[0]
    return u


#: The custom op the PVM layers call (its qualified name is what vLLM's compiler splits at).
UPDATE_OP = "pvm_kernels_vllm::add_pvm_update"


@torch.library.custom_op(UPDATE_OP, mutates_args=("out",))
def add_pvm_update(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    """``out += PVM(hidden)`` for the PVM layer whose cache is ``layer_name`` in vLLM's
    forward context (``out`` unchanged in a run without metadata). An opaque op: under
    vLLM's torch.compile the step-dependent retrieval runs eagerly between the compiled
    pieces (``UPDATE_OP`` is added to the splitting ops), never traced once and replayed."""
    from vllm.forward_context import get_forward_context
    cache = get_forward_context().no_compile_layers[layer_name]
    u = pvm_update(cache.pvm_block, cache, hidden, cache.pvm_step.mask(hidden.shape[0]))
    if u is not None:
        out.add_(u)


@add_pvm_update.register_fake
def _(hidden: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


class _PVMDecoderLayer:
    """Mixin for a PVM decoder layer (vLLM's Qwen3DecoderLayer forward, the PVM update added
    to the FFN's output). The layer has ``pvm_block`` and ``pvm_cache``."""

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        # vLLM 0.32's Qwen3DecoderLayer.forward, line for line, until the FFN.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        out = self.mlp(hidden_states)
        # residual is h, the stream entering post_attention_layernorm.
        torch.ops.pvm_kernels_vllm.add_pvm_update(residual, out, self.pvm_cache.layer_name)
        return out, residual


_LAYER_CLASSES: Dict[type, type] = {}


def _pvm_layer_class(cls: type) -> type:
    if cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[cls] = type(f"PVM{cls.__name__}", (_PVMDecoderLayer, cls), {})
    return _LAYER_CLASSES[cls]


def check_supported(vllm_config) -> None:
    """Refuse what the PVM path was not built or tested for, naming it."""
    why = version_problem(vllm_version())
    if why:
        raise ValueError(f"this checkpoint has PVM layers, and {why}: its internals (the "
                         "decoder layer's forward, the KV-cache spec and metadata API) are "
                         "what the PVM path is built on. Install a tested vLLM "
                         "(pip install 'pvm-kernels[vllm]').")
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    longest = vllm_config.model_config.max_model_len
    if budget < longest:
        raise ValueError(
            f"max_num_batched_tokens ({budget}) is below max_model_len ({longest}): vLLM runs "
            "PVM models without chunked prefill (a prompt must be computed in one step, "
            "its text before an image retrieving from it), so a longer prompt, or a "
            "preempted request recomputing its prompt and output, could never be scheduled. "
            "Pass max_num_batched_tokens >= max_model_len (--max-num-batched-tokens) or a "
            "smaller max_model_len.")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("PVM models do not run with pipeline parallelism in vLLM yet: a later "
                         "stage cannot see which of its tokens are visual")
    if vllm_config.speculative_config is not None:
        raise ValueError("PVM models do not run with speculative decoding in vLLM yet")


class PVMQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; with ``text_config.pvm_layers``, PVM in those layers (module doc)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        config = vllm_config.model_config.hf_config
        pvm = has_pvm_layers(config)
        if pvm:
            check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pvm_layers: List[int] = []
        if not pvm:
            return
        text = config.text_config
        decoder = self.language_model.model
        dtype = vllm_config.model_config.dtype
        device = decoder.embed_tokens.weight.device
        self.pvm_step = PVMStep(vllm_config.scheduler_config.max_num_batched_tokens, device)
        for index in sorted(int(i) for i in text.pvm_layers):
            if not 0 <= index < text.num_hidden_layers:
                raise ValueError(f"text_config.pvm_layers lists layer {index}; the model has "
                                 f"{text.num_hidden_layers} layers")
            layer = decoder.layers[index]
            block = FusedPVM(text).to(device=device, dtype=dtype)
            name = f"{prefix}.language_model.model.layers.{index}.pvm_cache"
            layer.pvm_block = block
            layer.pvm_cache = PVMCacheLayer(name, block.dims.num_kv_heads, block.dims.head_dim,
                                            dtype)
            # The op finds the block and the step's mask through the cache layer (plain
            # attributes: the block's parameters stay named layers.{i}.pvm_block.*).
            object.__setattr__(layer.pvm_cache, "pvm_block", block)
            object.__setattr__(layer.pvm_cache, "pvm_step", self.pvm_step)
            layer.__class__ = _pvm_layer_class(type(layer))
            self.pvm_layers.append(index)
        compilation = vllm_config.compilation_config
        if compilation.splitting_ops is not None and UPDATE_OP not in compilation.splitting_ops:
            compilation.splitting_ops.append(UPDATE_OP)

    def _pvm_pairs(self):
        decoder = self.language_model.model
        return [(decoder.layers[i].pvm_block, decoder.layers[i].pvm_cache)
                for i in self.pvm_layers]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *,
                        is_multimodal: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The stock embedding; for a PVM model it also records which tokens are visual."""
        embeds = super().embed_input_ids(input_ids, multimodal_embeddings,
                                         is_multimodal=is_multimodal)
        if self.pvm_layers:
            has_images = multimodal_embeddings is not None and len(multimodal_embeddings) > 0
            self.pvm_step.record(input_ids.shape[0], is_multimodal if has_images else None)
        return embeds

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        """The stock forward; a PVM model first stores the step's visual keys/values (before
        the decoder, whose in-place residual adds may overwrite ``inputs_embeds``)."""
        if self.pvm_layers:
            if inputs_embeds is None:
                raise RuntimeError("PVM needs the step's input embeddings (vLLM passes them "
                                   "to multimodal models)")
            pairs = self._pvm_pairs()
            rows = visual_rows(pairs[0][1].metadata(),
                               self.pvm_step.mask(inputs_embeds.shape[0]))
            for block, cache in pairs:
                store_visual(block, cache, inputs_embeds, rows)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                               **kwargs)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Set[str]:
        """The stock loader for every weight but the PVM ones, which load by name into the
        blocks: HF names (``model.language_model.layers.{i}.pvm_block.*``, what checkpoints
        hold and TRL's weight sync sends) or this module's (``language_model.model...``).
        A PVM weight of a layer without a block is an error naming it."""
        if not self.pvm_layers:
            return super().load_weights(weights)
        params = dict(self.named_parameters())
        loaded: Set[str] = set()

        def others():
            for name, tensor in weights:
                if PVM_KEY not in name:
                    yield name, tensor
                    continue
                target = name
                if target.startswith(_HF_TEXT_PREFIX):
                    target = _VLLM_TEXT_PREFIX + target[len(_HF_TEXT_PREFIX):]
                if target not in params:
                    raise ValueError(f"PVM weight {name!r} has no parameter in this model "
                                     f"(PVM layers: {self.pvm_layers})")
                param = params[target]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"PVM weight {name!r} is {tuple(tensor.shape)}, the "
                                     f"parameter {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))
                loaded.add(target)

        loaded |= super().load_weights(others())
        return loaded
