"""Numerical robustness of every backend: NaN/Inf stay in their sample, 1e4-scale inputs in
half precision, run-to-run determinism, and 64-bit offsets past 2^31 elements."""
import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import PVMConfig, pvm_merge
from pvm_kernels.reference import merge_reference, pvm_block_reference
from pvm_kernels.testing import TOLERANCE, double_params, live_block, max_rel_err, random_mask

CFG = PVMConfig(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                intermediate_size=256, pvm_hidden_size=64)  # H 4, Hkv 1


def run_block(block, h, visual, mask, backend, grad=None):
    h = h.detach().clone().requires_grad_()
    visual = visual.detach().clone().requires_grad_()
    out = block(h, visual, mask, backend=backend)
    if grad is not None:
        out.backward(grad)
    return out.detach(), h.grad, visual.grad


def fp32_problem(device, B, T, Nv, **mask_kw):
    """A live fp32 block and random hidden states, visual tokens, mask and output grad."""
    D = CFG.hidden_size
    return (live_block(CFG, torch.float32, device), torch.randn(B, T, D, device=device),
            torch.randn(B, Nv, D, device=device), random_mask(B, Nv, **mask_kw).to(device),
            torch.randn(B, T, D, device=device))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_nan_and_inf_stay_inside_their_sample(backend, device):
    T = 7
    block, h, visual, mask, grad = fp32_problem(device, 3, T, 11, pad_from={2: 6})
    clean = run_block(block, h, visual, mask, backend, grad)
    bad_h, bad_v = h.clone(), visual.clone()
    bad_h[0, 3, 5] = float("nan")       # one query token of sample 0
    bad_v[1, 2, 7] = float("inf")       # one valid visual token of sample 1
    bad_v[2, 8] = float("nan")          # padding of sample 2: must not matter at all
    out, dh, dv = run_block(block, bad_h, bad_v, mask, backend, grad)
    # Sample 0: only the poisoned query row; sample 1: all of it; sample 2: untouched.
    others = [t for t in range(T) if t != 3]
    assert torch.equal(out[0, others], clean[0][0, others])
    assert torch.isnan(out[0, 3]).all(), "a NaN query row must come out NaN, as in the reference"
    assert not torch.isfinite(out[1]).all()
    assert torch.equal(out[2], clean[0][2])
    assert torch.equal(dh[2], clean[1][2]) and torch.equal(dv[2], clean[2][2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_inputs_at_1e4_scale_do_not_overflow_in_half_precision(backend, device, dtype):
    """Squares of 1e4 (1e8) overflow fp16: norm statistics must run in float32. Weights at
    the checkpoint's init scale (0.02), so the reducers' outputs (~2e3, squares ~4e6) fit
    fp16 but their squares do not."""
    B, T, Nv, D = 2, 5, 9, CFG.hidden_size
    block = live_block(CFG, dtype, device, weight_std=0.02)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(B, T, D, generator=g, dtype=torch.float64) * 1e4).to(dtype)
    visual = (torch.randn(B, Nv, D, generator=g, dtype=torch.float64) * 1e4).to(dtype)
    expected = pvm_block_reference(double_params(block), block.dims, h.double(), visual.double())
    out = block(h.to(device), visual.to(device), backend=backend)
    assert torch.isfinite(out).all()
    assert max_rel_err(out, expected) < TOLERANCE[dtype]
    e = (torch.randn(4, 512, generator=g, dtype=torch.float64) * 1e4).to(dtype)
    gate = torch.ones(1, dtype=dtype)
    merged = pvm_merge(e.to(device), gate.to(device), backend=backend)
    assert max_rel_err(merged, merge_reference(e.double(), gate.double())) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_forward_and_backward_are_deterministic(backend, device):
    block, h, visual, mask, grad = fp32_problem(device, 2, 33, 70, pad_from={1: 40}, holes=0.2)
    runs = []
    for _ in range(3):
        block.zero_grad(set_to_none=True)
        out, dh, dv = run_block(block, h, visual, mask, backend, grad)
        runs.append([out, dh, dv] + [p.grad.clone() for p in block.parameters()])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


@pytest.mark.parametrize("backend,device", [p for p in backend_device_params()
                                            if p.id in ("cpu-cpu", "cuda-cuda", "triton-cuda")])
def test_merge_offsets_past_2_to_the_31(backend, device):
    """B*T*D > 2^31 elements: rows whose offset needs 64 bits are computed right."""
    B, T, D = 2, 262_145, 4096  # 2 * 262145 * 4096 = 2^31 + 8192 elements per tensor
    assert B * T * D > 2**31
    need = 2 * B * T * D * 2 / 2**30 + 1  # input and output in bf16, GiB
    if device == "cpu" and _available_gib() < need + 4:
        pytest.skip(f"needs ~{need:.0f} GiB of free memory")
    if device == "cuda" and torch.cuda.mem_get_info()[0] / 2**30 < need + 1:
        pytest.skip(f"needs ~{need:.0f} GiB of free GPU memory")
    e = torch.zeros(B, T, D, dtype=torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(0)
    rows = [(0, 0), (0, T - 1), (1, 0), (1, T // 2), (1, T - 1)]  # the last one starts past 2^31
    values = torch.randn(len(rows), D, generator=g).to(torch.bfloat16)
    for (b, t), v in zip(rows, values):
        e[b, t] = v.to(device)
    keep = torch.ones(B, T, dtype=torch.bool, device=device)
    keep[1, T // 2] = False
    gate = torch.full((1,), 0.5, dtype=torch.bfloat16, device=device)
    out = pvm_merge(e, gate, keep, backend=backend)
    assert (1 * T + T - 1) * D > 2**31
    for (b, t), v in zip(rows, values):
        want = merge_reference(v.double()[None], gate.double().cpu(),
                               keep[b, t].cpu()[None])[0]
        assert max_rel_err(out[b, t].cpu(), want) < TOLERANCE[torch.bfloat16] or \
            (not keep[b, t] and torch.equal(out[b, t].cpu(), torch.zeros(D, dtype=torch.bfloat16)))
    del e, out
