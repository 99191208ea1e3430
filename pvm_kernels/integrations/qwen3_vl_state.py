"""The PVM state of a generation request, carried by its transformers cache object.

A request's cache is its identity across calls: generate(), assisted / prompt-lookup
decoding, beam search and multi-turn continuation all pass the same cache object (or a deep
copy) from call to call. The text model's first call on a cache (its prefill) attaches
either a PVMState (the request has images) or TEXT_ONLY (it has none); every later call
reads it back. The cache's own row and length operations keep it in step:

- ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave``: its rows follow;
- ``reset`` and a ``crop`` that empties the cache: the request is over, the state is dropped;
- a ``crop`` into the prompt's visual tokens: the state is marked cut (using it raises:
  the tokens kept were computed with images that are no longer in the context).

Whatever the version's ``crop`` argument means (4.57: the length to keep; 5.x: minus the
tokens to remove, ``crop(0)`` a no-op), the decision is taken from the cache's length
after the crop, never from the argument.

The guard: a call that continues a non-empty cache which no PVM prefill marked raises
``PVMCacheError``: PVM cannot know that request's images, and running it without them
would silently compute another model.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import torch

from ..memory import VisualMemory
from ..modules import FusedPVM
from .qwen3_vl_packing import Packing

STATE_ATTR = "_pvm_state"


class PVMCacheError(RuntimeError):
    """A call continues a cache whose PVM state is missing or no longer valid."""


class _TextOnly:
    """The state of a request without images: its decode steps are the stock layers."""

    def index_select(self, rows):
        return self

    def __repr__(self):
        return "TEXT_ONLY"

    def __deepcopy__(self, memo):
        return self


TEXT_ONLY = _TextOnly()


def _static_addresses(memory: VisualMemory) -> VisualMemory:
    """Mark a kept memory's tensors as static inputs of compiled graphs (what transformers
    does for a StaticCache's key/value tensors): they live for the whole request at fixed
    addresses, so a CUDA graph captured on the first decode step ("reduce-overhead") reads
    them in place at every replay instead of copying K and V into its own buffers per step."""
    import torch._dynamo  # here, not at import: it imports triton (ops/registry.py explains)

    for t in (memory.key, memory.value, memory.key_mask, memory.kv_len, memory.has_visual):
        if t is not None:
            torch._dynamo.mark_static_address(t)
    return memory


@dataclass
class PVMState:
    """The visual side of one request for every PVM layer.

    At prefill it holds the gathered visual embeddings; each PVM layer encodes its own
    VisualMemory inside its own forward (where FSDP2 / ZeRO-3 have gathered the layer's
    parameters) and, when the state lives on a generation cache (``keep_memories``),
    stores it for the decode steps; the embeddings are dropped once every layer has its
    memory. A continuation that brings new images (a later turn) appends their memory to
    the kept one. Training calls (no cache) re-encode in each forward, which keeps
    activation checkpointing's recomputation exact.

    ``visual_end``: the cache length up to the last visual token of the request; a crop
    below it sets ``cut`` (why the state can no longer serve).
    """

    layers: Tuple[int, ...]
    visual: Optional[torch.Tensor]
    visual_mask: Optional[torch.Tensor]
    keep_memories: bool
    memories: Dict[int, VisualMemory] = field(default_factory=dict)
    # Packed (padding-free) row: (text, visual) boundaries of its samples; visual is then
    # [total_k, D] and the memories PackedVisualMemory.
    packing: Optional[Tuple[Packing, Packing]] = None
    visual_end: int = 0
    cut: Optional[str] = None
    # the layers whose memory already holds ``visual`` (a continuation appends it once)
    encoded: Set[int] = field(default_factory=set)

    def memory_for(self, index: int, block: FusedPVM, backend: Optional[str] = None):
        """Layer ``index``'s memory of the request, encoding (and appending) ``visual`` for
        it the first time this layer asks (with ``backend``'s glue)."""
        memory = self.memories.get(index)
        if self.visual is None or index in self.encoded:
            if memory is None:
                raise PVMCacheError(f"PVM layer {index} has no visual memory for this request "
                                    f"(the state holds layers {sorted(self.memories)})")
            return memory
        if self.packing is not None:
            vis = self.packing[1]
            new = block.encode_visual_varlen(self.visual, vis.cu_seqlens, vis.max_seqlen,
                                             backend=backend)
        else:
            new = block.encode_visual(self.visual, self.visual_mask, backend=backend)
        if not self.keep_memories:
            return new
        memory = new if memory is None else memory.concat(new)
        self.memories[index] = _static_addresses(memory)
        self.encoded.add(index)
        if self.encoded >= set(self.layers):
            self.visual = self.visual_mask = None
            self.encoded = set()
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
                         for i, m in self.memories.items()},
                        visual_end=self.visual_end, cut=self.cut, encoded=set(self.encoded))

    def continued_with(self, visual: torch.Tensor, visual_mask: torch.Tensor,
                       visual_end: int) -> "PVMState":
        """This request's state after a continuation call that brings more images."""
        if self.visual is not None:
            raise PVMCacheError("new images arrived before every PVM layer had encoded the "
                                "previous ones")
        if visual.shape[0] != self.batch_size:
            raise PVMCacheError(f"a continuation with {visual.shape[0]} rows on a cache of "
                                f"{self.batch_size}")
        return PVMState(self.layers, visual, visual_mask, True, dict(self.memories),
                        visual_end=visual_end, cut=self.cut)


@dataclass
class PVMCall:
    """What one forward call hands to the PVM layers: the state, and at prefill which
    query positions are visual tokens (their update is silenced)."""

    state: PVMState
    query_is_visual: Optional[torch.Tensor]


# ---- the cache carries the state ------------------------------------------------------------

def cache_length(cache) -> int:
    """Tokens held by the cache (a host read: only at prefill and in the cache's own
    reorder/crop calls, never in a decode step's forward)."""
    return int(cache.get_seq_length())


def state_of(cache):
    """The PVMState or TEXT_ONLY a prefill attached to ``cache``; None if none did."""
    return getattr(cache, STATE_ATTR, None)


def _drop(cache) -> None:
    cache.__dict__.pop(STATE_ATTR, None)


def _after_crop(cache, state):
    kept = cache_length(cache)
    if kept == 0:
        return None
    if isinstance(state, PVMState) and kept < state.visual_end and state.cut is None:
        state.cut = (f"the cache was cropped to {kept} tokens, inside the prompt's visual "
                     f"tokens (they end at {state.visual_end}): the tokens kept were computed "
                     "with images that are no longer in the context; prefill the prompt again")
    return state


def _follow_rows(rows_of):
    """The state's rows follow the cache's: rows_of(state, *args) gives the new order."""
    return lambda cache, state, *a, **k: state.index_select(rows_of(state, *a, **k))


def _rows(state) -> int:
    return state.batch_size if isinstance(state, PVMState) else 1


# What each hooked cache method does to the state, after the cache's own method ran.
_AFTER = {
    "reorder_cache": _follow_rows(lambda s, beam_idx, *a, **k: beam_idx),
    "batch_select_indices": _follow_rows(lambda s, indices, *a, **k: indices),
    "batch_repeat_interleave": _follow_rows(
        lambda s, repeats, *a, **k: torch.arange(_rows(s)).repeat_interleave(repeats)),
    "reset": lambda cache, state, *a, **k: None,
    "crop": lambda cache, state, *a, **k: _after_crop(cache, state),
}


def _make_hook(name: str):
    def hooked(self, *args, **kwargs):
        result = getattr(type(self), name)(self, *args, **kwargs)
        current = state_of(self)
        if current is not None:
            new = _AFTER[name](self, current, *args, **kwargs)
            if new is None:
                _drop(self)
            else:
                setattr(self, STATE_ATTR, new)
        return result
    hooked.__name__ = name
    return hooked


_HOOKS = {name: _make_hook(name) for name in _AFTER}


def attach_state(cache, state) -> None:
    """Store ``state`` (a PVMState or TEXT_ONLY) on this cache instance and hook the cache's
    own row and length operations (module docstring). The hooks are bound methods in the
    instance's dict that call the class's method: ``copy.deepcopy(cache)`` (transformers'
    way to reuse a prompt's cache) rebinds them to the copy, with a copy of the state."""
    setattr(cache, STATE_ATTR, state)
    if cache.__dict__.get("_pvm_hooked"):
        return
    for name, hook in _HOOKS.items():
        if callable(getattr(type(cache), name, None)):
            setattr(cache, name, types.MethodType(hook, cache))
    cache._pvm_hooked = True


def is_generation_cache(cache) -> bool:
    """A transformers Cache (Dynamic, Static, ...), the kind the state can live on."""
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is what calls us
        return False
    return isinstance(cache, Cache)
