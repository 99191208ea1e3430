"""``pvm-kernels bench``: the core ops and the whole block on this device, every backend.

Qwen3-VL-8B block dimensions (D 4096, P 512, H 4, Hkv 1, hd 128). For each shape T x Nv:
retrieval, merge and the whole FusedPVM block, each as forward, forward+backward and a
decode step (T 1; the block reuses an encoded VisualMemory). Every forward result is also
checked against the float64 reference (max relative error). Writes bench.json (raw times)
and bench.png (bar chart) to --out-dir.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .common import (help_text, CLIError, add_device_options, device_description, format_table,
                     output_dir, parse_backends, resolve_device, resolve_dtype, versions,
                     write_json)

OPS = ("retrieval", "merge", "block")
MODES = ("fwd", "fwd+bwd", "decode")
DEFAULT_SHAPES = {"cpu": "128x256,128x1024", "cuda": "2048x1024,8192x4096"}


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("bench", parents=parents, help="time the ops on this device "
                              "(JSON + bar chart PNG)", description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p)
    p.add_argument("--shapes", metavar="TxNv,...", help="query tokens x visual tokens, comma "
                   f"separated (default: {DEFAULT_SHAPES['cpu']} on cpu, "
                   f"{DEFAULT_SHAPES['cuda']} on cuda)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--ops", default=",".join(OPS), metavar="A,B",
                   help=f"which of {', '.join(OPS)} (default: all)")
    p.add_argument("--backends", metavar="A,B", help="comma-separated backends (default: every "
                   "usable backend; without a GPU, triton only when named here, since its "
                   "interpreter times numpy)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed calls per case "
                   "(default 5; the median is reported)")
    p.add_argument("--out-dir", default="pvm-results", metavar="DIR",
                   help="where bench.json and bench.png go (default pvm-results)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run)


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            T, Nv = (int(p) for p in parts)
        except ValueError:
            raise CLIError(f"--shapes: {item.strip()!r} is not TxNv (e.g. 128x256)") from None
        if T < 1 or Nv < 1:
            raise CLIError(f"--shapes: {item.strip()!r} needs T >= 1 and Nv >= 1")
        shapes.append((T, Nv))
    return shapes


@dataclass
class Case:
    op: str
    mode: str
    B: int
    T: int
    Nv: Optional[int]

    @property
    def label(self) -> str:
        nv = "" if self.Nv is None else f" Nv{self.Nv}"
        size = f"B{self.B}" if self.mode == "decode" else f"T{self.T}"
        return f"{self.mode} {size}{nv}"


def plan(ops: List[str], shapes: List[Tuple[int, int]], B: int) -> List[Case]:
    """The cases to run, without repeats (merge does not depend on Nv)."""
    cases, seen = [], set()
    for op in ops:
        for T, Nv in shapes:
            for mode in MODES:
                t = 1 if mode == "decode" else T
                nv = None if op == "merge" else Nv
                if (op, mode, t, nv) not in seen:
                    seen.add((op, mode, t, nv))
                    cases.append(Case(op, mode, B, t, nv))
    return cases


class Workloads:
    """Inputs and float64 references for each case, and the callables that time them."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        from ..config import PVMConfig
        from ..modules import FusedPVM
        from ..testing import double_params
        self.device, self.dtype = device, dtype
        torch.manual_seed(0)
        block = FusedPVM(PVMConfig.qwen3_vl_8b())
        with torch.no_grad():
            block.gate_alpha.fill_(1.0)
        self.block = block.to(device=device, dtype=dtype)
        self.dims = block.dims
        self.params64 = {k: v.to(device) for k, v in double_params(block).items()}

    def _randn(self, *shape, grad=False):
        return torch.randn(*shape, device=self.device, dtype=self.dtype, requires_grad=grad)

    def build(self, case: Case, backend: str) -> Tuple[Callable, Callable, Optional[Callable]]:
        """(forward returning the output, forward+backward, float64 reference of forward)."""
        return getattr(self, f"_{case.op}")(case, backend)

    def _retrieval(self, case, backend):
        from ..ops import pvm_retrieval
        from ..reference import retrieval_reference
        d, B, T, Nv = self.dims, case.B, case.T, case.Nv
        q = self._randn(B, T, d.num_heads, d.head_dim, grad=True)
        k = self._randn(B, Nv, d.num_kv_heads, d.head_dim, grad=True)
        v = self._randn(B, Nv, d.num_kv_heads, d.head_dim, grad=True)
        grad = torch.randn_like(q)
        fwd = lambda: pvm_retrieval(q, k, v, backend=backend)  # noqa: E731
        ref = lambda: retrieval_reference(q.double(), k.double(), v.double())  # noqa: E731
        return fwd, lambda: fwd().backward(grad), ref

    def _merge(self, case, backend):
        from ..ops import pvm_merge
        from ..reference import merge_reference
        B, T, D = case.B, case.T, self.dims.hidden_size
        e, ffn = self._randn(B, T, D, grad=True), self._randn(B, T, D, grad=True)
        gate = torch.ones(1, device=self.device, dtype=self.dtype, requires_grad=True)
        grad = torch.randn_like(e)
        fwd = lambda: pvm_merge(e, gate, None, ffn, backend=backend)  # noqa: E731
        ref = lambda: merge_reference(e.double(), gate.double(), None, ffn.double(),  # noqa: E731
                                      self.dims.eps)
        return fwd, lambda: fwd().backward(grad), ref

    def _block(self, case, backend):
        from ..reference import pvm_block_reference
        B, T, Nv, D = case.B, case.T, case.Nv, self.dims.hidden_size
        h, visual = self._randn(B, T, D, grad=True), self._randn(B, Nv, D, grad=True)
        grad = torch.randn_like(h)
        ref = lambda: pvm_block_reference(self.params64, self.dims, h.double(),  # noqa: E731
                                          visual.double())
        if case.mode == "decode":
            with torch.no_grad():
                memory = self.block.encode_visual(visual)
            return lambda: self.block(h, memory, backend=backend), None, ref
        fwd = lambda: self.block(h, visual, backend=backend)  # noqa: E731
        return fwd, lambda: fwd().backward(grad), ref


def times_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> List[float]:
    """Times of ``fn()`` in ms. CUDA: every repeat of triton.testing.do_bench (CUDA events,
    L2 flushed between calls, warm-up included), so ``repeats`` is ignored; CPU: ``repeats``
    single calls through torch.utils.benchmark after one warm-up call."""
    if device.type == "cuda":
        import triton.testing
        return [float(t) for t in triton.testing.do_bench(fn, return_mode="all")]
    import torch.utils.benchmark as tub
    fn()
    timer = tub.Timer(stmt="fn()", globals={"fn": fn})
    return [timer.timeit(1).median * 1e3 for _ in range(repeats)]


def case_cost(case: "Case", dims, dtype: torch.dtype):
    """FLOPs and bytes of a case (pvm_kernels.roofline)."""
    from ..roofline import block_cost, merge_cost, retrieval_cost
    elem = torch.finfo(dtype).bits // 8
    backward = case.mode == "fwd+bwd"
    if case.op == "retrieval":
        shape = (case.B, case.T, dims.num_heads, dims.num_kv_heads, dims.head_dim, case.Nv, elem)
        cost = retrieval_cost(*shape)
        return cost + retrieval_cost(*shape, backward=True) if backward else cost
    if case.op == "merge":
        cost = merge_cost(case.B * case.T, dims.hidden_size, elem)
        return cost + merge_cost(case.B * case.T, dims.hidden_size, elem, backward=True) \
            if backward else cost
    return block_cost(dims, case.B, case.T, case.Nv, elem, backward=backward,
                      cached=case.mode == "decode")


def run(args) -> int:
    from tqdm import tqdm

    from ..ops import available_backends
    from ..roofline import measure_peaks
    from ..testing import max_rel_err

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise CLIError(f"--ops: unknown {bad or ops}; choose from {', '.join(OPS)}")
    if args.batch < 1 or args.repeats < 1:
        raise CLIError("--batch and --repeats must be at least 1")
    default = [b for b in available_backends(device) if device.type == "cuda" or b != "triton"]
    backends = parse_backends(args.backends, device, default)
    shapes = parse_shapes(args.shapes or DEFAULT_SHAPES[device.type])
    out_dir = output_dir(args.out_dir)
    cases = plan(ops, shapes, args.batch)
    print(f"bench on {device_description(device)}, {dtype}, 8B block dims, backends "
          f"{', '.join(backends)}; {len(cases) * len(backends)} runs of {args.repeats} repeats")

    work = Workloads(device, dtype)
    # The ceilings of this run, so the rows' fractions of peak compare like with like.
    peaks = measure_peaks(device, dtype) if device.type == "cuda" else (None, None)
    rows = []
    with tqdm(total=len(cases) * len(backends), disable=args.no_progress, unit="run",
              dynamic_ncols=True) as bar:
        for case in cases:
            for backend in backends:
                fwd, fwd_bwd, ref = work.build(case, backend)
                err = None
                if case.mode == "fwd+bwd":
                    fn = fwd_bwd
                else:
                    with torch.no_grad():
                        err = max_rel_err(fwd(), ref())
                    fn = lambda: _no_grad(fwd)  # noqa: E731
                bar.set_postfix_str(f"{case.op} {case.label} {backend}")
                times = times_ms(fn, device, args.repeats)
                median = sorted(times)[len(times) // 2]
                rows.append(dict(op=case.op, mode=case.mode, case=case.label, backend=backend,
                                 B=case.B, T=case.T, Nv=case.Nv, times_ms=times,
                                 median_ms=median, max_rel_err=err,
                                 **case_cost(case, work.dims, dtype).fields(median, *peaks)))
                bar.update()

    reference_ms = {(r["op"], r["case"]): r["median_ms"] for r in rows if r["backend"] == "reference"}
    table = []
    for r in rows:
        base = reference_ms.get((r["op"], r["case"]), math.nan)
        table.append([r["op"], r["case"], r["backend"], f"{r['median_ms']:.3f}",
                      "-" if math.isnan(base) else f"{base / r['median_ms']:.2f}x",
                      "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"])
    print(format_table(["op", "case", "backend", "median ms", "vs reference", "max err"], table))
    report = dict(device=device_description(device), dtype=str(dtype), versions=versions(),
                  dims=vars(work.dims), repeats=args.repeats, peak_tflops=peaks[0],
                  peak_gbs=peaks[1], results=rows)
    json_path = os.path.join(out_dir, "bench.json")
    write_json(json_path, report)
    print(f"\nmax err: forward output vs the float64 reference (max |x - ref| / max |ref|).\n"
          f"wrote {json_path}")
    if not args.no_plot:
        from .plots import plot_bench
        png = os.path.join(out_dir, "bench.png")
        plot_bench(png, rows, f"PVM ops, 8B block dims, {report['device']}, "
                              f"{str(dtype).replace('torch.', '')}")
        print(f"wrote {png}")
    return 0


def _no_grad(fn):
    with torch.no_grad():
        return fn()
