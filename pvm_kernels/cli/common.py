"""What every CLI command shares: user errors, device/dtype options, versions, JSON output."""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
from typing import Dict, List, Optional

import torch


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (auto: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="compute dtype (auto: bfloat16 on cuda, float32 on cpu)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU is visible to torch "
                       "(torch.cuda.is_available() is False); use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def parse_backends(text: Optional[str], device: torch.device, usable: List[str]) -> List[str]:
    """--backends a,b: every name must be usable on the device (no silent skipping)."""
    if text is None:
        return usable
    from ..ops import backend_status
    status = backend_status(device)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError("--backends: give at least one backend name")
    for name in names:
        if name not in status:
            raise CLIError(f"--backends: unknown backend {name!r}; known: {', '.join(status)}")
        if status[name] is not None:
            raise CLIError(f"--backends: {name!r} cannot run on {device.type}: {status[name]}")
    return names


def enable_triton_interpreter_without_gpu() -> None:
    """With no GPU, run Triton kernels in its CPU interpreter so the triton backend can be
    exercised (must happen before triton is first imported; pvm_kernels imports it lazily)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def versions() -> Dict[str, Optional[str]]:
    """Installed versions of pvm-kernels and what it runs on (None: not installed)."""
    from .. import __version__
    out: Dict[str, Optional[str]] = {"pvm-kernels": __version__, "python": platform.python_version()}
    for pkg in ("torch", "triton", "transformers", "numpy", "matplotlib", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["torch CUDA build"] = torch.version.cuda
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def output_dir(path: str) -> str:
    """Create --out-dir (and parents); a clear error when that is impossible."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out-dir {path!r}: cannot create it ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise CLIError(f"--out-dir {path!r}: not writable")
    return path


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def format_table(header: List[str], rows: List[List[str]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def help_text(doc: str) -> str:
    """A module docstring as argparse description (without reST literal quotes)."""
    return doc.replace("``", "`")
