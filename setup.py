"""pvm-kernels: fused kernels for Persistent Visual Memory (PVM) in vision-language models.

Builds, with the torch already installed (use ``pip install --no-build-isolation .``):
  pvm_kernels._C       C++ CPU ops, always;
  pvm_kernels._C_cuda  CUDA ops, when torch has CUDA and nvcc is found (CUDA_HOME).
Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, PVM_SKIP_CUDA=1 to skip
the CUDA build, PVM_SKIP_EXTENSIONS=1 to build neither (a pure-Python package: reference
and triton backends), PVM_STRICT_BUILD=1 to make any extension build failure fatal (CI). Without
it a failed build only warns: the package still imports and reports which backends it has.
"""
import glob
import os
import sys
import warnings

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME when imported; the `nvcc` on PATH may be a
# wrapper script whose directory is not a CUDA root.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

STRICT = os.environ.get("PVM_STRICT_BUILD") == "1"


def extensions():
    if os.environ.get("PVM_SKIP_EXTENSIONS") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: building no C++/CUDA extension "
                      "(install torch first and use --no-build-isolation)")
        return [], {}
    cxx = ["-O3"]  # the C++ standard is torch's choice (C++20 for torch 2.14)
    # at::parallel_for is a header template whose `#pragma omp parallel` is compiled into the
    # extension: without -fopenmp it silently runs serially (the CPU kernels used one core
    # of two until this flag: T 512, Nv 1024, 9.2 ms on 1 thread and 8.4 ms on 2). The
    # OpenMP runtime is torch's own libgomp.so.1, already loaded by libtorch_cpu.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    macros = [("PVM_PYTHON_MODULE", None)]
    # libstdc++ linked as the shared library torch itself uses. A toolchain whose library
    # folder has libstdc++.a but no usable libstdc++.so (the GPU boxes' /opt/gcc: a dangling
    # symlink) otherwise links a private static copy into the extension; with Ubuntu Python's
    # -Wl,-Bsymbolic-functions its functions bind to that copy but its data (std::locale
    # facet ids) to the process's libstdc++.so.6, and formatting the first number into an
    # error message (TORCH_CHECK(..., q.sizes())) segfaults.
    link = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    exts = [CppExtension("pvm_kernels._C", ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")),
                         include_dirs=[os.path.abspath("csrc")], define_macros=macros,
                         extra_compile_args={"cxx": cxx + openmp},
                         extra_link_args=link + openmp)]
    want_cuda = os.environ.get("PVM_SKIP_CUDA") != "1"
    if want_cuda and torch.version.cuda and CUDA_HOME:
        exts.append(CUDAExtension(
            "pvm_kernels._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.abspath("csrc")], define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link))
    elif want_cuda:
        why = "torch has no CUDA" if not torch.version.cuda else "nvcc not found (set CUDA_HOME)"
        if STRICT:
            raise RuntimeError(f"PVM_STRICT_BUILD=1 but the CUDA extension cannot be built: {why}")
        warnings.warn(f"skipping the CUDA extension: {why}")

    class OptionalBuildExtension(BuildExtension):
        """A failed extension build warns instead of failing the install (unless strict)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                if STRICT:
                    raise
                warnings.warn(f"building {ext.name} failed, its backend will be unavailable: {exc}")

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="pvm-kernels",
    version="0.1.0",
    description="Fused Triton, CUDA and CPU kernels for Persistent Visual Memory (PVM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The Triton kernels sit at the top of the repository beside csrc/ (both kernel trees
    # side by side) and install as pvm_kernels.triton_ops: no generic top-level name in
    # site-packages.
    packages=find_packages(include=["pvm_kernels", "pvm_kernels.*"]) + ["pvm_kernels.triton_ops"],
    package_dir={"pvm_kernels.triton_ops": "triton_ops"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        # 2.11 is the GPU box's torch, 2.14 this project's CPU machines'.
        "torch>=2.11,<2.15",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "tqdm>=4.60",  # progress bars of the CLI's bench and the compile gate
    ],
    extras_require={
        # The CLI's model commands (demo, analyze) and its plots; bench and info need none.
        "cli": ["transformers>=4.57,<6", "safetensors", "pillow>=10", "matplotlib>=3.7"],
        # nvidia-cutlass: CuTe's headers (cutlass_library/source/include), the independent
        # statement of the tensor-core fragment layouts tests/test_mma_layouts.py checks the
        # CUDA emulator against (host code only; nothing of it is imported).
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4", "safetensors",
                 "transformers>=4.57,<6", "pillow>=10", "matplotlib>=3.7", "nvidia-cutlass>=4.2,<5"],
    },
    entry_points={"console_scripts": ["pvm-kernels = pvm_kernels.cli:main_exit"]},
)
