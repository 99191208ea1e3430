#!/usr/bin/env python3
"""Does every __syncthreads() of the CUDA kernels matter to the tests? Delete each one in
turn and see.

For every __syncthreads() call in csrc/cuda (.cu, .cuh, .h), this builds the emulated
kernel library (csrc/emu) from a copy of csrc/ with that one call deleted, runs the
emulator tests (tests/test_cuda_emulator.py, kernel cases only) against it through
$PVM_CUDA_EMU_LIB, and prints a table: where the barrier is, what it protects (the
comment on its line, or the one above), and whether a test failed (caught: which test,
and how) or all passed (not caught).

    python tools/sync_mutations.py                 # all barriers, first failing test each
    python tools/sync_mutations.py --all-tests     # run every test per mutant (slower)
    python tools/sync_mutations.py --only retrieval_kernels.cu:150 --seeds 0-7
    python tools/sync_mutations.py --json out.json --markdown out.md

Exit status 1 if some barrier is not caught. Builds are cached under build/cuda_emu/mutants.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
sys.path.insert(0, os.path.join(CSRC, "emu"))
import emulator  # noqa: E402

TEST_FILE = "tests/test_cuda_emulator.py"
# The kernel cases; the emulator's self-tests and the host-check tests do not run the
# project's kernels' barriers.
TEST_FILTER = "not selftest and not host_wrapper and not refuses"
SYNC = re.compile(r"\b__syncthreads\s*\(\s*\)\s*;")


@dataclass
class Site:
    file: str          # relative to csrc/
    line: int          # 1-based
    column: int        # 0-based offset of the call in the line
    function: str
    role: str


@dataclass
class Outcome:
    site: Site
    caught: bool
    how: str = ""          # "failed" / "crashed" / "timed out" / "build failed"
    test: str = ""         # the first failing test
    detail: str = ""       # its assertion or the emulator's report
    failing: List[str] = field(default_factory=list)
    seconds: float = 0.0


def strip_comments(text: str) -> str:
    """Comments and string literals blanked (same length, newlines kept)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"', blank, text, flags=re.S)


FUNC = re.compile(r"^(?:template\s*<[^>]*>\s*)?(?:[\w:<>,*&\s]+?\s)?(?:__launch_bounds__\([^)]*\)\s*)?"
                  r"(\w+)\s*\([^;{]*\)\s*(?:const\s*)?\{", re.M)


def find_sites() -> List[Site]:
    sites = []
    files = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))
                   + glob.glob(os.path.join(CSRC, "cuda", "*.h")))
    for path in files:
        text = open(path).read()
        code = strip_comments(text)
        lines = text.split("\n")
        funcs = [(m.start(), m.group(1)) for m in FUNC.finditer(code)
                 if m.group(1) not in ("if", "for", "while", "switch")]
        for m in SYNC.finditer(code):
            line = code.count("\n", 0, m.start()) + 1
            col = m.start() - (code.rfind("\n", 0, m.start()) + 1)
            func = next((name for pos, name in reversed(funcs) if pos < m.start()), "?")
            sites.append(Site(os.path.relpath(path, CSRC), line, col, func, role_of(lines, line)))
    return sites


def role_of(lines: List[str], line: int) -> str:
    """The comment on the barrier's line, else the comment lines right above it."""
    here = lines[line - 1]
    if "//" in here:
        return here.split("//", 1)[1].strip()
    above = []
    i = line - 2
    while i >= 0 and lines[i].strip().startswith("//"):
        above.insert(0, lines[i].strip()[2:].strip())
        i -= 1
    return " ".join(above) or "(no comment)"


def mutate(tmp_csrc: str, site: Site) -> None:
    path = os.path.join(tmp_csrc, site.file)
    lines = open(path).read().split("\n")
    text = lines[site.line - 1]
    m = SYNC.match(text, site.column)
    assert m, f"no __syncthreads() at {site.file}:{site.line}:{site.column}"
    lines[site.line - 1] = text[:m.start()] + "/* __syncthreads() deleted */;" + text[m.end():]
    open(path, "w").write("\n".join(lines))


NODE = r"tests/\S+?::\w+(?:\[[^\n]*?\](?= |$))?"


def run_tests(lib: str, seeds: str, all_tests: bool, timeout: int):
    """(how, first failing test, detail, all failing tests); how is "" when all pass."""
    # No plugin autoload: the emulator tests use none, and hypothesis's and pytest-benchmark's
    # imports were 1.6 s of each mutant's ~5 s start-up (18 mutants).
    env = dict(os.environ, PVM_CUDA_EMU_LIB=lib, PVM_EMU_SEEDS=seeds, PYTHONFAULTHANDLER="1",
               PYTHONUNBUFFERED="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-v", "-rf", "-p", "no:cacheprovider",
           "--tb=short", "-k", TEST_FILTER] + ([] if all_tests else ["-x"])
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timed out", last_started(out), f"no result in {timeout} s", []
    out = res.stdout + res.stderr
    if res.returncode == 0:
        return "", "", "", []
    failing = re.findall(rf"^FAILED ({NODE})", out, re.M)
    if failing:
        m = re.search(r"\[emulator: ([^\]]*)\]", out) or re.search(r"^E\s+(.*)$", out, re.M)
        return "failed", failing[0], m.group(1).strip() if m else "", failing
    test = last_started(res.stdout)
    if test:  # the process died inside a test: the emulator's fault report, if any
        m = re.search(r"^cuemu: (.*)$", out, re.M) or re.search(r"^(Fatal Python error: .*)$", out, re.M)
        return "crashed", test, m.group(1) if m else f"exit status {res.returncode}", [test]
    return "error", "", out[-2000:], []


def last_started(out: str) -> str:
    started = re.findall(rf"^({NODE})", out, re.M)
    return started[-1] if started else ""


def short(test: str) -> str:
    return test.split("::", 1)[-1]


def failing_summary(tests: List[str]) -> str:
    """How many failing tests per test function, e.g. "test_a x12, test_b x3"."""
    counts = {}
    for t in tests:
        name = short(t).split("[", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def table(outcomes: List[Outcome]) -> str:
    rows = [("site", "in", "role (comment at the barrier)", "result")]
    for o in outcomes:
        s = o.site
        if o.caught:
            res = f"caught ({o.how}) by {short(o.test)}"
            if len(o.failing) > 1:
                res += f" and {len(o.failing) - 1} more ({failing_summary(o.failing)})"
            if o.detail:
                res += f": {o.detail[:160]}"
        else:
            res = "NOT CAUGHT" if o.how != "build failed" else f"build failed: {o.detail[:200]}"
        rows.append((f"{s.file}:{s.line}", s.function, s.role, res))
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(md)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=os.environ.get("PVM_EMU_SEEDS", "0,1,2"),
                    help="schedules the tests run under (PVM_EMU_SEEDS), default 0,1,2")
    ap.add_argument("--all-tests", action="store_true", help="run every test per mutant, list all failing")
    ap.add_argument("--only", action="append", default=[], help="FILE:LINE (file name relative to csrc/cuda)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant's test run")
    ap.add_argument("--json", help="write the outcomes as JSON here")
    ap.add_argument("--markdown", help="write the table (markdown) here")
    ap.add_argument("--list", action="store_true", help="only list the barriers")
    ap.add_argument("--render", metavar="JSON", help="print the table of an earlier --json run")
    args = ap.parse_args(argv)

    if args.render:
        outcomes = [Outcome(Site(**o.pop("site")), **o) for o in json.load(open(args.render))]
        print(table(outcomes))
        return 0
    sites = find_sites()
    if args.only:
        sites = [s for s in sites if any(f"{os.path.basename(s.file)}:{s.line}" == o or f"{s.file}:{s.line}" == o
                                         for o in args.only)]
    if args.list:
        for s in sites:
            print(f"{s.file}:{s.line}  {s.function}: {s.role}")
        return 0
    print(f"{len(sites)} __syncthreads() calls; building the unmutated library first", file=sys.stderr)
    emulator.build_kernel_lib()  # fail early on a build that is broken without any mutation
    out_root = os.path.join(emulator.BUILD_ROOT, "mutants")
    outcomes = []
    for i, site in enumerate(sites, 1):
        t0 = time.time()
        print(f"[{i}/{len(sites)}] {site.file}:{site.line} ({site.function}) ...", file=sys.stderr, flush=True)
        tmp = tempfile.mkdtemp(prefix="pvm-mutant-")
        try:
            tmp_csrc = os.path.join(tmp, "csrc")
            shutil.copytree(CSRC, tmp_csrc, ignore=shutil.ignore_patterns("__pycache__"))
            mutate(tmp_csrc, site)
            try:
                lib = emulator.build_kernel_lib(csrc=tmp_csrc, out_root=out_root)
            except RuntimeError as exc:
                outcomes.append(Outcome(site, False, "build failed", detail=str(exc)))
                continue
            how, test, detail, failing = run_tests(lib, args.seeds, args.all_tests, args.timeout)
            o = Outcome(site, bool(how), how, test, detail, failing, round(time.time() - t0, 1))
            outcomes.append(o)
            print(f"    -> {'caught by ' + short(test) + ' (' + how + ')' if o.caught else 'NOT CAUGHT'}"
                  f" in {o.seconds:.0f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    md = table(outcomes)
    print(md)
    missed = [o for o in outcomes if not o.caught]
    print(f"\n{len(outcomes) - len(missed)} of {len(outcomes)} deleted barriers caught "
          f"(seeds {args.seeds}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(o) for o in outcomes], f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
