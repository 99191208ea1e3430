"""``make gpu-quick``: the one prepared command of a GPU lease (issue 27), in under 8 minutes.

A lease is 15 minutes of device time, machine start included, at most 10 minutes a command.
This runs, in order, each part only if its planned time still fits the budget (a part that
would overrun is skipped and says so), printing the elapsed time of each:

1. ``build``: ``pip install --no-build-isolation --use-pep517 -e .`` (the GPU box has no
   network; its torch builds the CUDA extension for its GPU). Nothing else runs without it.
2. ``smoke``: the CUDA cases (``-k cuda``) of the correctness tests against float64: the
   block forward and backward (8B layout, hd 128, bf16 and fp32, decode and prefill) and
   varlen (tests/test_fused_pvm.py, test_varlen.py);
   ``kernels``: the sm_90 TMA retrieval and the paged decode kernel against float64
   (tests/test_retrieval_tma.py, test_paged_memory.py: on the GPU where there is one).
3. ``tune``: ``tools/gpu_tune.py`` within what is left of its share (it checks each candidate
   tile against float64 before timing it, and rewrites triton_ops/configs/<arch>.json).
4. ``evidence``: ``bench/gpu_evidence.py`` (peaks, block, attention, decode, e2e) within the
   rest, JSON into bench/results/evidence/quick.json;
5. ``report``: its markdown table and plots (bench/evidence_report.py).

Without a GPU it prints one line and exits 2 (``--dry-run`` prints the plan instead). Exit 1
when a part failed or timed out; the later parts still run (their numbers are evidence),
except after a failed build.

    make gpu-quick                        # budget 450 s
    make gpu-quick QUICK_ARGS="--budget 300 --skip tune"
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 450.0
EVIDENCE = os.path.join("bench", "results", "evidence", "quick")
#: The block and varlen suites are parametrised over (backend, device): their CUDA cases.
SMOKE_TESTS = ("tests/test_fused_pvm.py", "tests/test_varlen.py")
#: Modules whose kernels run on the GPU where there is one: all of them.
KERNEL_TESTS = ("tests/test_retrieval_tma.py", "tests/test_paged_memory.py")


@dataclass
class Part:
    """One step: ``argv(seconds it may take)`` runs it; it is skipped unless ``planned_s``
    still fits. ``rest``: it takes whatever is left (less ``reserve_s`` for the parts
    after it). ``required``: nothing runs after it fails."""

    name: str
    planned_s: float
    argv: Callable[[float], List[str]]
    rest: bool = False
    reserve_s: float = 0.0
    required: bool = False


def default_parts(python: str = sys.executable) -> List[Part]:
    """The parts of the module docstring, with their planned seconds on an H100."""
    return [
        Part("build", 150, lambda s: [python, "-m", "pip", "install", "--no-build-isolation",
                                      "--no-deps", "--use-pep517", "-e", "."], required=True),
        Part("smoke", 60, lambda s: [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "-k", "cuda", "--maxfail", "20", *SMOKE_TESTS]),
        Part("kernels", 40, lambda s: [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       "--maxfail", "20", *KERNEL_TESTS]),
        Part("tune", 120, lambda s: [python, "tools/gpu_tune.py", "--budget", f"{s:.0f}",
                                     "--no-progress"]),
        Part("evidence", 60, lambda s: [python, "bench/gpu_evidence.py", "--parts",
                                        "peaks,block,attention,decode,e2e", "--budget-s",
                                        f"{s:.0f}", "--out", EVIDENCE + ".json"],
             rest=True, reserve_s=20),
        Part("report", 20, lambda s: [python, "bench/evidence_report.py", EVIDENCE + ".json",
                                      "--markdown", EVIDENCE + ".md", "--plots",
                                      os.path.join("bench", "results", "evidence", "plots")]),
    ]


def run_subprocess(argv: Sequence[str], timeout_s: float) -> str:
    """Run ``argv`` in the repository root: "ok", "failed (exit N)" or "timed out"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        rc = subprocess.run(list(argv), cwd=ROOT, env=env, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        return "timed out"
    return "ok" if rc == 0 else f"failed (exit {rc})"


def run_parts(parts: Sequence[Part], budget_s: float, skip: Sequence[str] = (),
              runner: Callable[[Sequence[str], float], str] = run_subprocess,
              clock: Callable[[], float] = time.monotonic,
              say: Callable[[str], None] = print) -> List[tuple]:
    """Run the parts within ``budget_s`` seconds; returns (name, outcome, seconds) rows."""
    start = clock()
    deadline = start + budget_s
    rows = []
    stop = None
    for part in parts:
        left = deadline - clock()
        if part.name in skip:
            outcome, took = "skipped (--skip)", 0.0
        elif stop:
            outcome, took = f"skipped ({stop} failed)", 0.0
        elif part.planned_s > left:
            outcome, took = f"skipped (needs {part.planned_s:.0f} s, {left:.0f} s left)", 0.0
        else:
            allowed = left - part.reserve_s if part.rest else min(part.planned_s * 1.5, left)
            argv = part.argv(allowed)
            say(f"=== {part.name} ({allowed:.0f} s at most): {' '.join(argv)}")
            t0 = clock()
            outcome = runner(argv, allowed)
            took = clock() - t0
            if part.required and outcome != "ok":
                stop = part.name
        rows.append((part.name, outcome, took))
        say(f"=== {part.name}: {outcome} in {took:.0f} s ({clock() - start:.0f} s elapsed)")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts")
    p.add_argument("--skip", action="append", default=[],
                   choices=[part.name for part in default_parts()], help="a part not to run")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = p.parse_args(argv)
    parts = default_parts()
    if args.dry_run:
        for part in parts:
            print(f"{part.name}: {part.planned_s:.0f} s planned"
                  f"{' (the rest of the budget)' if part.rest else ''}: "
                  f"{' '.join(part.argv(part.planned_s))}")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu-quick: no GPU here (torch.cuda.is_available() is False); it runs on a "
              "GPU lease (docs: /work/.library/device)")
        return 2
    rows = run_parts(parts, args.budget, args.skip)
    print("\n| part | outcome | seconds |\n|---|---|---|")
    for name, outcome, took in rows:
        print(f"| {name} | {outcome} | {took:.0f} |")
    return 1 if any(o.startswith(("failed", "timed out")) for _, o, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
