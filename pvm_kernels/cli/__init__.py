"""The ``pvm-kernels`` command line (also ``python -m pvm_kernels``).

Commands: ``demo``, ``analyze``, ``bench``, ``info``; ``pvm-kernels COMMAND --help`` lists
each one's options. User errors print one line and exit 2; an unexpected failure prints one
line and exits 1; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .common import CLIError

COMMANDS = ("demo", "analyze", "bench", "info")


def build_parser() -> argparse.ArgumentParser:
    from . import analyze, bench, demo, info

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback when something fails")
    parser = argparse.ArgumentParser(
        prog="pvm-kernels", description="Persistent Visual Memory kernels: demo, dilution "
        "analysis, benchmarks and installation report.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"pvm-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (demo, analyze, bench, info):
        module.add_parser(sub, [common])
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    prog = f"pvm-kernels {args.command}"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except CLIError as exc:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # anything else: one line, the traceback only on request
        if args.debug:
            raise
        print(f"{prog}: error: {type(exc).__name__}: {_one_line(exc)} "
              f"(--debug shows the traceback)", file=sys.stderr)
        return 1


def main_exit() -> None:
    """Console-script entry point: exit with main()'s status."""
    raise SystemExit(main())
