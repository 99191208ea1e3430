"""PVM block at Qwen3-VL-8B shapes: forward, forward+backward and a cached decode step,
every backend against the reference; peak memory of forward+backward in extra_info.

Run: ``pytest bench/ --benchmark-only`` (``--benchmark-json=FILE`` to keep raw times).
"""
import pytest
import torch

from conftest import BACKENDS, BATCH, DEVICE, DTYPE, TOKENS, VISUAL, sync


def inputs(T, Nv, requires_grad=False):
    D = 4096
    h = torch.randn(BATCH, T, D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    visual = torch.randn(BATCH, Nv, D, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    return h, visual


def saved_activation_bytes(fn):
    """Bytes autograd keeps for backward (device-independent activation memory)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def record(benchmark, backend, T, Nv, **extra):
    benchmark.extra_info.update(dict(backend=backend, T=T, Nv=Nv, B=BATCH, dtype=str(DTYPE),
                                     device=str(DEVICE), **extra))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", VISUAL)
@pytest.mark.parametrize("T", [t for t in TOKENS if t > 1])
def test_forward(benchmark, block, backend, T, Nv):
    h, visual = inputs(T, Nv)

    def run():
        with torch.no_grad():
            block(h, visual, backend=backend)
        sync()

    record(benchmark, backend, T, Nv)
    benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", VISUAL)
@pytest.mark.parametrize("T", [t for t in TOKENS if t > 1])
def test_forward_backward(benchmark, block, backend, T, Nv):
    h, visual = inputs(T, Nv, requires_grad=True)
    grad = torch.randn_like(h)

    def run():
        block(h, visual, backend=backend).backward(grad)
        sync()

    extra = dict(saved_activation_bytes=saved_activation_bytes(
        lambda: block(h, visual, backend=backend)))
    if DEVICE.type == "cuda":
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        extra["peak_fwd_bwd_bytes"] = torch.cuda.max_memory_allocated() - base
    record(benchmark, backend, T, Nv, **extra)
    benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", VISUAL)
def test_decode_step_cached_memory(benchmark, block, backend, Nv):
    h, visual = inputs(1, Nv)
    with torch.no_grad():
        memory = block.encode_visual(visual)

    def run():
        with torch.no_grad():
            block(h, memory, backend=backend)
        sync()

    record(benchmark, backend, 1, Nv)
    benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nv", VISUAL)
def test_decode_step_reprojecting(benchmark, block, backend, Nv):
    """The published behaviour: the visual tokens are projected again at every step."""
    h, visual = inputs(1, Nv)

    def run():
        with torch.no_grad():
            block(h, visual, backend=backend)
        sync()

    record(benchmark, backend, 1, Nv)
    benchmark(run)
