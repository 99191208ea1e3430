"""CMakeLists.txt builds the csrc/ sources standalone against libtorch, and they run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                    reason="cmake and ninja are needed for the standalone build")
def test_cmake_builds_loadable_libraries(tmp_path):
    build = tmp_path / "cmake"
    # One CUDA architecture: what is under test is the CMake build, not the code generation
    # for each GPU (make install builds sm_80 and sm_90); 34 s instead of 50 on 2 cores.
    run = subprocess.run(["make", "-s", "cmake-build", f"CMAKE_BUILD_DIR={build}",
                          f"PYTHON={sys.executable}", "TORCH_CUDA_ARCH_LIST=9.0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    libs = sorted(p.name for p in build.glob("libpvm_kernels_*.so"))
    assert "libpvm_kernels_cpu.so" in libs
    # A fresh interpreter without pvm_kernels: the library alone defines and runs the ops.
    probe = (
        "import sys, torch\n"
        "for lib in sys.argv[1:]: torch.ops.load_library(lib)\n"
        "q = torch.randn(1, 3, 4, 16); k = torch.randn(1, 5, 1, 16)\n"
        "out, lse = torch.ops.pvm_kernels.native_retrieval_fwd(q, k, k, None, None, 0.25)\n"
        "p = torch.softmax(torch.einsum('bthd,bnd->bhtn', q, k[:, :, 0]) * 0.25, -1)\n"
        "ref = torch.einsum('bhtn,bnd->bthd', p, k[:, :, 0])\n"
        "assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()\n"
    )
    check = subprocess.run([sys.executable, "-c", probe, *[str(build / n) for n in libs]],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
                           cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
