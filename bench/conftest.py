"""Benchmark set-up: device, dtype and 8B-shaped blocks.

GPU: bf16 at the issue's shapes (T in {1, 2048, 8192}, Nv in {256, 1024, 4096}).
Every case also records its roofline fields and its kernel launches per call
(``time_and_roofline``: ``extra_info["launches"]``).
CPU: fp32 at small sizes; decode at B {1, 8}, Nv {256, 1024, 4096}. Every usable backend
but Triton on CPU (its interpreter measures numpy, not a kernel).
"""
import pytest
import torch

from pvm_kernels import FusedPVM, PVMConfig, available_backends
from pvm_kernels.roofline import measure_peaks

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


_PEAKS = {}


def measured_peaks():
    """(bf16 matmul TFLOP/s, copy GB/s) measured once in this run on the GPU
    (pvm_kernels.roofline.measure_peaks); (None, None) on CPU."""
    if DEVICE.type != "cuda":
        return None, None
    if not _PEAKS:
        _PEAKS["peaks"] = measure_peaks(DEVICE)
    return _PEAKS["peaks"]


def time_and_roofline(benchmark, work, cost) -> None:
    """Time ``work`` (no host sync inside) with pytest-benchmark (host clock, synchronised)
    and, on a GPU, with CUDA events and an L2 flush (triton.testing.do_bench, the number
    the roofline fields use); record FLOPs, bytes, achieved rates and their fractions of
    the peaks measured in this run (on CPU: the counts and the H100 lower bound)."""
    def run():
        work()
        sync()

    benchmark(run)
    if DEVICE.type == "cuda":
        import triton.testing
        ms = float(triton.testing.do_bench(work, return_mode="median"))
        benchmark.extra_info["event_ms"] = ms
    else:
        ms = benchmark.stats.stats.median * 1e3
    tflops, gbs = measured_peaks()
    benchmark.extra_info.update(cost.fields(ms, tflops, gbs))
    benchmark.extra_info["launches"] = count_launches(work)


def count_launches(work) -> int:
    """Kernels one call of ``work`` launches (pvm_kernels.launches.LaunchCounter: every
    kernel-launching aten op and each custom op at its real kernel count), counted after
    the timed calls, so nothing built once is counted."""
    from pvm_kernels.launches import LaunchCounter
    with LaunchCounter() as counter:
        work()
    return counter.total


@pytest.fixture
def block():
    return block_8b()


def pytest_benchmark_update_machine_info(config, machine_info):
    # The same device line and versions as `pvm-kernels bench` / `info` report.
    from pvm_kernels.cli.common import device_description, versions
    tflops, gbs = measured_peaks()
    machine_info.update(device=device_description(DEVICE), dtype=str(DTYPE),
                        versions=versions(), cuda=torch.version.cuda,
                        peak_bf16_tflops=tflops, peak_copy_gbs=gbs)
