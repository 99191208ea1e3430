#!/usr/bin/env python3
"""Print how long each phase of `make test` took, from start and end times in seconds.

    python tools/phase_times.py install=T0:T1 triton-3.6=T1:T2 pytest=T2:T3

The Makefile passes `date +%s.%N` readings; the pytest phase's own breakdown by test area
is printed by tests/conftest.py at the end of the test session.
"""
from __future__ import annotations

import sys


def main(argv) -> int:
    rows = []
    for arg in argv:
        name, _, span = arg.partition("=")
        start, _, end = span.partition(":")
        try:
            rows.append((name, float(end) - float(start)))
        except ValueError:
            print(f"phase_times: cannot read {arg!r} (want NAME=START:END)", file=sys.stderr)
            return 2
    total = sum(seconds for _, seconds in rows)
    print("\nmake test, wall-clock time per phase")
    for name, seconds in rows + [("total", total)]:
        print(f"  {name:<12}{int(seconds // 60):3d} min {int(seconds % 60):02d} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
