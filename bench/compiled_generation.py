"""Compiled generation with and without PVM: tokens/s of generate() with a static cache and
the decode step compiled whole (issue 15). ``make gpu-check`` runs it on the GPU with
``mode="reduce-overhead"`` (CUDA graphs); on CPU it runs with the mode and dynamo backend
given (the test suite uses it as a smoke test).

For each variant (no PVM: the text model's own forward; PVM: the patched model, default
backend) it runs one warm-up generate (compiles), then ``--repeats`` timed generates of
``--new-tokens`` tokens, and records tokens/s, the dynamo graph breaks of the compiled
run and whether the tokens equal an eager (uncompiled) generate of the same variant.
Writes one JSON object to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _model(device, dtype, small: bool):
    import torch
    from pvm_kernels.integrations import apply_pvm_to_qwen3_vl, set_pvm_gate
    from pvm_kernels.integrations.tiny_qwen3_vl import small_qwen3_vl, tiny_qwen3_vl

    torch.manual_seed(0)
    base = (small_qwen3_vl if small else tiny_qwen3_vl)(seed=0, dtype=dtype)
    model = apply_pvm_to_qwen3_vl(base, pvm_hidden_size=None if small else 32)
    set_pvm_gate(model, 0.5)
    return model.to(device)


def main(argv=None) -> int:
    import torch
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from pvm_kernels.integrations.qwen3_vl import language_model_of
    from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", default=None,
                        help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    parser.add_argument("--dynamo-backend", default="inductor")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    mode = args.mode or ("reduce-overhead" if device.type == "cuda" else "default")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    model = _model(device, dtype, small=device.type == "cuda")
    batch = {k: v.to(device) for k, v in tiny_batch([[(4, 4), (4, 4)], (8, 4), None]).items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    text_model = language_model_of(model)
    patched = text_model.forward
    config = CompileConfig(fullgraph=True, backend=args.dynamo_backend, mode=mode)
    config._compile_all_devices = True

    def generate(**kwargs):
        out = model.generate(**batch, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False,
                             cache_implementation="static", **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    rows = []
    for name, forward in (("no PVM", text_model._pvm_original_forward), ("PVM", patched)):
        text_model.forward = forward
        try:
            eager = generate(disable_compile=True)
            torch._dynamo.reset()
            counters.clear()
            compiled = generate(compile_config=config)  # warm-up: compiles (and captures)
            breaks = sum(counters["graph_break"].values())
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                generate(compile_config=config)
                times.append(time.perf_counter() - start)
        finally:
            text_model.forward = patched
        n_tokens = batch["input_ids"].shape[0] * args.new_tokens
        best = min(times)
        rows.append(dict(variant=name, tokens_per_s=n_tokens / best, seconds=times,
                         graph_breaks=breaks, tokens_match_eager=bool(torch.equal(compiled, eager))))
        print(f"{name:7s} {n_tokens / best:10.1f} tokens/s  graph breaks {breaks}  "
              f"tokens = eager: {rows[-1]['tokens_match_eager']}")
    pvm_cost = 1.0 - rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"PVM costs {100 * pvm_cost:.1f}% of tokens/s")
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, mode=mode, dynamo_backend=args.dynamo_backend,
                  new_tokens=args.new_tokens, batch=int(batch["input_ids"].shape[0]),
                  rows=rows, pvm_cost_fraction=pvm_cost)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    ok = all(r["graph_breaks"] == 0 and r["tokens_match_eager"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
