"""FusedPVM.forward_varlen: packed sequences give, per sequence, the float64 block reference
of that sequence alone (values and every gradient), on every backend."""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import PackedVisualMemory, PVMConfig
from pvm_kernels.reference import pvm_block_reference
from pvm_kernels.testing import TOLERANCE, double_params, live_block, max_rel_err, poisoned_outputs
from varlen_cases import cu_seqlens


def tiny_config():
    return PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=192, pvm_hidden_size=64, rms_norm_eps=1e-6)


# Text tokens and visual tokens per sequence: a text-only sequence, a decode row (1 token),
# and two with images; the first query token of the last sequence is itself visual.
TEXT = (6, 4, 1, 9)
VISION = (5, 0, 12, 3)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("as_memory", [False, True], ids=["embeddings", "memory"])
def test_forward_varlen_matches_each_sequence_alone(backend, device, dtype, as_memory):
    config = tiny_config()
    block = live_block(config, dtype, device)
    D = config.hidden_size
    h = torch.randn(sum(TEXT) + 2, D, dtype=torch.float64).to(dtype)  # 2 rows of no sequence
    visual = torch.randn(sum(VISION), D, dtype=torch.float64).to(dtype)
    qiv = torch.zeros(h.shape[0], dtype=torch.bool)
    qiv[sum(TEXT[:3])] = True
    cu_q, cu_k = cu_seqlens(TEXT, device), cu_seqlens(VISION, device)

    params = double_params(block)
    h64 = h.double().requires_grad_()
    v64 = visual.double().requires_grad_()
    expected = torch.zeros(h.shape[0], D, dtype=torch.float64)
    q0 = k0 = 0
    for nq, nk in zip(TEXT, VISION):
        piece = pvm_block_reference(params, block.dims, h64[None, q0:q0 + nq],
                                    v64[None, k0:k0 + nk] if nk else None,
                                    query_is_visual=qiv[None, q0:q0 + nq])[0]
        expected = torch.cat([expected[:q0], piece, expected[q0 + nq:]])
        q0, k0 = q0 + nq, k0 + nk
    grad = torch.randn_like(expected)
    grad[sum(TEXT):] = 0  # rows of no sequence: the block's output there is 0 either way
    expected.backward(grad)

    def run(impl):
        block.zero_grad()
        hd, vd = (t.to(device, copy=True).requires_grad_() for t in (h, visual))
        with poisoned_outputs():
            if as_memory:
                memory = block.encode_visual_varlen(vd, cu_k, max(VISION))
                assert isinstance(memory, PackedVisualMemory)
                out = block.forward_varlen(hd, cu_q, max(TEXT), memory,
                                           query_is_visual=qiv.to(device), backend=impl)
            else:
                out = block.forward_varlen(hd, cu_q, max(TEXT), vd, cu_k, max(VISION),
                                           query_is_visual=qiv.to(device), backend=impl)
            out.backward(grad.to(dtype).to(device))
        return out.detach(), hd.grad, vd.grad, {n: p.grad.clone() for n, p in
                                               block.named_parameters()}

    # Parameter gradients are sums over every token: in bf16 their rounding is judged
    # against PyTorch's own (the reference backend in the same dtype), as flash-attention
    # judges its kernels, and never looser than the fixed tolerance.
    baseline = run("reference")[3] if dtype != torch.float32 else None
    out, d_h, d_v, d_params = run(backend)
    tol = TOLERANCE[dtype] * (2 if dtype != torch.float32 else 1)
    assert max_rel_err(out, expected) < TOLERANCE[dtype]
    # Exactly 0: the text-only sequence, the visual query token, rows of no sequence.
    assert (out[6:10] == 0).all() and (out[sum(TEXT[:3])] == 0).all()
    assert (out[sum(TEXT):] == 0).all()
    assert max_rel_err(d_h, h64.grad) < tol, "d hidden_states"
    assert max_rel_err(d_v, v64.grad) < tol, "d visual"
    for name, got in d_params.items():
        ref = params[name].grad
        limit = tol if baseline is None else max(tol, 2 * max_rel_err(baseline[name], ref))
        assert max_rel_err(got, ref) < limit, name


def test_forward_varlen_fuses_ffn_and_checks_arguments():
    config = tiny_config()
    block = live_block(config)
    h = torch.randn(7, 64)
    ffn = torch.randn(7, 64)
    cu_q, cu_k = cu_seqlens((3, 4), "cpu"), cu_seqlens((2, 5), "cpu")
    visual = torch.randn(7, 64)
    plain = block.forward_varlen(h, cu_q, 4, visual, cu_k, 5)
    fused = block.forward_varlen(h, cu_q, 4, visual, cu_k, 5, ffn_output=ffn)
    assert torch.allclose(fused, plain + ffn, atol=1e-6)
    assert torch.equal(block.forward_varlen(h, cu_q, 4, None, ffn_output=ffn), ffn)
    with pytest.raises(ValueError, match="need cu_seqlens_k and max_seqlen_k"):
        block.forward_varlen(h, cu_q, 4, visual)
    with pytest.raises(ValueError, match=r"hidden_states must be \[total_q, 64\]"):
        block.forward_varlen(h[None], cu_q, 4, visual, cu_k, 5)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is below the longest sequence"):
        block.forward_varlen(h, cu_q, 3, visual, cu_k, 5)
    memory = block.encode_visual_varlen(visual, cu_seqlens((7,), "cpu"), 7)
    with pytest.raises(ValueError, match="visual describes 1 sequences, cu_seqlens_q 2"):
        block.forward_varlen(h, cu_q, 4, memory)
