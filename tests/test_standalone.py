"""The project stands on its own: no tracked file points at documents a user never gets
(the development workspace's ../shared notes). What they held lives in docs/ (spec.md,
gpu_facts.md, qwen3_vl.md)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELF = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")
FORBIDDEN = ("../shared", "PVM_SPEC.md", "GPU_FACTS.md", "QWEN3VL_NOTES.md")


def tracked_files():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def test_no_tracked_file_refers_to_files_outside_the_project():
    offenders = []
    for path in tracked_files():
        if path == SELF:
            continue
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            continue  # deleted in the working tree, or a submodule
        with open(full, "rb") as fh:
            data = fh.read()
        if b"\0" in data:
            continue  # binary
        text = data.decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for word in FORBIDDEN:
                if word in line:
                    offenders.append(f"{path}:{lineno}: {word}")
    assert not offenders, ("tracked files refer to documents outside the project (restate "
                           "the facts in docs/ and link there):\n" + "\n".join(offenders))
