"""Build and drive the CUDA emulator (csrc/emu) from Python: tests and tools only.

Two shared libraries, both cached under ``build/cuda_emu`` by a hash of what they are built
from, so a second run builds nothing:

* the kernel library ``libpvm_cuda_emu.so`` (torch-free, seconds to build): the emulator
  runtime plus the real ``csrc/cuda/*.cu`` compiled as C++ by g++, with the shim headers
  of ``csrc/emu/include`` first on the include path. Its C API (``capi.cpp``) is used here
  through ctypes and by the harness below;
* the torch harness (``torch_ops.cpp``, built once with torch.utils.cpp_extension): the ops
  ``pvm_kernels::cuda_emulated_*`` on CPU tensors, running the same host-side op bodies as
  the CUDA backend (``csrc/native_common.h``) and launching through the kernel library
  named by ``$PVM_CUDA_EMU_LIB`` (set here unless already set, e.g. by
  tools/sync_mutations.py pointing the tests at a mutated build).

``register_backend()`` makes the ops a pvm_kernels backend named ``cuda_emulated`` (CPU
tensors, never a default), so the ordinary test helpers run the CUDA kernels unchanged.
The package itself never imports this module.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
REPO = os.path.dirname(CSRC)
BUILD_ROOT = os.path.join(REPO, "build", "cuda_emu")
LIB_ENV = "PVM_CUDA_EMU_LIB"
BACKEND = "cuda_emulated"

CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++20", "-O2", "-g0", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra",
            "-Wno-unknown-pragmas", "-Werror"]


def kernel_sources(csrc: str = CSRC) -> List[str]:
    """Files the kernel library is compiled from: every .cu of csrc/cuda, the emulator's
    own .cu (self-tests) and its runtime .cpp (not the torch harness)."""
    cu = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu"))) + \
        sorted(glob.glob(os.path.join(csrc, "emu", "*.cu")))
    cpp = [os.path.join(csrc, "emu", f) for f in ("cuemu.cpp", "cuemu_mma.cpp", "capi.cpp")]
    return cu + cpp


def _hash_inputs(paths: Iterable[str], extra: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.path.relpath(p, os.path.dirname(p)).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        return "?"


def _headers(csrc: str) -> List[str]:
    pats = ["cuda/*.cuh", "cuda/*.h", "*.h", "emu/*.h", "emu/include/*.h"]
    return [p for pat in pats for p in glob.glob(os.path.join(csrc, pat))]


def _object(src: str, csrc: str, flags: Sequence[str], includes: Sequence[str]) -> str:
    """The object file of one source, compiled once per content: the source, every header
    under ``csrc``, the flags and the compiler make its key (paths do not). The mutation
    tools build a library per mutant of one kernel file; with the other files' objects
    reused, a mutant costs that file's compile (0.5-2 s) instead of all nine (10.5 s)."""
    key = _hash_inputs([src] + _headers(csrc), list(flags) + [_compiler_version()])
    cache = os.path.join(BUILD_ROOT, "objects")
    obj = os.path.join(cache, f"{os.path.basename(src)}-{key}.o")
    if os.path.exists(obj):
        return obj
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(src) + "-", suffix=".o", dir=cache)
    os.close(fd)
    lang = ["-x", "c++"] if src.endswith(".cu") else []
    cmd = [CXX] + list(flags) + list(includes) + lang + ["-c", src, "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        os.remove(tmp)
        raise RuntimeError(f"building the emulated kernels failed:\n{' '.join(cmd)}\n"
                           f"{res.stdout}{res.stderr}")
    os.replace(tmp, obj)  # atomic: a concurrent compile of the same key may win
    return obj


def build_kernel_lib(csrc: str = CSRC, defines: Sequence[str] = (), out_root: str = BUILD_ROOT,
                     quiet: bool = True) -> str:
    """Path of the kernel library built from the sources under ``csrc`` (cached by hash).

    ``defines``: extra -D flags (e.g. ``PVM_FOLD_GRID_X=5``). Raises RuntimeError with the
    compiler's output if the build fails.
    """
    sources = kernel_sources(csrc)
    flags = CXXFLAGS + [f"-D{d}" for d in defines]
    key = _hash_inputs(sources + _headers(csrc), flags + [_compiler_version()])
    out_dir = os.path.join(out_root, f"kernels-{key}")
    lib = os.path.join(out_dir, "libpvm_cuda_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="kernels-", dir=out_root)
    includes = ["-I", os.path.join(csrc, "emu", "include"), "-I", csrc, "-I", os.path.join(csrc, "emu")]
    try:
        # one compiler at a time: the machine has 2 cores to share
        objs = [_object(src, csrc, flags, includes) for src in sources]
        tmp_lib = os.path.join(tmp, "libpvm_cuda_emu.so")
        res = subprocess.run([CXX, "-shared", "-o", tmp_lib] + objs, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"linking the emulated kernels failed:\n{res.stdout}{res.stderr}")
        try:
            os.rename(tmp, out_dir)  # atomic: a concurrent build of the same key may win
        except OSError:
            pass
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"built {lib}", file=sys.stderr)
    return lib


def kernel_lib_path() -> str:
    """The kernel library the ops use: $PVM_CUDA_EMU_LIB, else a fresh (cached) build."""
    path = os.environ.get(LIB_ENV)
    if not path:
        path = build_kernel_lib()
        os.environ[LIB_ENV] = path
    return path


# ---- ctypes view of the kernel library ------------------------------------------------------

class KernelLib:
    """The C API of one kernel library (capi.cpp, selftest_kernels.cu)."""

    def __init__(self, path: str):
        self.path = path
        self.dll = ctypes.CDLL(path)
        d = self.dll
        d.pvm_emu_configure.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int]
        d.pvm_emu_error_string.restype = ctypes.c_char_p
        d.pvm_emu_last_message.restype = ctypes.c_char_p
        d.pvm_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 3
        d.pvm_emu_selftest.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_void_p, ctypes.c_int64]
        d.pvm_emu_convert.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p]
        d.pvm_emu_decode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        d.pvm_emu_retrieval_fwd_dry.argtypes = [ctypes.c_int64] * 6
        d.pvm_emu_site_stats.argtypes = [ctypes.c_char_p] + [ctypes.POINTER(ctypes.c_int64)] * 2

    def configure(self, seed: int = 0, sample_blocks: int = 0, guard_mode: int = 0) -> None:
        """Scheduling seed (0, 1: fixed orders; more: random), block sampling (0 = all)
        and guard placement (0: buffers end at a guard page, 1: start after one)."""
        self.dll.pvm_emu_configure(seed, sample_blocks, guard_mode)

    def stats(self) -> Dict[str, int]:
        vals = [ctypes.c_int64() for _ in range(3)]
        self.dll.pvm_emu_stats(*[ctypes.byref(v) for v in vals])
        return dict(zip(("launches", "blocks", "context_switches"), (v.value for v in vals)))

    def site_stats(self, file: str) -> Dict[str, int]:
        """Launches and blocks run from the launch sites in source file ``file`` (a file
        name, e.g. "retrieval_tc_fwd.cu"): which kernel a dispatch really ran."""
        vals = [ctypes.c_int64() for _ in range(2)]
        self.dll.pvm_emu_site_stats(file.encode(), *[ctypes.byref(v) for v in vals])
        return dict(zip(("launches", "blocks"), (v.value for v in vals)))

    def error_string(self, err: int) -> str:
        return self.dll.pvm_emu_error_string(err).decode()

    def last_message(self) -> str:
        return self.dll.pvm_emu_last_message().decode()

    def selftest(self, name: str, mode: int = 0, n_out: int = 128, inp=None):
        """(status, message, out) of self-test kernel ``name`` (selftest_kernels.cu)."""
        import torch
        out = torch.zeros(n_out, dtype=torch.float32)
        inp = torch.zeros(0, dtype=torch.float32) if inp is None else inp.float().contiguous()
        err = self.dll.pvm_emu_selftest(name.encode(), mode, out.data_ptr(), n_out, inp.data_ptr(),
                                        inp.numel())
        return err, self.last_message(), out

    def retrieval_fwd_dry(self, B, T, H, Hkv, Nv, hd) -> int:
        return self.dll.pvm_emu_retrieval_fwd_dry(B, T, H, Hkv, Nv, hd)

    # ---- the tensor-core wrappers (csrc/cuda/mma.cuh) ----

    def mma_layout(self, operand: str):
        """The emulator's m16n8k16 fragment layout of operand "A", "B" or "C": an int tensor
        [32, n, 2] of (row, col) per (lane, element); for B, row is k and col is n."""
        import torch
        which = "ABC".index(operand)
        n = 8 if which == 0 else 4
        rows = (ctypes.c_int * (32 * n))()
        cols = (ctypes.c_int * (32 * n))()
        assert self.dll.pvm_emu_mma_layout(which, rows, cols) == n
        return torch.stack([torch.tensor(list(rows)), torch.tensor(list(cols))], -1).view(32, n, 2)

    def mma_selftest(self, a, b, c=None, ldm: int = 4, a_rows: int = 16):
        """Runs csrc/cuda/mma_selftest.cu on 16 x 16 tiles a (M x K) and b (K x N) of bf16 or
        fp16 (and fp32 c). Returns (status, message, outputs) with outputs a dict of a_f32, d
        (B by ldmatrix .trans), d_t (B^T by ldmatrix) and d16 (d rounded by pack2)."""
        import torch
        dtype = a.dtype
        code = {torch.float16: 1, torch.bfloat16: 2}[dtype]
        a, b = a.contiguous(), b.to(dtype).contiguous()
        bt = b.t().contiguous()
        c = None if c is None else c.float().contiguous()
        out = {k: torch.zeros(16, 16) for k in ("a_f32", "d", "d_t")}
        out["d16"] = torch.zeros(16, 16, dtype=dtype)
        ptr = ctypes.c_void_p
        err = self.dll.pvm_emu_mma_selftest(
            ctypes.c_int(code), ctypes.c_int(ldm), ctypes.c_int(a_rows), ptr(a.data_ptr()),
            ptr(b.data_ptr()), ptr(bt.data_ptr()), ptr(None if c is None else c.data_ptr()),
            *[ptr(out[k].data_ptr()) for k in ("a_f32", "d", "d_t", "d16")])
        return err, self.last_message(), out


_LIBS: Dict[str, KernelLib] = {}


def kernel_lib(path: Optional[str] = None) -> KernelLib:
    path = path or kernel_lib_path()
    if path not in _LIBS:
        _LIBS[path] = KernelLib(path)
    return _LIBS[path]


# ---- torch ops and backend ----------------------------------------------------------------

_OPS_READY = False
_LIBRARY = None  # the torch.library.Library holding the op definitions (kept alive)


def _harness_build_dir() -> str:
    import torch
    files = [os.path.join(HERE, "torch_ops.cpp"), os.path.join(CSRC, "native_common.h"),
             os.path.join(CSRC, "pvm_params.h")]
    key = _hash_inputs(files, [torch.__version__, _compiler_version()])
    return os.path.join(BUILD_ROOT, f"harness-{key}")


def ensure_ops() -> None:
    """Define pvm_kernels::cuda_emulated_* (shared schemas), load their CPU implementations
    (the harness, built on first use) and attach the shared fake/autograd formulas."""
    global _OPS_READY, _LIBRARY
    if _OPS_READY:
        return
    import torch
    from torch.utils import cpp_extension

    from pvm_kernels.ops import registration

    kernel_lib_path()  # the harness reads $PVM_CUDA_EMU_LIB at its first call
    lib = torch.library.Library(registration.NAMESPACE, "FRAGMENT")
    for op, schema in registration.SCHEMAS.items():
        lib.define(f"{BACKEND}_{op}{schema}")
    _LIBRARY = lib
    build_dir = _harness_build_dir()
    os.makedirs(build_dir, exist_ok=True)
    old_jobs = os.environ.get("MAX_JOBS")
    os.environ["MAX_JOBS"] = "1"
    try:
        cpp_extension.load(name="pvm_cuda_emu_ops", sources=[os.path.join(HERE, "torch_ops.cpp")],
                           extra_include_paths=[CSRC], extra_cflags=["-O1"], build_directory=build_dir,
                           is_python_module=False, with_cuda=False, verbose=False)
    finally:
        if old_jobs is None:
            os.environ.pop("MAX_JOBS", None)
        else:
            os.environ["MAX_JOBS"] = old_jobs
    registration.attach_fake_and_autograd(BACKEND)
    _OPS_READY = True


def register_backend() -> None:
    """Register the ``cuda_emulated`` backend (CPU tensors only, never the default)."""
    ensure_ops()
    from pvm_kernels.ops.registration import get_op
    from pvm_kernels.ops.registry import Backend, register_backend as _register

    def retrieval(q, k, v, key_mask, kv_len, scale):
        return get_op(BACKEND, "retrieval_fwd")(q, k, v, key_mask, kv_len, scale)[0]

    def retrieval_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
        return get_op(BACKEND, "retrieval_varlen_fwd")(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k, scale)[0]

    def merge(expanded, gate, keep, ffn_output, eps):
        return get_op(BACKEND, "merge_fwd")(expanded, gate, keep, ffn_output, eps)[0]

    def check(device_type: str) -> Optional[str]:
        return None if device_type == "cpu" else \
            f"the cuda_emulated backend runs the CUDA kernels on CPU tensors, not '{device_type}'"

    _register(Backend(BACKEND, retrieval, merge, check=check, default_rank={},
                      retrieval_varlen=retrieval_varlen))


def unregister_backend() -> None:
    from pvm_kernels.ops.registry import unregister_backend as _unregister
    _unregister(BACKEND)
