"""Model integrations: PVM inside stock transformers models, and training helpers."""
from .qwen3_vl import (apply_pvm_to_qwen3_vl, default_pvm_layers, pvm_blocks, set_pvm_backend,
                       set_pvm_gate)
from .training import (freeze_all_but_pvm, load_pvm_qwen3_vl, load_pvm_weights, pvm_parameters,
                       pvm_state_dict, save_pvm_weights)

__all__ = ["apply_pvm_to_qwen3_vl", "default_pvm_layers", "pvm_blocks", "set_pvm_backend",
           "set_pvm_gate", "load_pvm_qwen3_vl", "pvm_parameters",
           "pvm_state_dict", "freeze_all_but_pvm", "save_pvm_weights", "load_pvm_weights"]


def __getattr__(name):
    """PVMQwen3VLForConditionalGeneration / PVMQwen3VLModel, importing transformers on use."""
    if name in ("PVMQwen3VLForConditionalGeneration", "PVMQwen3VLModel"):
        from . import qwen3_vl_model
        return getattr(qwen3_vl_model, name)
    raise AttributeError(f"module 'pvm_kernels.integrations' has no attribute {name!r}")
