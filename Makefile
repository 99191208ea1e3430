# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Where torch is already installed (the GPU box), it is used as is; otherwise the
# machine's local torch wheel is installed.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.14.1

.PHONY: install test demo bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --no-build-isolation -e ".[test]"

test: install
	$(PYTHON) -m pytest tests -q

demo: install
	$(PYTHON) -m pvm_kernels.demo

# Raw times land in bench/results/<device>.json (device name from torch).
bench: install
	$(PYTHON) -m pytest bench --benchmark-only -q \
	  --benchmark-json=bench/results/$$($(PYTHON) -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')").json

clean:
	rm -rf build *.egg-info .pytest_cache .benchmarks
	find . -name __pycache__ -prune -exec rm -rf {} +
