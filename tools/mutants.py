"""The mutant loop shared by tools/mma_mutations.py and tools/tc_mutations.py: a copy of
csrc/ with textual replacements, built into its own emulator kernel library, run through a
test file via $PVM_CUDA_EMU_LIB, and the table of what failed."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
sys.path.insert(0, os.path.join(CSRC, "emu"))
import emulator  # noqa: E402


def build(name: str, edits, out_dir: str) -> str:
    """The kernel library of csrc/ with each (file under csrc, old, new) of ``edits`` applied
    (old must occur once), cached under build/cuda_emu/<out_dir>."""
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "csrc")
        shutil.copytree(CSRC, dst)
        for rel, old, new in edits:
            path = os.path.join(dst, rel)
            text = open(path).read()
            assert text.count(old) == 1, f"{name}: {rel} has {text.count(old)} copies of {old!r}"
            open(path, "w").write(text.replace(old, new))
        return emulator.build_kernel_lib(csrc=dst, out_root=os.path.join(emulator.BUILD_ROOT, out_dir))


def run_tests(lib: str, test_file: str, filt: str, timeout: int):
    """pytest on ``test_file`` -k ``filt`` with kernel library ``lib``: (the failed test ids,
    pytest's summary line, its exit status)."""
    env = dict(os.environ, **{emulator.LIB_ENV: lib})
    res = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-rf", "-p", "no:cacheprovider",
                          "-k", filt], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    failed = re.findall(r"^FAILED (\S+)", res.stdout, re.M)
    summary = (res.stdout.strip().splitlines() or ["?"])[-1]
    return failed, summary, res.returncode


def failing_tests(failed) -> list:
    """The test functions of failed test ids, without their parameters."""
    return sorted({re.sub(r"\[.*", "", f.split("::")[-1]) for f in failed})


def report(name: str, caught: bool, seconds: float, summary: str, tests) -> None:
    print(f"{name}: {'CAUGHT' if caught else 'survived'} ({seconds:.0f} s) {summary}", flush=True)
    for t in tests:
        print(f"    {t}", flush=True)


def parse_args(doc: str):
    """--only (repeatable) and --markdown."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="run the mutants whose name contains this")
    ap.add_argument("--markdown", help="also write the table here")
    return ap.parse_args()


def write_markdown(path: str, rows) -> None:
    """rows: (description of the break, failing cases, failing tests)."""
    with open(path, "w") as f:
        f.write("| break | failing cases | failing tests |\n| --- | --- | --- |\n")
        for what, n, tests in rows:
            f.write(f"| {what} | {n} | {', '.join(f'`{t}`' for t in tests) or 'none'} |\n")
