"""Qwen3-VL for vLLM, PVM-aware (imported by vLLM through the plugin's registration)."""
from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

from . import version_problem, vllm_version

#: Why a PVM checkpoint is refused today (issue 26 is open: see docs/vllm.md).
NOT_YET = (
    "this checkpoint has PVM layers (text_config.pvm_layers = {layers}), and pvm-kernels' "
    "vLLM plugin cannot serve them yet: PVM's retrieval needs the request's visual K/V in a "
    "paged cache, which the plugin does not implement. Running it as a stock Qwen3-VL would "
    "drop the PVM branch and change every output, so it is refused. Serve it with "
    "transformers (pvm_kernels.integrations.qwen3_vl) until the vLLM path lands.")


def has_pvm_layers(config) -> bool:
    """Whether a Qwen3-VL config lists PVM layers (``text_config.pvm_layers``), as
    pvm_kernels.integrations.qwen3_vl_model decides (not imported: it needs transformers'
    model classes, which a vLLM process never loads)."""
    return bool(getattr(getattr(config, "text_config", config), "pvm_layers", None))


class PVMQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL, unchanged for configs without PVM layers; a config with PVM layers
    (``text_config.pvm_layers``) is refused with a ValueError saying why (see NOT_YET)."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        config = vllm_config.model_config.hf_config
        if has_pvm_layers(config):
            layers = list(getattr(config.text_config, "pvm_layers", []))
            why = version_problem(vllm_version())
            raise ValueError(NOT_YET.format(layers=layers) + (f" ({why}.)" if why else ""))
        super().__init__(vllm_config=vllm_config, prefix=prefix)
