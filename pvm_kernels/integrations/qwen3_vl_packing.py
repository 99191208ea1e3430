"""Packed (padding-free) inputs to Qwen3-VL: where the samples of a packed row begin and end.

Padding-free training concatenates samples into one row (batch 1). transformers signals it
two ways (4.57 and 5.x alike):
- ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (and ``max_length_q`` / ``max_length_k``) keyword
  arguments, the FlashAttentionKwargs that ``DataCollatorWithFlattening(
  return_flash_attn_kwargs=True)`` produces and the text model passes on to its layers;
- position ids that restart inside the row (``DataCollatorWithFlattening`` with
  ``return_position_ids=True``): 2-D [1, T] text positions, or the 4-row [4, 1, T] form
  whose row 0 is the text position (transformers 5.x). A sample starts where the position
  equals the row's minimum, transformers' own rule (``prepare_fa_kwargs_from_position_ids``).
3-row m-RoPE position ids [3, 1, T] that go backwards also mean packing, but their
temporal row repeats values inside an image, so the boundaries cannot be read from them:
that raises instead of letting one sample's text attend to another sample's image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch


class PackedBoundariesUnknown(ValueError):
    """The inputs are packed but where each sample begins cannot be known."""


@dataclass(frozen=True)
class Packing:
    """Boundaries of the samples packed into row 0: int32 [N + 1] cumulative lengths over
    the row's tokens and the longest sample (a Python int)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def _from_cu(cu: torch.Tensor, max_len: Any) -> Packing:
    cu = cu.to(torch.int32).reshape(-1)
    if max_len is None:
        max_len = cu.diff().max() if cu.numel() > 1 else 0
    return Packing(cu, int(max_len))  # int(): one host read per packed forward


def _starts(text_positions: torch.Tensor) -> torch.Tensor:
    """cu_seqlens from 1-D text positions that restart at their minimum."""
    starts = (text_positions == text_positions.min()).nonzero().view(-1)
    end = torch.tensor([text_positions.shape[0]], device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


def find_packing(kwargs: Mapping[str, Any], batch: int, length: int) -> Optional[Packing]:
    """The packing of a text-model call, None when its rows are plain sequences.

    kwargs: the call's keyword arguments (``cu_seq_lens_q``, ``position_ids``, ...); batch,
    length: the inputs' [B, T]. Raises PackedBoundariesUnknown when the inputs are packed
    but the boundaries cannot be known (3-row m-RoPE position ids alone).
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes packed samples in one row, but the batch "
                             f"has {batch} rows")
        return _from_cu(cu, kwargs.get("max_length_q"))
    position_ids = kwargs.get("position_ids")
    if position_ids is None or batch != 1 or length <= 1:
        return None
    if position_ids.dim() == 3 and position_ids.shape[0] == 3:
        backwards = bool((position_ids[0, 0].diff() < 0).any())
        if backwards:
            raise PackedBoundariesUnknown(
                "the inputs look packed (m-RoPE position ids go backwards inside the row) but "
                "3-row m-RoPE positions do not say where each sample begins: pass "
                "cu_seq_lens_q / cu_seq_lens_k (DataCollatorWithFlattening("
                "return_flash_attn_kwargs=True)) or text position ids, so PVM never lets one "
                "sample's text read another sample's image")
        return None
    text = position_ids[0, 0] if position_ids.dim() == 3 else position_ids.reshape(-1)
    sequential = torch.arange(length, device=text.device) + text.min()
    if not bool((sequential != text).any()):  # one host read per prefill/training call
        return None
    cu = _starts(text)
    return Packing(cu, int(cu.diff().max()))


def visual_boundaries(visual_pos_masks: torch.Tensor, packing: Packing) -> Packing:
    """cu_seqlens over the visual tokens of row 0 (the order inputs_embeds holds them in):
    sample b's visual tokens are those between its text boundaries."""
    counts = torch.cumsum(visual_pos_masks[0].to(torch.int32), 0)
    before = torch.cat([counts.new_zeros(1), counts])
    cu = before[packing.cu_seqlens.long()].to(torch.int32)
    return _from_cu(cu, None)
