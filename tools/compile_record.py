"""The compile gate's record: what each specialisation compiled to, keyed by Triton's own
cache key, so a gate run on a fresh machine compiles only what changed.

A cold gate run is ~1,260 Triton compiles per Triton version (~440 core-seconds each on the
2-core machine: MLIR passes, LLVM, libdevice linking and ptxas), half of `make test`'s work.
Triton itself skips a compile when its cache key matches: the key hashes the Triton install
(its Python sources and libtriton), the kernel's source and its dependencies, the
specialisation (signature, constexprs, attributes), the compile options, the target and
ptxas's version. The same inputs give the same cubin. The record maps that key to the
resources the gate reads from the cubin (registers, spills, shared memory) or to the
compile error, one file per Triton version (``tools/compile_record/triton-<version>.json``).

- A gate run with the record recalls every specialisation whose key it holds and compiles
  the rest (a changed kernel, table entry, flag or Triton: a new key). The checks then run
  on recalled and compiled results alike.
- Every run also compiles a fixed sample of recalled keys for real (one in ``SPOT_EVERY``)
  and fails if the results differ from the record: a record that is stale or edited by
  hand cannot pass.
- ``make compile-gate`` compiles everything (``--no-recall``) and rewrites the record
  (``--write-record``), as it rewrites docs/kernel_resources.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

RECORD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_record")

#: One recalled key in SPOT_EVERY (by its hash) is compiled for real anyway, every run:
#: ~12 per target and Triton version.
SPOT_EVERY = 50


def record_path(triton_version: str) -> str:
    """The committed record of one Triton version."""
    return os.path.join(RECORD_DIR, f"triton-{triton_version}.json")


def load(path: str) -> Dict[str, dict]:
    """{key: result} from ``path``; empty when there is no record."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["results"]
    except FileNotFoundError:
        return {}


def save(path: str, triton_version: str, results: Dict[str, dict]) -> None:
    """Write the record: one line per key, sorted, so a kernel change is a small diff."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = [f"  {json.dumps(k)}: {json.dumps(results[k], sort_keys=True)}"
             for k in sorted(results)]
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"triton": ' + json.dumps(triton_version) + ', "results": {\n')
        f.write(",\n".join(lines))
        f.write("\n}}\n")


#: The fields of an entry that a compile determines (the rest name the kernel, for readers).
RESULT_FIELDS = ("registers", "local", "shared", "error")


def result_of(registers: int, local: int, shared: int, error: Optional[str]) -> dict:
    """What a compile gave, as the record keeps it."""
    return {"registers": registers, "local": local, "shared": shared, "error": error}


def entry(kernel: str, target: int, result: dict) -> dict:
    """A record entry: the result, and which kernel and target it belongs to."""
    return dict(result, kernel=kernel, target=target)


def result_in(record_entry: dict) -> dict:
    """The result part of a record entry (what a spot check compares)."""
    return {f: record_entry[f] for f in RESULT_FIELDS}


def compile_key(src, target, options, env_vars=None) -> str:
    """Triton's cache key of ``triton.compile(src, target, options)``: the preamble of that
    function (identical in triton 3.6 and 3.8), run without compiling."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    backend = make_backend(target)
    options = backend.parse_options(dict(options or dict(), **src.parse_options()))
    env_vars = get_cache_invalidating_env_vars() if env_vars is None else env_vars
    key = get_cache_key(src, backend, options, env_vars=env_vars)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def spot_checked(key: str) -> bool:
    """Whether a recalled ``key`` is compiled for real anyway: a fixed choice by its hash,
    so every run checks the same ones until the kernels or Triton change."""
    return int(key[:8], 16) % SPOT_EVERY == 0
