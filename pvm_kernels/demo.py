"""``python -m pvm_kernels.demo``: FusedPVM at Qwen3-VL-8B shapes, every backend vs float64.

Random weights with the paper's dimensions (D 4096, P 512, H 4, Hkv 1, hd 128), a mixed
batch (one sample padded, one without any visual token, silenced visual query positions),
run on the best device here. Prints per backend the max relative error of the update and
of the gradients against the float64 reference, and forward / forward+backward / decode
times. Without a GPU the Triton kernels run in Triton's interpreter: correct, not fast.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from . import FusedPVM, PVMConfig, available_backends  # noqa: E402
from .ops import backends as _backends  # noqa: E402
from .reference import pvm_block_reference  # noqa: E402
from .testing import double_params, max_rel_err, random_mask  # noqa: E402
from .timing import median_ms  # noqa: E402


def build_inputs(B: int, T: int, Nv: int, D: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    visual = torch.randn(B, Nv, D, generator=g, dtype=torch.float64)
    mask = random_mask(B, Nv, empty_rows=[B - 1] if B > 1 else [], pad_from={0: Nv * 3 // 4})
    qiv = torch.zeros(B, T, dtype=torch.bool)
    qiv[:, : min(4, T)] = True
    return (h.to(dtype).to(device), visual.to(dtype).to(device), mask.to(device),
            qiv.to(device))


def run(B: int, T: int, Nv: int, repeats: int) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = PVMConfig.qwen3_vl_8b()
    torch.manual_seed(0)
    block = FusedPVM(cfg)
    with torch.no_grad():
        block.gate_alpha.fill_(1.0)  # a trained-looking gate, so the update matters
    block = block.to(device=device, dtype=dtype)
    h, visual, mask, qiv = build_inputs(B, T, Nv, cfg.hidden_size, dtype, device)

    params = double_params(block)
    h64 = h.detach().double().cpu().requires_grad_()
    v64 = visual.detach().double().cpu().requires_grad_()
    ref = pvm_block_reference(params, block.dims, h64, v64, mask.cpu(), qiv.cpu())
    grad = torch.randn_like(ref)
    ref.backward(grad)
    grad_dev = grad.to(dtype).to(device)

    interp = device.type == "cpu" and _backends.triton_interpret_requested()
    print(f"FusedPVM at Qwen3-VL-8B shapes ({block.extra_repr()}), {dtype}, device {device}; "
          f"B={B} T={T} Nv={Nv} (sample 0 padded to {Nv * 3 // 4}, sample {B - 1} without "
          f"visual tokens)\n")
    head = (f"{'backend':<22}{'err u':>10}{'err dh':>10}{'err dV':>10}{'err dW':>10}"
            f"{'fwd ms':>10}{'fwd+bwd ms':>12}{'decode ms':>11}")
    print(head)
    print("-" * len(head))
    ok = True
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name in available_backends(device):
        hh = h.detach().clone().requires_grad_()
        vv = visual.detach().clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        out = block(hh, vv, mask, qiv, backend=name)
        out.backward(grad_dev)
        errs = [max_rel_err(out, ref), max_rel_err(hh.grad, h64.grad),
                max_rel_err(vv.grad, v64.grad),
                max(max_rel_err(p.grad, params[n].grad) for n, p in block.named_parameters()
                    if n != "gate_alpha")]
        ok &= all(e < 2 * tol for e in errs)

        def fwd():
            with torch.no_grad():
                block(h, visual, mask, qiv, backend=name)

        def fwd_bwd():
            block(hh, vv, mask, qiv, backend=name).backward(grad_dev)

        with torch.no_grad():
            memory = block.encode_visual(visual, mask)
        step = h[:, -1:].contiguous()

        def decode():
            with torch.no_grad():
                block(step, memory, backend=name)

        times = [median_ms(f, device, repeats) for f in (fwd, fwd_bwd, decode)]
        label = name + (" (interpreter)" if interp and name == "triton" else "")
        print(f"{label:<22}" + "".join(f"{e:>10.2e}" for e in errs)
              + f"{times[0]:>10.2f}{times[1]:>12.2f}{times[2]:>11.3f}")
    print(f"\nerrors: max |x - ref| / max |ref| against float64, tolerance {tol:g}; "
          f"err dW = worst parameter gradient.")
    if interp:
        print("Triton runs in its CPU interpreter here: its times measure numpy, not a GPU.")
    print("PASS" if ok else "FAIL: an error is over tolerance")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="query tokens T")
    parser.add_argument("--visual", type=int, default=256, help="visual tokens Nv")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    return run(args.batch, args.tokens, args.visual, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
