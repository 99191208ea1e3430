"""``pvm-kernels info``: versions, devices, the compiled extensions (the torch they were
built for, and whether the installed build or a just-in-time rebuild for this torch was
loaded), and which backends are usable (and why not)."""
from __future__ import annotations

import argparse
import os

import torch

from .common import help_text, device_description, format_table, versions, write_json


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("info", parents=parents, help="versions, device and backends",
                              description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.set_defaults(run=run)


def _extensions() -> dict:
    from ..ops.native_backend import EXTENSION_LOADS
    from ..ops.native_loader import build_info
    info = build_info() or {}
    return {name: dict(loaded=load.how, built_for_torch=load.built_for, error=load.error,
                       path=load.path,
                       built_at_install=info.get("extensions", {}).get(name, {}).get("built"))
            for name, load in EXTENSION_LOADS.items()}


def _extension_line(name: str, ext: dict) -> str:
    built = f"built for torch {ext['built_for_torch']}" if ext["built_for_torch"] else "not built"
    how = {"installed": "loaded", "jit": f"rebuilt for this torch: {ext['path']}",
           "none": f"not loaded: {ext['error']}"}[ext["loaded"]]
    return f"  {'pvm_kernels.' + name:<21}{built}; {how}"


def collect() -> dict:
    from ..ops import backend_status, glue_status
    from ..ops.registry import resolve_backend
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    gpus = [dict(name=torch.cuda.get_device_name(d), capability=".".join(
        map(str, torch.cuda.get_device_capability(d))),
        memory_gib=round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1))
        for d in devices[1:]]
    backends = {}
    present = {d.type for d in devices}
    for device_type in ("cpu", "cuda"):
        status = backend_status(device_type)
        default = resolve_backend(None, torch.device(device_type)).name \
            if device_type in present else None
        for name, why in status.items():
            if why is not None and why.startswith(f"{device_type}: "):
                why = why[len(device_type) + 2:]
            backends.setdefault(name, {})[device_type] = dict(usable=why is None, reason=why,
                                                              default=name == default)
    return dict(versions=versions(), cpu=device_description(torch.device("cpu")), gpus=gpus,
                cuda_available=torch.cuda.is_available(), extensions=_extensions(),
                glue=glue_status(),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1", backends=backends)


def _cell(entry: dict) -> str:
    if entry["usable"]:
        return "yes (default)" if entry["default"] else "yes"
    return "no"


def run(args) -> int:
    report = collect()
    print("versions")
    for name, version in report["versions"].items():
        print(f"  {name:<18}{version or 'not installed'}")
    print("\ndevices")
    print(f"  {'cpu':<18}{report['cpu']}")
    if report["gpus"]:
        for i, gpu in enumerate(report["gpus"]):
            print(f"  {'cuda:%d' % i:<18}{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, "
                  f"{gpu['memory_gib']} GiB)")
    else:
        print(f"  {'cuda':<18}no CUDA GPU visible")
    print("\ncompiled extensions")
    for name, ext in report["extensions"].items():
        print(_extension_line(name, ext))
    print("\nbackends (usable on cpu / cuda tensors)")
    rows = [[name, _cell(b["cpu"]), _cell(b["cuda"])] for name, b in report["backends"].items()]
    print("  " + format_table(["backend", "cpu", "cuda"], rows).replace("\n", "\n  "))
    print("\nthe block's glue (RMSNorm, SwiGLU) per backend")
    for name, ops in report["glue"].items():
        print(f"  {name:<12}" + ", ".join(f"{op} {how}" for op, how in ops.items()))
    reasons = [(name, t, b[t]["reason"]) for name, b in report["backends"].items()
               for t in ("cpu", "cuda") if b[t]["reason"]]
    if reasons:
        print("\nwhy not")
        for name, t, why in reasons:
            print(f"  {name} on {t}: {why}")
    if args.json:
        write_json(args.json, report)
    return 0
