"""PVM checkpoints served by vLLM (issue 26), on CPU: ``make test-vllm`` (build/vllm-venv).

A small random PVM Qwen3-VL (gate 1, so PVM moves the logits) is saved with an offline
processor; vLLM serves it through the plugin and every request's greedy tokens must equal
the package's transformers integration's, with per-token log-probs within 1e-4 (fp32):
several requests with and without images batched, the same one at a time, long text before
the image (across a block boundary), the same text before a different image, two images in
one prompt. Text-only requests get exactly no PVM update; PVM changes image requests'
tokens; ``load_weights`` takes HF-named PVM weights (TRL's weight sync).
"""
import math

import pytest
import torch
from conftest import error_text

vllm = pytest.importorskip("vllm")

NEW_TOKENS = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(small_checkpoints):
    """(pvm path, stock path, config): conftest's small random Qwen3-VL, PVM gate 1."""
    return small_checkpoints


def _image(seed, size=(128, 96)):
    """A drawn image whose sides are multiples of patch x merge (32): never resized, so
    vLLM's and transformers' processors see the same pixels."""
    from pvm_kernels.integrations.qwen3_vl_inputs import synthetic_image
    return synthetic_image(*size, seed=seed)


IMG_A, IMG_B, IMG_C = 1, 2, 3
#: Prompts: token ids, and ("img", seed) where an image goes.
PROMPTS = {
    "image": [11, 12, ("img", IMG_A), 13, 14, 15],
    "text": [11, 12, 13, 14, 40, 41],
    "long-text-first": list(range(100, 140)) + [("img", IMG_B), 20, 21],
    "same-text-other-image": list(range(100, 140)) + [("img", IMG_C), 20, 21],
    "two-images": [30, ("img", IMG_A), 31, 32, ("img", IMG_C), 33],
    # What would be a prefix-cache hit covering the image: computed again, the same.
    "image-again": [11, 12, ("img", IMG_A), 13, 14, 15],
}


def _vllm_prompt(config, items):
    from vllm import TokensPrompt
    ids, images = [], []
    for item in items:
        if isinstance(item, tuple):
            ids += [config.vision_start_token_id, config.image_token_id,
                    config.vision_end_token_id]
            images.append(_image(item[1]))
        else:
            ids.append(item)
    if not images:
        return TokensPrompt(prompt_token_ids=ids)
    return TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": images})


def _hf_inputs(config, items):
    from pvm_kernels.integrations.qwen3_vl_inputs import image_processor_for
    from pvm_kernels.integrations.tiny_qwen3_vl import pad_prompts
    images = [_image(item[1]) for item in items if isinstance(item, tuple)]
    merge = config.vision_config.spatial_merge_size
    pixels = image_processor_for(config)(images=images, return_tensors="pt") if images else None
    ids, k = [], 0
    for item in items:
        if isinstance(item, tuple):
            n = int(pixels["image_grid_thw"][k].prod()) // (merge * merge)
            ids += [config.vision_start_token_id] + [config.image_token_id] * n + \
                   [config.vision_end_token_id]
            k += 1
        else:
            ids.append(item)
    batch = pad_prompts([ids], config.image_token_id)
    if pixels is not None:
        batch["pixel_values"] = pixels["pixel_values"]
        batch["image_grid_thw"] = pixels["image_grid_thw"]
    return batch


def _reference(path, config, names, pvm=True):
    """{name: (tokens, log-probs of those tokens)} from transformers, one prompt at a time."""
    if pvm:
        from pvm_kernels.integrations.qwen3_vl_model import PVMQwen3VLForConditionalGeneration as cls
    else:
        from transformers import Qwen3VLForConditionalGeneration as cls
    return _greedy(cls.from_pretrained(path, torch_dtype=torch.float32).eval(), config, names)


def _greedy(model, config, names):
    """{name: (tokens, log-probs of those tokens)} of a transformers model, one prompt at a
    time."""
    out = {}
    for name in names:
        batch = _hf_inputs(config, PROMPTS[name])
        with torch.no_grad():
            ref = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        tokens = ref.sequences[0, batch["input_ids"].shape[1]:].tolist()
        lps = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(ref.scores, tokens)]
        out[name] = (tokens, lps)
    return out


def _llm(path, **overrides):
    """An in-process engine on the small model: fp32, eager, 32-token blocks, two images a
    prompt; ``overrides`` replace or add engine arguments."""
    from vllm import LLM
    args = dict(model=path, dtype="float32", max_model_len=512, block_size=32,
                enforce_eager=True, limit_mm_per_prompt={"image": 2, "video": 0}, seed=0)
    return LLM(**{**args, **overrides})


def _generate(llm, config, names):
    from vllm import SamplingParams
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0)
    outs = llm.generate([_vllm_prompt(config, PROMPTS[n]) for n in names], params)
    result = {}
    for name, o in zip(names, outs):
        tokens = list(o.outputs[0].token_ids)
        result[name] = (tokens, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, tokens)])
    return result


def _assert_same(got, want, what):
    for name, (tokens, lps) in want.items():
        assert got[name][0] == tokens, (what, name, got[name][0], tokens)
        for step, (a, b) in enumerate(zip(got[name][1], lps)):
            assert math.isclose(a, b, abs_tol=TOL), (what, name, step, a, b)


@pytest.fixture(scope="module")
def served(setup):
    """The PVM engine and its outputs: every prompt batched, then each alone."""
    path, _, config = setup
    llm = _llm(path)
    names = list(PROMPTS)
    batched = _generate(llm, config, names)
    alone = {}
    for name in names:
        alone.update(_generate(llm, config, [name]))
    yield llm, batched, alone
    del llm


@pytest.fixture(scope="module")
def reference(setup):
    path, _, config = setup
    return _reference(path, config, list(PROMPTS))


def test_the_engine_turned_off_chunked_prefill_and_prefix_caching(setup):
    """PVM's cache layers say non_causal: vLLM's engine core then never splits a prompt
    and never reuses a cached prefix (the text before an image depends on the image, and
    vLLM would hash that text's blocks without it), even when asked for both."""
    llm = _llm(setup[0], enable_prefix_caching=True, enable_chunked_prefill=True)
    config = llm.llm_engine.vllm_config
    assert config.scheduler_config.enable_chunked_prefill is False
    assert config.cache_config.enable_prefix_caching is False
    del llm


def test_batched_requests_equal_transformers(served, reference):
    """Requests with and without images, long text before an image, the same text before a
    different image, two images: one batch, each equal to transformers alone."""
    _assert_same(served[1], reference, "batched")


def test_each_request_alone_equals_transformers(served, reference):
    _assert_same(served[2], reference, "alone")


def test_pvm_changes_image_requests_and_leaves_text_only_ones_exact(setup, served):
    """Against stock transformers on the stock checkpoint (no PVM): image requests differ
    (the branch works), text-only ones are equal (their update is exactly 0)."""
    _, stock_path, config = setup
    stock = _reference(stock_path, config, list(PROMPTS), pvm=False)
    batched = served[1]
    for name in ("image", "long-text-first", "two-images"):
        assert batched[name][0] != stock[name][0] or \
            max(abs(a - b) for a, b in zip(batched[name][1], stock[name][1])) > 1e-2, name
    _assert_same({"text": batched["text"]}, {"text": stock["text"]}, "text-only vs stock")


def test_load_weights_takes_hf_named_pvm_weights(setup, served):
    """What TRL's vLLM weight sync sends: HF names, one tensor at a time. A changed gate
    changes the outputs; restoring it restores them."""
    llm, batched, _ = served
    path, _, config = setup
    import glob

    from safetensors.torch import load_file
    weights = {}
    for f in glob.glob(f"{path}/*.safetensors"):
        weights.update(load_file(f))
    names = [n for n in weights if ".pvm_block.gate_alpha" in n]
    assert names and all(n.startswith("model.language_model.layers.") for n in names), names

    def load(pairs):
        return llm.apply_model(lambda model: sorted(model.load_weights(iter(pairs))))

    loaded = load([(n, torch.zeros(1)) for n in names])[0]
    assert len(loaded) == len(names) and all(".pvm_block.gate_alpha" in n for n in loaded)
    off = _generate(llm, config, ["image"])
    assert off["image"] != batched["image"]
    load([(n, weights[n]) for n in names])
    _assert_same(_generate(llm, config, ["image"]), {"image": batched["image"]}, "restored")
    with pytest.raises(Exception, match="no parameter"):
        load([("model.language_model.layers.0.pvm_block.gate_alpha", torch.zeros(1))])


def test_a_compiled_engine_equals_transformers(setup, reference):
    """vLLM's default path (torch.compile, not enforce_eager): the PVM update is an opaque
    custom op that vLLM splits the graph at, so the step-dependent retrieval runs every step
    (traced, it ran once without metadata and PVM silently vanished)."""
    path, _, config = setup
    llm = _llm(path, enforce_eager=False)
    from pvm_kernels.integrations.vllm.qwen3_vl import UPDATE_OP
    assert UPDATE_OP in llm.llm_engine.vllm_config.compilation_config.splitting_ops
    names = ["image", "text", "two-images"]
    got = _generate(llm, config, names)
    del llm
    _assert_same(got, {n: reference[n] for n in names}, "compiled")


def test_a_prompt_split_before_its_image_is_refused():
    """vLLM never splits a PVM prompt (chunked prefill is off), except when the encoder
    cache or budget cannot take an image: then the text before it was computed without it,
    and the step that brings the image is refused."""
    from pvm_kernels.integrations.vllm.paged_cache import PVMPagedMetadata, check_whole_prompt
    meta = PVMPagedMetadata(slot_mapping=torch.zeros(0), block_table=torch.zeros(2, 1),
                            seq_lens=torch.tensor([40, 9]), query_start_loc=torch.tensor([0, 1, 10]),
                            query_lens=[1, 9], seq_lens_host=[40, 9], num_actual_tokens=10)
    check_whole_prompt(meta, 0, has_visual=False)   # a decode step: no visual token
    check_whole_prompt(meta, 1, has_visual=True)    # a whole prompt with its image
    cut = PVMPagedMetadata(slot_mapping=torch.zeros(0), block_table=torch.zeros(1, 1),
                           seq_lens=torch.tensor([30]), query_start_loc=torch.tensor([0, 14]),
                           query_lens=[14], seq_lens_host=[30], num_actual_tokens=14)
    check_whole_prompt(cut, 0, has_visual=False)    # text after the images: fine
    with pytest.raises(RuntimeError, match="split before one of its images"):
        check_whole_prompt(cut, 0, has_visual=True)


def test_a_token_budget_below_the_model_length_is_refused(setup):
    """Without chunked prefill a prompt longer than the step budget (or a preempted request
    recomputing prompt and output) would wait forever: refused at construction, naming the
    setting."""
    with pytest.raises(Exception) as err:
        _llm(setup[0], max_num_batched_tokens=256)
    text = error_text(err.value)
    assert "max_num_batched_tokens (256) is below max_model_len (512)" in text, text


def test_trl_colocate_weight_sync_serves_the_trained_pvm_weights(setup):
    """TRL 1.16's colocate weight sync, as it does it: parameters of the transformers model
    by HF name, one at a time, into
    ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``. After
    a "training step" changed every PVM weight, vLLM generates what transformers does.
    Only the PVM weights are synced: vLLM's CPU backend repacks its own linear layers after
    the first load (their parameters are left empty), so no stock weight can be reloaded
    on CPU, with or without this plugin."""
    from pvm_kernels.integrations.qwen3_vl_model import PVMQwen3VLForConditionalGeneration
    path, _, config = setup
    trained = PVMQwen3VLForConditionalGeneration.from_pretrained(
        path, torch_dtype=torch.float32).eval()
    pvm = [(n, p) for n, p in trained.named_parameters() if ".pvm_block." in n]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in pvm:
            param.add_(0.05 * param.abs().mean() * torch.randn(param.shape, generator=g))
            if name.endswith("gate_alpha"):
                param.fill_(0.7)
    llm = _llm(path)
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    for name, param in pvm:
        model.load_weights([(name, param.data)])
    names = ["image", "two-images", "text"]
    got = _generate(llm, config, names)
    del llm
    _assert_same(got, _greedy(trained, config, names), "after a TRL-style sync")
