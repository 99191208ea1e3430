"""FusedPVM against the float64 block reference, and its module-level contract."""
from unittest import mock

import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import FusedPVM, PVMConfig, VisualMemory
from pvm_kernels.ops import backends
from pvm_kernels.reference import pvm_block_reference
from pvm_kernels.testing import (TOLERANCE, double_params, live_block, max_rel_err, poisoned_outputs,
                                 random_mask)

SPEC_SHAPES_8B = {
    "text_reducer.weight": (512, 4096), "vision_reducer.weight": (512, 4096),
    "output_expander.weight": (4096, 512), "input_norm.weight": (512,),
    "post_attn_norm.weight": (512,), "cross_attn.q_proj.weight": (512, 512),
    "cross_attn.k_proj.weight": (128, 512), "cross_attn.v_proj.weight": (128, 512),
    "cross_attn.o_proj.weight": (512, 512), "cross_attn.q_norm.weight": (128,),
    "cross_attn.k_norm.weight": (128,), "mlp.gate_proj.weight": (1536, 512),
    "mlp.up_proj.weight": (1536, 512), "mlp.down_proj.weight": (512, 1536),
    "gate_alpha": (1,),
}


def tiny_config(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=192, pvm_hidden_size=64, rms_norm_eps=1e-6)
    base.update(kw)
    return PVMConfig(**base)


def check_block(backend, device, dtype, config, B, T, Nv, mask, query_is_visual=None,
                transform=lambda t: t):
    block = live_block(config, dtype, device)
    D = config.hidden_size
    h = transform(torch.randn(B, T, D, dtype=torch.float64).to(dtype)).to(device)
    visual = transform(torch.randn(B, Nv, D, dtype=torch.float64).to(dtype)).to(device)
    h.requires_grad_()
    visual.requires_grad_()
    params = double_params(block)
    h64 = h.detach().double().cpu().requires_grad_()
    v64 = visual.detach().double().cpu().requires_grad_()
    expected = pvm_block_reference(params, block.dims, h64, v64, mask, query_is_visual)
    grad = torch.randn_like(expected)
    expected.backward(grad)

    dmask = None if mask is None else mask.to(device)
    qiv = None if query_is_visual is None else query_is_visual.to(device)
    with poisoned_outputs():
        out = block(h, visual, dmask, qiv, backend=backend)
        out.backward(grad.to(dtype).to(device))
    tol = TOLERANCE[dtype] * (2 if dtype != torch.float32 else 1)
    assert out.dtype == dtype
    assert max_rel_err(out, expected) < TOLERANCE[dtype]
    assert max_rel_err(h.grad, h64.grad) < tol, "d hidden_states"
    assert max_rel_err(visual.grad, v64.grad) < tol, "d visual"
    for name, p in block.named_parameters():
        ref = params[name].grad
        if name == "gate_alpha":
            # a cancelling reduction: judged against the mass of its summands
            u1 = expected.detach() / params[name].detach()
            assert abs(p.grad.double().item() - ref.item()) <= tol * (grad * u1).abs().sum()
        else:
            assert max_rel_err(p.grad, ref) < tol, f"d {name}"
    return out.detach().cpu(), expected.detach()


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_mixed_batch(backend, device, dtype):
    """Empty sample, padded sample, full sample, and silenced visual query positions."""
    mask = random_mask(3, 12, empty_rows=[1], pad_from={2: 5})
    qiv = torch.zeros(3, 9, dtype=torch.bool)
    qiv[0, 2:5] = True
    out, _ = check_block(backend, device, dtype, tiny_config(), 3, 9, 12, mask, qiv)
    assert (out[1] == 0).all(), "sample without visual tokens must get exactly 0"
    assert (out[0, 2:5] == 0).all(), "visual query positions must get exactly 0"
    assert (out[0, 5:] != 0).any()


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("case", ["nv1", "odd", "noncontig", "mha", "bias"])
def test_block_edge_shapes(backend, device, case):
    cfg, B, T, Nv, mask, transform = tiny_config(), 2, 5, 7, None, (lambda t: t)
    if case == "nv1":
        Nv = 1
    elif case == "odd":      # D, P, I, T, Nv: nothing a multiple of a block size
        cfg = tiny_config(hidden_size=72, pvm_hidden_size=48, head_dim=24,
                          num_attention_heads=6, num_key_value_heads=3, intermediate_size=100)
        B, T, Nv, mask = 3, 67, 69, random_mask(3, 69, holes=0.2)
    elif case == "noncontig":
        transform = lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    elif case == "mha":      # n_heads == n_kv_heads: Hkv = H
        cfg = tiny_config(num_key_value_heads=4)
    elif case == "bias":     # attention_bias honoured; empty sample still exactly 0
        cfg = tiny_config(attention_bias=True)
        mask = random_mask(B, Nv, empty_rows=[0])
    out, _ = check_block(backend, device, torch.float32, cfg, B, T, Nv, mask, transform=transform)
    if case == "bias":
        assert (out[0] == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_block_with_ffn_output_fuses_the_add(backend, device):
    block = live_block(tiny_config(), device=device)
    h = torch.randn(2, 4, 64, device=device)
    visual = torch.randn(2, 6, 64, device=device)
    ffn = torch.randn(2, 4, 64, device=device)
    fused = block(h, visual, ffn_output=ffn, backend=backend)
    assert max_rel_err(fused, ffn + block(h, visual, backend=backend)) < 1e-6


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_encoded_memory_gives_the_same_result(backend, device):
    block = live_block(tiny_config(), device=device)
    h = torch.randn(3, 4, 64, device=device)
    visual = torch.randn(3, 11, 64, device=device)
    mask = random_mask(3, 11, empty_rows=[2], pad_from={0: 6}).to(device)
    memory = block.encode_visual(visual, mask, backend=backend)  # the same k-norm kernel
    assert isinstance(memory, VisualMemory)
    assert memory.kv_len.tolist() == [6, 11, 0]
    assert torch.equal(block(h, memory, backend=backend), block(h, visual, mask, backend=backend))
    # decode-like reuse over several steps, and reordering rows (beam search)
    for _ in range(3):
        step = torch.randn(3, 1, 64, device=device)
        assert torch.equal(block(step, memory, backend=backend),
                           block(step, visual, mask, backend=backend))
    order = torch.tensor([2, 0, 1], device=device)
    assert torch.equal(block(h[order], memory.index_select(order), backend=backend),
                       block(h[order], visual[order], mask[order], backend=backend))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_text_only_is_zero_and_free(backend, device):
    block = live_block(tiny_config(), device=device)
    h = torch.randn(2, 5, 64, device=device)
    ffn = torch.randn(2, 5, 64, device=device)
    boom = AssertionError("a text-only call reached backend dispatch")
    with mock.patch("pvm_kernels.modules.fused_pvm.resolve_backend", side_effect=boom), \
            mock.patch("pvm_kernels.ops.functional.resolve_backend", side_effect=boom), \
            mock.patch.object(block.text_reducer, "forward", side_effect=boom):
        assert (block(h, None, backend=backend) == 0).all()
        assert block(h, None, ffn_output=ffn, backend=backend) is ffn
        assert (block(h, torch.empty(2, 0, 64, device=device), backend=backend) == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_fresh_block_is_exactly_inert(backend, device):
    block = FusedPVM(tiny_config()).to(device=device, dtype=torch.bfloat16)
    h = torch.randn(2, 5, 64, device=device, dtype=torch.bfloat16)
    visual = torch.randn(2, 8, 64, device=device, dtype=torch.bfloat16)
    ffn = torch.randn(2, 5, 64, device=device, dtype=torch.bfloat16)
    assert (block(h, visual, backend=backend) == 0).all()
    assert torch.equal(block(h, visual, ffn_output=ffn, backend=backend), ffn)


def test_initialisation_follows_the_spec():
    block = FusedPVM(tiny_config(initializer_range=0.05))
    assert block.gate_alpha.item() == 0
    assert block.output_expander.weight.abs().sum() > 0, "expander must not be zero"
    for name, p in block.named_parameters():
        if name.endswith("norm.weight"):
            assert (p == 1).all(), name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.05) < 0.01, name


def test_gradients_flow_at_initialisation():
    """gate 0 with a non-zero expander: the gate gets a gradient, so training can start."""
    block = FusedPVM(tiny_config())
    out = block(torch.randn(2, 3, 64), torch.randn(2, 4, 64), backend="reference")
    (out * torch.randn_like(out)).sum().backward()
    assert block.gate_alpha.grad.abs().item() > 0


def test_state_dict_matches_the_published_layout_at_8b():
    with torch.device("meta"):
        block = FusedPVM(PVMConfig.qwen3_vl_8b())
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == SPEC_SHAPES_8B
    total = sum(p.numel() for p in block.parameters())
    assert round(3 * total / 1e6, 2) == 27.92  # the paper's figure for three layers


def test_state_dict_round_trip_strict():
    src = live_block(tiny_config())
    dst = FusedPVM(tiny_config())
    dst.load_state_dict(src.state_dict(), strict=True)
    h, visual = torch.randn(1, 3, 64), torch.randn(1, 5, 64)
    assert torch.equal(dst(h, visual, backend="reference"), src(h, visual, backend="reference"))


def test_config_from_any_object_and_derived_dims():
    class TextConfig:  # what a transformers text config looks like to us
        hidden_size, num_attention_heads, num_key_value_heads = 4096, 32, 8
        head_dim, intermediate_size, rms_norm_eps, pvm_hidden_size = 128, 12288, 1e-6, 512

    d = FusedPVM(TextConfig()).dims
    assert (d.num_heads, d.num_kv_heads, d.intermediate_size) == (4, 1, 1536)
    with pytest.raises(ValueError, match="pvm_hidden_size must be a positive multiple of head_dim"):
        FusedPVM(tiny_config(pvm_hidden_size=40))
    with pytest.raises(ValueError, match="config has no 'pvm_hidden_size'"):
        class NoPVM:
            hidden_size, num_attention_heads, intermediate_size = 64, 4, 128
        FusedPVM(NoPVM())


def test_unusable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends._CHECKS.clear()
    try:
        with pytest.raises(ValueError, match="backend='triton' cannot run on device 'cpu'"):
            backends.resolve_backend("triton", torch.device("cpu"))
    finally:
        monkeypatch.undo()
        backends._CHECKS.clear()
    assert backends.resolve_backend(None, torch.device("cpu")).name in ("cpu", "reference")


@pytest.mark.parametrize("backend,device", [p for p in backend_device_params()
                                            if p.values[0] == "triton"])
def test_block_under_autocast(backend, device):
    """fp32 parameters under torch.autocast(bfloat16), as TRL's bf16 training runs: the
    fused paths that read weights step aside (q_proj's output is bf16, its gain fp32), and
    forward + backward stay within bf16 error of the fp32 block. (The reference and cpu
    backends do not run under autocast yet.)"""
    cfg = tiny_config()
    block = live_block(cfg, torch.float32, device)
    h = torch.randn(2, 5, 64, device=device, requires_grad=True)
    visual = torch.randn(2, 7, 64, device=device)
    mask = random_mask(2, 7, pad_from={1: 4}).to(device)
    g = torch.randn(2, 5, 64, device=device)
    expected = block(h, visual, mask, backend=backend)
    expected_grad, = torch.autograd.grad(expected, h, g)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = block(h, visual, mask, backend=backend)
    grad, = torch.autograd.grad(out, h, g.to(out.dtype))
    assert out.dtype == torch.bfloat16
    assert max_rel_err(out, expected) < 2 * TOLERANCE[torch.bfloat16]
    assert max_rel_err(grad, expected_grad) < 4 * TOLERANCE[torch.bfloat16]
