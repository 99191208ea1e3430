"""Model integrations: PVM inside stock transformers models."""
from .qwen3_vl import apply_pvm_to_qwen3_vl, default_pvm_layers

__all__ = ["apply_pvm_to_qwen3_vl", "default_pvm_layers"]
