"""Loading the compiled extensions, and only ones built for the torch that runs.

An extension compiled against one torch and loaded into another may fail to link or, worse,
load and misbehave (C++ ABI and op schemas move between releases). The build records the
torch it used (``_build_info.json``, pvm_kernels/build_spec.py); here:

- built for this very torch: the installed extension is imported;
- built for another torch (say `pip install .` built against the torch of its isolated build
  while another one is installed, or torch was upgraded since): the installed extension is
  left alone and the shipped sources are compiled for the running torch, once, with a
  progress line, into a cache folder per torch build (``PVM_KERNELS_CACHE``, default
  ``~/.cache/pvm_kernels``); later imports load that build at once. With
  ``PVM_JIT_BUILD=0``, or when that build fails, the backend is off and one warning line at
  import says so and how to fix it; ``backend_status()`` gives the same reason;
- not built at all (``PVM_SKIP_EXTENSIONS=1``): the backend is off, silently (on purpose).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .. import build_spec

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOG = logging.getLogger("pvm_kernels")

#: How to rebuild against the running torch, quoted in every mismatch message.
REINSTALL_FIX = ("reinstall pvm-kernels against this torch: pip install --no-build-isolation "
                 "--force-reinstall --no-deps <pvm-kernels source or sdist>")


@dataclass(frozen=True)
class ExtensionLoad:
    """How one extension was (or was not) loaded.

    ``how``: "installed" (the build of the install), "jit" (compiled for the running torch by
    this package, ``path`` its library), or "none". ``error``: None when loaded, else why not.
    ``built_for``: the torch release the installed extension was built against, if known.
    """

    name: str
    how: str
    error: Optional[str] = None
    path: Optional[str] = None
    built_for: Optional[str] = None


def build_info() -> Optional[dict]:
    """The installed build's record (build_spec.write_build_info), None if nothing was built."""
    return build_spec.read_build_info(_PACKAGE_DIR)


def sources_dir() -> Optional[str]:
    """The C++/CUDA sources for a rebuild: the wheel's copy, else a source checkout's csrc/."""
    for candidate in (os.path.join(_PACKAGE_DIR, build_spec.SHIPPED_SOURCES),
                      os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(candidate, "ops.cpp")):
            return candidate
    return None


def cache_dir(extension: str) -> str:
    """Where the just-in-time build of ``extension`` for the running torch lives: one folder
    per torch build (release, commit, CUDA) and Python version."""
    root = os.environ.get("PVM_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "pvm_kernels")
    ident = build_spec.torch_identity(torch)
    tag = f"torch-{ident['torch']}-{(ident['torch_git'] or 'unknown')[:12]}-" \
          f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, tag.replace("+", "_"), extension)


def _same_torch(info: dict) -> bool:
    ident = build_spec.torch_identity(torch)
    return all(info.get(key) == ident[key] for key in ("torch", "torch_git", "cuda"))


def _import_installed(name: str, built_for: Optional[str]) -> ExtensionLoad:
    try:
        importlib.import_module(f"pvm_kernels.{name}")
    except ImportError as exc:
        return ExtensionLoad(name, "none", f"pvm_kernels.{name} failed to load ({exc})",
                             built_for=built_for)
    return ExtensionLoad(name, "installed", built_for=built_for)


def _jit_build(name: str) -> str:
    """Compile ``name`` from the shipped sources for the running torch (or reuse the cached
    build) and load it; returns the library's path. Raises on any failure."""
    csrc = sources_dir()
    if csrc is None:
        raise RuntimeError("this install carries no C++ sources to rebuild from")
    # cpp_extension warns at import when it guesses CUDA_HOME on a machine without a GPU;
    # the C++-only build does not use it.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _compile_and_load(name, csrc)
    finally:
        quiet.setLevel(level)


def _compile_and_load(name: str, csrc: str) -> str:
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    folder = cache_dir(name)
    os.makedirs(folder, exist_ok=True)
    library = os.path.join(folder, f"pvm_kernels{name}.so")
    fresh = not os.path.exists(library)
    if fresh:
        print(f"pvm_kernels: compiling the {name} extension for torch {torch.__version__} "
              f"(once; cached in {folder}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cuda = name == "_C_cuda"
    openmp = [] if cuda else build_spec.openmp_flags()
    cpp_extension.load(
        name=f"pvm_kernels{name}", sources=build_spec.sources(csrc, name),
        extra_include_paths=[csrc], extra_cflags=build_spec.CXX_FLAGS + openmp,
        extra_cuda_cflags=build_spec.NVCC_FLAGS if cuda else None,
        extra_ldflags=build_spec.link_flags() + openmp, build_directory=folder,
        is_python_module=False, verbose=False)
    if fresh:
        print(f"pvm_kernels: compiled the {name} extension in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return library


def load_extension(name: str) -> ExtensionLoad:
    """Load extension ``name`` ("_C" or "_C_cuda") as the module docstring says; warns (one
    line, logger "pvm_kernels") only where an installed extension cannot serve this torch."""
    info = build_info()
    installed = importlib.util.find_spec(f"pvm_kernels.{name}") is not None
    entry = (info or {}).get("extensions", {}).get(name, {})
    built_for = (info or {}).get("torch")
    if not installed:
        why = entry.get("why_not") or (
            "this install has no compiled extensions (PVM_SKIP_EXTENSIONS=1, or a source "
            "tree that was never built): `pip install .` builds them")
        return ExtensionLoad(name, "none", f"pvm_kernels.{name} is not built: {why}",
                             built_for=built_for)
    if info is None or _same_torch(info):
        return _import_installed(name, built_for)
    mismatch = (f"pvm_kernels.{name} was built for torch {built_for} but torch "
                f"{torch.__version__} is running")
    if name == "_C_cuda" and not torch.cuda.is_available():
        # No GPU: the cuda backend cannot run anyway; a GPU machine rebuilds it on import.
        return ExtensionLoad(name, "none", f"{mismatch}; it is rebuilt for this torch on the "
                             "first import where a GPU is visible", built_for=built_for)
    if os.environ.get("PVM_JIT_BUILD") == "0":
        error = f"{mismatch}, and PVM_JIT_BUILD=0 forbids rebuilding it: {REINSTALL_FIX}"
    else:
        try:
            return ExtensionLoad(name, "jit", path=_jit_build(name), built_for=built_for)
        except Exception as exc:  # noqa: BLE001 - any compiler, linker or loader failure
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            error = f"{mismatch}, and rebuilding it for this torch failed ({reason}): " \
                    f"{REINSTALL_FIX}"
    _LOG.warning("pvm_kernels: the %s backend is off: %s", "cuda" if name == "_C_cuda" else "cpu",
                 error)
    return ExtensionLoad(name, "none", error, built_for=built_for)


def load_all() -> Dict[str, ExtensionLoad]:
    """Both extensions, _C first: it defines the op schemas _C_cuda implements."""
    loads = {"_C": load_extension("_C")}
    if loads["_C"].error is None:
        loads["_C_cuda"] = load_extension("_C_cuda")
    else:
        loads["_C_cuda"] = ExtensionLoad("_C_cuda", "none",
                                         "needs pvm_kernels._C, which defines the op schemas",
                                         built_for=loads["_C"].built_for)
    return loads
