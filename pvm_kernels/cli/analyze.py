"""``pvm-kernels analyze``: visual signal dilution, the paper's central measurement.

While the model generates, record per decoder layer and per step the share of the newest
text query's self-attention mass that lands on the prompt's visual tokens, and, for the PVM
layers, the visual mass of the PVM retrieval itself (1 by construction: its softmax runs
over the image alone). Writes analyze.json and analyze.png (share vs generated length with
a least-squares a/L fit, L = context length) to --out-dir. Self-attention weights need
eager attention, so this runs slower than plain generation.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, List

import torch

from .common import (help_text, CLIError, add_device_options, output_dir, resolve_device, resolve_dtype,
                     write_json)


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("analyze", parents=parents, help="self-attention visual share "
                              "vs generated length, next to PVM's (JSON + PNG)",
                              description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="PATH", help="local Qwen3-VL checkpoint directory (PVM or "
                   "plain); default: the embedded small model with random weights")
    add_device_options(p)
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="tokens to generate (default 256)")
    p.add_argument("--gate", type=float, default=None, help="gate_alpha for every PVM block "
                   "(default: 1.0 for new blocks, the trained value for a PVM checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    p.add_argument("--out-dir", default="pvm-results", metavar="DIR",
                   help="where analyze.json and analyze.png go (default pvm-results)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.set_defaults(run=run)


def fit_inverse_length(lengths: List[int], share: List[float]):
    """Least-squares a in share ~ a / L; returns (a, R^2)."""
    x = torch.tensor([1.0 / n for n in lengths], dtype=torch.float64)
    y = torch.tensor(share, dtype=torch.float64)
    a = float((x * y).sum() / (x * x).sum())
    residual = float(((y - a * x) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return a, (1.0 - residual / total) if total > 0 else 1.0


class PVMMassRecorder:
    """Forward hooks on the PVM blocks: for every call, the retrieval's attention mass on
    visual tokens for the newest query (mean over heads, sample 0)."""

    def __init__(self, blocks: Dict[int, torch.nn.Module]):
        self.mass: Dict[int, List[float]] = {i: [] for i in blocks}
        self.handles = [b.register_forward_hook(self._hook(i), with_kwargs=True)
                        for i, b in blocks.items()]

    def _hook(self, index):
        def hook(block, args, kwargs, output):
            hidden, memory = args[0], args[1]
            probs = block.visual_attention(hidden[:, -1:], memory)  # [B, H, 1, Nv]
            self.mass[index].append(float(probs[0].sum(-1).mean()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run(args) -> int:
    from ..integrations import pvm_blocks
    from .models import load_prompted_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.max_new_tokens < 2:
        raise CLIError(f"--max-new-tokens must be at least 2, got {args.max_new_tokens}")
    out_dir = output_dir(args.out_dir)
    pm = load_prompted_model(args.model, device, dtype, args.gate, eager_attention=True,
                             seed=args.seed)
    model, batch = pm.model, pm.batch
    visual = (batch["input_ids"][0] == model.config.image_token_id).to(device)
    prompt_len = batch["input_ids"].shape[1]
    blocks = pvm_blocks(model)
    print(f"model: {pm.description}\nprompt {prompt_len} tokens ({pm.visual_tokens} visual); "
          f"generating {args.max_new_tokens} tokens with attention weights, {dtype} on {device}")

    recorder = PVMMassRecorder(blocks)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens, do_sample=False,
                                 suppress_tokens=pm.suppress, output_attentions=True,
                                 return_dict_in_generate=True)
    finally:
        recorder.close()
    steps = out.attentions
    if not steps or steps[0] is None or steps[0][0] is None:
        raise CLIError("the model returned no attention weights (eager attention required)")

    n_layers = len(steps[0])
    share: Dict[int, List[float]] = {i: [] for i in range(n_layers)}
    for step in steps:
        for i, attn in enumerate(step):
            # The newest query row of sample 0; keys past the prompt are generated text.
            row = attn[0, :, -1, :].float()
            share[i].append(float(row[:, :prompt_len][:, visual].sum(-1).mean()))
    generated = list(range(len(steps)))
    lengths = [prompt_len + g for g in generated]  # keys the newest query attends to
    mean = [sum(share[i][s] for i in share) / n_layers for s in generated]
    a, r2 = fit_inverse_length(lengths, mean)
    fit = [a / n for n in lengths]
    pvm_mass = {i: recorder.mass[i][:len(steps)] for i in blocks}

    result = dict(model=pm.description, device=str(device), dtype=str(dtype),
                  prompt_tokens=prompt_len, visual_tokens=pm.visual_tokens,
                  generated=generated, context_length=lengths,
                  self_attention_visual_share={str(i): v for i, v in share.items()},
                  self_attention_visual_share_mean=mean,
                  pvm_layers=sorted(blocks),
                  pvm_visual_mass={str(i): v for i, v in pvm_mass.items()},
                  fit=dict(formula="share = a / context_length", a=a, r2=r2))
    json_path = os.path.join(out_dir, "analyze.json")
    write_json(json_path, result)
    print(f"\nself-attention visual share (mean of {n_layers} layers): {mean[0]:.3f} at the first "
          f"generated token -> {mean[-1]:.3f} after {generated[-1]} more "
          f"({mean[0] / max(mean[-1], 1e-12):.1f}x lower)")
    print(f"fit share = a / L: a = {a:.2f} (visual tokens: {pm.visual_tokens}), R^2 = {r2:.3f}")
    masses = [m for v in pvm_mass.values() for m in v]
    print(f"PVM retrieval visual mass (layers {sorted(blocks)}): min {min(masses):.6f}, "
          f"max {max(masses):.6f}")
    print(f"wrote {json_path}")
    if not args.no_plot:
        from .plots import plot_visual_share
        png = os.path.join(out_dir, "analyze.png")
        plot_visual_share(png, generated, {f"layer {i}": v for i, v in share.items()}, mean, fit,
                          f"fit a/L, a = {a:.1f}, R² = {r2:.3f}",
                          {f"layer {i}": v for i, v in pvm_mass.items()},
                          f"Visual signal dilution: {pm.description.split(',')[0]}, "
                          f"{pm.visual_tokens} visual tokens")
        print(f"wrote {png}")
    return 0
