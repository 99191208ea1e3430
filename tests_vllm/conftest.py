"""Shared by the vLLM tests (``make test-vllm``): the small random Qwen3-VL saved with and
without PVM, and the text of an error with its causes."""
import pytest
import torch


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory):
    """(pvm path, stock path, config): the CLI's small random Qwen3-VL (head dim 32: vLLM's
    CPU attention needs at least 32), fp32, saved with an offline processor; the PVM one is
    the same base with PVM at P 128 and gate 1 (so PVM moves the logits)."""
    from pvm_kernels.integrations.qwen3_vl import apply_pvm_to_qwen3_vl, set_pvm_gate
    from pvm_kernels.integrations.tiny_qwen3_vl import small_qwen3_vl_config, tiny_processor
    from transformers import Qwen3VLForConditionalGeneration
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    # vLLM's M-RoPE needs the sections to cover the rotary half (16 of head dim 32);
    # transformers accepts the small model's default [2, 3, 3] (8).
    config = small_qwen3_vl_config(rope_scaling={"rope_type": "default", "mrope_section": [6, 5, 5],
                                                 "mrope_interleaved": True})
    model = Qwen3VLForConditionalGeneration(config).float().eval()
    model.save_pretrained(root / "stock")
    tiny_processor(config).save_pretrained(root / "stock")
    apply_pvm_to_qwen3_vl(model, pvm_hidden_size=128)
    set_pvm_gate(model, 1.0)
    model.save_pretrained(root / "pvm")
    tiny_processor(config).save_pretrained(root / "pvm")
    return str(root / "pvm"), str(root / "stock"), config


def error_text(exc: BaseException) -> str:
    """The exception's message and its causes' (vLLM wraps model errors), joined."""
    text, cause = f"{exc}", exc.__cause__ or exc.__context__
    while cause is not None:
        text += f" | {cause}"
        cause = cause.__cause__ or cause.__context__
    return text
