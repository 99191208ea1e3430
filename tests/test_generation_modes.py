"""Every generation mode of transformers keeps PVM (issue 22; the table in docs/qwen3_vl.md).

The model: a tiny random Qwen3-VL with PVM on layers 1 and 3 and the gate at 2.0, where PVM
changes the greedy tokens (asserted, so no test here can pass blind). Each speculative or
cache-reusing mode must give exactly the tokens of plain greedy `generate`, as the stock
model does. The guard: a call that continues a cache PVM cannot vouch for raises
PVMCacheError instead of running the PVM layers without the request's images.
"""
import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from pvm_kernels import available_backends  # noqa: E402
from pvm_kernels.integrations import (apply_pvm_to_qwen3_vl, set_pvm_backend,  # noqa: E402
                                      set_pvm_gate)
from pvm_kernels.integrations.qwen3_vl_state import (STATE_ATTR, TEXT_ONLY,  # noqa: E402
                                                     PVMCacheError)
from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch, tiny_qwen3_vl  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5
LAYERS = [1, 3]
NEW_TOKENS = 10
# Greedy and deterministic; an eos id is needed by 4.57's prompt lookup (stock raises without)
GREEDY = dict(do_sample=False, eos_token_id=511, pad_token_id=0)
ONE_IMAGE = [(8, 4)]
MIXED = [[(4, 4), (4, 4)], (8, 4), None]  # two images in a row, one image, text only
BACKENDS = ["reference", "cpu", "triton"]


def cache_kwarg() -> str:
    from transformers import Qwen3VLForConditionalGeneration
    params = inspect.signature(Qwen3VLForConditionalGeneration.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def crop_last(cache, n: int) -> None:
    """Remove the last n tokens, in the installed version's `crop` convention (4.57: the
    length to keep; 5.x: minus the tokens to remove)."""
    cache.crop(-n if V5 else cache.get_seq_length() - n)


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_vl(seed=0)


def make_pvm(base, backend="reference", gate=2.0, seed=0):
    torch.manual_seed(seed)
    model = apply_pvm_to_qwen3_vl(copy.deepcopy(base), layers=LAYERS, pvm_hidden_size=32,
                                  backend=backend)
    set_pvm_gate(model, gate)
    return model


@pytest.fixture(scope="module")
def pvm(base):
    return make_pvm(base)


@pytest.fixture(params=BACKENDS)
def backend_pvm(request, pvm):
    """The module's PVM model switched to one backend (set_pvm_backend), reset afterwards."""
    if request.param not in available_backends("cpu"):
        pytest.skip(f"{request.param} not usable on cpu here")
    set_pvm_backend(pvm, request.param)
    yield pvm
    set_pvm_backend(pvm, "reference")


def greedy(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, **GREEDY, **kwargs)


@pytest.fixture(scope="module")
def plain(base, pvm):
    """Plain greedy tokens of each batch, with the check that PVM changes them."""
    out = {}
    for name, grids in (("one", ONE_IMAGE), ("mixed", MIXED)):
        batch = tiny_batch(grids)
        out[name] = greedy(pvm, batch)
        stock = greedy(base, batch)
        image_rows = [i for i, g in enumerate(grids) if g is not None]
        for i in image_rows:  # PVM changes the tokens of every image row ...
            assert not torch.equal(out[name][i], stock[i]), f"{name} row {i}: PVM changes nothing"
        for i in set(range(len(grids))) - set(image_rows):  # ... and no text-only row
            assert torch.equal(out[name][i], stock[i])
    return out


# ---- speculative decoding: candidates verified several at a time, then the cache cropped --------

def _draft(name, base, pvm):
    return {"self": pvm, "stock": base, "pvm": make_pvm(base, gate=-1.0, seed=3)}[name]


@pytest.mark.parametrize("mode", ["prompt_lookup", "self", "stock", "pvm"])
def test_speculative_decoding_gives_the_plain_greedy_tokens(backend_pvm, base, plain, mode):
    batch = tiny_batch(ONE_IMAGE)  # transformers' speculative modes take one row
    if mode == "prompt_lookup":
        kwargs = dict(prompt_lookup_num_tokens=2)
    else:  # two candidates per round: several verify-and-crop rounds in ten tokens
        kwargs = dict(assistant_model=_draft(mode, base, backend_pvm), num_assistant_tokens=2,
                      num_assistant_tokens_schedule="constant")
    calls = []  # (tokens in the call, PVM state given) of every call of a PVM layer
    hook = backend_pvm.model.language_model.layers[LAYERS[0]].register_forward_pre_hook(
        lambda mod, args, kw: calls.append((args[0].shape[1], kw.get("pvm_state") is not None)),
        with_kwargs=True)
    try:
        assert torch.equal(greedy(backend_pvm, batch, **kwargs), plain["one"])
    finally:
        hook.remove()
    if mode != "self":  # (the model as its own draft also runs the draft's text-only calls)
        assert all(has_state for _, has_state in calls), calls
    if mode != "prompt_lookup":  # candidates were verified several at a time, with PVM
        assert any(n >= 2 and has_state for n, has_state in calls[2:]), calls


def _extend(batch, tokens):
    """The batch with `tokens` [B, n] appended to every row (attended text tokens)."""
    out = dict(batch, input_ids=torch.cat([batch["input_ids"], tokens], dim=1),
               attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1))
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"],
                                              torch.zeros_like(tokens)], dim=1)
    return out


# ---- caches from generate or from the user ----------------------------------------------------

def _static_cache(model, batch):
    from transformers import StaticCache
    length = batch["input_ids"].shape[1] + NEW_TOKENS
    try:
        return StaticCache(config=model.config.text_config, max_cache_len=length)
    except TypeError:  # 4.57 also wants the batch size
        return StaticCache(config=model.config.text_config, max_batch_size=len(batch["input_ids"]),
                           max_cache_len=length)


@pytest.mark.parametrize("cache", ["user_dynamic", "user_static", "static_by_name"])
def test_user_and_static_caches_give_the_plain_tokens(backend_pvm, plain, cache):
    from transformers import DynamicCache
    batch = tiny_batch(MIXED)
    kwargs = {"user_dynamic": {cache_kwarg(): DynamicCache(config=backend_pvm.config.text_config)},
              "user_static": {cache_kwarg(): _static_cache(backend_pvm, batch)},
              "static_by_name": dict(cache_implementation="static", disable_compile=True)}[cache]
    assert torch.equal(greedy(backend_pvm, batch, **kwargs), plain["mixed"])


def test_continuing_a_returned_cache_and_a_copied_prompt_cache(backend_pvm, plain):
    """Multi-turn continuation on the cache generate returned; and transformers' prompt-cache
    reuse (copy.deepcopy of a prefilled cache per continuation): the copy carries the PVM
    state, its hooks act on the copy, and the original stays as it was."""
    batch = tiny_batch(MIXED)
    half = NEW_TOKENS // 2
    with torch.no_grad():
        first = backend_pvm.generate(**batch, max_new_tokens=half, return_dict_in_generate=True,
                                     **GREEDY)
        cache = returned_cache(first)
        prompt_len = cache.get_seq_length()
        pool = copy.deepcopy(cache)
        follow = _extend(batch, first.sequences[:, batch["input_ids"].shape[1]:])
        follow = {k: v for k, v in follow.items() if k not in ("pixel_values", "image_grid_thw")}
        for reused in (cache, copy.deepcopy(pool), copy.deepcopy(pool)):
            rest = backend_pvm.generate(**follow, **{cache_kwarg(): reused},
                                        max_new_tokens=NEW_TOKENS - half, **GREEDY)
            assert torch.equal(rest, plain["mixed"])
    assert pool.get_seq_length() == prompt_len  # continuing the copies left the pool alone
    assert pool.__dict__[STATE_ATTR] is not cache.__dict__[STATE_ATTR]
    clone = copy.deepcopy(pool)  # a hooked call on a copy acts on the copy, rows and state
    clone.batch_select_indices(torch.tensor([1]))
    assert clone.__dict__[STATE_ATTR].batch_size == 1 and clone.layers[0].keys.shape[0] == 1
    assert pool.__dict__[STATE_ATTR].batch_size == 3 and pool.layers[0].keys.shape[0] == 3


def test_beam_search_and_several_sequences_per_prompt(backend_pvm, plain):
    batch = tiny_batch(MIXED)
    with torch.no_grad():  # sampling with top_k 1: two samples per prompt, each the argmax
        repeated = backend_pvm.generate(**batch, max_new_tokens=NEW_TOKENS, num_return_sequences=2,
                                        **dict(GREEDY, do_sample=True, top_k=1))
    assert torch.equal(repeated[0::2], plain["mixed"]) and torch.equal(repeated[1::2], plain["mixed"])
    beams = greedy(backend_pvm, batch, num_beams=3)
    set_pvm_backend(backend_pvm, "reference")
    assert torch.equal(beams, greedy(backend_pvm, batch, num_beams=3))


def test_continuous_batching_takes_no_images_and_equals_stock(base, pvm):
    """transformers' continuous batching (generate_batch) takes token lists only: no image
    can reach PVM there, and the PVM model gives the stock model's tokens."""
    if not hasattr(pvm, "generate_batch"):
        pytest.skip("this transformers has no generate_batch")
    from transformers import GenerationConfig
    prompts = [[5, 17, 33, 2], [9, 4]]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=511, pad_token_id=0)
    params = inspect.signature(pvm.generate_batch).parameters
    extra = {"progress_bar": False} if "progress_bar" in params else {}
    if "warmup" in params:
        extra["warmup"] = False
    if "continuous_batching_config" in params:  # a small paged cache: 0.5 s instead of 14
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        extra["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=16,
                                                                       max_batch_tokens=64)
    try:
        stock = base.generate_batch(prompts, generation_config=config, **extra)
    except Exception as exc:  # noqa: BLE001 - the stock model itself cannot run it here
        pytest.skip(f"stock generate_batch does not run on this machine: {exc}")
    got = pvm.generate_batch(prompts, generation_config=config, **extra)
    assert [o.generated_tokens for o in got.values()] == [o.generated_tokens for o in stock.values()]


# ---- the guard: a decode step never runs PVM layers without the request's memory ---------------

def _prefilled(model, batch):
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, **{cache_kwarg(): cache}, use_cache=True)
    return cache


def _next_step(model, batch, cache):
    """One decode step of the text model on ``cache`` (its own default positions: these
    tests look at which state a step gets, not at its logits)."""
    text_model = model.model.language_model
    step = torch.randn(len(batch["input_ids"]), 1, text_model.config.hidden_size)
    with torch.no_grad():
        return text_model(inputs_embeds=step, use_cache=True, **{text_model._pvm_cache_key: cache})


def test_crops_that_keep_tokens_keep_the_state(pvm):
    """Speculative decoding crops after every verification, often removing nothing (5.x:
    crop(0); the state was dropped there, every later step ran without PVM)."""
    batch = tiny_batch(MIXED)
    cache = _prefilled(pvm, batch)
    state = cache.__dict__[STATE_ATTR]
    _next_step(pvm, batch, cache)
    crop_last(cache, 0)
    assert cache.__dict__[STATE_ATTR] is state
    crop_last(cache, 1)  # the unaccepted candidate
    assert cache.__dict__[STATE_ATTR] is state
    assert _next_step(pvm, batch, cache).last_hidden_state.isfinite().all()


def test_a_cache_no_pvm_model_prefilled_is_refused(base, pvm):
    batch = tiny_batch(ONE_IMAGE)
    foreign = _prefilled(base, batch)  # the stock model filled it: PVM never saw the images
    with pytest.raises(PVMCacheError, match="no PVM model prefilled"):
        _next_step(pvm, batch, foreign)


def test_a_lost_state_raises_instead_of_running_without_images(pvm):
    """Whatever path loses the state (here: deleted by hand), the next step raises."""
    batch = tiny_batch(ONE_IMAGE)
    cache = _prefilled(pvm, batch)
    _next_step(pvm, batch, cache)  # fine with its state
    del cache.__dict__[STATE_ATTR]
    with pytest.raises(PVMCacheError, match="no PVM model prefilled"):
        _next_step(pvm, batch, cache)


def test_crop_into_the_images_is_refused_and_crop_to_empty_starts_over(base, pvm):
    batch = tiny_batch(ONE_IMAGE)
    cache = _prefilled(pvm, batch)
    first_image_token = int(batch["input_ids"][0].tolist().index(500))
    crop_last(cache, cache.get_seq_length() - first_image_token)
    with pytest.raises(PVMCacheError, match="cropped to .* inside the prompt's visual tokens"):
        _next_step(pvm, batch, cache)
    crop_last(cache, cache.get_seq_length())  # empty: a new request may start on it
    assert STATE_ATTR not in cache.__dict__
    text = tiny_batch([None], seed=4)
    with torch.no_grad():
        got = pvm(**text, **{cache_kwarg(): cache}, use_cache=True).logits
        want = base(**text).logits
    assert torch.equal(got, want)  # no leak of the first request's image
    assert cache.__dict__[STATE_ATTR] is TEXT_ONLY


def test_new_images_in_a_continuation_join_the_requests_memory(pvm):
    """A call bringing visual tokens on a non-empty cache (a later turn, run by hand: stock
    generate drops or refuses images on a continuation) appends their memory to the
    request's, so later tokens retrieve from every image of the request."""
    cache = _prefilled(pvm, tiny_batch([(4, 4)], seed=1))
    before = dict(cache.__dict__[STATE_ATTR].memories)
    text_model = pvm.model.language_model
    embeds = torch.randn(1, 9, text_model.config.hidden_size)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 2:7] = True  # five visual tokens among text
    with torch.no_grad():
        text_model(inputs_embeds=embeds, visual_pos_masks=mask, use_cache=True,
                   **{text_model._pvm_cache_key: cache})
        state = cache.__dict__[STATE_ATTR]
        for i in LAYERS:
            alone = text_model.layers[i].pvm_block.encode_visual(embeds[:, 2:7])
            after, n1 = state.memories[i], before[i].num_tokens
            assert after.num_tokens == n1 + 5 and bool(after.valid().all())
            assert torch.equal(after.key[:, :n1], before[i].key)
            torch.testing.assert_close(after.key[:, n1:], alone.key)
            torch.testing.assert_close(after.value[:, n1:], alone.value)
    assert state.visual is None  # every layer appended the new images once
