"""PVM inside a stock transformers Qwen3-VL (tiny random model, synthetic images, CPU)."""
import copy
import threading

import pytest
import torch

pytest.importorskip("transformers")

from pvm_kernels.integrations import (apply_pvm_to_qwen3_vl, default_pvm_layers,  # noqa: E402
                                      set_pvm_backend, set_pvm_gate)
from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch, tiny_qwen3_vl  # noqa: E402

GRIDS = [(4, 4), None, (8, 4)]  # 4 visual tokens, a text-only row, 8 visual tokens


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_vl(seed=0)


def pvm_model(base, backend="reference", gate=1.0, seed=0):
    torch.manual_seed(seed)  # the same PVM weights every call, so models can be compared
    model = apply_pvm_to_qwen3_vl(copy.deepcopy(base), pvm_hidden_size=32, backend=backend)
    set_pvm_gate(model, gate)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_layout_and_config(base):
    model = pvm_model(base)
    cfg = model.config.text_config
    assert cfg.pvm_layers == default_pvm_layers(4, 64) == [1, 2, 3]
    assert cfg.pvm_hidden_size == 32
    keys = [k for k in model.state_dict() if ".pvm_block." in k]
    assert "model.language_model.layers.1.pvm_block.cross_attn.q_proj.weight" in keys
    assert len(keys) == 3 * 15
    assert default_pvm_layers(36, 4096) == [8, 16, 24]
    assert default_pvm_layers(36, 2560) == [5, 11, 17]
    assert not hasattr(base.model.language_model.layers[1], "pvm_block"), "base was modified"


def test_gate_zero_is_bit_identical_to_the_stock_model(base):
    batch = tiny_batch(GRIDS)
    assert torch.equal(logits(pvm_model(base, gate=0.0), batch), logits(base, batch))


def test_pvm_changes_image_rows_only(base):
    batch = tiny_batch(GRIDS)
    got, ref = logits(pvm_model(base), batch), logits(base, batch)
    assert (got[0] - ref[0]).abs().max() > 1e-3 and (got[2] - ref[2]).abs().max() > 1e-3
    assert torch.equal(got[1], ref[1]), "a row without an image must be untouched"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backends_agree_with_the_reference(base, backend):
    from pvm_kernels import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"{backend} not usable on cpu here")
    batch = tiny_batch(GRIDS)
    model = pvm_model(base)
    ref_logits = logits(model, batch)
    ref_tokens = model.generate(**batch, max_new_tokens=6, do_sample=False)
    set_pvm_backend(model, backend)
    got = logits(model, batch)
    assert ((got - ref_logits).abs().max() / ref_logits.abs().max()) < 1e-4
    assert torch.equal(model.generate(**batch, max_new_tokens=6, do_sample=False), ref_tokens)


def test_decode_steps_do_not_reproject_the_image(base):
    """Visual tokens are projected once per PVM layer at prefill, whatever the length."""
    batch = tiny_batch(GRIDS)
    model = pvm_model(base)
    calls = []
    for i in model.config.text_config.pvm_layers:
        model.model.language_model.layers[i].pvm_block.vision_reducer.register_forward_hook(
            lambda mod, inp, out: calls.append(inp[0].shape))
    for new_tokens in (2, 9):
        calls.clear()
        model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        assert len(calls) == 3, calls  # one encode per PVM layer, at prefill only


def test_cache_state_follows_row_reordering(base):
    """generate() reorders (beam search) and repeats cache rows: the memories follow."""
    from transformers import DynamicCache
    from pvm_kernels.integrations.qwen3_vl_state import STATE_ATTR as _STATE_ATTR
    model = pvm_model(base)
    batch = tiny_batch(GRIDS)
    import inspect
    cache = DynamicCache(config=model.config.text_config)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(**batch, **{key: cache}, use_cache=True)
    state = getattr(cache, _STATE_ATTR)
    before = {i: m.key.clone() for i, m in state.memories.items()}
    order = torch.tensor([2, 0, 1])
    cache.reorder_cache(order)
    for i, m in getattr(cache, _STATE_ATTR).memories.items():
        assert torch.equal(m.key, before[i][order])
    cache.batch_repeat_interleave(2)
    assert next(iter(getattr(cache, _STATE_ATTR).memories.values())).batch_size == 6


def test_beam_search_agrees_across_backends(base):
    batch = tiny_batch(GRIDS)
    model = pvm_model(base)
    ref = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    set_pvm_backend(model, "cpu")
    assert torch.equal(model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False), ref)


def test_concurrent_generates_do_not_share_images(base):
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("stock Qwen3-VL in transformers 4.x keeps rope_deltas on the model "
                    "instance: concurrent generate() disagrees even without PVM")
    model = pvm_model(base)
    jobs = [tiny_batch([(4, 4)], seed=1), tiny_batch([(8, 4)], seed=2)]
    alone = [model.generate(**b, max_new_tokens=6, do_sample=False) for b in jobs]
    results = [None] * 4
    barrier = threading.Barrier(4)

    def run(k):
        barrier.wait()
        results[k] = model.generate(**jobs[k % 2], max_new_tokens=6, do_sample=False)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert torch.equal(results[k], alone[k % 2])


def test_save_and_reload_into_a_stock_model(base, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration
    batch = tiny_batch(GRIDS)
    model = pvm_model(base, gate=0.7)
    model.save_pretrained(tmp_path)
    stock = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path)
    assert stock.config.text_config.pvm_layers == [1, 2, 3]
    reloaded = apply_pvm_to_qwen3_vl(stock, backend="reference")  # layers, P from config
    reloaded.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(reloaded.eval(), batch), logits(model, batch))


def test_training_with_gradient_checkpointing_matches_plain(base):
    batch = tiny_batch(GRIDS)
    grads = []
    for checkpointing in (False, True):
        model = pvm_model(base, gate=0.5).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(**batch, use_cache=False)
        out.logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if ".pvm_block." in n and p.grad is not None})
    assert len(grads[0]) == 3 * 15
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_rejects_bad_layers_and_double_application(base):
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        apply_pvm_to_qwen3_vl(copy.deepcopy(base), layers=[1, 7])
    model = pvm_model(base)
    with pytest.raises(ValueError, match="already applied"):
        apply_pvm_to_qwen3_vl(model)
    with pytest.raises(TypeError, match="expected a transformers Qwen3-VL model"):
        apply_pvm_to_qwen3_vl(torch.nn.Linear(2, 2))


def test_load_published_checkpoint_and_key_errors(base, tmp_path):
    from pvm_kernels.integrations import load_pvm_qwen3_vl, load_pvm_weights, save_pvm_weights
    batch = tiny_batch(GRIDS)
    model = pvm_model(base, gate=0.7)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_pvm_qwen3_vl(str(tmp_path / "ckpt")).eval()
    set_pvm_backend(loaded, "reference")
    assert torch.equal(logits(loaded, batch), logits(model, batch))

    save_pvm_weights(model, str(tmp_path / "pvm.safetensors"))
    other = pvm_model(base, gate=0.0, seed=1)
    load_pvm_weights(other, str(tmp_path / "pvm.safetensors"))
    assert torch.equal(logits(other, batch), logits(model, batch))

    fewer = apply_pvm_to_qwen3_vl(copy.deepcopy(base), layers=[1, 2], pvm_hidden_size=32)
    with pytest.raises(ValueError, match=r"unexpected \['model.language_model.layers.3.pvm_block"):
        load_pvm_weights(fewer, str(tmp_path / "pvm.safetensors"))
    with pytest.raises(ValueError, match="is not a PVM checkpoint"):
        base.save_pretrained(tmp_path / "stock")
        load_pvm_qwen3_vl(str(tmp_path / "stock"))


def test_sft_steps_train_only_pvm_and_lower_the_loss(base):
    """The paper's SFT stage on a toy task: fit the logits of image rows to fixed targets."""
    from pvm_kernels.integrations import freeze_all_but_pvm, pvm_parameters
    batch = tiny_batch(GRIDS)
    model = pvm_model(base, gate=0.0).train()
    n_trainable = freeze_all_but_pvm(model)
    assert n_trainable == sum(p.numel() for p in pvm_parameters(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randint(0, 512, (3, batch["input_ids"].shape[1]))
    losses = []
    for _ in range(6):
        out = model(**batch, use_cache=False)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (".pvm_block." in n), n  # the gate leaves 0, so every PVM weight moves


def test_text_only_generation_does_no_pvm_work(base):
    """No image in the request: no visual encoding, no PVM call, the stock model's tokens."""
    batch = tiny_batch([None, None])
    model = pvm_model(base)
    calls = []
    for i in model.config.text_config.pvm_layers:
        model.model.language_model.layers[i].pvm_block.register_forward_pre_hook(
            lambda mod, args: calls.append(1))
        model.model.language_model.layers[i].pvm_block.vision_reducer.register_forward_pre_hook(
            lambda mod, args: calls.append(1))
    got = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert calls == []
    assert torch.equal(got, base.generate(**batch, max_new_tokens=5, do_sample=False))
