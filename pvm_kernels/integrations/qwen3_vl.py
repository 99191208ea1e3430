"""PVM in a stock transformers Qwen3-VL, patching only the model instance it is given.

- Each chosen decoder layer gets a ``pvm_block`` (FusedPVM) and its instance's class is
  swapped for a subclass whose forward computes
  ``out = h + merge(FFN(post_attention_layernorm(h)), PVM(h, V))``. A subclass rather
  than an instance ``forward`` so transformers' gradient checkpointing (which wraps the
  class's forward) still applies. Other instances and module globals are untouched.
- The text model's forward is wrapped on the instance: at prefill it gathers the visual
  embeddings scattered into ``inputs_embeds`` (``visual_pos_masks``), attaches a PVMState
  to the call's cache object and passes it down as the ``pvm_state`` keyword, which the
  text model forwards to its layers. Each PVM layer encodes its VisualMemory inside its
  own forward (so sharded parameters are gathered there) and keeps it in the state. Decode
  steps read the state back from the cache: nothing visual is projected again, and two
  generate() calls never share state because they never share a cache.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..memory import PackedVisualMemory, VisualMemory
from ..modules import FusedPVM
from .qwen3_vl_packing import Packing, find_packing, visual_boundaries

#: The paper's PVM layers by (num_hidden_layers, hidden_size).
PAPER_LAYERS = {(36, 4096): [8, 16, 24], (36, 2560): [5, 11, 17]}
DEFAULT_PVM_HIDDEN_SIZE = 512
_STATE_ATTR = "_pvm_state"


@dataclass
class PVMState:
    """The visual side of one request for every PVM layer.

    At prefill it holds the gathered visual embeddings; each PVM layer encodes its own
    VisualMemory inside its own forward (where FSDP2 / ZeRO-3 have gathered the layer's
    parameters) and, when the state lives on a generation cache (``keep_memories``),
    stores it for the decode steps; the embeddings are dropped once every layer has its
    memory. Training calls (no cache) re-encode in each forward, which keeps activation
    checkpointing's recomputation exact.
    """

    layers: Tuple[int, ...]
    visual: Optional[torch.Tensor]
    visual_mask: Optional[torch.Tensor]
    keep_memories: bool
    memories: Dict[int, VisualMemory] = field(default_factory=dict)
    # Packed (padding-free) row: (text, visual) boundaries of its samples; visual is then
    # [total_k, D] and the memories PackedVisualMemory.
    packing: Optional[Tuple[Packing, Packing]] = None

    def memory_for(self, index: int, block: FusedPVM):
        memory = self.memories.get(index)
        if memory is None:
            if self.packing is not None:
                vis = self.packing[1]
                memory = block.encode_visual_varlen(self.visual, vis.cu_seqlens, vis.max_seqlen)
            else:
                memory = block.encode_visual(self.visual, self.visual_mask)
            if self.keep_memories:
                self.memories[index] = _static_addresses(memory)
                if len(self.memories) == len(self.layers):
                    self.visual = self.visual_mask = None
        return memory

    @property
    def batch_size(self) -> int:
        if self.visual is not None:
            return self.visual.shape[0]
        return next(iter(self.memories.values())).batch_size

    def index_select(self, rows: torch.Tensor) -> "PVMState":
        pick = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        return PVMState(self.layers, pick(self.visual), pick(self.visual_mask), self.keep_memories,
                        {i: _static_addresses(m.index_select(rows.to(m.key.device)))
                         for i, m in self.memories.items()})


def _static_addresses(memory: VisualMemory) -> VisualMemory:
    """Mark a kept memory's tensors as static inputs of compiled graphs (what transformers
    does for a StaticCache's key/value tensors): they live for the whole request at fixed
    addresses, so a CUDA graph captured on the first decode step ("reduce-overhead") reads
    them in place at every replay instead of copying K and V into its own buffers per step."""
    import torch._dynamo  # here, not at import: it imports triton (registry.py explains)

    for t in (memory.key, memory.value, memory.key_mask, memory.kv_len, memory.has_visual):
        if t is not None:
            torch._dynamo.mark_static_address(t)
    return memory


@dataclass
class PVMCall:
    """What one forward call hands to the PVM layers: the state, and at prefill which
    query positions are visual tokens (their update is silenced)."""

    state: PVMState
    query_is_visual: Optional[torch.Tensor]


def default_pvm_layers(num_layers: int, hidden_size: int) -> List[int]:
    """The paper's layers for Qwen3-VL-8B/4B; otherwise the same relative depths (8, 16 and
    24 of 36)."""
    if (num_layers, hidden_size) in PAPER_LAYERS:
        return list(PAPER_LAYERS[(num_layers, hidden_size)])
    return sorted({min(num_layers - 1, max(0, round(num_layers * f / 36))) for f in (8, 16, 24)})


def language_model_of(model):
    """The Qwen3VLTextModel inside a Qwen3VLForConditionalGeneration or Qwen3VLModel."""
    for path in (("model", "language_model"), ("language_model",)):
        obj = model
        for part in path:
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "layers"):
            return obj
    raise TypeError(f"expected a transformers Qwen3-VL model (Qwen3VLForConditionalGeneration "
                    f"or Qwen3VLModel), got {type(model).__name__}")


def gather_visual(inputs_embeds: torch.Tensor, visual_pos_masks: torch.Tensor):
    """Row b's visual embeddings inputs_embeds[b][mask[b]], left-aligned and padded:
    returns V [B, Nv, D] and its validity mask [B, Nv] (Nv = the largest count)."""
    counts = visual_pos_masks.sum(dim=1)
    nv = int(counts.max())  # one host sync per prefill, never per decode step
    B, _, D = inputs_embeds.shape
    visual = inputs_embeds.new_zeros(B, nv, D)
    rows, cols = visual_pos_masks.nonzero(as_tuple=True)
    slot = torch.cumsum(visual_pos_masks.long(), dim=1)[rows, cols] - 1
    visual = visual.index_put((rows, slot), inputs_embeds[rows, cols])
    mask = torch.arange(nv, device=counts.device)[None, :] < counts[:, None]
    return visual, mask


# ---- the cache carries the state ------------------------------------------------------------

def _attach_state(cache, state: PVMState) -> None:
    """Store the state on this cache instance and keep it aligned with the cache's rows when
    generate() reorders (beam search), repeats or selects them."""
    setattr(cache, _STATE_ATTR, state)
    if getattr(cache, "_pvm_wrapped", False):
        return
    cache._pvm_wrapped = True

    def after(name, update):
        """Run update(state, *args, **kwargs) -> new state after the cache's own `name`."""
        original = getattr(cache, name, None)
        if original is None:
            return

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            current = getattr(cache, _STATE_ATTR, None)
            if current is not None:
                setattr(cache, _STATE_ATTR, update(current, *args, **kwargs))
            return result
        setattr(cache, name, wrapped)

    def follow(name, rows_of):  # the state's rows follow the cache's
        after(name, lambda s, *a, **k: s.index_select(rows_of(s, *a, **k)))

    follow("reorder_cache", lambda s, beam_idx, *a, **k: beam_idx)
    follow("batch_select_indices", lambda s, indices, *a, **k: indices)
    follow("batch_repeat_interleave",
           lambda s, repeats, *a, **k: torch.arange(s.batch_size).repeat_interleave(repeats))

    # An emptied cache starts a new request, whose images are not these: reset() (what
    # transformers 4.57 calls on a reused static cache, and a server on a pooled one) and
    # crop to nothing drop the state. Deciding it here, outside the forward, is what keeps
    # a decode step free of a host read of the cache length (issue 15: `if
    # cache.get_seq_length() == 0` in the forward cut every compiled decode graph).
    after("reset", lambda s, *a, **k: None)
    after("crop", lambda s, max_length, *a, **k: None if max_length == 0 else s)


def _text_forward(self, *args, **kwargs):
    """Wrapper of the text model's forward (bound to the instance by apply_pvm_to_qwen3_vl)."""
    original = self._pvm_original_forward
    if args:  # bind positionals to names once so the inputs below can be found
        kwargs.update(zip(self._pvm_param_names, args))
        args = ()
    cache_key = self._pvm_cache_key
    cache = kwargs.get(cache_key)
    inputs_embeds = kwargs.get("inputs_embeds")
    visual_pos_masks = kwargs.get("visual_pos_masks")
    call = None
    if visual_pos_masks is not None and inputs_embeds is not None and bool(visual_pos_masks.any()):
        packing = find_packing(kwargs, inputs_embeds.shape[0], inputs_embeds.shape[1])
        if packing is not None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("packed inputs (several samples in one row) continue a cache: "
                                 "PVM supports packing for forward calls that start a sequence "
                                 "(training, scoring), not for generation")
            # The samples' visual tokens in row order, with their own boundaries: each
            # sample's text retrieves from its own image only (FusedPVM.forward_varlen).
            visual = inputs_embeds[0][visual_pos_masks[0]]
            state = PVMState(tuple(self._pvm_layers), visual, None, keep_memories=False,
                             packing=(packing, visual_boundaries(visual_pos_masks, packing)))
            kwargs["pvm_state"] = PVMCall(state, visual_pos_masks)
            return original(**kwargs)
        if cache is None and kwargs.get("use_cache", self.config.use_cache) \
                and not torch.is_grad_enabled():
            from transformers import DynamicCache
            cache = kwargs[cache_key] = DynamicCache(config=self.config)
        visual, mask = gather_visual(inputs_embeds, visual_pos_masks)
        state = PVMState(tuple(self._pvm_layers), visual, mask, keep_memories=cache is not None)
        if cache is not None:
            _attach_state(cache, state)
        call = PVMCall(state, visual_pos_masks)
    elif cache is not None and getattr(cache, _STATE_ATTR, None) is not None:
        # A decode step (or a continued prompt) of the request whose images the state holds:
        # a reset or emptied cache has already dropped it (_attach_state), so nothing here
        # reads a tensor on the host and a compiled decode step stays one graph.
        call = PVMCall(getattr(cache, _STATE_ATTR), None)
    if call is not None:
        kwargs["pvm_state"] = call
    return original(**kwargs)


# ---- the decoder layer ----------------------------------------------------------------------

def _pvm_layer_forward(self, hidden_states, *args, pvm_state: Optional[PVMCall] = None, **kwargs):
    """The stock layer's computation, with the PVM update merged into the FFN output."""
    if args:
        kwargs.update(zip(self._pvm_param_names, args))
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn = self.self_attn(hidden_states=hidden_states, **kwargs)
    hidden_states = residual + (attn[0] if isinstance(attn, tuple) else attn)
    residual = hidden_states
    ffn = self.mlp(self.post_attention_layernorm(hidden_states))
    if pvm_state is None:  # text only: exactly the stock layer, no PVM work at all
        return residual + ffn
    memory = pvm_state.state.memory_for(self._pvm_index, self.pvm_block)
    if isinstance(memory, PackedVisualMemory):  # one packed row: the varlen path
        text = pvm_state.state.packing[0]
        merged = self.pvm_block.forward_varlen(
            residual[0], text.cu_seqlens, text.max_seqlen, memory,
            query_is_visual=pvm_state.query_is_visual[0], ffn_output=ffn[0],
            backend=self._pvm_backend)[None]
    else:
        merged = self.pvm_block(residual, memory, query_is_visual=pvm_state.query_is_visual,
                                ffn_output=ffn, backend=self._pvm_backend)
    return residual + merged


_PVM_LAYER_CLASSES: Dict[type, type] = {}


def _pvm_layer_class(cls: type) -> type:
    if cls not in _PVM_LAYER_CLASSES:
        _PVM_LAYER_CLASSES[cls] = type(f"PVM{cls.__name__}", (cls,), {"forward": _pvm_layer_forward})
    return _PVM_LAYER_CLASSES[cls]


def _param_names(fn, skip: int) -> List[str]:
    return [p.name for p in list(inspect.signature(fn).parameters.values())[skip:]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def apply_pvm_to_qwen3_vl(model, layers: Optional[Sequence[int]] = None,
                          pvm_hidden_size: Optional[int] = None, backend: Optional[str] = None):
    """Add PVM blocks to a stock transformers Qwen3-VL model, in place; returns the model.

    layers / pvm_hidden_size default to ``config.text_config.pvm_layers`` /
    ``pvm_hidden_size`` (a published PVM checkpoint's config has them), else to the paper's
    layers for the model's depth and P = 512. New blocks start inert (gate 0) on the
    decoder's device and dtype; ``model.config.text_config`` records both fields, so
    ``state_dict()`` keys are ``model.language_model.layers.N.pvm_block.*``.
    backend: the FusedPVM backend for every call (None: fastest for the device).
    """
    text_model = language_model_of(model)
    text_config = model.config.text_config if hasattr(model.config, "text_config") else model.config
    n_layers = len(text_model.layers)
    if getattr(text_model, "_pvm_layers", None):
        raise ValueError("PVM is already applied to this model")
    if layers is None:
        layers = getattr(text_config, "pvm_layers", None) or \
            default_pvm_layers(n_layers, text_config.hidden_size)
    layers = sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n_layers} decoder layers")
    if pvm_hidden_size is None:
        pvm_hidden_size = getattr(text_config, "pvm_hidden_size", None) or DEFAULT_PVM_HIDDEN_SIZE
    text_config.pvm_layers = layers
    text_config.pvm_hidden_size = int(pvm_hidden_size)

    text_model._pvm_layers = {}
    for i in layers:
        layer = text_model.layers[i]
        ref = layer.post_attention_layernorm.weight
        block = FusedPVM(text_config).to(device=ref.device, dtype=ref.dtype)
        layer._pvm_param_names = _param_names(type(layer).forward, 2)
        layer.pvm_block = block
        layer._pvm_index = i
        layer._pvm_backend = backend
        layer.__class__ = _pvm_layer_class(type(layer))
        text_model._pvm_layers[i] = layer

    original = text_model.forward
    names = _param_names(original, 0)
    text_model._pvm_original_forward = original
    text_model._pvm_param_names = names
    text_model._pvm_cache_key = "cache" if "cache" in names else "past_key_values"
    text_model.forward = types.MethodType(_text_forward, text_model)
    return model


def pvm_blocks(model) -> Dict[int, FusedPVM]:
    """{decoder layer index: FusedPVM} of a model that apply_pvm_to_qwen3_vl patched."""
    layers = getattr(language_model_of(model), "_pvm_layers", None)
    if not layers:
        raise ValueError("the model has no PVM block; call apply_pvm_to_qwen3_vl first")
    return {i: layer.pvm_block for i, layer in layers.items()}


def set_pvm_backend(model, backend: Optional[str]) -> None:
    """Run every PVM block of the model on ``backend`` from the next call on (None: the
    fastest for the device). The name is checked now, against the model's device."""
    from ..ops import resolve_backend

    blocks = pvm_blocks(model)
    resolve_backend(backend, next(iter(blocks.values())).gate_alpha.device)
    for layer in language_model_of(model)._pvm_layers.values():
        layer._pvm_backend = backend


def set_pvm_gate(model, value: float) -> None:
    """Set gate_alpha of every PVM block (0: the block is exactly inert)."""
    with torch.no_grad():
        for block in pvm_blocks(model).values():
            block.gate_alpha.fill_(value)
