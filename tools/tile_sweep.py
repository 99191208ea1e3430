"""Sweep candidate tiles of the Triton retrieval's configuration table through the compile
gate's session, for one target architecture, on a machine with no GPU.

For each table entry chosen and each candidate TileConfig (in order of preference), the
entry is replaced, the entry's forward + backward problem is compiled for sm_<target> (as
tools/compile_gate.py does) and the candidate's compiled kernel is checked: no compile
error, no register spill, shared memory within the target's per-block limit. Prints one
JSON line per (entry, candidate) and, at the end, the first passing candidate of each
entry. Run it once per Triton version (``PYTHONPATH=build/triton-3.6`` for the GPU
machines' 3.6) and keep the first candidate that passes under both:

    python tools/tile_sweep.py --target 90 --kernels fwd,dq,dkdv --block-d 64,128,256 \\
        --json /tmp/sweep-3.8.json

The default candidates start from published H100 attention configurations: the Triton
fused-attention tutorial's forward (BLOCK_M 128, BLOCK_N 64-128, 4-8 warps, 3 stages) and
backward (32-64 query rows by 128 keys for dK/dV, 128 x 32-64 for dQ), flash-attention 2's
128 x 64 forward on 4 warps at head dim 128 and 64 x 128 dK/dV on 8 warps, ending with the
entry's current tile. Timing them is tools/tile_probe.py's job, on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

#: (kernel, row class) -> candidates "MxNxWARPSxSTAGES", most preferred first.
CANDIDATES: Dict[tuple, List[str]] = {
    ("fwd", "prefill"): ["128x128x8x3", "128x64x8x3", "128x64x4x3", "128x64x8x2", "64x64x4x3",
                         "64x64x8x3"],
    ("fwd", "decode"): ["16x128x4x3", "16x64x4x3", "16x128x4x2"],
    ("dq", "prefill"): ["128x64x8x3", "128x32x8x3", "64x64x4x3", "64x64x8x3", "64x32x4x3"],
    ("dq", "decode"): ["16x128x4x3", "16x64x4x3"],
    ("dkdv", "prefill"): ["64x128x8x3", "32x128x8x3", "32x128x4x3", "64x64x8x3", "64x64x4x3",
                          "32x64x4x3"],
    ("dkdv", "decode"): ["16x128x8x3", "16x64x8x3", "16x64x4x3"],
}
_KERNEL_NAME = {"fwd": "retrieval_fwd_kernel", "dq": "retrieval_bwd_dq_kernel",
                "dkdv": "retrieval_bwd_dkdv_kernel"}


def compile_candidate(cap: int, key: tuple, cand) -> dict:
    """Compile ``key``'s problem for sm_<cap> with the entry set to ``cand``; the verdict
    on the kernel that entry launches."""
    import compile_gate as gate
    from pvm_kernels.triton_ops import retrieval as R

    arch, kernel, dc, bd, rc = key
    previous = R.CONFIGS[key]
    R.CONFIGS[key] = cand
    try:
        s = gate.compile_entry_problem(cap, dc, bd, rc)
    finally:
        R.CONFIGS[key] = previous
    recs = [r for r in s.records.values() if r.kernel == _KERNEL_NAME[kernel]]
    if not recs:
        return dict(ok=False, why="no launch reached the entry")
    # The worst of its layouts (padded, varlen): every one must pass.
    r = max(recs, key=lambda r: (r.error is not None, r.local, r.shared, r.registers))
    limit = gate.TARGETS[cap]["smem_block"]
    why = ("compile error: " + r.error.splitlines()[0]) if r.error else \
        f"spill {r.local} B" if r.local else \
        f"shared {r.shared} B > {limit} B" if r.shared > limit else None
    return dict(ok=why is None, why=why, registers=r.registers, shared=r.shared, local=r.local)


def main(argv=None) -> int:
    import triton

    from pvm_kernels.triton_ops import retrieval as R

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=int, default=90, choices=[80, 90])
    p.add_argument("--kernels", default="fwd,dq,dkdv")
    p.add_argument("--rows", default="decode,prefill")
    p.add_argument("--block-d", default="64,128,256")
    p.add_argument("--dtype-class", default="16bit", choices=["16bit", "fp32"])
    p.add_argument("--json", help="write every line here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the sweep compiles for the GPU")
    arch = f"sm{args.target}"
    rows, best = [], {}
    for kernel in args.kernels.split(","):
        for rc in args.rows.split(","):
            for bd in (int(b) for b in args.block_d.split(",")):
                key = (arch, kernel, args.dtype_class, bd, rc)
                current = R.CONFIGS[key]
                cands = [R.TileConfig(*map(int, c.split("x"))) for c in CANDIDATES[(kernel, rc)]]
                for cand in dict.fromkeys(cands + [current]):
                    verdict = compile_candidate(args.target, key, cand)
                    row = dict(triton=triton.__version__, key=list(key),
                               tile=[cand.block_m, cand.block_n, cand.num_warps, cand.num_stages],
                               current=cand == current, **verdict)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if verdict["ok"] and key not in best:
                        best[key] = cand
    for key, cand in best.items():
        print(f"{key}: {cand}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
