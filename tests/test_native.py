"""The compiled backends: build present, schemas shared with the Triton ops, selection."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pvm_kernels import FusedPVM, PVMConfig, pvm_retrieval
from pvm_kernels.ops import native_backend, registration
from pvm_kernels.ops.registry import resolve_backend


def cuda_build_expected() -> bool:
    """setup.py builds _C_cuda when torch has CUDA and nvcc is found (CUDA_HOME or default)."""
    if os.environ.get("PVM_SKIP_CUDA") == "1" or not torch.version.cuda:
        return False
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_cpu_extension_is_built_and_loaded():
    assert native_backend.CPU_LOAD_ERROR is None, native_backend.CPU_LOAD_ERROR


def test_cuda_extension_is_built_and_links():
    """Loading the library resolves every symbol: a link break fails here, GPU or not."""
    if not cuda_build_expected():
        pytest.skip("no CUDA toolchain here, so no CUDA extension is expected")
    assert importlib.util.find_spec("pvm_kernels._C_cuda") is not None, "CUDA extension not built"
    assert native_backend.CUDA_LOAD_ERROR is None, native_backend.CUDA_LOAD_ERROR


def _built_extensions():
    import glob
    import pvm_kernels
    return sorted(glob.glob(os.path.join(os.path.dirname(pvm_kernels.__file__), "_C*.so")))


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf")
def test_extensions_use_the_shared_libstdcxx():
    """The extensions link the libstdc++.so.6 torch uses, never a private static copy: on the
    GPU boxes' toolchain (libstdc++.a, dangling libstdc++.so) a static copy made every
    TORCH_CHECK message with a number in it segfault (locale data bound to the process's
    library, code to the copy)."""
    libs = _built_extensions()
    if not libs:
        pytest.skip("no extension built")
    for lib in libs:
        dynamic = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
        assert "[libstdc++.so.6]" in dynamic, f"{lib} does not link libstdc++.so.6"
        symbols = subprocess.run(["readelf", "-W", "--dyn-syms", lib], capture_output=True,
                                 text=True).stdout
        # std::ostream::_M_insert<long>, defined (not UND) only when libstdc++ is inside
        assert not any("_ZNSo9_M_insertIlEERSoT_" in line and " UND " not in line
                       for line in symbols.splitlines()), f"{lib} carries its own libstdc++"


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf")
def test_cpu_extension_runs_parallel_for_on_threads():
    """at::parallel_for is a header template: built without -fopenmp its `omp parallel`
    vanishes and every CPU kernel runs on one thread (found on the 2-core CI machine: no
    speed-up from a second thread). Compiled with OpenMP, the library calls GOMP_parallel."""
    cpu_libs = [p for p in _built_extensions() if os.path.basename(p).startswith("_C.")]
    if not cpu_libs:
        pytest.skip("no CPU extension built")
    symbols = subprocess.run(["readelf", "-W", "--dyn-syms", cpu_libs[0]], capture_output=True,
                             text=True).stdout
    assert "GOMP_parallel" in symbols, f"{cpu_libs[0]} was compiled without OpenMP"


@pytest.mark.parametrize("op", sorted(registration.SCHEMAS))
def test_native_schema_matches_the_shared_schema(op):
    """csrc/ops.cpp must declare exactly the schemas the Python fakes and autograd assume."""
    native = str(registration.get_op("native", op)._schema)
    triton = str(registration.get_op("triton", op)._schema)
    assert native.split("(", 1)[1] == triton.split("(", 1)[1]


def test_cpu_is_the_default_on_cpu():
    assert resolve_backend(None, torch.device("cpu")).name == "cpu"


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="backend='cuda' cannot run on device 'cpu'"):
        resolve_backend("cuda", torch.device("cpu"))


def test_native_ops_reject_float64_with_a_clear_error():
    q = torch.randn(1, 2, 2, 16, dtype=torch.float64)
    k = torch.randn(1, 3, 1, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'cpu' supports float16, bfloat16, float32"):
        pvm_retrieval(q, k, k, backend="cpu")


def test_native_op_checks_arguments_itself():
    """Direct op calls (bypassing the Python checks) still get a clear error, not a crash."""
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 3, 3, 16)
    with pytest.raises(RuntimeError, match="q heads must be a multiple of k heads"):
        registration.get_op("native", "retrieval_fwd")(q, k, k, None, None, 0.25)


def test_block_runs_on_the_default_cpu_backend():
    block = FusedPVM(PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, intermediate_size=128, pvm_hidden_size=64))
    h, visual = torch.randn(2, 3, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        block.gate_alpha.fill_(1.0)
    torch.testing.assert_close(block(h, visual), block(h, visual, backend="reference"),
                               rtol=1e-5, atol=1e-6)


def _sass(lib: str, arch: str) -> str:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("triton's cuobjdump is not installed")
    return subprocess.run([tool, "-sass", "-arch", arch, lib], capture_output=True, text=True,
                          timeout=300).stdout


def _cuda_library() -> str:
    if not cuda_build_expected():
        pytest.skip("no CUDA toolchain here, so no CUDA extension is expected")
    libs = [lib for lib in _built_extensions() if "_C_cuda" in lib]
    assert libs, "CUDA extension not built"
    return libs[0]


def _wide_accesses(arch: str, kernel: str) -> dict:
    """{kernel instance: the 16-byte global loads/stores in its SASS}."""
    import re
    kernels, current = {}, None
    for line in _sass(_cuda_library(), arch).splitlines():
        m = re.search(r"Function : (\S*" + kernel + r"\S*)", line)
        if m or "Function :" in line:
            current = m.group(1) if m else None
            if current:
                kernels[current] = set()
        elif current:
            kernels[current].update(re.findall(r"\b(LDG\.E\.128|STG\.E\.128)\b", line))
    return kernels


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_merge_moves_rows_in_16_byte_chunks(arch):
    """The CUDA merge kernels read and write aligned rows 16 bytes at a time (LDG.E.128 /
    STG.E.128 in the SASS of every dtype's forward and backward)."""
    kernels = _wide_accesses(arch, r"merge_(?:fwd|bwd)_kernel")
    assert len(kernels) == 6, sorted(kernels)  # fwd and bwd x fp32, fp16, bf16
    for name, ops in kernels.items():
        assert ops == {"LDG.E.128", "STG.E.128"}, f"{name}: {sorted(ops)}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_retrieval_stages_keys_in_16_byte_chunks(arch):
    """Every CUDA retrieval kernel (forward, dQ, dK/dV; three dtypes) stages K and V with
    16-byte loads: what a decode step reads; the split-KV combine and the dK/dV partials'
    sum read their fp32 partials 16 bytes at a time. (Every kernel of
    retrieval_kernels.cu matches: its anonymous namespace carries the file's name. The
    tensor-core kernels, retrieval_tc_*.cu, stage with cp.async instead: LDGSTS, checked in
    tests/test_cuda_tensor_cores.py.)"""
    kernels = _wide_accesses(arch, r"retrieval_kernels_cu\w+_kernel")
    assert len(kernels) == 15, sorted(kernels)  # + combine_splits, sum_dkdv_splits
    for name, ops in kernels.items():
        assert "LDG.E.128" in ops, f"{name}: {sorted(ops)}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernels_do_not_spill(arch):
    """No CUDA kernel uses a stack frame or local memory (cuobjdump -res-usage): the dQ
    kernel sits at 123-128 registers, where one more live value spilled 8 bytes."""
    import re
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    out = subprocess.run([cuobjdump, "-res-usage", "-arch", arch, _cuda_library()],
                         capture_output=True, text=True, timeout=300).stdout
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    assert len(usage) >= 21, out[-2000:]  # 15 retrieval + 6 merge kernels
    for name, regs, stack, local in usage:
        assert int(stack) == 0 and int(local) == 0, f"{name}: {regs} registers, stack {stack}, local {local}"
