"""PVM training under DDP and FSDP2 (2 processes, gloo, CPU) equals single-process training."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import distributed_train  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def single():
    return distributed_train.train_single()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_match_single_process_training(mode, single, tmp_path):
    out = tmp_path / f"{mode}.pt"
    script = os.path.join(os.path.dirname(__file__), "distributed_train.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, mode, str(out)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert set(got["grads"]) == set(single["grads"]) and len(single["grads"]) == 3 * 15
    for name, ref in single["grads"].items():
        assert ref.abs().max() > 0, f"{name}: zero gradient, the comparison would prove nothing"
        torch.testing.assert_close(got["grads"][name], ref, rtol=1e-5, atol=1e-7, msg=name)
    for name, ref in single["weights"].items():
        torch.testing.assert_close(got["weights"][name], ref, rtol=1e-5, atol=1e-6, msg=name)
    moved = max((single["weights"][n] - w).abs().max().item()
                for n, w in distributed_train.trainable(distributed_train.build_model()).items())
    assert moved > 1e-4, "training must move the PVM weights"
