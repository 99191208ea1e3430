"""On a GPU: check (and time) candidate tiles of the Triton retrieval's launch table.

For each chosen ``CONFIGS`` entry and each candidate TileConfig, the entry is replaced,
the retrieval runs forward and backward on fresh random inputs of a shape that selects
that entry, and out / dq / dk / dv are compared with the float64 reference (relative to
the largest reference element, as the tests do); the kernel's time comes from
``triton.testing.do_bench``. Used to find tiles that are right on the GPU, not only in the
interpreter and the ahead-of-time compile gate:

    python tools/tile_probe.py --kernel dkdv --block-d 128 --rows decode \\
        --candidates 16x64x4x2,16x64x4x1,16x32x4x2 --dtypes bf16,fp16

    python tools/tile_probe.py --arch-changes     # every sm90 entry that differs from sm80

Prints one line per (entry, candidate, dtype, shape); exit 1 if a current entry is wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def shapes_for(rows: str, hd: int):
    """(B, T, H, Hkv, Nv) problems whose T * G lands in the row class, checked against the
    float64 reference; the last one is only timed (too big for a CPU reference per tile)."""
    if rows == "decode":
        return [(1, 1, 4, 1, 300), (2, 3, 4, 2, 37), (4, 4, 4, 1, 1024), (16, 1, 4, 1, 4096)]
    return [(1, 200, 4, 1, 300), (2, 67, 4, 2, 130), (1, 2048, 4, 1, 1024), (1, 8192, 4, 1, 4096)]


def problem(shape, hd, dtype, dev, masked=True, kv_len=None, seed=0):
    """Random inputs of the (B, T, H, Hkv, Nv) problem ``shape`` at head dim ``hd``: q, k,
    v, key_mask (90% valid; None unless ``masked``), kv_len (int32 [B] from the sequence
    ``kv_len``, or None) and grad_out, drawn from ``seed``."""
    B, T, H, Hkv, Nv = shape
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, hd, device=dev, dtype=dtype)
    k = torch.randn(B, Nv, Hkv, hd, device=dev, dtype=dtype)
    v = torch.randn(B, Nv, Hkv, hd, device=dev, dtype=dtype)
    mask = torch.rand(B, Nv, device=dev) > 0.1
    go = torch.randn_like(q)
    lens = None if kv_len is None else torch.tensor(list(kv_len), dtype=torch.int32, device=dev)
    return q, k, v, mask if masked else None, lens, go


def reference_mask(mask, kv_len, B, Nv):
    """The key_mask the float64 reference takes for ``mask`` and ``kv_len`` together (keys
    at or past a sample's kv_len, clamped to [0, Nv], are invalid); None if both are."""
    if kv_len is None:
        return None if mask is None else mask.cpu()
    lens = kv_len.cpu().long().clamp(0, Nv)
    valid = torch.arange(Nv)[None, :] < lens.expand(B)[:, None]
    return valid if mask is None else valid & mask.cpu()


def check(q, k, v, mask, go, backend="triton", kv_len=None):
    """Max relative errors {out, dq, dk, dv} of the retrieval (forward, then backward of
    ``go``) on ``backend`` against the float64 reference on the CPU."""
    from pvm_kernels import pvm_retrieval
    from pvm_kernels.reference import retrieval_reference
    from pvm_kernels.testing import max_rel_err
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = pvm_retrieval(qs, ks, vs, mask, kv_len, backend=backend)
    out.backward(go)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = retrieval_reference(q64, k64, v64, reference_mask(mask, kv_len, k.shape[0], k.shape[1]))
    ref.backward(go.double().cpu())
    return {"out": max_rel_err(out, ref), "dq": max_rel_err(qs.grad, q64.grad),
            "dk": max_rel_err(ks.grad, k64.grad), "dv": max_rel_err(vs.grad, v64.grad)}


def probe_entry(R, key, cands, dtype, dname, dev, kernel, block_d, rows_class):
    """Check (and on a GPU time) each candidate tile of table entry ``key`` in ``dtype``;
    returns the rows and whether the entry's current tile was wrong."""
    import triton.testing
    rows_out, current_bad = [], False
    current = R.CONFIGS[key]
    for cand in dict.fromkeys([current] + list(cands)):
        R.CONFIGS[key] = cand
        try:
            shapes = shapes_for(rows_class, block_d)
            for i, (B, T, H, Hkv, Nv) in enumerate(shapes):
                timed_only = i == len(shapes) - 1
                if timed_only and dev.type != "cuda":
                    continue
                hd = block_d
                q, k, v, mask, _, go = problem((B, T, H, Hkv, Nv), hd, dtype, dev)
                try:
                    errs = {} if timed_only else check(q, k, v, mask, go)
                except Exception as exc:  # noqa: BLE001 - a compile failure is a result
                    errs = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                ok = "error" not in errs and all(e < TOL[dtype] for e in errs.values())
                qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
                ms = None
                if "error" not in errs and dev.type == "cuda":
                    from pvm_kernels import pvm_retrieval
                    out = pvm_retrieval(qs, ks, vs, mask, backend="triton")
                    fn = (lambda: pvm_retrieval(q, k, v, mask, backend="triton")) if kernel == "fwd" \
                        else (lambda: torch.autograd.grad(out, (qs, ks, vs), go, retain_graph=True))
                    ms = triton.testing.do_bench(fn, return_mode="median")
                row = dict(key=list(key), tile=[cand.block_m, cand.block_n, cand.num_warps,
                                                cand.num_stages],
                           current=cand == current, dtype=dname, shape=[B, T, H, Hkv, Nv, hd],
                           ok=ok, ms=ms, **errs)
                rows_out.append(row)
                current_bad |= (cand == current and not ok)
                print(json.dumps(row), flush=True)
        finally:
            R.CONFIGS[key] = current
    return rows_out, current_bad


def main(argv=None) -> int:
    from pvm_kernels import triton_ops  # noqa: F401 - the launchers
    from pvm_kernels.triton_ops import retrieval as R

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", default="dkdv", choices=["fwd", "dq", "dkdv"])
    p.add_argument("--block-d", type=int, default=128)
    p.add_argument("--rows", default="decode", choices=["decode", "prefill"])
    p.add_argument("--candidates", default="", help="MxNxWARPSxSTAGES,... (current entry always first)")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--arch-changes", action="store_true",
                   help="check the current tile of every entry of this GPU's table that "
                        "differs from the sm80 table (entries no GPU run has verified yet)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        print("tile_probe: needs a CUDA GPU (or TRITON_INTERPRET=1 to check the script)",
              file=sys.stderr)
        return 2
    dev = torch.device("cpu" if interpret else "cuda")
    jobs = []  # (key, candidates, dtype name)
    if args.arch_changes:
        arch = R.arch_of(dev)
        for key in sorted(R.CONFIGS):
            base = ("sm80",) + key[1:]
            if key[0] == arch and key[1] not in ("delta", "finish") and R.CONFIGS[key] != R.CONFIGS[base]:
                names = ("bf16", "fp16") if key[2] == "16bit" else ("fp32",)
                jobs += [(key, [], name) for name in names]
    else:
        cands = [R.TileConfig(*map(int, c.split("x"))) for c in args.candidates.split(",") if c]
        for dname in args.dtypes.split(","):
            key = (R.arch_of(dev), args.kernel, R.dtype_class(DTYPES[dname]), args.block_d,
                   args.rows)
            if key not in R.CONFIGS:
                print(f"no table entry {key}")
                continue
            jobs.append((key, cands, dname))
    rows_out, current_bad = [], False
    for key, cands, dname in jobs:
        _, kernel, _, block_d, rows_class = key
        rows, bad = probe_entry(R, key, cands, DTYPES[dname], dname, dev, kernel, block_d,
                                rows_class)
        rows_out += rows
        current_bad |= bad
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)
    return 1 if current_bad else 0


if __name__ == "__main__":
    sys.exit(main())
