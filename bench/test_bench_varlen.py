"""Varlen retrieval: 8 requests of different lengths packed (cu_seqlens) against the same
requests padded to the longest, forward, forward+backward and one batched decode step, at
the 8B layout (H 4, Hkv 1, hd 128). Records time, the bytes each layout allocates for its
tensors and, on a GPU, the peak memory of the call; the roofline counts are the useful work
(each request's own tokens and keys), the same for both layouts."""
import pytest
import torch

from conftest import BACKENDS, DEVICE, DTYPE, sync, time_and_roofline
from pvm_kernels import pvm_retrieval, pvm_retrieval_varlen
from pvm_kernels.roofline import Cost, retrieval_step_cost

ELEM = torch.finfo(DTYPE).bits // 8
H, HKV, HD = 4, 1, 128
# Text 256-4096 and visual 256-2048 tokens per request on a GPU (the mix); an
# eighth of that on the CPU machine.
_SCALE = 1 if DEVICE.type == "cuda" else 8
TEXT = [n // _SCALE for n in (256, 4096, 512, 1024, 3072, 768, 2048, 1536)]
VISUAL = [n // _SCALE for n in (2048, 256, 1024, 512, 2048, 768, 256, 1536)]


def _cu(lengths):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=DEVICE)
    out[1:] = torch.cumsum(torch.tensor(lengths, device=DEVICE), 0)
    return out


def _useful_cost(text, backward):
    return sum((retrieval_step_cost(1, t, H, HKV, HD, n, ELEM, backward)
                for t, n in zip(text, VISUAL)), Cost(0.0, 0))


def _inputs(backend, layout, text, grad):
    """(a call running the retrieval, its differentiable inputs) for one layout."""
    if layout == "packed":
        shapes = ((sum(text), H), (sum(VISUAL), HKV), (sum(VISUAL), HKV))
        q, k, v = (torch.randn(n, h, HD, device=DEVICE, dtype=DTYPE, requires_grad=grad)
                   for n, h in shapes)
        cu_q, cu_k = _cu(text), _cu(VISUAL)

        def call():
            return pvm_retrieval_varlen(q, k, v, cu_q, cu_k, max(text), max(VISUAL),
                                        backend=backend)
        return call, (q, k, v)
    B, T, N = len(text), max(text), max(VISUAL)
    q = torch.randn(B, T, H, HD, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    k, v = (torch.randn(B, N, HKV, HD, device=DEVICE, dtype=DTYPE, requires_grad=grad)
            for _ in range(2))
    mask = torch.arange(N, device=DEVICE)[None] < torch.tensor(VISUAL, device=DEVICE)[:, None]
    kv_len = torch.tensor(VISUAL, dtype=torch.int32, device=DEVICE)

    def call():
        return pvm_retrieval(q, k, v, mask, kv_len, backend=backend)
    return call, (q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd", "decode"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_varlen_vs_padded(benchmark, backend, mode, layout):
    text = [1] * len(TEXT) if mode == "decode" else TEXT
    backward = mode == "fwd_bwd"
    call, tensors = _inputs(backend, layout, text, backward)
    grad = torch.randn_like(call()) if backward else None

    def work():
        if backward:
            torch.autograd.grad(call(), tensors, grad)
        else:
            with torch.no_grad():
                call()

    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors) * (2 if backward else 1)
    benchmark.extra_info.update(backend=backend, layout=layout, mode=mode, requests=len(text),
                                text=text, visual=VISUAL, op="retrieval_varlen",
                                tensor_bytes=tensor_bytes)
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        work()
        sync()
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    time_and_roofline(benchmark, work, _useful_cost(text, backward))
