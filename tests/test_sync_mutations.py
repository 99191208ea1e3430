"""Every __syncthreads in the CUDA kernels matters to a test: tools/sync_mutations.py deletes
each in turn, rebuilds the emulated kernel library and runs the emulator tests against it.
A new barrier that no test needs, or a test change that stops catching a deleted one, fails
here (~80 s: the torch harness is built once, each mutant's kernel library in ~4 s)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cpu_verification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="the emulator builds with g++")
def test_deleting_any_barrier_fails_an_emulator_test(tmp_path):
    out = tmp_path / "mutations.json"
    res = subprocess.run([sys.executable, os.path.join("tools", "sync_mutations.py"), "--json",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) >= 9  # merge 1, retrieval 8 (forward 2, dQ 2, dK/dV 3, staging 1)
    # caught by a failing test: a mutant that does not build proves nothing
    assert all(r["caught"] and r["how"] != "build failed" for r in rows), \
        [r for r in rows if not r["caught"] or r["how"] == "build failed"]
