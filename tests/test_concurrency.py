"""Threads running FusedPVM at once on different inputs get exactly what they get alone
(generate() under threads is tested in test_qwen3_vl.py)."""
import threading

import pytest
import torch

from conftest import backend_device_params
from pvm_kernels import PVMConfig
from pvm_kernels.testing import live_block, random_mask

CFG = PVMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, pvm_hidden_size=32)
THREADS = 4


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_threads_get_the_results_they_get_alone(backend, device):
    block = live_block(CFG, torch.float32, device)
    jobs = []
    for k in range(THREADS):  # different shapes, masks and a decode step per thread
        B, T, Nv = 1 + k % 2, 3 + 5 * k, 4 + 9 * k
        h = torch.randn(B, T, CFG.hidden_size, device=device)
        visual = torch.randn(B, Nv, CFG.hidden_size, device=device)
        mask = random_mask(B, Nv, pad_from={0: Nv // 2 + 1}).to(device)
        jobs.append((h, visual, mask))

    def work(h, visual, mask):
        with torch.no_grad():
            full = block(h, visual, mask, backend=backend)
            memory = block.encode_visual(visual, mask)
            steps = [block(h[:, t:t + 1], memory, backend=backend) for t in range(h.shape[1])]
        return [full] + steps

    alone = [work(*job) for job in jobs]
    results = [[None] * THREADS for _ in range(3)]
    errors = []
    barrier = threading.Barrier(THREADS)

    def run(k):
        try:
            barrier.wait()
            for r in range(3):
                results[r][k] = work(*jobs[k])
        except Exception as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in range(3):
        for k in range(THREADS):
            for got, want in zip(results[r][k], alone[k]):
                assert torch.equal(got, want), (r, k)
