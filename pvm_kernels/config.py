"""PVM configuration: the user-facing ``PVMConfig`` and the derived block dimensions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PVMConfig:
    """Text-model fields FusedPVM needs, with Qwen3-VL-8B values as defaults.

    Any object with these attributes works in its place (e.g. a transformers
    ``Qwen3VLTextConfig`` with ``pvm_hidden_size`` set).
    """

    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    rms_norm_eps: float = 1e-6
    pvm_hidden_size: int = 512
    attention_bias: bool = False
    initializer_range: float = 0.02

    @classmethod
    def qwen3_vl_8b(cls, **overrides: Any) -> "PVMConfig":
        """The Qwen3-VL-8B text dimensions with the paper's P = 512."""
        return cls(**overrides)

    @classmethod
    def qwen3_vl_4b(cls, **overrides: Any) -> "PVMConfig":
        """The Qwen3-VL-4B text dimensions with the paper's P = 512."""
        base = dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=9728)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class PVMDims:
    """Sizes of one PVM block, derived from a config exactly as the spec states."""

    hidden_size: int        # D
    pvm_hidden_size: int    # P
    head_dim: int           # hd
    num_heads: int          # H = P // hd
    num_kv_heads: int       # Hkv = max(1, H // (n_heads // n_kv_heads))
    intermediate_size: int  # I = int(P * intermediate_size / hidden_size)
    eps: float
    attention_bias: bool
    initializer_range: float

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> "PVMDims":
        """Derive the block sizes; raises ValueError naming the offending field."""
        def need(name: str) -> Any:
            if not hasattr(config, name) or getattr(config, name) is None:
                raise ValueError(f"config has no '{name}'; FusedPVM needs it "
                                 f"(got config of type {type(config).__name__})")
            return getattr(config, name)

        d = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        hd = getattr(config, "head_dim", None)
        hd = int(hd) if hd else d // n_heads
        p = int(need("pvm_hidden_size"))
        inter = int(need("intermediate_size"))
        eps = float(getattr(config, "rms_norm_eps", 1e-6))
        if p <= 0 or p % hd != 0:
            raise ValueError(f"pvm_hidden_size must be a positive multiple of head_dim={hd}, "
                             f"got pvm_hidden_size={p}")
        if n_kv <= 0 or n_heads % n_kv != 0:
            raise ValueError(f"num_attention_heads={n_heads} must be divisible by "
                             f"num_key_value_heads={n_kv}")
        h = p // hd
        h_kv = max(1, h // (n_heads // n_kv))
        if h % h_kv != 0:
            raise ValueError(f"PVM heads H={h} not divisible by PVM KV heads Hkv={h_kv} "
                             f"(pvm_hidden_size={p}, head_dim={hd})")
        i = int(p * inter / d)
        if i <= 0:
            raise ValueError(f"PVM FFN width int(P * intermediate_size / hidden_size) = {i}; "
                             f"must be positive")
        return cls(hidden_size=d, pvm_hidden_size=p, head_dim=hd, num_heads=h,
                   num_kv_heads=h_kv, intermediate_size=i, eps=eps,
                   attention_bias=bool(getattr(config, "attention_bias", False)),
                   initializer_range=float(getattr(config, "initializer_range", 0.02) or 0.02))
