"""How the compiled extensions are built: their sources and flags, and the record of what a
build produced. One recipe for the install-time build (setup.py) and for the just-in-time
rebuild of the shipped sources (``pvm_kernels.ops.native_loader``), so the two cannot drift.

No torch import at module level: setup.py loads this file by path, before the package it
belongs to is importable.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Dict, List, Optional

#: The compiled extensions, by module name inside ``pvm_kernels``: ``_C`` defines the op
#: schemas and the CPU kernels, ``_C_cuda`` the CUDA kernels (it needs ``_C`` loaded first).
EXTENSIONS = ("_C", "_C_cuda")

#: Written beside the extensions by every build that builds them: which torch they were
#: built against and which extension was skipped, and why.
BUILD_INFO = "_build_info.json"

#: Where an installed wheel keeps the C++/CUDA sources for the just-in-time rebuild
#: (a folder of the package); a source checkout uses its top-level ``csrc/``.
SHIPPED_SOURCES = "_csrc"

# The kernel sources, relative to the csrc root. emu/ (the CUDA emulator of the tests) is
# not part of any extension and is not shipped.
_SOURCE_GLOBS = {"_C": ["ops.cpp", "cpu/*.cpp"], "_C_cuda": ["cuda/*.cpp", "cuda/*.cu"]}
_SHIPPED_GLOBS = ["*.h", "*.cpp", "cpu/*", "cuda/*"]

CXX_FLAGS = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch 2.14)
NVCC_FLAGS = ["-O3", "-lineinfo"]


def openmp_flags() -> List[str]:
    """at::parallel_for is a header template whose ``#pragma omp parallel`` is compiled into
    the extension: without -fopenmp it silently runs serially (the CPU kernels used one core
    of two until this flag: T 512, Nv 1024, 9.2 ms on 1 thread and 8.4 ms on 2). The OpenMP
    runtime is torch's own libgomp.so.1, already loaded by libtorch_cpu."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def link_flags() -> List[str]:
    """libstdc++ linked as the shared library torch itself uses. A toolchain whose library
    folder has libstdc++.a but no usable libstdc++.so (the GPU boxes' /opt/gcc: a dangling
    symlink) otherwise links a private static copy into the extension; with Ubuntu Python's
    -Wl,-Bsymbolic-functions its functions bind to that copy but its data (std::locale facet
    ids) to the process's libstdc++.so.6, and formatting the first number into an error
    message (TORCH_CHECK(..., q.sizes())) segfaults."""
    return ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def sources(csrc: str, extension: str) -> List[str]:
    """Absolute paths of the sources of ``extension`` ("_C" or "_C_cuda") under ``csrc``,
    sorted, so every build lists them in the same order."""
    found = []
    for pattern in _SOURCE_GLOBS[extension]:
        found += sorted(glob.glob(os.path.join(csrc, pattern)))
    return [os.path.abspath(f) for f in found]


def shipped_files(csrc: str) -> List[str]:
    """The files under ``csrc`` a wheel carries for the just-in-time rebuild, relative to it."""
    out = []
    for pattern in _SHIPPED_GLOBS:
        out += [os.path.relpath(f, csrc) for f in sorted(glob.glob(os.path.join(csrc, pattern)))
                if os.path.isfile(f)]
    return out


def torch_identity(torch_module) -> Dict[str, Optional[str]]:
    """What an extension must match to load: the torch release and its exact commit (nightly
    builds share release strings), and its CUDA version."""
    return {"torch": torch_module.__version__,
            "torch_git": getattr(torch_module.version, "git_version", None),
            "cuda": torch_module.version.cuda}


def write_build_info(folder: str, identity: Dict[str, Optional[str]],
                     extensions: Dict[str, Optional[str]]) -> str:
    """Record a build in ``folder``/_build_info.json: ``identity`` (torch_identity of the torch
    it was built against) and, per extension name, None if built or why it was not."""
    path = os.path.join(folder, BUILD_INFO)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(identity, extensions={name: {"built": why is None, "why_not": why}
                                             for name, why in extensions.items()}),
                  f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def read_build_info(folder: str) -> Optional[dict]:
    """The build record in ``folder``, or None when there is none (no extension was built)."""
    try:
        with open(os.path.join(folder, BUILD_INFO), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
