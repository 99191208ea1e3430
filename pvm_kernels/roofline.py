"""FLOPs and bytes of the PVM ops and block: what a measured time is judged against.

Counts are the work the math needs (matrix products as 2 flops per multiply-add) and the
fewest bytes an implementation must move through device memory (each input read once,
each output written once); an implementation may do more of either. ``lower_bound_ms``
turns them into the time no implementation beats on a device with the given peaks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Peaks measured on this project's H100 80GB HBM3 machines (docs/gpu_facts.md): an
#: 8192^3 bf16 torch.mm on random data and a large device-to-device copy (read + write).
H100_BF16_TFLOPS = 798.0
H100_COPY_GBS = 3000.0


@dataclass(frozen=True)
class Cost:
    """flops (float) and bytes (int) of one call."""

    flops: float
    bytes: int

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def lower_bound_ms(self, tflops: float = H100_BF16_TFLOPS, gbs: float = H100_COPY_GBS) -> float:
        """max(flops / peak rate, bytes / bandwidth) in ms: the roofline floor."""
        return max(self.flops / (tflops * 1e9), self.bytes / (gbs * 1e6))

    def fields(self, ms: Optional[float], tflops: Optional[float] = None,
               gbs: Optional[float] = None) -> dict:
        """The bench JSON's roofline fields for a time of ``ms``: counts, achieved rates, and
        their fractions of the given peaks (measured in the same run) when known."""
        out = dict(flops=self.flops, bytes=self.bytes,
                   h100_lower_bound_ms=self.lower_bound_ms())
        if ms:
            out.update(achieved_tflops=self.flops / ms / 1e9, achieved_gbs=self.bytes / ms / 1e6)
            if tflops:
                out["of_peak_tflops"] = out["achieved_tflops"] / tflops
            if gbs:
                out["of_peak_gbs"] = out["achieved_gbs"] / gbs
        return out


def retrieval_cost(B: int, T: int, H: int, Hkv: int, hd: int, Nv: int, elem: int,
                   backward: bool = False) -> Cost:
    """Forward: QK^T and PV, 4 B T H Nv hd flops; reads q, K, V, writes out and the fp32 lse.
    Backward: QK^T again, dP, dV, dQ, dK: 10 B T H Nv hd; reads q, K, V, out, dO, lse,
    writes dq, dK, dV."""
    rows, keys = B * T * H * hd, B * Nv * Hkv * hd
    if not backward:
        return Cost(4.0 * B * T * H * Nv * hd, elem * (2 * rows + 2 * keys) + 4 * B * H * T)
    return Cost(10.0 * B * T * H * Nv * hd, elem * (4 * rows + 4 * keys) + 4 * B * H * T)


def retrieval_step_cost(B: int, T: int, H: int, Hkv: int, hd: int, Nv: int, elem: int,
                        backward: bool = False) -> Cost:
    """What one timed call does: the forward, plus the backward when ``backward`` (a
    forward+backward timing: 14 B T H Nv hd flops). ``retrieval_cost(backward=True)`` is
    the backward pass alone."""
    fwd = retrieval_cost(B, T, H, Hkv, hd, Nv, elem)
    return fwd + retrieval_cost(B, T, H, Hkv, hd, Nv, elem, backward=True) if backward else fwd


def paged_decode_cost(R: int, H: int, Hkv: int, hd: int, Nv: int, context: int,
                      block_size: int, elem: int, in_place: bool = True) -> Cost:
    """One decode step's retrieval for R requests from a paged cache (ops/paged.py), each
    with ``context`` tokens of which Nv are visual, packed in whole blocks.

    in_place (the Triton kernel): reads q, the block table and summaries of every block,
    and the flags and entries (K and V, Hkv heads of hd) of the visual blocks only; writes
    the output. Gathered (the fallback): every position's entry and flag read, written to
    the padded memory and read again by the retrieval. Flops: the visual keys' QK^T and PV
    (4 R H Nv hd; the in-place kernel also scores the text slots sharing a visual block,
    and the gathered retrieval every masked position: counted as useful work only).
    """
    blocks = -(-context // block_size)
    visual_blocks = min(blocks, -(-Nv // block_size))
    entry = Hkv * 2 * hd * elem
    io = 2 * R * H * hd * elem
    if in_place:
        moved = R * (blocks * 5 + visual_blocks * block_size * (entry + 1))
    else:
        moved = R * (blocks * 4 + context * (3 * entry + 1))
    return Cost(4.0 * R * H * Nv * hd, io + moved)


def merge_cost(N: int, D: int, elem: int, ffn: bool = True, backward: bool = False) -> Cost:
    """RMSNorm-gated merge of N rows of width D: reads e (and the FFN output), writes out;
    backward reads grad and e, writes d(e) (the gate's gradient is a reduction of those)."""
    return Cost(8.0 * N * D, elem * N * D * (3 if (ffn or backward) else 2))


def block_cost(dims, B: int, T: int, Nv: int, elem: int, backward: bool = False,
               cached: bool = False) -> Cost:
    """The FusedPVM block (``dims``: a PVMDims). cached: the visual side comes from a
    VisualMemory (no vision_reducer / k / v work, K and V read instead).
    Backward: twice the forward's GEMM flops, the retrieval's own backward."""
    D, P, I, H, hd, Hkv = (dims.hidden_size, dims.pvm_hidden_size, dims.intermediate_size,
                           dims.num_heads, dims.head_dim, dims.num_kv_heads)
    text_w = D * P + P * H * hd + H * hd * P + 3 * P * I + P * D
    visual_w = D * P + 2 * P * Hkv * hd
    text = 2.0 * B * T * text_w
    visual = 0.0 if cached else 2.0 * B * Nv * visual_w
    weights = elem * (text_w + (0 if cached else visual_w))
    io = elem * B * T * D * 2 + (0 if cached else elem * B * Nv * D)
    attn = retrieval_cost(B, T, H, Hkv, hd, Nv, elem)
    fwd = Cost(text + visual, weights + io) + attn
    if not backward:
        return fwd
    grads = Cost(2.0 * (text + visual), weights + io)
    return fwd + grads + retrieval_cost(B, T, H, Hkv, hd, Nv, elem, backward=True)


def measure_peaks(device, dtype=None) -> tuple:
    """(matmul TFLOP/s, copy GB/s) measured now on a CUDA ``device``: an 8192^3 torch.mm on
    random data in ``dtype`` (default bf16) and a 1 GiB device-to-device copy counted as
    bytes read + written; medians of ``triton.testing.do_bench`` (CUDA events, L2
    flushed). Ratios against them are fair only within one run: the same kind of H100
    gave 719 and 796 TFLOP/s on two machines."""
    import torch
    import triton.testing

    dtype = dtype or torch.bfloat16
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    tflops = 2 * n ** 3 / triton.testing.do_bench(lambda: torch.mm(a, b), return_mode="median") / 1e9
    del a, b
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return float(tflops), float(2 * src.numel() * src.element_size() / ms / 1e6)
