"""PVM block at Qwen3-VL-8B shapes: forward, forward+backward and a cached decode step,
every backend against the reference; peak memory of forward+backward, the bytes saved for
backward and the kernel launches per call in extra_info.

Run: ``pytest bench/ --benchmark-only`` (``--benchmark-json=FILE`` to keep raw times).
"""
import pytest
import torch

from pvm_kernels import PVMConfig
from pvm_kernels.roofline import block_cost
from pvm_kernels.testing import block_saved_bytes, saved_tensor_bytes
from conftest import (BACKENDS, BATCH, DECODE_BATCH, DECODE_VISUAL, DEVICE, DTYPE, TOKENS, VISUAL,
                      time_and_roofline)

ELEM = torch.finfo(DTYPE).bits // 8


def inputs(T, Nv, requires_grad=False, batch=BATCH):
    D = 4096
    h = torch.randn(batch, T, D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    visual = torch.randn(batch, Nv, D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    return h, visual


def record(benchmark, backend, T, Nv, B=BATCH, **extra):
    benchmark.extra_info.update(dict(backend=backend, T=T, Nv=Nv, B=B, dtype=str(DTYPE),
                                     device=str(DEVICE), **extra))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", VISUAL)
@pytest.mark.parametrize("T", [t for t in TOKENS if t > 1])
def test_forward(benchmark, block, backend, T, Nv):
    h, visual = inputs(T, Nv)

    def work():
        with torch.no_grad():
            block(h, visual, backend=backend)

    record(benchmark, backend, T, Nv)
    time_and_roofline(benchmark, work, block_cost(block.dims, BATCH, T, Nv, ELEM))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", VISUAL)
@pytest.mark.parametrize("T", [t for t in TOKENS if t > 1])
def test_forward_backward(benchmark, block, backend, T, Nv):
    h, visual = inputs(T, Nv, requires_grad=True)
    grad = torch.randn_like(h)

    def work():
        h.grad = visual.grad = None
        block(h, visual, backend=backend).backward(grad)

    # Saved for backward, not counting the block's inputs or parameters (issue 24), and
    # the same at the 8B long-sequence point (bf16, T 8192, Nv 2048) under FakeTensorMode,
    # which any machine can measure.
    extra = dict(saved_activation_bytes=saved_tensor_bytes(
        lambda: block(h, visual, backend=backend), [h, visual, *block.parameters()]),
        saved_bytes_8b_t8192_nv2048=block_saved_bytes(PVMConfig.qwen3_vl_8b(), backend,
                                                      8192, 2048, device=DEVICE.type))
    if DEVICE.type == "cuda":
        work()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        extra["peak_fwd_bwd_bytes"] = torch.cuda.max_memory_allocated() - base
    record(benchmark, backend, T, Nv, **extra)
    time_and_roofline(benchmark, work, block_cost(block.dims, BATCH, T, Nv, ELEM, backward=True))


def decode_step(benchmark, block, backend, B, Nv, cached):
    h, visual = inputs(1, Nv, batch=B)
    with torch.no_grad():
        visual_arg = block.encode_visual(visual) if cached else visual

    def work():
        with torch.no_grad():
            block(h, visual_arg, backend=backend)

    record(benchmark, backend, 1, Nv, B=B)
    time_and_roofline(benchmark, work, block_cost(block.dims, B, 1, Nv, ELEM, cached=cached))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", DECODE_VISUAL)
@pytest.mark.parametrize("B", DECODE_BATCH)
def test_decode_step_cached_memory(benchmark, block, backend, B, Nv):
    """One decode step of the block reusing a VisualMemory (query side only)."""
    decode_step(benchmark, block, backend, B, Nv, cached=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", DECODE_VISUAL)
@pytest.mark.parametrize("B", DECODE_BATCH)
def test_decode_step_reprojecting(benchmark, block, backend, B, Nv):
    """The published behaviour: the visual tokens are projected again at every step."""
    decode_step(benchmark, block, backend, B, Nv, cached=False)
