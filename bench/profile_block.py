"""Where the time goes: torch.profiler over the 8B PVM block on a GPU.

    python bench/profile_block.py --shape 1,8192,2048 --backends triton,reference

For each backend: forward+backward at (B, T, Nv) and one cached decode step (B 1, the
shape's Nv), three profiled iterations after warm-up. Prints the top kernels by GPU time
and the wall time of an iteration against the sum of its GPU kernels (a gap means the
host, not the GPU, sets the pace), and the top Python-side (CPU) costs of a decode step.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from gpu_evidence import make_block  # noqa: E402


def profile(fn, label: str, iters: int = 3, rows: int = 18) -> None:
    from torch.profiler import ProfilerActivity, profile as prof
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = p.key_averages()
    # Kernels only: an op's own row (a custom op, say) also carries its kernels' device time,
    # so summing every row counts them twice (seen: 5.8 ms "GPU" for 2.9 ms of kernels).
    gpu_us = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA) / iters
    print(f"\n=== {label}: wall {wall_ms:.3f} ms per iteration, GPU kernels {gpu_us / 1e3:.3f} ms "
          f"({'host-bound' if wall_ms > 1.5 * gpu_us / 1e3 else 'GPU-bound'})")
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


def python_costs(fn, label: str, iters: int = 200, rows: int = 22) -> None:
    """cProfile of the host side: which Python functions a call spends its time in."""
    import cProfile
    import pstats
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    start = time.perf_counter()
    pr.enable()
    for _ in range(iters):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    print(f"\n=== {label}: host {(time.perf_counter() - start) * 1e6 / iters:.0f} us per call "
          f"(under cProfile), top by own time")
    pstats.Stats(pr).sort_stats("tottime").print_stats(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1,8192,2048")
    parser.add_argument("--backends", default="triton,reference")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_block: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dtype = torch.device("cuda"), torch.bfloat16
    B, T, Nv = (int(x) for x in args.shape.split(","))
    block = make_block(dev, dtype)
    D = block.dims.hidden_size
    h = torch.randn(B, T, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Nv, D, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T, D, device=dev, dtype=dtype)
    h1 = torch.randn(1, 1, D, device=dev, dtype=dtype)
    f1 = torch.randn_like(h1)
    with torch.no_grad():
        memory = block.encode_visual(v[:1].detach())
    for backend in args.backends.split(","):
        profile(lambda: block(h, v, backend=backend).backward(grad),
                f"{backend} fwd+bwd B{B} T{T} Nv{Nv}")
        with torch.no_grad():
            profile(lambda: block(h1, memory, ffn_output=f1, backend=backend),
                    f"{backend} cached decode step B1 Nv{Nv}", iters=20, rows=12)
            python_costs(lambda: block(h1, memory, ffn_output=f1, backend=backend),
                         f"{backend} cached decode step B1 Nv{Nv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
