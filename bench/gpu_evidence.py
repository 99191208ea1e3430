"""The GPU evidence of issue 14, all in one process so that ratios are fair.

Parts (``--parts``, default all):

- ``peaks``:   the two ceilings measured here: bf16 matmul (8192^3, random data) and a
  device-to-device copy (bytes read + written).
- ``block``:   the 8B PVM block (D 4096, P 512, H 4, Hkv 1, hd 128), bf16, forward and
  forward+backward at (B, T, Nv) in {(1, 2048, 1024), (1, 8192, 2048), (1, 16384, 4096),
  (8, 2048, 1024)}: triton, cuda, the reference module eager and under torch.compile;
  peak memory of each.
- ``attention``: the retrieval alone at the block shapes against
  F.scaled_dot_product_attention (flash, cuDNN; enable_gqa, no expanded K/V) and compiled
  FlexAttention (enable_gqa, kv_len block mask, lse returned), each checked against ours
  before it is timed, with its TFLOP/s against the matmul peak.
- ``decode``:  one PVM layer step (merge with the FFN output included) with a cached
  VisualMemory, B in {1, 16, 64}, Nv in {1024, 4096}: eager and CUDA-graph replayed,
  against the published behaviour (re-projecting the visual tokens each step) and against
  the bandwidth floor (bytes the step must read and write over the measured copy rate).
  The merge and the decode retrieval alone in GB/s.
- ``e2e``:     greedy generate of a Qwen3-VL-8B-shaped model with random bf16 weights, one
  image of 1024 visual tokens, 512 new tokens, batch 1 and 16: no PVM, PVM on the fused
  path (3 layers), PVM as published (reference math, visual tokens re-projected per step).

Every row is appended to ``--out`` (JSON) as soon as it is measured, so a run cut short
still leaves its numbers. Times are medians of ``triton.testing.do_bench`` (CUDA events,
L2 flushed between repeats) on a GPU and of ``torch.utils.benchmark`` on a CPU.
``--smoke`` runs every part at toy sizes on the CPU (the check that the script works
before it spends GPU time). ``bench/evidence_report.py`` turns the JSON into the README
table and the plots.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pvm_kernels import FusedPVM, PVMConfig, available_backends  # noqa: E402
from pvm_kernels.cli.common import device_description, versions  # noqa: E402
from pvm_kernels.ops import pvm_merge, pvm_retrieval, resolve_backend  # noqa: E402
from pvm_kernels.roofline import block_cost, measure_peaks  # noqa: E402
from pvm_kernels.testing import saved_tensor_bytes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_impls import (HD, HKV, AttentionCase, H, assert_lse_matches,  # noqa: E402
                             assert_matches, implementation_context, make_flex, make_ours,
                             make_sdpa, reference_lse, sdpa_refusal, unavailable_reason)

BLOCK_SHAPES = [(1, 2048, 1024), (1, 8192, 2048), (1, 16384, 4096), (8, 2048, 1024)]
DECODE_BATCH, DECODE_VISUAL = [1, 16, 64], [1024, 4096]
SMOKE_BLOCK_SHAPES = [(1, 64, 32), (2, 32, 16)]
ELEM = 2  # bf16 on the GPU; the CPU smoke run's fp32 counts are not reported as evidence


class Recorder:
    """Rows of measurements, rewritten to the JSON file after each one."""

    def __init__(self, path: str, meta: dict, deadline: float):
        self.path, self.deadline = path, deadline
        self.data = {"meta": meta, "rows": [], "errors": []}
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, **row) -> dict:
        self.data["rows"].append(row)
        self.flush()
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
        print("  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return row

    def error(self, where: str, exc: BaseException) -> None:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        self.data["errors"].append({"where": where, "error": text[-2000:]})
        self.flush()
        print(f"ERROR in {where}: {text[-600:]}", flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def guard(self, where: str):
        """Run one measurement; an exception is recorded and the run goes on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - every failure is evidence, recorded
            self.error(where, exc)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---- timing ------------------------------------------------------------------------------

def bench_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> float:
    """Median time of fn() in ms: triton.testing.do_bench on CUDA, torch.utils.benchmark on CPU."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    import torch.utils.benchmark as tub

    def run():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()
    fn()
    return tub.Timer(stmt="run()", globals={"run": run}).blocked_autorange(min_run_time=0.05).median * 1e3


def graph_ms(fn: Callable[[], object]) -> float:
    """Median time of one replay of fn captured in a CUDA graph (triton.testing)."""
    import triton.testing
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory allocated by one call of fn above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


# ---- peaks ---------------------------------------------------------------------------------

def record_peaks(rec: Recorder, device: torch.device, dtype: torch.dtype, smoke: bool) -> None:
    if smoke:  # the CPU check of the script: no GPU peaks to measure
        return
    tflops, gbs = measure_peaks(device, dtype)
    rec.data["meta"].update(matmul_tflops=tflops, copy_gbs=gbs)
    rec.add(part="peaks", case="mm 8192^3 / copy 1 GiB r+w", variant="measure_peaks",
            tflops=tflops, gbs=gbs)


# ---- block ---------------------------------------------------------------------------------

def make_block(device: torch.device, dtype: torch.dtype) -> FusedPVM:
    torch.manual_seed(0)
    block = FusedPVM(PVMConfig.qwen3_vl_8b())
    with torch.no_grad():
        block.gate_alpha.fill_(0.5)  # not 0: the whole update is live
    return block.to(device=device, dtype=dtype)


def compiled_reference(block: FusedPVM):
    """The reference module under torch.compile (default mode, dynamic shapes: one graph for
    the four shapes, since a static graph per shape costs 8 compiles of lease time)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(lambda h, v: block(h, v, backend="reference"), dynamic=True)


def measure_block(rec: Recorder, device: torch.device, dtype: torch.dtype, shapes,
                  backends: List[str], with_compile: bool) -> None:
    block = make_block(device, dtype)
    params = list(block.parameters())
    compiled = compiled_reference(block) if with_compile else None
    for B, T, Nv in shapes:
        fwd_flop = block_cost(block.dims, B, T, Nv, ELEM).flops
        train_flop = block_cost(block.dims, B, T, Nv, ELEM, backward=True).flops
        h = torch.randn(B, T, block.dims.hidden_size, device=device, dtype=dtype)
        v = torch.randn(B, Nv, block.dims.hidden_size, device=device, dtype=dtype)
        grad = torch.randn_like(h)
        variants = [(b, (lambda b=b: lambda x, y: block(x, y, backend=b))()) for b in backends]
        if compiled is not None:
            variants.append(("reference+compile", compiled))
        for name, fn in variants:
            if rec.time_left() < 30:
                rec.error(f"block {B}x{T}x{Nv} {name}", TimeoutError("deadline: skipped"))
                continue
            case = f"B{B} T{T} Nv{Nv}"
            with rec.guard(f"block fwd {case} {name}"):
                with torch.no_grad():
                    fwd = lambda: fn(h, v)  # noqa: E731
                    ms = bench_ms(fwd, device)
                    mem = peak_bytes(fwd, device)
                rec.add(part="block", pass_="fwd", case=case, B=B, T=T, Nv=Nv, variant=name,
                        ms=ms, peak_bytes=mem, gflop=fwd_flop / 1e9, tflops=fwd_flop / ms / 1e9)
            with rec.guard(f"block fwd+bwd {case} {name}"):
                hg = h.detach().requires_grad_()
                vg = v.detach().requires_grad_()
                step = lambda: fn(hg, vg).backward(grad)  # noqa: E731
                ms = bench_ms(step, device, grad_to_none=[hg, vg] + params)
                for t in [hg, vg] + params:
                    t.grad = None
                mem = peak_bytes(step, device)
                saved = saved_tensor_bytes(lambda: fn(hg, vg)) if name != "reference+compile" else None
                for t in [hg, vg] + params:
                    t.grad = None
                rec.add(part="block", pass_="fwd+bwd", case=case, B=B, T=T, Nv=Nv, variant=name,
                        ms=ms, peak_bytes=mem, saved_bytes=saved,
                        gflop=train_flop / 1e9, tflops=train_flop / ms / 1e9)
        del h, v, grad


def measure_attention(rec: Recorder, device: torch.device, dtype: torch.dtype, shapes,
                      backends: List[str]) -> None:
    """The retrieval alone, forward and backward alone: our kernels against SDPA's flash and
    cuDNN kernels and compiled FlexAttention on a GPU, all on the same q [B, T, H, hd] and
    k, v [B, Nv, Hkv, hd] tensors (SDPA and flex get transpose views with enable_gqa=True,
    no K/V expanded to H heads; flex has a kv_len block mask and returns the lse:
    bench/attention_impls.py, shared with bench/test_bench_attention.py). Each variant's
    output (and flex's lse) is checked against our first backend's before it is timed: a
    difference above 2% of the largest value, or an SDPA kernel refusing the inputs, is an
    error row and that variant is not timed. FLOPs: attention_impls.retrieval_kv_len_cost
    (forward 4 B T H Nv hd, backward 2.5x)."""
    peak = rec.data["meta"].get("matmul_tflops")
    for B, T, Nv in shapes:
        case = AttentionCase(B, T, Nv)
        label = f"B{B} T{T} Nv{Nv}"
        fwd_flop = case.cost(ELEM).flops
        bwd_flop = case.cost(ELEM, backward=True).flops - fwd_flop
        q = torch.randn(B, T, H, HD, device=device, dtype=dtype)
        k = torch.randn(B, Nv, HKV, HD, device=device, dtype=dtype)
        v = torch.randn(B, Nv, HKV, HD, device=device, dtype=dtype)
        go = torch.randn_like(q)
        variants = [(b, make_ours(b)) for b in backends]
        if "triton" in backends and unavailable_reason("pvm-triton-pointer", device,
                                                       case) is None:
            variants.append(("triton-pointer", make_ours("triton")))  # no TMA: its gain
        if device.type == "cuda":
            variants += [("sdpa-flash", make_sdpa("flash")), ("sdpa-cudnn", make_sdpa("cudnn")),
                         ("flex", make_flex(case.kv_len_tensor(device), T, Nv))]
        with torch.no_grad():
            want = variants[0][1](q, k, v)[0]
            want_lse = reference_lse(q, k)
        for name, fn in variants:
            with implementation_context(f"pvm-{name}"):
                _time_attention(rec, device, name, fn, q, k, v, go, want, want_lse, case,
                                label, fwd_flop, bwd_flop, peak)


def _time_attention(rec: Recorder, device: torch.device, name: str, fn, q, k, v, go, want,
                    want_lse, case, label: str, fwd_flop: float, bwd_flop: float,
                    peak: Optional[float]) -> None:
    """measure_attention's check, then forward and backward timing, of one variant."""
    B, T, Nv = case.B, case.T, case.Nv
    checked = {}
    with rec.guard(f"attention check {label} {name}"):
        with torch.no_grad():
            refused, result = sdpa_refusal(fn, q, k, v)
        if refused:
            raise RuntimeError(refused)
        out, lse = result
        checked["err_output"] = assert_matches(name, "output", out, want)
        if lse is not None:
            checked["err_lse"] = assert_lse_matches(name, lse, want_lse)
    if not checked:
        return  # the error row says why; nothing unchecked is timed
    with rec.guard(f"attention fwd {label} {name}"):
        with torch.no_grad():
            ms = bench_ms(lambda: fn(q, k, v), device)
        rec.add(part="attention", pass_="fwd", case=label, B=B, T=T, Nv=Nv, variant=name,
                ms=ms, tflops=fwd_flop / ms / 1e9,
                of_peak=(fwd_flop / ms / 1e9 / peak) if peak else None, **checked)
    with rec.guard(f"attention bwd {label} {name}"):
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qg, kg, vg)[0]
        # backward alone: the graph is kept and re-run
        ms = bench_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), go, retain_graph=True),
                      device)
        rec.add(part="attention", pass_="bwd", case=label, B=B, T=T, Nv=Nv, variant=name,
                ms=ms, tflops=bwd_flop / ms / 1e9,
                of_peak=(bwd_flop / ms / 1e9 / peak) if peak else None)


# ---- decode --------------------------------------------------------------------------------

def measure_decode(rec: Recorder, device: torch.device, dtype: torch.dtype, batches, visuals,
                   backends: List[str]) -> None:
    block = make_block(device, dtype)
    D = block.dims.hidden_size
    copy_gbs = rec.data["meta"].get("copy_gbs")
    d = block.dims
    for B in batches:
        for Nv in visuals:
            case = f"B{B} Nv{Nv}"
            h = torch.randn(B, 1, D, device=device, dtype=dtype)
            ffn = torch.randn_like(h)
            visual = torch.randn(B, Nv, D, device=device, dtype=dtype)
            with torch.no_grad():
                memory = block.encode_visual(visual)
            kv_bytes = 2 * B * Nv * d.num_kv_heads * d.head_dim * memory.key.element_size()
            # the query side's weights, K/V, h in and the row out; plus the FFN row in
            floor_bytes = block_cost(d, B, 1, Nv, ELEM, cached=True).bytes + B * D * ELEM
            floor_ms = floor_bytes / copy_gbs / 1e6 if copy_gbs else None
            steps = [(f"{b} cached", (lambda b=b: lambda: block(h, memory, ffn_output=ffn, backend=b))())
                     for b in backends]
            # Re-projecting: the published behaviour (reference), and our default backend.
            steps += [(f"{b} reprojecting", (lambda b=b: lambda: block(h, visual, ffn_output=ffn,
                                                                       backend=b))())
                      for b in (backends[0], "reference")]
            for name, step in steps:
                modes = [("eager", lambda s=step: bench_ms(s, device))]
                if device.type == "cuda":
                    modes.append(("cuda-graph", lambda s=step: graph_ms(s)))
                for mode, measure in modes:
                    with rec.guard(f"decode {case} {name} {mode}"):
                        with torch.no_grad():
                            ms = measure()
                        rec.add(part="decode", case=case, B=B, Nv=Nv, variant=name, mode=mode, ms=ms,
                                floor_ms=floor_ms, floor_bytes=floor_bytes,
                                over_floor=(ms / floor_ms) if floor_ms else None)
            # the decode ops alone, in GB/s against the copy rate
            q = torch.randn(B, 1, d.num_heads, d.head_dim, device=device, dtype=dtype)
            for b in backends:
                with rec.guard(f"decode retrieval {case} {b}"):
                    with torch.no_grad():
                        ms = bench_ms(lambda: pvm_retrieval(q, memory.key, memory.value, None,
                                                            memory.kv_len, backend=b), device)
                    nbytes = kv_bytes + 2 * q.numel() * q.element_size()
                    rec.add(part="decode-op", op="retrieval", case=case, B=B, Nv=Nv, variant=b, ms=ms,
                            bytes=nbytes, gbs=nbytes / ms / 1e6,
                            of_copy=(nbytes / ms / 1e6 / copy_gbs) if copy_gbs else None)
        for T in (1, 2048):
            e = torch.randn(B, T, D, device=device, dtype=dtype)
            f = torch.randn_like(e)
            keep = torch.ones(B, T, dtype=torch.bool, device=device)
            for b in backends:
                with rec.guard(f"merge B{B} T{T} {b}"):
                    with torch.no_grad():
                        ms = bench_ms(lambda: pvm_merge(e, block.gate_alpha, keep, f, backend=b), device)
                    nbytes = 3 * e.numel() * e.element_size() + keep.numel()
                    rec.add(part="decode-op", op="merge", case=f"B{B} T{T}", B=B, T=T, variant=b,
                            ms=ms, bytes=nbytes, gbs=nbytes / ms / 1e6,
                            of_copy=(nbytes / ms / 1e6 / copy_gbs) if copy_gbs else None)


# ---- end to end ----------------------------------------------------------------------------

def qwen3_vl_8b_config():
    """Qwen3-VL-8B-Instruct's published shapes (text and vision), as a transformers config."""
    from transformers import Qwen3VLConfig
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20],
                              "mrope_interleaved": True},
                rope_theta=5000000.0)
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                         video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653, tie_word_embeddings=False)


def random_model(config, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def image_inputs(config, batch: int, grid_hw, device: torch.device, dtype: torch.dtype) -> dict:
    """One prompt per row, each with one image of grid (1, h, w) patches: h*w/merge^2 tokens."""
    from pvm_kernels.integrations.tiny_qwen3_vl import pad_prompts
    vision = config.vision_config
    h, w = grid_hw
    n_tokens = h * w // (vision.spatial_merge_size ** 2)
    row = [11, 12, config.vision_start_token_id] + [config.image_token_id] * n_tokens + \
          [config.vision_end_token_id, 13, 14, 15]
    inputs = pad_prompts([row] * batch, config.image_token_id)
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    g = torch.Generator().manual_seed(0)
    inputs["pixel_values"] = torch.randn(batch * h * w, patch, generator=g).to(dtype)
    inputs["image_grid_thw"] = torch.tensor([[1, h, w]] * batch)
    return {k: v.to(device) for k, v in inputs.items()}


@contextlib.contextmanager
def published_behaviour():
    """PVM as the published code computes it: the visual tokens are projected again by every
    PVM layer at every step (no VisualMemory is kept). Restored on exit."""
    from pvm_kernels.integrations import qwen3_vl as integ

    original = integ.PVMState.memory_for

    def reproject(self, index, block, backend=None):
        return block.encode_visual(self.visual, self.visual_mask)
    integ.PVMState.memory_for = reproject
    try:
        yield
    finally:
        integ.PVMState.memory_for = original


def measure_e2e(rec: Recorder, device: torch.device, dtype: torch.dtype, smoke: bool,
                batches, new_tokens: int, repeats: int = 2) -> None:
    from pvm_kernels import apply_pvm_to_qwen3_vl
    from pvm_kernels.integrations.qwen3_vl import set_pvm_backend, set_pvm_gate
    from pvm_kernels.integrations.qwen3_vl_inputs import special_token_ids
    from pvm_kernels.integrations.tiny_qwen3_vl import small_qwen3_vl_config

    config = small_qwen3_vl_config() if smoke else qwen3_vl_8b_config()
    grid = (8, 8) if smoke else (64, 64)  # 64 x 64 patches of 16 px -> 1024 visual tokens
    model = random_model(config, device, dtype)
    suppress = special_token_ids(config)

    def generate(inputs, n):
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             suppress_tokens=suppress, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def timed(inputs, n):
        start = time.perf_counter()
        out = generate(inputs, n)
        return time.perf_counter() - start, out

    from pvm_kernels.integrations.qwen3_vl import language_model_of

    apply_pvm_to_qwen3_vl(model)
    set_pvm_gate(model, 0.5)
    text_model = language_model_of(model)
    wrapped = text_model.forward

    @contextlib.contextmanager
    def variant(kind):
        """no PVM: the text model's own forward (its layers get no pvm_state and compute
        exactly the stock layer); fused: our default backend with cached memories;
        published: reference math, re-projecting the visual tokens at every step."""
        if kind is None:
            text_model.forward = text_model._pvm_original_forward
        else:
            set_pvm_backend(model, "reference" if kind == "published" else None)
        ctx = published_behaviour() if kind == "published" else contextlib.nullcontext()
        try:
            with ctx, torch.no_grad():
                yield
        finally:
            text_model.forward = wrapped
            set_pvm_backend(model, None)

    variants = [("no PVM", None), ("PVM fused", "fused"), ("PVM published", "published")]
    for B in batches:
        inputs = image_inputs(config, B, grid, device, dtype)
        for name, kind in variants:  # warm-up of every variant before any timing
            with rec.guard(f"e2e warm-up B{B} {name}"), variant(kind):
                generate(inputs, 4)
        # Interleaved rounds, so a drift of the machine (clocks, host load) hits every
        # variant alike; the first run's 1.6x inversion (bench/NOTES.md) is why.
        for rnd in range(repeats):
            for name, kind in variants:
                if rec.time_left() < 60:
                    rec.error(f"e2e B{B} {name} round {rnd}", TimeoutError("deadline: skipped"))
                    continue
                with rec.guard(f"e2e B{B} {name} round {rnd}"), variant(kind):
                    t_prefill, _ = timed(inputs, 1)
                    t_total, out = timed(inputs, new_tokens)
                    n_new = out.shape[1] - inputs["input_ids"].shape[1]
                    decode_s = t_total - t_prefill
                    rec.add(part="e2e", case=f"B{B}", B=B, variant=name, round=rnd,
                            new_tokens=n_new, prompt_tokens=int(inputs["input_ids"].shape[1]),
                            total_s=t_total, prefill_s=t_prefill,
                            tokens_per_s=B * n_new / t_total,
                            decode_tokens_per_s=B * (n_new - 1) / decode_s if decode_s > 0 else None,
                            mode="eager, DynamicCache")


# ---- main ----------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file the rows are written to")
    parser.add_argument("--parts", default="peaks,block,attention,decode,e2e")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop starting new measurements after this many seconds")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the reference under torch.compile")
    parser.add_argument("--e2e-batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--e2e-repeats", type=int, default=2,
                        help="interleaved rounds of the three e2e variants")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("gpu_evidence: no CUDA GPU; use --smoke for the CPU check of the script",
              file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    kernel_backends = [b for b in available_backends(device) if b in ("triton", "cuda", "cpu")]
    backends = kernel_backends + ["reference"]
    meta = dict(device=device_description(device), versions=versions(), dtype=str(dtype),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                default_backend=resolve_backend(None, device).name, backends=backends,
                argv=sys.argv[1:])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1))
    rec = Recorder(args.out, meta, time.monotonic() + args.budget_s)
    parts = args.parts.split(",")
    smoke = args.smoke
    shapes = SMOKE_BLOCK_SHAPES if smoke else BLOCK_SHAPES
    if "peaks" in parts:
        with rec.guard("peaks"):
            record_peaks(rec, device, dtype, smoke)
    if "block" in parts:
        with rec.guard("block"):
            measure_block(rec, device, dtype, shapes, backends, with_compile=not args.no_compile)
    if "attention" in parts:
        with rec.guard("attention"):
            measure_attention(rec, device, dtype, shapes, kernel_backends + ["reference"])
    if "decode" in parts:
        with rec.guard("decode"):
            measure_decode(rec, device, dtype, [1, 2] if smoke else DECODE_BATCH,
                           [32] if smoke else DECODE_VISUAL, kernel_backends + ["reference"])
    if "e2e" in parts:
        with rec.guard("e2e"):
            measure_e2e(rec, device, dtype, smoke, [int(b) for b in args.e2e_batches.split(",")],
                        4 if smoke else args.new_tokens, args.e2e_repeats)
    print(f"\n{len(rec.data['rows'])} rows, {len(rec.data['errors'])} errors -> {args.out}")
    for err in rec.data["errors"]:
        print(f"  error: {err['where']}: {err['error'][-300:]}")
    return 0 if not rec.data["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
