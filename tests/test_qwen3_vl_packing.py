"""Padding-free (packed) inputs through the patched Qwen3-VL text model: each packed sample
gives what it gives alone, so no sample's text reads another sample's image."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from pvm_kernels.integrations import apply_pvm_to_qwen3_vl, set_pvm_gate  # noqa: E402
from pvm_kernels.integrations import qwen3_vl_packing  # noqa: E402
from pvm_kernels.integrations.qwen3_vl import language_model_of  # noqa: E402
from pvm_kernels.integrations.qwen3_vl_packing import PackedBoundariesUnknown  # noqa: E402
from pvm_kernels.integrations.tiny_qwen3_vl import tiny_qwen3_vl  # noqa: E402

# (tokens, visual token positions) per packed sample: one without an image.
SAMPLES = [(7, range(2, 5)), (5, ()), (9, range(1, 7))]


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    model = apply_pvm_to_qwen3_vl(copy.deepcopy(tiny_qwen3_vl(seed=0)), pvm_hidden_size=32,
                                  backend="reference")
    set_pvm_gate(model, 1.0)
    return language_model_of(model)


def _samples(D):
    g = torch.Generator().manual_seed(1)
    out = []
    for n, vis in SAMPLES:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[list(vis)] = True
        out.append((torch.randn(n, D, generator=g), mask))
    return out


def _positions(lengths):
    text = torch.cat([torch.arange(n) for n in lengths])
    return text.view(1, 1, -1).expand(4, 1, -1).contiguous()  # text row + 3 m-RoPE rows


def _run(tm, embeds, mask, position_ids, **kwargs):
    with torch.no_grad():
        return tm(inputs_embeds=embeds[None], visual_pos_masks=mask[None],
                  position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state[0]


def _alone(tm, samples):
    return torch.cat([_run(tm, x, m, _positions([x.shape[0]])) for x, m in samples])


def _packed_inputs(samples):
    embeds = torch.cat([x for x, _ in samples])
    mask = torch.cat([m for _, m in samples])
    lengths = [x.shape[0] for x, _ in samples]
    return embeds, mask, lengths


def set_pvm_gate_tm(tm, value):
    """The gate of every PVM block of the text model tm."""
    with torch.no_grad():
        for layer in tm._pvm_layers.values():
            layer.pvm_block.gate_alpha.fill_(value)


def _run_gate0(tm, samples):
    set_pvm_gate_tm(tm, 0.0)
    try:
        return _alone(tm, samples)
    finally:
        set_pvm_gate_tm(tm, 1.0)


def _stock_masks_packed_samples(tm, samples):
    """Whether this transformers' own attention keeps packed samples apart (5.x derives a
    block mask from restarting positions); without it no packed run can match."""
    embeds, mask, lengths = _packed_inputs(samples)
    set_pvm_gate_tm(tm, 0.0)
    try:
        packed = _run(tm, embeds, mask, _positions(lengths))
    finally:
        set_pvm_gate_tm(tm, 1.0)
    return torch.allclose(packed, _run_gate0(tm, samples), atol=1e-5)


@pytest.mark.parametrize("signal", ["position_ids", "cu_seq_lens"])
def test_packed_samples_match_each_sample_alone(text_model, signal):
    samples = _samples(text_model.config.hidden_size)
    if not _stock_masks_packed_samples(text_model, samples):
        pytest.skip("this transformers' attention does not keep packed samples apart")
    embeds, mask, lengths = _packed_inputs(samples)
    kwargs = {}
    if signal == "cu_seq_lens":
        cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    packed = _run(text_model, embeds, mask, _positions(lengths), **kwargs)
    alone = _alone(text_model, samples)
    assert (alone - _run_gate0(text_model, samples)).abs().max() > 1e-3, "PVM must matter here"
    assert torch.allclose(packed, alone, atol=1e-5), (packed - alone).abs().max()


def test_without_boundaries_samples_would_mix(text_model, monkeypatch):
    """The check above bites: treating the packed row as one sequence (what PVM did before
    packing support) lets sample 0's and 1's text read sample 2's image."""
    samples = _samples(text_model.config.hidden_size)
    if not _stock_masks_packed_samples(text_model, samples):
        pytest.skip("this transformers' attention does not keep packed samples apart")
    embeds, mask, lengths = _packed_inputs(samples)
    monkeypatch.setattr("pvm_kernels.integrations.qwen3_vl.find_packing", lambda *a, **k: None)
    packed = _run(text_model, embeds, mask, _positions(lengths))
    assert (packed - _alone(text_model, samples)).abs().max() > 1e-3


def test_packed_with_unknowable_boundaries_raises(text_model):
    samples = _samples(text_model.config.hidden_size)
    embeds, mask, lengths = _packed_inputs(samples)
    mrope = _positions(lengths)[1:]  # 3 m-RoPE rows only, restarting: packed, but where?
    with pytest.raises(PackedBoundariesUnknown, match="cu_seq_lens_q"):
        _run(text_model, embeds, mask, mrope)


def test_find_packing_rules():
    find = qwen3_vl_packing.find_packing
    assert find({"position_ids": torch.arange(6)[None]}, 1, 6) is None
    got = find({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}, 1, 6)
    assert got.cu_seqlens.tolist() == [0, 3, 5, 6] and got.max_seqlen == 3
    assert find({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]] * 2)}, 2, 6) is None
    with pytest.raises(ValueError, match="the batch has 2 rows"):
        find({"cu_seq_lens_q": torch.tensor([0, 3, 6])}, 2, 6)
