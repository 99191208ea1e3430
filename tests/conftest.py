"""Test set-up: Triton's CPU interpreter when there is no GPU (before triton is imported)."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pvm_kernels.ops import available_backends  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["reference", "triton"]


def backend_device_params():
    """(backend, device) pairs; pairs that cannot run here are skipped with the reason."""
    out = []
    for dev in DEVICES:
        for be in BACKENDS:
            usable = be in available_backends(dev)
            marks = [] if usable else [pytest.mark.skip(reason=f"{be} not usable on {dev}")]
            out.append(pytest.param(be, dev, id=f"{be}-{dev}", marks=marks))
    return out


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # Fresh random inputs per test case, reproducible from the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
