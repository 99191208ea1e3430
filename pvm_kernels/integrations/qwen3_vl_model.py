"""transformers classes for PVM checkpoints, and the code a checkpoint carries to find them.

``PVMQwen3VLForConditionalGeneration`` and ``PVMQwen3VLModel`` are the stock Qwen3-VL
classes with PVM applied in their constructor whenever the config lists ``pvm_layers``
(without it they are exactly the stock classes), so ``from_pretrained`` loads the PVM
weights with the rest, in one pass. Their ``save_pretrained`` also writes
``modeling_pvm_qwen3_vl.py`` into the checkpoint and points the config's ``auto_map`` at it,
so every tool that loads by model id with ``trust_remote_code=True``
(``AutoModelForImageTextToText``, ``AutoModel``, ``pipeline``, TRL's reference model for the
KL term, evaluation harnesses) gets PVM and this package's kernels. The file holds no model
code: it imports these classes from the installed package, and names the package when it
is missing. ``config.json`` keeps the stock ``architectures`` (what the published
checkpoints and serving engines read).

``apply_pvm_to_qwen3_vl`` turns a stock instance into these classes, so a model patched the
usual way saves such a checkpoint too.
"""
from __future__ import annotations

import json
import os

from transformers import GenerationMixin, Qwen3VLForConditionalGeneration, Qwen3VLModel

from .qwen3_vl import apply_pvm_to_qwen3_vl

#: The file save_pretrained writes beside config.json.
REMOTE_CODE_FILE = "modeling_pvm_qwen3_vl.py"
_MODULE = REMOTE_CODE_FILE[:-3]
PVM_KEY = ".pvm_block."

REMOTE_CODE = '''"""Qwen3-VL with Persistent Visual Memory (PVM, arXiv 2605.00814), written by pvm-kernels.

This checkpoint's decoder layers carry PVM blocks (config.text_config.pvm_layers). The model
classes come from the installed pvm-kernels package, which runs PVM with its fused kernels;
load with trust_remote_code=True, or with pvm_kernels.PVMQwen3VLForConditionalGeneration.
"""
try:
    from pvm_kernels.integrations.qwen3_vl_model import (PVMQwen3VLForConditionalGeneration,
                                                         PVMQwen3VLModel)
except ImportError as exc:
    raise ImportError(
        "This checkpoint is a Qwen3-VL with Persistent Visual Memory (PVM) layers: loading it "
        "needs the pvm-kernels package (pip install pvm-kernels). Without it the PVM weights "
        "would be dropped and a different model would run.") from exc

__all__ = ["PVMQwen3VLForConditionalGeneration", "PVMQwen3VLModel"]
'''


def has_pvm_layers(config) -> bool:
    """The config (a Qwen3VLConfig or its text config) lists PVM layers."""
    return bool(getattr(getattr(config, "text_config", config), "pvm_layers", None))


def auto_map() -> dict:
    """config.json's auto_map: the Auto classes that load a PVM checkpoint through the file."""
    return {"AutoModel": f"{_MODULE}.PVMQwen3VLModel",
            "AutoModelForImageTextToText": f"{_MODULE}.PVMQwen3VLForConditionalGeneration",
            "AutoModelForVision2Seq": f"{_MODULE}.PVMQwen3VLForConditionalGeneration"}


def write_remote_code(save_directory: str, architecture: str) -> None:
    """Write the file and point config.json's auto_map at it; ``architectures`` stays the
    stock ``architecture`` (transformers writes the saving class's name there)."""
    with open(os.path.join(save_directory, REMOTE_CODE_FILE), "w", encoding="utf-8") as f:
        f.write(REMOTE_CODE)
    path = os.path.join(save_directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["architectures"] = [architecture]
    config["auto_map"] = auto_map()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


class _PVMCheckpoints:
    """What both classes add to their stock base: PVM from the config, strict PVM weights on
    load, the loading file on save."""

    _stock_architecture: str

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if has_pvm_layers(config):
            apply_pvm_to_qwen3_vl(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The stock ``from_pretrained``; a PVM weight the config implies but the checkpoint
        lacks, or one it has for a layer the config does not list, is an error naming it (a
        PVM block left at its initial values, or dropped, would run a different model)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", ()))
        pvm_missing = [k for k in missing if PVM_KEY in k]
        if pvm_missing:
            raise ValueError(f"the checkpoint's config lists PVM layers, but {len(pvm_missing)} "
                             f"PVM weights are missing from it ({len(missing)} weights missing "
                             f"in all), e.g. {pvm_missing[:3]}")
        extra = sorted(k for k in info.get("unexpected_keys", ()) if PVM_KEY in k)
        if extra:
            raise ValueError(f"the checkpoint has {len(extra)} PVM weights its config's "
                             f"pvm_layers do not account for, e.g. {extra[:3]}")
        return (model, info) if want_info else model

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """A no-op. transformers calls it on a class loaded through remote code, and a
        registered class's save_pretrained copies the source file of its module with its
        relative imports into the checkpoint (custom_object_save): this package's modules,
        which fail to copy. save_pretrained writes its own small file instead."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The stock ``save_pretrained``, plus (for a model with PVM layers, on the main
        process) the loading file and auto_map of the module docstring."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if has_pvm_layers(self.config) and kwargs.get("is_main_process", True):
            write_remote_code(str(save_directory), self._stock_architecture)
        return result


# GenerationMixin named among the bases: transformers 4.57 otherwise wraps a remote-code
# class that does not list it directly in a new class (auto_factory's
# add_generation_mixin_to_remote_model), and the Auto classes would return that copy.
class PVMQwen3VLForConditionalGeneration(_PVMCheckpoints, Qwen3VLForConditionalGeneration,
                                         GenerationMixin):
    """Qwen3VLForConditionalGeneration with PVM in the layers ``config.text_config.pvm_layers``
    lists (the stock model when it lists none). Load a checkpoint saved by this package or a
    published PVM checkpoint with ``from_pretrained(path)``; no trust_remote_code needed."""

    _stock_architecture = "Qwen3VLForConditionalGeneration"


class PVMQwen3VLModel(_PVMCheckpoints, Qwen3VLModel):
    """Qwen3VLModel (no language-model head) with PVM, as PVMQwen3VLForConditionalGeneration."""

    _stock_architecture = "Qwen3VLModel"


#: The stock class of an instance -> its PVM class (apply_pvm_to_qwen3_vl swaps them).
PVM_CLASSES = {Qwen3VLForConditionalGeneration: PVMQwen3VLForConditionalGeneration,
               Qwen3VLModel: PVMQwen3VLModel}
