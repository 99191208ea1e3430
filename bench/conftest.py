"""Benchmark set-up: device, dtype and 8B-shaped blocks.

GPU: bf16 at the issue's shapes (T in {1, 2048, 8192}, Nv in {256, 1024, 4096}).
CPU: fp32 at small sizes; decode at B {1, 8}, Nv {256, 1024, 4096}. Every usable backend
but Triton on CPU (its interpreter measures numpy, not a kernel).
"""
import pytest
import torch

from pvm_kernels import FusedPVM, PVMConfig, available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

# Triton's CPU interpreter measures numpy, so on CPU the kernel backend is the compiled one.
BACKENDS = [b for b in available_backends(DEVICE) if DEVICE.type == "cuda" or b != "triton"]
if DEVICE.type == "cuda":
    TOKENS, VISUAL, BATCH = [1, 2048, 8192], [256, 1024, 4096], 1
    DECODE_BATCH, DECODE_VISUAL = [1, 8], [256, 1024, 4096]
else:
    TOKENS, VISUAL, BATCH = [1, 128], [256, 1024], 1
    DECODE_BATCH, DECODE_VISUAL = [1, 8], [256, 1024, 4096]

_BLOCKS = {}


def block_8b() -> FusedPVM:
    if "b" not in _BLOCKS:
        torch.manual_seed(0)
        block = FusedPVM(PVMConfig.qwen3_vl_8b())
        with torch.no_grad():
            block.gate_alpha.fill_(1.0)
        _BLOCKS["b"] = block.to(device=DEVICE, dtype=DTYPE)
    return _BLOCKS["b"]


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def block():
    return block_8b()


def pytest_benchmark_update_machine_info(config, machine_info):
    # The same device line and versions as `pvm-kernels bench` / `info` report.
    from pvm_kernels.cli.common import device_description, versions
    machine_info.update(device=device_description(DEVICE), dtype=str(DTYPE),
                        versions=versions(), cuda=torch.version.cuda)
