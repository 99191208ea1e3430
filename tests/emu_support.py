"""Support shared by the tests that run the CUDA kernels on CPU in the project's CUDA emulator
(csrc/emu) and read the SASS of the built CUDA extension.

Importing this module skips the importing test module where the emulator cannot be built
(no g++ on Linux) and makes ``emulator`` (csrc/emu/emulator.py) importable. The fixtures
``emulated_backend`` and ``lib`` (tests/conftest.py) go with it."""
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU_DIR = os.path.join(REPO, "csrc", "emu")

if sys.platform != "linux" or shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("the CUDA emulator needs g++ on Linux", allow_module_level=True)

sys.path.insert(0, EMU_DIR)
import emulator  # noqa: E402

BACKEND = emulator.BACKEND
SMS = 132  # what the emulator plans for (kEmulatedSmCount)


# ---- SASS and resources of the CUDA extension ---------------------------------------------------

def cuda_library() -> str:
    """The built CUDA extension (skips where no CUDA build is expected)."""
    import glob

    import pvm_kernels
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_native import cuda_build_expected
    if not cuda_build_expected():
        pytest.skip("no CUDA toolchain here, so no CUDA extension is expected")
    libs = glob.glob(os.path.join(os.path.dirname(pvm_kernels.__file__), "_C_cuda*.so"))
    assert libs, "CUDA extension not built"
    return libs[0]


def cuobjdump(*args: str) -> str:
    """stdout of triton's cuobjdump with ``args`` on the CUDA extension (e.g. "-sass",
    "-arch", "sm_80" or "-res-usage", "-arch", "sm_90"); skips where the tool is absent."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's cuobjdump is not installed")
    return subprocess.run([tool, *args, cuda_library()], capture_output=True, text=True, timeout=300).stdout


# The element type of a kernel template instance, as the mangled name spells it.
MANGLED_DTYPE = {"13__nv_bfloat16": "bf16", "6__half": "f16"}
TC_OPS = ("HMMA", "LDSM", "LDGSTS", "LDGDEPBAR", "DEPBAR")


def sass_counts(arch: str, function: str, key, ops=TC_OPS) -> dict:
    """{key(m): {instruction: count}} over the SASS of every function whose name matches the
    regex ``function`` (m its match), counting the instructions (with their modifiers) whose
    opcode is one of ``ops``."""
    op_re = r"\b((?:" + "|".join(ops) + r")(?:\.[A-Z0-9_]+)*)"
    counts, current = {}, None
    for line in cuobjdump("-sass", "-arch", arch).splitlines():
        if "Function :" in line:
            m = re.search(function, line)
            current = key(m) if m else None
            if current:
                counts[current] = {}
        elif current:
            for op in re.findall(op_re, line):
                counts[current][op] = counts[current].get(op, 0) + 1
    return counts
