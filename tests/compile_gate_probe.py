"""Probes that show the compile gate bites, run by tests/test_compile_gate.py in a process
without TRITON_INTERPRET (the gate compiles for the GPU). Each prints one JSON object.

    python tests/compile_gate_probe.py interpreter-accepts   # (with TRITON_INTERPRET=1)
    python tests/compile_gate_probe.py shape-mismatch
    python tests/compile_gate_probe.py table-entry <json: key> <json: TileConfig fields>
    python tests/compile_gate_probe.py unreachable-entry
    python tests/compile_gate_probe.py ptx-instructions
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))


@triton.jit
def _tile(X, n, TRANSPOSED: tl.constexpr):
    # The bug the gate found in the first retrieval kernels: a constexpr if returns a tile
    # of another shape than the return after it. The interpreter runs only the taken
    # return and accepts it; the GPU compiler types both and refuses.
    i = tl.arange(0, 32)
    j = tl.arange(0, 16)
    if TRANSPOSED:
        return tl.load(X + j[:, None] * n + i[None, :])
    return tl.load(X + i[:, None] * n + j[None, :])


@triton.jit
def broken_kernel(X, Y, n, TRANSPOSED: tl.constexpr):
    tl.store(Y, tl.sum(tl.sum(_tile(X, n, TRANSPOSED), 0), 0))


def interpreter_accepts():
    x = torch.randn(32, 32)
    y = torch.empty(1)
    broken_kernel[(1,)](x, y, 32, TRANSPOSED=True)
    return {"ran": True, "y": float(y.sum())}


def shape_mismatch():
    import compile_gate as gate
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    errors = {}
    for cap in (80, 90):
        src = ASTSource(broken_kernel, {"X": "*fp32", "Y": "*fp32", "n": "i32",
                                        "TRANSPOSED": "constexpr"}, {(3,): True})
        try:
            triton.compile(src, target=GPUTarget("cuda", cap, 32))
            errors[cap] = None
        except Exception as exc:  # noqa: BLE001 - the error is what the probe reports
            errors[cap] = gate.describe(exc)
    assert gate.TARGETS  # the gate module imports without a GPU
    return {"errors": errors}


def table_entry(key, fields, targets=(80, 90)):
    """Replace one retrieval table entry, compile its problem for ``targets`` and return the
    gate's failures for it. The problem's other kernels, unchanged, are recalled from the
    compile record: only the replaced entry compiles."""
    import compile_gate as gate
    import compile_record
    import triton
    from pvm_kernels.triton_ops import retrieval as R
    kernel, dc, bd, rc = key
    for arch in ("sm80", "sm90"):
        R.CONFIGS[(arch, kernel, dc, bd, rc)] = R.TileConfig(**fields)
    recall = compile_record.load(compile_record.record_path(triton.__version__))
    records = [vars(r) for cap in targets
               for r in gate.compile_entry_problem(cap, dc, bd, rc, recall).records.values()]
    return {"failures": [f for f in gate.check(records, list(targets), only="retrieval")
                         if "never compiled" not in f]}


def unreachable_entry():
    """A table entry no launch can select must fail the gate's coverage check."""
    import compile_gate as gate
    from pvm_kernels.triton_ops import retrieval as R
    R.CONFIGS[("sm90", "fwd", "16bit", 512, "decode")] = R.TileConfig(16, 64, 4, 2)
    return {"failures": [f for f in gate.check([], [90], only="retrieval") if "512" in f]}


#: PTX instructions the ptx-instructions probe counts: TMA box loads, Hopper's
#: warpgroup MMA, Ampere's warp MMA, 16-byte global loads.
PTX_INSTRUCTIONS = ("cp.async.bulk.tensor", "wgmma.mma_async", "mma.sync", "ld.global.v4")


def ptx_instructions():
    """Compile, for sm_90, the 8B-layout bf16 prefill retrieval (forward + backward, hd
    128) twice: as the launchers choose (tensor descriptors: no key_mask, one KV head) and
    with pointer loads (retrieval.tensor_descriptors(False)); the PTX instruction counts
    of each tile kernel."""
    import compile_gate as gate
    from pvm_kernels.triton_ops import retrieval as R
    counts = {}
    for tma in (True, False):
        with gate.CompileSession(90) as session:
            compile_fn = session._original_run

            def run(fn, *args, tma=tma, **kwargs):
                kernel = compile_fn(fn, *args, **kwargs)
                name = fn.fn.__name__
                if name in ("retrieval_fwd_kernel", "retrieval_bwd_dq_kernel",
                            "retrieval_bwd_dkdv_kernel"):
                    ptx = kernel.asm["ptx"]
                    counts[f"{name}:{'tma' if tma else 'pointer'}"] = dict(
                        {i: ptx.count(i) for i in PTX_INSTRUCTIONS},
                        TMA=bool(kwargs.get("TMA")))
                return kernel

            session._original_run = run
            T, H, Hkv = gate.TMA_ROWS
            session.context["config"] = lambda k: ("retrieval", R.config_key(
                k, torch.bfloat16, T * H // Hkv, 128, torch.device("cpu")))
            with R.tensor_descriptors(tma):
                q = torch.randn(1, T, H, 128, dtype=torch.bfloat16, requires_grad=True)
                kv = torch.randn(1, 150, Hkv, 128, dtype=torch.bfloat16, requires_grad=True)
                torch.ops.pvm_kernels.triton_retrieval_fwd(q, kv, kv, None, None,
                                                           128 ** -0.5)[0].sum().backward()
            session._original_run = compile_fn  # what __exit__ puts back on JITFunction
    return {"counts": counts}


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "interpreter-accepts":
        result = interpreter_accepts()
    elif what == "shape-mismatch":
        result = shape_mismatch()
    elif what == "ptx-instructions":
        result = ptx_instructions()
    elif what == "table-entry":
        result = table_entry(json.loads(sys.argv[2]), json.loads(sys.argv[3]),
                             json.loads(sys.argv[4]) if len(sys.argv) > 4 else (80, 90))
    else:
        result = unreachable_entry()
    print(json.dumps(result))
