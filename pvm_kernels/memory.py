"""VisualMemory: the projected visual side of one PVM block, computed once per prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class VisualMemory:
    """Visual keys/values of one PVM block, ready for retrieval at every decode step.

    Built by ``FusedPVM.encode_visual``; hold on to it for the life of a request.

    Attributes:
        key:        [B, Nv, Hkv, hd] k-normed visual keys (dtype of the block).
        value:      [B, Nv, Hkv, hd] visual values.
        key_mask:   [B, Nv] bool, True = valid token; None when every token is valid.
        kv_len:     [B] int32, one past the last valid token of each sample (0 = none):
                    kernels never visit keys at or beyond it.
        has_visual: [B] bool, the sample has at least one valid visual token.
    """

    key: torch.Tensor
    value: torch.Tensor
    key_mask: Optional[torch.Tensor]
    kv_len: torch.Tensor
    has_visual: torch.Tensor

    @classmethod
    def from_kv(cls, key: torch.Tensor, value: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> "VisualMemory":
        """Wrap projected keys/values; derives kv_len and has_visual on device (no host sync)."""
        B, Nv = key.shape[:2]
        if key_mask is None:
            kv_len = torch.full((B,), Nv, dtype=torch.int32, device=key.device)
            has_visual = torch.full((B,), Nv > 0, dtype=torch.bool, device=key.device)
        else:
            pos = torch.arange(1, Nv + 1, device=key.device, dtype=torch.int32)
            kv_len = (key_mask.to(torch.int32) * pos).amax(dim=1).to(torch.int32) if Nv else \
                torch.zeros(B, dtype=torch.int32, device=key.device)
            has_visual = kv_len > 0
        return cls(key, value, key_mask, kv_len, has_visual)

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    @property
    def num_tokens(self) -> int:
        """Nv, the padded number of visual tokens."""
        return self.key.shape[1]

    def valid(self) -> torch.Tensor:
        """[B, Nv] bool: the tokens retrieval reads (key_mask and below kv_len)."""
        pos = torch.arange(self.num_tokens, device=self.key.device)
        inside = pos[None, :] < self.kv_len[:, None]
        return inside if self.key_mask is None else inside & self.key_mask

    def concat(self, other: "VisualMemory") -> "VisualMemory":
        """This memory followed by ``other``'s tokens, row by row (the images of a later turn
        appended to a request's memory): [B, Nv + Nv', Hkv, hd], with both validity masks."""
        if other.batch_size != self.batch_size:
            raise ValueError(f"cannot concatenate memories of {self.batch_size} and "
                             f"{other.batch_size} rows")
        return VisualMemory.from_kv(torch.cat([self.key, other.key], dim=1),
                                    torch.cat([self.value, other.value], dim=1),
                                    torch.cat([self.valid(), other.valid()], dim=1))

    def index_select(self, batch_index: torch.Tensor) -> "VisualMemory":
        """Rows of the memory in a new order (beam search, batch reordering)."""
        pick = lambda t: None if t is None else t.index_select(0, batch_index)  # noqa: E731
        return VisualMemory(pick(self.key), pick(self.value), pick(self.key_mask),
                            pick(self.kv_len), pick(self.has_visual))


@dataclass(frozen=True)
class PackedVisualMemory:
    """Visual keys/values of N packed sequences (varlen layout, flash-attention's cu_seqlens).

    Built by ``FusedPVM.encode_visual_varlen``; passed as ``visual`` to
    ``FusedPVM.forward_varlen``. Sequence b's visual tokens are rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]``; a sequence with none has no row at all.

    Attributes:
        key:        [total_k, Hkv, hd] k-normed visual keys (dtype of the block).
        value:      [total_k, Hkv, hd] visual values.
        cu_seqlens: [N + 1] int32 cumulative visual-token counts.
        max_seqlen: the most visual tokens of one sequence (a Python int: sizes grids).
        has_visual: [N] bool, the sequence has at least one visual token.
    """

    key: torch.Tensor
    value: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    has_visual: torch.Tensor

    @classmethod
    def from_kv(cls, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> "PackedVisualMemory":
        """Wrap packed keys/values; has_visual from the lengths on device (no host sync)."""
        return cls(key, value, cu_seqlens, int(max_seqlen), cu_seqlens[1:] > cu_seqlens[:-1])

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1
