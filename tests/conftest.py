"""Test set-up: Triton's CPU interpreter when there is no GPU (before triton is imported)."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pvm_kernels.ops import available_backends  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_rounding  # noqa: E402
    interpreter_rounding.install()  # bf16 rounded as the GPU rounds (see there)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["reference", "triton", "cpu", "cuda"]


# The device types each backend is meant for; (backend, device) pairs outside this are
# not generated, pairs inside it that cannot run on this machine are skipped with a reason.
HOME_DEVICES = {"reference": ("cpu", "cuda"), "triton": ("cpu", "cuda"), "cpu": ("cpu",),
                "cuda": ("cuda",)}


def backend_device_params():
    """(backend, device) pairs for every backend on every device type it targets."""
    out = []
    for be in BACKENDS:
        for dev in HOME_DEVICES[be]:
            usable = dev in DEVICES and be in available_backends(dev)
            marks = [] if usable else [pytest.mark.skip(reason=f"{be} not usable on {dev} here")]
            out.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return out


def op_prefix(backend: str) -> str:
    """Name prefix of a kernel backend's custom ops (cpu and cuda share the native ops)."""
    return "native" if backend in ("cpu", "cuda") else backend


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Fresh random inputs per test case, reproducible from the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---- the CUDA emulator (csrc/emu): for the modules that import tests/emu_support.py ----------

@pytest.fixture(scope="module")
def emulated_backend():
    """Build (cached) and register the cuda_emulated backend for one module only: a module
    asks for it with pytest.mark.usefixtures("emulated_backend") in its pytestmark."""
    from emu_support import emulator
    emulator.register_backend()
    yield
    emulator.unregister_backend()


@pytest.fixture
def lib():
    """The emulator's kernel library's controls, reset to seed 0 / all blocks after each test."""
    from emu_support import emulator
    kl = emulator.kernel_lib()
    kl.configure(0)
    yield kl
    kl.configure(0)


# ---- make test's workers (pytest-xdist, --dist loadfile) --------------------------------------

# The modules that run for minutes, longest first: they start at once, one per worker, while
# the other worker works through the many short ones. Seconds on the 2-core machine: a pip
# install with build isolation (~150), the barrier deletions (~100), the CMake build (~45).
# The longest modules first (make test's times, 2 workers), so no long one starts last.
LONG_MODULES = ["test_install", "test_sync_mutations", "test_cli", "test_compile_gate",
                "test_random_shapes", "test_cmake_build", "test_compiled_generation",
                "test_qnorm_retrieval", "test_varlen", "test_generation_modes"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


_MODULE_SECONDS: dict = {}


def pytest_runtest_logreport(report):
    """Time spent per test module (setup, call and teardown), for the summary below."""
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Where make test's time goes: the modules that took longest (test time summed over
    the workers, so their sum exceeds the wall-clock time when workers run side by side)."""
    if not _MODULE_SECONDS:
        return
    total = sum(_MODULE_SECONDS.values())
    terminalreporter.write_sep("-", "test time by module (all workers)")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1])[:12]:
        terminalreporter.write_line(f"{seconds:8.1f} s  {module}")
    terminalreporter.write_line(f"{total:8.1f} s  in all ({len(_MODULE_SECONDS)} modules)")
