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
  steps read the state back from the cache (qwen3_vl_state.py: how it follows the cache's
  reorders, crops and copies, and the guard that refuses a cache PVM never prefilled):
  nothing visual is projected again, and two generate() calls never share state because
  they never share a cache.
"""
from __future__ import annotations

import inspect
import types
from typing import Dict, List, Optional, Sequence

import torch

from ..memory import PackedVisualMemory
from ..modules import FusedPVM
from .qwen3_vl_packing import find_packing, visual_boundaries
from .qwen3_vl_state import (TEXT_ONLY, PVMCacheError, PVMCall, PVMState, attach_state,
                             cache_length, state_of)

#: The paper's PVM layers by (num_hidden_layers, hidden_size).
PAPER_LAYERS = {(36, 4096): [8, 16, 24], (36, 2560): [5, 11, 17]}
DEFAULT_PVM_HIDDEN_SIZE = 512


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


def _image_call(text_model, cache, inputs_embeds, visual_pos_masks) -> PVMCall:
    """A call whose inputs hold visual tokens: a prefill, or a continuation (a later turn)
    that brings more images, whose memory is then appended to the request's."""
    layers = tuple(text_model._pvm_layers)
    visual, mask = gather_visual(inputs_embeds, visual_pos_masks)
    if cache is None:  # training / scoring: no request to remember
        return PVMCall(PVMState(layers, visual, mask, keep_memories=False), visual_pos_masks)
    past = cache_length(cache)  # host reads are fine here: gather_visual has one already
    visual_end = past + int(visual_pos_masks.any(dim=0).nonzero().max()) + 1
    previous = state_of(cache) if past > 0 else None
    if isinstance(previous, PVMState):
        if previous.cut is not None:
            raise PVMCacheError(previous.cut)
        state = previous.continued_with(visual, mask, visual_end)
    else:
        state = PVMState(layers, visual, mask, keep_memories=True, visual_end=visual_end)
    attach_state(cache, state)
    return PVMCall(state, visual_pos_masks)


def _text_call(text_model, cache) -> Optional[PVMCall]:
    """A call without visual tokens: a decode step, candidate verification, a continued
    prompt, or a text-only prefill. Reads the request's state from its cache."""
    if cache is None or not isinstance(cache, text_model._pvm_cache_type):
        return None
    state = state_of(cache)
    if state is None:
        # The first call PVM sees on this cache. A compiled call cannot afford the length
        # read; generate() never compiles a prefill, so its caches are always marked.
        if torch.compiler.is_compiling():
            return None
        held = cache_length(cache)
        if held > 0:
            raise PVMCacheError(
                f"this cache holds {held} tokens that no PVM model prefilled, so PVM cannot "
                "know the request's images; prefill the prompt (with its images) through this "
                "model, or reuse a cache it filled (copy.deepcopy keeps its PVM state)")
        attach_state(cache, TEXT_ONLY)
        return None
    if state is TEXT_ONLY:
        return None
    if state.cut is not None:
        raise PVMCacheError(state.cut)
    return PVMCall(state, None)


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
    if visual_pos_masks is not None and inputs_embeds is not None and bool(visual_pos_masks.any()):
        packing = find_packing(kwargs, inputs_embeds.shape[0], inputs_embeds.shape[1])
        if packing is not None:
            if cache is not None and cache_length(cache) > 0:
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
        call = _image_call(self, cache, inputs_embeds, visual_pos_masks)
    else:
        # A reset or emptied cache has already dropped its state (qwen3_vl_state), so a
        # decode step reads no tensor on the host and a compiled decode stays one graph.
        call = _text_call(self, cache)
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
    memory = pvm_state.state.memory_for(self._pvm_index, self.pvm_block, self._pvm_backend)
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
    A stock Qwen3VLForConditionalGeneration / Qwen3VLModel instance becomes a
    PVMQwen3VLForConditionalGeneration / PVMQwen3VLModel (a subclass): its
    ``save_pretrained`` then writes a checkpoint that loads with PVM by model id
    (qwen3_vl_model.py).
    """
    text_model = language_model_of(model)
    from .qwen3_vl_model import PVM_CLASSES
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
    from transformers.cache_utils import Cache
    text_model._pvm_cache_type = Cache  # the caches a request's PVM state can live on
    text_model.forward = types.MethodType(_text_forward, text_model)
    if type(model) in PVM_CLASSES:  # its save_pretrained then writes a loadable checkpoint
        model.__class__ = PVM_CLASSES[type(model)]
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
