"""Ahead-of-time compile gate: every Triton kernel specialisation the launchers can produce,
compiled for sm_80 (A100) and sm_90 (H100/H200) on a machine with no GPU.

Triton's CPU interpreter runs kernels as Python and accepts code the GPU compiler rejects;
this gate runs the GPU compiler. It drives the real launchers through the public ops
(``pvm_retrieval``, ``pvm_retrieval_varlen``, ``pvm_merge``, forward and backward) on CPU
tensors, with Triton's driver replaced by a stand-in that names the target GPU and every
launch turned into ``warmup`` (compile, never run). The problems come from the launchers' own configuration
tables (``triton_ops/retrieval.py:CONFIGS``, ``triton_ops/merge.py:CONFIGS``) times the
dtypes and flags the launchers can pass, so a new table entry cannot escape the gate.

For each compiled kernel it reads registers, shared memory and local memory (spills) from
the cubin with the ``cuobjdump`` Triton ships, and fails on: a compile error, shared memory
above the target's per-block limit, any spill, a table entry no launch reached (a retrieval
entry: in either layout, padded or varlen), or one table entry compiling to more than one
specialisation per layout (the launchers promise a closed set).

    python tools/compile_gate.py                      # both targets, 2 processes
    python tools/compile_gate.py --markdown docs/kernel_resources.md --json out.json
    PYTHONPATH=/path/to/triton-3.6 python tools/compile_gate.py   # another Triton
    python tools/compile_gate.py --no-recall --write-record    # what make compile-gate does

Specialisations whose Triton cache key is in the committed record (tools/compile_record.py)
are recalled, not compiled; the rest compile, and a fixed sample of the recalled ones
compiles anyway and must match the record.

Exit status 0 when every check passes, 1 otherwise (the failures are listed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_record  # noqa: E402

#: Per-target limits from docs/gpu_facts.md (opt-in shared memory per block, per SM).
TARGETS = {
    80: dict(gpu="A100", smem_block=166_912, smem_sm=167_936, sms=108),
    90: dict(gpu="H100", smem_block=232_448, smem_sm=233_472, sms=132),
}
REGS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65_536, 2_048, 32


@dataclass
class Compiled:
    """One distinct specialisation compiled for one target."""
    kernel: str
    target: int
    table: str                  # the configuration table that chose it: retrieval / merge
    entries: List[str]          # the keys in that table whose launches compiled to it
    config: str                 # their value
    dtype: str
    constexprs: Dict[str, object]
    signature: str              # Triton's specialisation key (types and attributes)
    num_warps: int
    num_stages: int
    shared: int = 0             # bytes per block (Triton's dynamic allocation)
    registers: int = 0
    local: int = 0              # bytes of local memory per thread: spills
    error: Optional[str] = None
    launches: int = 0
    problems: List[str] = field(default_factory=list)
    layout: str = ""            # retrieval: "padded" or "varlen" (VARLEN); merge: ""
    compile_key: str = ""       # Triton's cache key (compile_record.py)
    how: str = ""               # "compiled", "recalled" (from the record), "spot-checked"
    record_mismatch: Optional[str] = None  # a spot check that disagreed with the record


def blocks_per_sm(c: Compiled) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256),
    shared memory (+1 KB reserved per block) and threads."""
    lim = TARGETS[c.target]
    threads = c.num_warps * 32
    regs_warp = -(-max(c.registers, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_warp) // c.num_warps
    by_smem = lim["smem_sm"] // (c.shared + 1024) if c.shared else MAX_BLOCKS_PER_SM
    return max(0, min(MAX_BLOCKS_PER_SM, MAX_THREADS_PER_SM // threads, by_regs, by_smem))


# ---- the worker: one target, in its own process ---------------------------------------

def _resources(cubin: bytes) -> Dict[str, int]:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, local=max(stack, local), static_shared=shared)


def describe(exc: BaseException) -> str:
    """An exception and its causes: Triton's CompilationError points at the call site and
    keeps the reason (e.g. "Return type mismatch") in its __cause__."""
    parts = []
    while exc is not None and len(parts) < 5:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n  caused by ".join(parts)


class _Recalled(Exception):
    """Raised from the compile hook instead of compiling: the record holds the result."""

    def __init__(self, result: dict):
        super().__init__("recalled from the compile record")
        self.result = result


class _TargetDriver:
    """Stands in for Triton's CUDA driver: names the target GPU, runs nothing."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _drive_problems(context) -> None:  # noqa: C901 - one loop per table
    """Every launch the tables allow, through the public ops, forward and backward."""
    import torch
    from pvm_kernels import pvm_merge, pvm_retrieval
    from pvm_kernels.triton_ops import merge as merge_mod
    from pvm_kernels.triton_ops import paged_retrieval as paged_mod
    from pvm_kernels.triton_ops import retrieval as retr_mod
    from pvm_kernels.triton_ops import rms_norm as norm_mod
    from pvm_kernels.triton_ops import swiglu as swiglu_mod

    dtypes = {"16bit": (torch.float16, torch.bfloat16), "fp32": (torch.float32,)}
    rows_for = {"decode": (1, 4, 1), "prefill": (37, 4, 2)}  # (T, H, Hkv): T * G rows 4 / 74
    problems = []
    arch = f"sm{context['cap']}"
    for (table_arch, kernel, dc, bd, rc) in sorted(retr_mod.CONFIGS):
        # this target's table only; one forward + backward reaches fwd, dq and dkdv of it
        if table_arch != arch or kernel != "fwd":
            continue
        for dtype in dtypes[dc]:
            # The bucket's own head dim without masks, then its smallest with masks, kv_len
            # past Nv and transposed storage: all must compile to the same variant. The
            # same twice packed (varlen): own head dim, then smallest with transposed storage.
            for varlen in (False, True):
                for qn in (False, True):
                    problems.append(("retrieval", dtype, bd, rc, False, varlen, qn))
                    problems.append(("retrieval", dtype, bd, rc, True, varlen, qn))
                    if tma_entry(table_arch, dc, bd, rc):  # the tensor-descriptor kernels
                        problems.append(("retrieval", dtype, bd, rc, "tma", varlen, qn))
    for (kernel, dc, bd) in sorted(merge_mod.CONFIGS):
        if kernel != "fwd":  # the backward of each forward reaches the bwd entry
            continue
        for dtype in dtypes[dc]:
            for aligned in (True, False):
                for ffn in (False, True):
                    for gate_fp32 in ({False, True} if dtype != torch.float32 else {False}):
                        problems.append(("merge", dtype, bd, aligned, ffn, gate_fp32))
    for (kernel, dc, bn) in sorted(norm_mod.CONFIGS):
        if kernel == "fwd":  # the backward of each forward reaches the bwd entry
            problems += [("rms_norm", dtype, bn, aligned) for dtype in dtypes[dc]
                         for aligned in (True, False)]
    for (kernel, dc, bn) in sorted(_visual_kv_table()):
        if kernel == "fwd":  # visual_kv's k_norm programs use rms_norm's forward entries
            problems += [("visual_kv", dtype, bn, aligned, has_mask) for dtype in dtypes[dc]
                         for aligned in (True, False) for has_mask in (True, False)]
    for (kernel, dc) in sorted(swiglu_mod.CONFIGS):
        if kernel == "fwd":
            problems += [("swiglu", dtype, aligned) for dtype in dtypes[dc]
                         for aligned in (True, False)]

    for (kernel, dc, bd) in sorted(paged_mod.CONFIGS):
        # the entry's own head dim, then a smaller one of the same BLOCK_D: one variant
        problems += [("paged_retrieval", dtype, bd, bs, varied) for dtype in dtypes[dc]
                     for bs in paged_mod.BLOCK_SIZES for varied in (False, True)]

    problems = [p for p in problems if context["only"] in (None, p[0])]
    from tqdm import tqdm
    with tqdm(total=len(problems), disable=not context["progress"], unit="problem",
              dynamic_ncols=True) as bar:
        for prob in problems:
            context["problem"] = f"{prob[0]} {prob[1:]}"
            if prob[0] == "retrieval" and prob[4] == "tma":
                _, dtype, bd, rc, _, varlen, qn = prob
                T, H, Hkv = TMA_ROWS
                context["config"] = lambda kernel, rows=T * (H // Hkv), hd=bd, dtype=dtype: (
                    "retrieval", retr_mod.config_key(kernel, dtype, rows, hd, torch.device("cpu")))
                run_tma_problem(dtype, bd, varlen, qn)
            elif prob[0] == "retrieval" and prob[5]:
                _, dtype, bd, rc, varied, _, qn = prob
                T, H, Hkv = rows_for[rc]
                hd = (bd // 2 + 8 if bd > 16 else 8) if varied else bd
                context["config"] = lambda kernel, rows=T * (H // Hkv), hd=hd, dtype=dtype: (
                    "retrieval", retr_mod.config_key(kernel, dtype, rows, hd, torch.device("cpu")))
                run_varlen_problem(dtype, T, H, Hkv, hd, transposed=varied, q_norm=qn)
            elif prob[0] == "retrieval":
                _, dtype, bd, rc, varied, _, qn = prob
                T, H, Hkv = rows_for[rc]
                B, Nv = 2, 77
                hd = (bd // 2 + 8 if bd > 16 else 8) if varied else bd  # 8, 24, 40, 72, 136
                q = torch.randn(B, H, T, hd, dtype=dtype).transpose(1, 2) if varied else \
                    torch.randn(B, T, H, hd, dtype=dtype)
                q.requires_grad_()
                k = torch.randn(B, Nv, Hkv, hd, dtype=dtype, requires_grad=True)
                v = torch.randn(B, Nv, Hkv, hd, dtype=dtype, requires_grad=True)
                mask = lens = None
                if varied:
                    mask = torch.rand(B, Nv) > 0.2
                    lens = torch.tensor([Nv - 5, 2**20], dtype=torch.int32)
                context["config"] = lambda kernel, rows=T * (H // Hkv), hd=hd, dtype=dtype: (
                    "retrieval", retr_mod.config_key(kernel, dtype, rows, hd, torch.device("cpu")))
                if qn:
                    w = torch.ones(hd, dtype=dtype, requires_grad=True)
                    out = torch.ops.pvm_kernels.triton_retrieval_qn_fwd(
                        q, w, k, v, mask, lens, hd ** -0.5, 1e-6)[0]
                else:
                    out = pvm_retrieval(q, k, v, mask, lens, backend="triton")
                out.backward(torch.randn_like(out))
            elif prob[0] == "rms_norm":
                _, dtype, bn, aligned = prob
                N = bn if aligned else bn - 3
                context["config"] = lambda kernel, N=N, dtype=dtype: (
                    "rms_norm", norm_mod.config_key(kernel, dtype, N))
                x = torch.randn(5, N, dtype=dtype, requires_grad=True)
                w = torch.ones(N, dtype=dtype, requires_grad=True)
                y, _ = torch.ops.pvm_kernels.triton_rms_norm_fwd(x, w, 1e-6)
                y.backward(torch.randn_like(y))
            elif prob[0] == "visual_kv":
                _, dtype, bn, aligned, has_mask = prob
                hd = bn if aligned else bn - 3
                context["config"] = lambda kernel, hd=hd, dtype=dtype: (
                    "visual_kv", norm_mod.config_key(kernel, dtype, hd))
                k = torch.randn(2, 7, 3, hd, dtype=dtype)
                mask = torch.rand(2, 7) > 0.3 if has_mask else None
                torch.ops.pvm_kernels.triton_visual_kv_fwd(k, torch.ones(hd, dtype=dtype),
                                                           mask, 1e-6)
            elif prob[0] == "paged_retrieval":
                _, dtype, bd, bs, varied = prob
                hd = bd - 8 if varied and bd > 16 else bd
                context["config"] = lambda kernel, hd=hd, dtype=dtype: (
                    "paged_retrieval", paged_mod.config_key(dtype, hd))
                run_paged_problem(dtype, hd, bs)
            elif prob[0] == "swiglu":
                _, dtype, aligned = prob
                inter = 256 if aligned else 253
                context["config"] = lambda kernel, dtype=dtype: (
                    "swiglu", (kernel, "fp32" if dtype == torch.float32 else "16bit"))
                g, u = (torch.randn(5, inter, dtype=dtype, requires_grad=True) for _ in range(2))
                out = torch.ops.pvm_kernels.triton_swiglu_fwd(g, u)
                out.backward(torch.randn_like(out))
            else:
                _, dtype, bd, aligned, ffn, gate_fp32 = prob
                D = bd if aligned else bd - 3
                e = torch.randn(3, D, dtype=dtype, requires_grad=True)
                gate = torch.ones(1, dtype=torch.float32 if gate_fp32 else dtype,
                                  requires_grad=True)
                f = torch.randn(3, D, dtype=dtype) if ffn else None
                keep = torch.tensor([True, False, True]) if ffn else None
                context["config"] = lambda kernel, D=D, dtype=dtype: (
                    "merge", merge_mod.config_key(kernel, dtype, D))
                pvm_merge(e, gate, keep, f, backend="triton").backward(
                    torch.randn(3, D, dtype=dtype))
            bar.set_postfix_str(context["problem"])
            bar.update()


_KERNEL_TABLE_NAME = {"retrieval_fwd_kernel": "fwd",
                      "retrieval_bwd_dq_kernel": "dq", "retrieval_delta_kernel": "delta",
                      "retrieval_bwd_finish_kernel": "finish",
                      "retrieval_bwd_dkdv_kernel": "dkdv", "merge_fwd_kernel": "fwd",
                      "merge_bwd_kernel": "bwd", "rms_norm_fwd_kernel": "fwd",
                      "rms_norm_bwd_kernel": "bwd", "swiglu_fwd_kernel": "fwd",
                      "swiglu_bwd_kernel": "bwd", "visual_kv_fwd_kernel": "fwd",
                      "paged_retrieval_fwd_kernel": "fwd"}


class CompileSession:
    """Within ``with CompileSession(cap) as s``: Triton targets sm_<cap>, the triton backend
    accepts CPU tensors, and every kernel launch compiles (once per specialisation) into
    ``s.records`` instead of running. ``s.context`` names the problem and table entry."""

    def __init__(self, cap: int, progress: bool = False, only: Optional[str] = None,
                 recall: Optional[Dict[str, dict]] = None):
        self.cap = cap
        self.recall = recall or {}  # compile key -> result (compile_record.py)
        self.records: Dict[tuple, Compiled] = {}
        self._key: Optional[str] = None
        self._spot = False
        self._hooked = []
        self.context = {"progress": progress, "problem": "", "config": None, "only": only,
                        "cap": cap}

    def __enter__(self) -> "CompileSession":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("unset TRITON_INTERPRET: the gate compiles for the GPU")
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        from pvm_kernels.ops import triton_backend  # noqa: F401 - registers "triton"
        from pvm_kernels.ops.registry import Backend, register_backend, _REGISTRY
        from pvm_kernels.triton_ops.common import compile_target

        driver.set_active(_TargetDriver(GPUTarget("cuda", self.cap, 32)))
        # The launchers pick this target's table and SM count for the CPU tensors.
        self._target = compile_target(self.cap)
        self._target.__enter__()
        # The triton backend refuses CPU tensors outside the interpreter; here CPU tensors
        # only carry shapes, dtypes and strides to the launchers, which compile, never run.
        self._real = _REGISTRY["triton"]
        register_backend(Backend("triton", self._real.retrieval, self._real.merge,
                                 check=lambda _: None, default_rank=self._real.default_rank,
                                 dtypes=self._real.dtypes,
                                 head_dim_check=self._real.head_dim_check,
                                 retrieval_varlen=self._real.retrieval_varlen))
        self._original_run = JITFunction.run
        session = self

        def compile_only(fn, *args, grid, warmup, **kwargs):
            session._compile(fn, args, kwargs)
            return None

        JITFunction.run = compile_only
        self._jit = JITFunction
        self._driver = driver
        return self

    def __exit__(self, *exc) -> None:
        from pvm_kernels.ops.registry import register_backend
        for fn, compile_fn in self._hooked:
            fn.compile = compile_fn
        self._target.__exit__(None, None, None)
        self._jit.run = self._original_run
        self._driver._active = None  # no real driver exists without a GPU: leave none set
        register_backend(self._real)

    def _compile(self, fn, args, kwargs) -> None:
        name = fn.fn.__name__
        # Triton's own binder gives the specialisation a real launch would compile.
        fn.device_caches.clear()  # built for whatever target was active before
        _, _, _, _, binder = fn.device_caches[0]
        bound, specialization, _ = binder(*args, **kwargs)
        constexprs = {k: v for k, v in bound.items() if isinstance(v, (bool, int))
                      and k.startswith(("BLOCK", "HAS", "ALIGNED", "FP32", "UPCAST", "VARLEN",
                                        "QN", "TMA", "WS"))}
        dtype = str(bound[next(iter(bound))].dtype).replace("torch.", "")
        sig = repr(specialization) + repr(sorted(kwargs.items()))
        table, entry = self.context["config"](_KERNEL_TABLE_NAME[name])
        rec = self.records.get((name, sig))
        if rec is None:
            cfg = TABLES[table]()[entry]
            rec = self.records[(name, sig)] = Compiled(
                kernel=name, target=self.cap, table=table, entries=[],
                layout=_layout(table, constexprs), config=repr(cfg),
                dtype=dtype, constexprs=constexprs, signature=sig,
                num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
            self._hook(fn)
            self._key, self._spot = None, False
            try:
                kernel = self._original_run(fn, *args, grid=(1,), warmup=True, **kwargs)
                res = _resources(kernel.asm["cubin"])
                rec.registers, rec.local = res["registers"], res["local"]
                rec.shared = kernel.metadata.shared + res["static_shared"]
                rec.how = "spot-checked" if self._spot else "compiled"
            except _Recalled as recalled:
                known = recalled.result
                rec.registers, rec.local = known["registers"], known["local"]
                rec.shared, rec.error, rec.how = known["shared"], known["error"], "recalled"
            except Exception as exc:  # noqa: BLE001 - a compile error is the finding
                rec.error = describe(exc)[:4000]
                rec.how = "spot-checked" if self._spot else "compiled"
            rec.compile_key = self._key or ""
            if self._spot:
                got = compile_record.result_of(rec.registers, rec.local, rec.shared, rec.error)
                want = compile_record.result_in(self.recall[self._key])
                if got != want:
                    rec.record_mismatch = (f"the compile record says {want}, a real compile "
                                           f"gives {got}")
        rec.launches += 1
        if repr(entry) not in rec.entries:
            rec.entries.append(repr(entry))
        if self.context["problem"] not in rec.problems:
            rec.problems.append(self.context["problem"])

    def _hook(self, fn) -> None:
        """Route ``fn``'s next compile through the record. Triton's JITFunction keeps its
        compile function as an instance attribute, which triton 3.8 sets again whenever it
        builds a device cache (create_binder): hooked before every compile."""
        triton_compile = fn.compile
        if getattr(triton_compile, "_pvm_recall_hook", False):
            return
        if not any(f is fn for f, _ in self._hooked):
            self._hooked.append((fn, triton_compile))
        session = self

        def compile_or_recall(src, target=None, options=None, _env_vars=None):
            if target is None:
                from triton.runtime.driver import driver
                target = driver.active.get_current_target()
            key = compile_record.compile_key(src, target, options, _env_vars)
            known = session.recall.get(key)
            session._key = key
            session._spot = known is not None and compile_record.spot_checked(key)
            if known is not None and not session._spot:
                raise _Recalled(known)
            return triton_compile(src, target=target, options=options, _env_vars=_env_vars)

        compile_or_recall._pvm_recall_hook = True
        fn.compile = compile_or_recall


def run_varlen_problem(dtype, T: int, H: int, Hkv: int, hd: int, transposed: bool = False,
                       Nv: int = 77, q_norm: bool = False) -> None:
    """Forward + backward of the varlen (packed) retrieval on the triton backend for CPU
    tensors: two sequences, the longer of T query tokens and Nv keys (max_seqlen_q /
    max_seqlen_k, as a padded problem's T and Nv), then rows and keys of no sequence;
    ``transposed``: q stored head-major (a strided view); ``q_norm``: the op with q_norm
    fused (QN)."""
    import torch
    from pvm_kernels import pvm_retrieval_varlen
    q_lens, k_lens = (T, max(T // 2, 1)), (Nv, Nv // 2 + 2)
    total_q, total_k = sum(q_lens) + 3, sum(k_lens) + 5
    q = torch.randn(H, total_q, hd, dtype=dtype).transpose(0, 1) if transposed else \
        torch.randn(total_q, H, hd, dtype=dtype)
    q.requires_grad_()
    k = torch.randn(total_k, Hkv, hd, dtype=dtype, requires_grad=True)
    v = torch.randn(total_k, Hkv, hd, dtype=dtype, requires_grad=True)
    cu_q = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
    cu_k = torch.tensor([0, k_lens[0], sum(k_lens)], dtype=torch.int32)
    if q_norm:
        w = torch.ones(hd, dtype=dtype, requires_grad=True)
        out = torch.ops.pvm_kernels.triton_retrieval_varlen_qn_fwd(
            q, w, k, v, cu_q, cu_k, max(q_lens), max(k_lens), hd ** -0.5, 1e-6)[0]
    else:
        out = pvm_retrieval_varlen(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens),
                                   backend="triton")
    out.backward(torch.randn_like(out))


#: (T, H, Hkv) of the gate's tensor-descriptor problems: the 8B layout's one KV head (rows
#: evenly strided), T * G = 148 prefill rows, a partial last row block.
TMA_ROWS = (37, 4, 1)


def tma_entry(arch: str, dc: str, bd: int, rc: str) -> bool:
    """Whether retrieval table bucket (arch, dtype class, BLOCK_D, row class) has
    tensor-descriptor (TMA) launches besides its pointer ones (retrieval.uses_tma)."""
    from pvm_kernels.triton_ops import retrieval as R
    return arch == "sm90" and dc == "16bit" and rc == "prefill" and bd in R.TMA_BLOCK_D


def run_tma_problem(dtype, hd: int, varlen: bool, q_norm: bool) -> None:
    """Forward + backward of a retrieval that takes the tensor-descriptor path (no
    key_mask, one KV head, prefill rows), padded with a kv_len below Nv and past it, or
    packed (varlen), optionally with q_norm fused. Had a launch taken pointer loads, its
    entry's "-tma" layout would never compile: check() fails on that."""
    import torch
    T, H, Hkv = TMA_ROWS
    if varlen:
        run_varlen_problem(dtype, T, H, Hkv, hd, q_norm=q_norm)
        return
    q = torch.randn(2, T, H, hd, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 77, Hkv, hd, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 77, Hkv, hd, dtype=dtype, requires_grad=True)
    lens = torch.tensor([77 - 5, 2**20], dtype=torch.int32)
    if q_norm:
        w = torch.ones(hd, dtype=dtype, requires_grad=True)
        out = torch.ops.pvm_kernels.triton_retrieval_qn_fwd(q, w, k, v, None, lens,
                                                            hd ** -0.5, 1e-6)[0]
    else:
        out = torch.ops.pvm_kernels.triton_retrieval_fwd(q, k, v, None, lens, hd ** -0.5)[0]
    out.backward(torch.randn_like(out))


def run_paged_problem(dtype, hd: int, block_size: int) -> None:
    """One launch of the in-place paged retrieval (3 decode tokens, G 4, 2 KV heads, a
    strided cache view as vLLM binds it)."""
    import torch
    num_blocks, hkv = 6, 2
    kv = torch.zeros(num_blocks, block_size, hkv, 2 * hd, dtype=dtype).permute(0, 2, 1, 3)
    torch.ops.pvm_kernels.triton_paged_retrieval_fwd(
        torch.randn(3, 4 * hkv, hd, dtype=dtype), kv,
        torch.ones(num_blocks * block_size, dtype=torch.bool),
        torch.ones(num_blocks, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.int32),
        torch.tensor([5, 40], dtype=torch.int32), torch.tensor([0, 1, 1], dtype=torch.int32),
        hd ** -0.5)


def compile_entry_problem(cap: int, dc: str, bd: int, rc: str,
                          recall: Optional[Dict[str, dict]] = None) -> "CompileSession":
    """Compile, for sm_<cap>, the forward + backward of the one small retrieval problem
    that lands in table bucket (dtype class ``dc``, BLOCK_D ``bd``, row class ``rc``), in
    both layouts (padded, then varlen), with whatever the table holds now; the session's
    records. For tools that try one entry (tools/tile_sweep.py,
    tests/compile_gate_probe.py); ``recall``: a compile record to recall unchanged kernels
    from (compile_record.py)."""
    import torch
    from pvm_kernels import pvm_retrieval
    from pvm_kernels.triton_ops import retrieval as R
    dtype = torch.float32 if dc == "fp32" else torch.bfloat16
    T, H, Hkv = (1, 4, 1) if rc == "decode" else (37, 4, 2)
    with CompileSession(cap, recall=recall) as s:
        s.context["config"] = lambda k: ("retrieval", R.config_key(
            k, dtype, T * H // Hkv, bd, torch.device("cpu")))
        q = torch.randn(2, T, H, bd, dtype=dtype, requires_grad=True)
        kv = torch.randn(2, 77, Hkv, bd, dtype=dtype, requires_grad=True)
        pvm_retrieval(q, kv, kv, None, None, backend="triton").sum().backward()
        w = torch.ones(bd, dtype=dtype, requires_grad=True)  # and with q_norm fused
        torch.ops.pvm_kernels.triton_retrieval_qn_fwd(q, w, kv, kv, None, None, bd ** -0.5,
                                                      1e-6)[0].sum().backward()
        run_varlen_problem(dtype, T, H, Hkv, bd)
        run_varlen_problem(dtype, T, H, Hkv, bd, q_norm=True)
        if tma_entry(f"sm{cap}", dc, bd, rc):
            T, H, Hkv = TMA_ROWS
            s.context["config"] = lambda k: ("retrieval", R.config_key(
                k, dtype, T * H // Hkv, bd, torch.device("cpu")))
            for varlen in (False, True):
                for qn in (False, True):
                    run_tma_problem(dtype, bd, varlen, qn)
    return s


def run_target(cap: int, progress: bool, only: Optional[str] = None,
               record: Optional[str] = None) -> List[dict]:
    """Compile (or recall from the compile record at path ``record``) every specialisation
    for sm_<cap>; returns Compiled records as dicts."""
    recall = compile_record.load(record) if record else {}
    with CompileSession(cap, progress, only, recall) as session:
        _drive_problems(session.context)
    return [asdict(r) for r in session.records.values()]


# ---- checks and report ------------------------------------------------------------------

def _retrieval_table():
    from pvm_kernels.triton_ops import retrieval
    return retrieval.CONFIGS


def _merge_table():
    from pvm_kernels.triton_ops import merge
    return merge.CONFIGS


def _rms_norm_table():
    from pvm_kernels.triton_ops import rms_norm
    return rms_norm.CONFIGS


def _visual_kv_table():
    from pvm_kernels.triton_ops import rms_norm, visual_kv
    return {key: cfg for key, cfg in rms_norm.CONFIGS.items()
            if key[0] == "fwd" and key[2] <= visual_kv.MAX_HEAD_DIM}


def _swiglu_table():
    from pvm_kernels.triton_ops import swiglu
    return swiglu.CONFIGS


def _paged_retrieval_table():
    from pvm_kernels.triton_ops import paged_retrieval
    return paged_retrieval.CONFIGS


#: The launchers' configuration tables, by name: what the gate must cover.
TABLES = {"retrieval": _retrieval_table, "merge": _merge_table, "rms_norm": _rms_norm_table,
          "swiglu": _swiglu_table, "visual_kv": _visual_kv_table,
          "paged_retrieval": _paged_retrieval_table}
DTYPES_OF_CLASS = {"16bit": ("float16", "bfloat16"), "fp32": ("float32",)}


def _table_arch(table: str, key: tuple) -> Optional[int]:
    """The capability a table entry is for (retrieval keys start with "sm80"/"sm90"; the
    merge table serves every architecture: None)."""
    return int(key[0][2:]) if table == "retrieval" else None


def _dtype_class(table: str, key: tuple) -> str:
    return key[2] if table == "retrieval" else key[1]


#: The layouts each table's launchers compile: the retrieval's padded and varlen (packed,
#: VARLEN=True) kernels, each also with q_norm fused (QN=True: "-qn") where the kernel has
#: it; the other tables have one.
LAYOUTS = {"retrieval": ("padded", "varlen"), "merge": ("",), "rms_norm": ("",),
           "swiglu": ("",), "visual_kv": ("mask", "no-mask"),
           "paged_retrieval": ("bs16", "bs32")}
#: The retrieval kernels with a QN (fused q_norm) variant, by table kernel name.
QN_KERNELS = ("fwd", "dq", "finish")
#: The retrieval kernels with a tensor-descriptor (TMA=True: "-tma") variant on sm_90.
TMA_KERNELS = ("fwd", "dq", "dkdv")


def _layout(table: str, constexprs: Dict[str, object]) -> str:
    if table == "visual_kv":
        return "mask" if constexprs.get("HAS_MASK") else "no-mask"
    if table == "paged_retrieval":  # the cache's block size is the key tile
        return f"bs{constexprs.get('BLOCK_N')}"
    if table != "retrieval":
        return ""
    return ("varlen" if constexprs.get("VARLEN") else "padded") + \
        ("-tma" if constexprs.get("TMA") else "") + ("-qn" if constexprs.get("QN") else "")


def _layouts(table: str, key: tuple) -> Tuple[str, ...]:
    """The layouts table entry ``key`` must be compiled in."""
    base = LAYOUTS[table]
    if table == "retrieval" and key[1] == "finish":  # no layout: elements of dk and dv
        base = ("padded",)
    if table == "retrieval" and key[1] in TMA_KERNELS and tma_entry(key[0], *key[2:]):
        base = base + tuple(f"{layout}-tma" for layout in base)
    if table == "retrieval" and key[1] in QN_KERNELS:
        return base + tuple(f"{layout}-qn" for layout in base)
    return base


def expected_entries(cap: int) -> set:
    """(table, entry, dtype, layout) that target sm_<cap> must have compiled: read from the
    tables (its own architecture's retrieval entries in both layouts, every merge entry)."""
    return {(table, repr(key), dt, layout) for table, get in TABLES.items() for key in get()
            if _table_arch(table, key) in (None, cap)
            for dt in DTYPES_OF_CLASS[_dtype_class(table, key)]
            for layout in _layouts(table, key)}


def uncovered_inputs() -> List[str]:
    """Inputs a launcher accepts whose table entry is missing (it would fail at launch):
    every head dim and row class the retrieval takes, every width the merge takes."""
    import torch

    from pvm_kernels.triton_ops import merge, paged_retrieval, retrieval, rms_norm
    from pvm_kernels.triton_ops.common import ARCH_SMS
    missing = set()
    for dtype in (torch.float16,):  # fp32 is not compiled: it takes the gather path
        for hd in range(retrieval.HEAD_DIM_MULTIPLE,
                        retrieval.MAX_HEAD_DIM[retrieval.dtype_class(dtype)] + 1,
                        retrieval.HEAD_DIM_MULTIPLE):
            if paged_retrieval.config_key(dtype, hd) not in paged_retrieval.CONFIGS:
                missing.add(f"paged_retrieval {paged_retrieval.config_key(dtype, hd)}")
    for dc, largest in retrieval.MAX_HEAD_DIM.items():
        for hd in range(retrieval.HEAD_DIM_MULTIPLE, largest + 1, retrieval.HEAD_DIM_MULTIPLE):
            for kernel in ("fwd", "dq", "dkdv", "delta", "finish"):
                for rc in ("decode", "prefill"):
                    for cap in ARCH_SMS:
                        key = (f"sm{cap}", kernel, dc, retrieval.block_d_for(hd), rc)
                        if key not in retrieval.CONFIGS:
                            missing.add(f"retrieval {key} (head dim {hd})")
    for dc in ("16bit", "fp32"):
        for bd in sorted({merge.block_d_for(D) for D in range(1, merge.MAX_D + 1)}):
            for kernel in ("fwd", "bwd"):
                if (kernel, dc, bd) not in merge.CONFIGS:
                    missing.add(f"merge {(kernel, dc, bd)}")
        for bn in sorted({rms_norm.block_n_for(N) for N in range(1, rms_norm.MAX_N + 1)}):
            for kernel in ("fwd", "bwd"):
                if (kernel, dc, bn) not in rms_norm.CONFIGS:
                    missing.add(f"rms_norm {(kernel, dc, bn)}")
    return sorted(missing)


def _entries(rec: dict) -> List[tuple]:
    layout = rec.get("layout", _layout(rec["table"], rec["constexprs"]))
    return [(rec["table"], entry, rec["dtype"], layout) for entry in rec["entries"]]


def check(records: List[dict], targets: List[int], only: Optional[str] = None) -> List[str]:
    failures = []
    for r in records:
        where = f"{r['kernel']} sm_{r['target']} {r['dtype']} {r['constexprs']} warps={r['num_warps']} stages={r['num_stages']}"
        if r.get("record_mismatch"):
            failures.append(f"stale or wrong compile record: {where}: {r['record_mismatch']} "
                            "(rewrite it: make compile-gate)")
        if r["error"]:
            failures.append(f"compile error: {where}\n    {r['error'].splitlines()[0] if r['error'] else ''}\n"
                            + "\n".join("    " + line for line in r["error"].splitlines()[1:12]))
            continue
        limit = TARGETS[r["target"]]["smem_block"]
        if r["shared"] > limit:
            failures.append(f"shared memory {r['shared']} B > {limit} B ({TARGETS[r['target']]['gpu']}): {where}")
        if r["local"] > 0:
            failures.append(f"register spill ({r['local']} B local memory per thread, "
                            f"{r['registers']} registers): {where}")
    failures += [f"accepted input without a table entry: {m}" for m in uncovered_inputs()]
    for cap in targets:
        want = expected_entries(cap)
        have = defaultdict(set)
        for r in records:
            if r["target"] == cap:
                for entry in _entries(r):
                    have[entry].add(r["signature"])
        for entry in sorted(e for e in want - set(have) if only in (None, e[0])):
            failures.append(f"sm_{cap}: table entry never compiled: {entry}")
        for entry, sigs in have.items():
            if entry[0] in ("retrieval", "paged_retrieval") and len(sigs) > 1:
                failures.append(f"sm_{cap}: {entry} compiled to {len(sigs)} specialisations; "
                                f"the launcher promises one")
    return failures


README_BEGIN = "<!-- compile-gate:begin (make compile-gate rewrites this block) -->"
README_END = "<!-- compile-gate:end -->"


def _rows(records: List[dict]) -> Dict[tuple, Dict[int, dict]]:
    """(kernel, dtype, tile, flags, warps, stages) -> {target: worst record of the row}."""
    rows = defaultdict(dict)
    for r in records:
        if r["error"]:
            continue
        c = r["constexprs"]
        tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_R", "BLOCK_N", "BLOCK_C",
                                             "BLOCK_D") if k in c)
        flags = ",".join(k.lower() for k in ("HAS_FFN", "ALIGNED", "VARLEN") if c.get(k))
        key = (r["kernel"], r["dtype"], tile, flags, r["num_warps"], r["num_stages"])
        cell = rows[key].get(r["target"])
        # Several specialisations may share a row (merge: gate dtype): show the worst.
        if cell is None or (r["registers"], r["shared"]) > (cell["registers"], cell["shared"]):
            rows[key][r["target"]] = dict(r, blocks=blocks_per_sm(Compiled(**{
                k: v for k, v in r.items() if k in Compiled.__dataclass_fields__})))
    return rows


def _table(rows: Dict[tuple, Dict[int, dict]], keep=lambda key: True) -> List[str]:
    out = ["| kernel | dtype | tile (BLOCK_M/R x N x C/D) | flags | warps | stages | "
           "H100: regs / smem B / spill B / blocks per SM | "
           "A100: regs / smem B / spill B / blocks per SM |",
           "|---|---|---|---|---|---|---|---|"]
    order = lambda k: (k[0], k[1], [int(x) for x in k[2].split("x")], k[3])  # noqa: E731
    for key in sorted(filter(keep, rows), key=order):
        kern, dt, tile, flags, w, st = key
        cells = []
        for cap in (90, 80):
            c = rows[key].get(cap)
            cells.append("-" if c is None else
                         f"{c['registers']} / {c['shared']:,} / {c['local']} / {c['blocks']}")
        out.append(f"| {kern} | {dt} | {tile} | {flags or '-'} | {w} | {st} | "
                   f"{cells[0]} | {cells[1]} |")
    return out


def _eight_b(key) -> bool:
    """The 8B shapes: retrieval at head dim 128, merge at D 4096, RMSNorm over P 512 and
    hd 128, visual K/V at hd 128, SwiGLU; aligned rows."""
    kern, _, tile, flags, _, _ = key
    if kern.startswith(("retrieval", "paged_retrieval")):
        return tile.endswith("x128")
    if kern.startswith("visual_kv"):
        return tile.split("x")[1] == "128" and "aligned" in flags
    if kern.startswith("rms_norm"):
        return tile.split("x")[1] in ("128", "512") and "aligned" in flags
    if kern.startswith("swiglu"):
        return "aligned" in flags
    return tile == "4096" and "aligned" in flags


def markdown(records: List[dict]) -> Tuple[str, str]:
    """The full resource document (every configuration) and the compile-gate block of
    docs/verification.md (the 8B shapes), both per kernel configuration and dtype, on H100
    (sm_90) and A100 (sm_80)."""
    import triton
    rows = _rows(records)
    made = (f"Generated by `make compile-gate` (tools/compile_gate.py) with triton "
            f"{triton.__version__}")
    doc = ["# Triton kernel resources per configuration", "",
           made + ": every specialisation the launchers can produce, compiled ahead of time "
           "for sm_90 (H100) and sm_80 (A100) on a machine with no GPU. Registers and local "
           "memory (spill) per thread, shared memory per block, resident blocks per SM from "
           "registers, shared memory and threads. Retrieval rows flagged varlen are the packed "
           "(cu_seqlens) kernels. Merge rows differ in flags (has_ffn: the "
           "FFN output is fused; aligned: 16-byte vector loads); of a row's gate dtypes the "
           "worst is shown.", ""] + _table(rows)
    readme = [README_BEGIN, "", made + "; the 8B shapes (head dim 128, D 4096), every row "
              "in [kernel_resources.md](kernel_resources.md):", ""] + \
        _table(rows, _eight_b) + ["", README_END]
    return "\n".join(doc) + "\n", "\n".join(readme)


def replace_readme_block(path: str, block: str) -> None:
    text = open(path).read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{path} has no compile-gate block ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as fh:
        fh.write(head + block + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="80,90", help="compute capabilities (default 80,90)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel target processes")
    ap.add_argument("--json", help="write every record here")
    ap.add_argument("--markdown", help="write the per-configuration resource table here")
    ap.add_argument("--readme", help="rewrite the compile-gate block (8B rows) of this markdown file (docs/verification.md)")
    ap.add_argument("--only", choices=sorted(TABLES), help="one table's kernels only "
                    "(a partial run: coverage of the other table is not checked)")
    ap.add_argument("--record", help="the compile record to recall from (default: "
                    "tools/compile_record/triton-<version>.json)")
    ap.add_argument("--no-recall", action="store_true",
                    help="compile every specialisation, recalling nothing")
    ap.add_argument("--write-record", action="store_true",
                    help="rewrite the record (--record) with this run's results")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.worker is not None:
        json.dump(run_target(args.worker, not args.no_progress, args.only,
                             None if args.no_recall else args.record), sys.stdout)
        return 0

    import triton
    record = args.record or compile_record.record_path(triton.__version__)
    targets = [int(t) for t in args.targets.split(",")]
    start = time.perf_counter()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    records: List[dict] = []
    pending = list(targets)
    running = []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            cap = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(cap),
                   "--record", record] + (["--no-recall"] if args.no_recall else [])
            if args.only:
                cmd += ["--only", args.only]
            if args.no_progress or cap != targets[0]:
                cmd.append("--no-progress")
            running.append((cap, subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)))
        cap, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"sm_{cap}: the gate's worker failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        records.extend(json.loads(out))
    failures = check(records, targets, args.only)
    elapsed = time.perf_counter() - start
    n_ok = sum(1 for r in records if not r["error"])
    how = {h: sum(1 for r in records if r["how"] == h)
           for h in ("compiled", "recalled", "spot-checked")}
    print(f"compile gate (triton {triton.__version__}): {len(records)} specialisations "
          f"({n_ok} without error: {how['compiled']} compiled, {how['recalled']} recalled from "
          f"{os.path.relpath(record)}, {how['spot-checked']} recalled and compiled again) for "
          + ", ".join(f"sm_{t}" for t in targets) +
          f" in {elapsed:.0f} s; {len(failures)} failure(s)")
    for f in failures:
        print("FAIL " + f)
    if args.write_record:
        results = {r["compile_key"]: compile_record.entry(
                       r["kernel"], r["target"],
                       compile_record.result_of(r["registers"], r["local"], r["shared"], r["error"]))
                   for r in records if r["compile_key"]}
        if not args.no_recall or args.only:
            results = {**compile_record.load(record), **results}
        compile_record.save(record, triton.__version__, results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(triton=triton.__version__, records=records, failures=failures), fh,
                      indent=1)
    if args.markdown or args.readme:
        doc, block = markdown(records)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(doc)
        if args.readme:
            replace_readme_block(args.readme, block)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
