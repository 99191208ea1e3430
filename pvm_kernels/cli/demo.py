"""``pvm-kernels demo``: a Qwen3-VL with PVM generates from an image on every backend.

An image drawn in code goes through the real Qwen3-VL image processor; the model (the
embedded small one with random weights, or ``--model PATH``) generates greedily with every
backend usable here; each backend's tokens and logits are checked against the reference
backend. Prints backend, prefill ms, decode ms/token and the max error.
"""
from __future__ import annotations

import argparse
import time
from typing import List

import torch

from .common import (help_text, CLIError, add_device_options, enable_triton_interpreter_without_gpu, format_table,
                     parse_backends, resolve_device, resolve_dtype, write_json)


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("demo", parents=parents, help="generate with every backend and "
                              "compare them (what `make demo` runs)", description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH", help="local Qwen3-VL checkpoint directory (PVM or "
                   "plain); default: the embedded small model with random weights")
    add_device_options(p)
    p.add_argument("--backends", metavar="A,B", help="comma-separated backends (default: every "
                   "backend usable on the device; triton runs in its interpreter without a GPU)")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                   help="tokens to generate per backend (default 16)")
    p.add_argument("--gate", type=float, default=None, help="gate_alpha for every PVM block "
                   "(default: 1.0 for new blocks, the trained value for a PVM checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.set_defaults(run=run)


class StepClock:
    """A generate() streamer that timestamps each emitted token: the first emission after
    the prompt ends the prefill, the rest are decode steps. Token tensors arrive on the
    CPU (generate copies them), so the GPU is synchronised at each stamp."""

    def __init__(self):
        self.stamps: List[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(model, batch, new_tokens: int, suppress, clock=None):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, suppress_tokens=suppress, streamer=clock,
                              return_dict_in_generate=True, output_logits=True)


def _time_generation(model, batch, new_tokens, suppress):
    _generate(model, batch, 2, suppress)  # warm-up: Triton JIT, allocator, caches
    clock = StepClock()
    start = time.perf_counter()
    out = _generate(model, batch, new_tokens, suppress, clock)
    prefill = (clock.stamps[0] - start) * 1e3
    decode = (clock.stamps[-1] - clock.stamps[0]) * 1e3 / max(len(clock.stamps) - 1, 1)
    return out, prefill, decode


def _compare(out, ref, prompt_len: int):
    """(tokens equal / total, max relative logit error up to and including the first step
    whose token differs: after it the two runs see different contexts)."""
    from ..testing import max_rel_err
    got, want = out.sequences[0, prompt_len:], ref.sequences[0, prompt_len:]
    same = int((got == want).cumprod(0).sum())
    steps = min(same + 1, len(ref.logits))
    err = max(max_rel_err(out.logits[s].float(), ref.logits[s].float()) for s in range(steps))
    return same, len(want), err


def run(args) -> int:
    from ..integrations import pvm_blocks, set_pvm_backend, set_pvm_gate
    from ..ops import available_backends
    from ..testing import TOLERANCE
    from .models import load_prompted_model

    enable_triton_interpreter_without_gpu()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.max_new_tokens < 2:
        raise CLIError(f"--max-new-tokens must be at least 2, got {args.max_new_tokens}")
    backends = parse_backends(args.backends, device, available_backends(device))
    if "reference" not in backends:
        backends = ["reference", *backends]  # the yardstick always runs

    pm = load_prompted_model(args.model, device, dtype, args.gate, seed=args.seed)
    model, batch = pm.model, pm.batch
    prompt_len = batch["input_ids"].shape[1]
    blocks = pvm_blocks(model)
    gate = float(next(iter(blocks.values())).gate_alpha.detach())
    print(f"model: {pm.description}")
    print(f"PVM layers {sorted(blocks)}, {next(iter(blocks.values())).extra_repr()}, gate {gate:g}; "
          f"prompt {prompt_len} tokens ({pm.visual_tokens} visual, image "
          f"{tuple(batch['image_grid_thw'][0].tolist())} patches t,h,w); {dtype} on {device}")

    # How much PVM moves the logits: the scale the backends' error is to be read against.
    set_pvm_backend(model, "reference")
    with torch.no_grad():
        with_pvm = model(**batch).logits[:, -1].float()
        set_pvm_gate(model, 0.0)
        without = model(**batch).logits[:, -1].float()
        set_pvm_gate(model, gate)
    effect = float((with_pvm - without).abs().max() / without.abs().max())
    print(f"PVM effect on the last prompt token's logits: max |with - without| / max |without| "
          f"= {effect:.3g}\n")

    tol = TOLERANCE[dtype]
    rows, results, ok = [], [], True
    ref = None
    for name in backends:
        set_pvm_backend(model, name)
        out, prefill, decode = _time_generation(model, batch, args.max_new_tokens, pm.suppress)
        if name == "reference":
            ref = out
            same, total, err = args.max_new_tokens, args.max_new_tokens, 0.0
        else:
            same, total, err = _compare(out, ref, prompt_len)
        passed = err <= tol and (same == total or dtype != torch.float32)
        ok &= passed
        interp = name == "triton" and device.type == "cpu"
        label = name + (" (interpreter)" if interp else "")
        rows.append([label, f"{prefill:.1f}", f"{decode:.2f}", f"{err:.2e}", f"{same}/{total}",
                     "ok" if passed else "FAIL"])
        results.append(dict(backend=name, prefill_ms=prefill, decode_ms_per_token=decode,
                            max_rel_err_logits=err, tokens_equal=same, tokens=total, passed=passed))
    print(format_table(["backend", "prefill ms", "decode ms/token", "max err", "tokens = ref",
                        "check"], rows))
    print(f"\nmax err: max |logits - reference logits| / max |reference logits| over the generated "
          f"steps (tolerance {tol:g} for {str(dtype).replace('torch.', '')}).")
    if device.type == "cpu" and "triton" in backends:
        print("triton runs in Triton's CPU interpreter here: correct, but its times measure numpy.")
    tokens = ref.sequences[0, prompt_len:].tolist()
    print(f"generated ids (reference): {tokens}")
    if pm.tokenizer is not None:
        print(f"generated text (reference): {pm.tokenizer.decode(tokens, skip_special_tokens=True)!r}")
    if args.json:
        write_json(args.json, dict(model=pm.description, device=str(device), dtype=str(dtype), gate=gate,
                                   pvm_layers=sorted(blocks),
                                   prompt_tokens=prompt_len, visual_tokens=pm.visual_tokens,
                                   pvm_effect=effect, tolerance=tol, results=results,
                                   reference_tokens=tokens))
    print("PASS: every backend agrees with the reference" if ok else
          "FAIL: a backend disagrees with the reference")
    return 0 if ok else 1
