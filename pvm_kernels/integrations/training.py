"""Training helpers: PVM parameters, the paper's SFT freezing, PVM-only safetensors,
and loading a published PVM checkpoint into a stock transformers Qwen3-VL."""
from __future__ import annotations

from typing import Dict, List

import torch

from ..modules import FusedPVM

_PVM_KEY = ".pvm_block."


def pvm_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The PVM entries of the model's state dict (published key names)."""
    return {k: v for k, v in model.state_dict().items() if _PVM_KEY in k}


def pvm_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Every parameter of every FusedPVM block in the model."""
    return [p for m in model.modules() if isinstance(m, FusedPVM) for p in m.parameters()]


def freeze_all_but_pvm(model: torch.nn.Module) -> int:
    """The paper's SFT stage: only PVM parameters train (vision encoder, projector and
    language model frozen). Returns the number of trainable parameters."""
    if not pvm_parameters(model):
        raise ValueError("the model has no PVM block; call apply_pvm_to_qwen3_vl first")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in pvm_parameters(model):
        p.requires_grad_(True)
    return sum(p.numel() for p in pvm_parameters(model))


def save_pvm_weights(model: torch.nn.Module, path: str) -> None:
    """Write only the PVM weights, under their published key names, to a safetensors file."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in pvm_state_dict(model).items()}
    if not state:
        raise ValueError("the model has no PVM block; nothing to save")
    save_file(state, path)


def load_pvm_state(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load PVM weights; missing or unexpected PVM keys are an error naming them."""
    expected = set(pvm_state_dict(model))
    given = {k for k in state if _PVM_KEY in k}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"PVM weights do not match the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    model.load_state_dict({k: state[k] for k in given}, strict=False)


def load_pvm_weights(model: torch.nn.Module, path: str) -> None:
    """Load a file written by save_pvm_weights (strict on PVM keys)."""
    from safetensors.torch import load_file
    load_pvm_state(model, load_file(path))


def load_pvm_qwen3_vl(path: str, **from_pretrained_kwargs):
    """Load a PVM checkpoint directory (published, or saved by this package) with PVM.

    ``path`` holds safetensors shards and a config whose text_config has ``pvm_layers``
    and ``pvm_hidden_size``. Extra keyword arguments go to ``from_pretrained``
    (e.g. torch_dtype, device_map). Returns a PVMQwen3VLForConditionalGeneration; raises if
    the checkpoint has no PVM layers or its PVM weights do not match them exactly.
    """
    from transformers import AutoConfig

    from .qwen3_vl_model import PVMQwen3VLForConditionalGeneration, has_pvm_layers

    if not has_pvm_layers(AutoConfig.from_pretrained(path)):
        raise ValueError(f"{path!r} is not a PVM checkpoint: its text_config has no pvm_layers")
    return PVMQwen3VLForConditionalGeneration.from_pretrained(path, **from_pretrained_kwargs)
