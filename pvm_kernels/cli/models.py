"""The model and prompt the demo and analyze commands run: the embedded small random Qwen3-VL,
or a local checkpoint (a published PVM one, or a plain Qwen3-VL that gets new PVM blocks)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .common import CLIError

PROMPT_TEXT = "Describe this image in detail."


@dataclass
class PromptedModel:
    model: torch.nn.Module
    batch: dict               # model inputs on the model's device
    description: str          # one line: what model, where the PVM weights come from
    suppress: List[int]       # token ids generation must never produce
    tokenizer: Optional[object]
    visual_tokens: int


def _checkpoint_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise CLIError(f"--model {path!r}: no such directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CLIError(f"--model {path!r}: not a transformers checkpoint (no config.json)")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("model_type") != "qwen3_vl":
        raise CLIError(f"--model {path!r}: model_type is {config.get('model_type')!r}, "
                       f"expected 'qwen3_vl'")
    return config


def _tokenizer(path: str):
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in files):
        return None  # transformers would build an empty tokenizer rather than fail
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # a checkpoint without tokenizer files: prompt built from ids
        return None


def _image_processor(path: str, config):
    """The checkpoint's image processor settings (else ones built for its config), through
    the PIL implementation when torchvision is missing: transformers 5.17's
    AutoImageProcessor insists on the torchvision one."""
    import importlib.util

    import transformers

    from ..integrations.qwen3_vl_inputs import image_processor_for
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return image_processor_for(config)
    pil = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if pil is not None and importlib.util.find_spec("torchvision") is None:
        return pil.from_pretrained(path)
    return transformers.AutoImageProcessor.from_pretrained(path)


def _prompt_ids(tokenizer, config):
    """(prefix, suffix) ids around the image placeholders: the chat template when the
    tokenizer has one, else the plain question, else fixed ids."""
    if tokenizer is None:
        return (11, 12), (13, 14, 15)
    marker = "\x00IMAGE\x00"
    text = f"{marker}{PROMPT_TEXT}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    before, after = text.split(marker)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(after)


def load_prompted_model(path: Optional[str], device: torch.device, dtype: torch.dtype,
                        gate: Optional[float], eager_attention: bool = False,
                        seed: int = 0) -> PromptedModel:
    """The model with PVM applied, on ``device`` in ``dtype``, and its image prompt.

    gate: gate_alpha for every PVM block; None keeps a checkpoint's trained gate (random
    blocks get 1.0 so PVM changes the output). eager_attention: attention weights
    available (analyze), at the cost of speed.
    """
    from ..integrations import apply_pvm_to_qwen3_vl, load_pvm_qwen3_vl, set_pvm_gate
    from ..integrations.qwen3_vl_inputs import (image_prompt, move_to, special_token_ids,
                                                synthetic_image)
    from ..integrations.tiny_qwen3_vl import SMALL_PVM_HIDDEN_SIZE, small_qwen3_vl

    attn = {"attn_implementation": "eager"} if eager_attention else {}
    tokenizer = None
    if path is None:
        model = small_qwen3_vl(seed=seed, dtype=dtype)
        if eager_attention:
            model.set_attn_implementation("eager")
        torch.manual_seed(seed + 1)
        apply_pvm_to_qwen3_vl(model, pvm_hidden_size=SMALL_PVM_HIDDEN_SIZE)
        processor = None
        source = "embedded small Qwen3-VL (random weights), new PVM blocks (random weights)"
        trained_gate = False
    else:
        config = _checkpoint_config(path)
        is_pvm = bool(config.get("text_config", {}).get("pvm_layers"))
        if is_pvm:
            model = load_pvm_qwen3_vl(path, dtype=dtype, **attn)
            source = f"{path} (PVM checkpoint, trained PVM weights)"
        else:
            from transformers import Qwen3VLForConditionalGeneration
            model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, **attn)
            torch.manual_seed(seed + 1)
            apply_pvm_to_qwen3_vl(model)
            source = f"{path} (plain Qwen3-VL), new PVM blocks (random weights)"
        trained_gate = is_pvm
        tokenizer = _tokenizer(path)
        processor = _image_processor(path, model.config)
    model = model.to(device).eval()
    if gate is not None or not trained_gate:
        set_pvm_gate(model, 1.0 if gate is None else gate)
    prefix, suffix = _prompt_ids(tokenizer, model.config)
    batch = image_prompt(model.config, [synthetic_image(seed=seed)], processor, prefix, suffix)
    visual = int((batch["input_ids"] == model.config.image_token_id).sum())
    return PromptedModel(model, move_to(batch, device, dtype), source,
                         special_token_ids(model.config), tokenizer, visual)
