"""The retrieval's tile tables as data: ``configs/<arch>.json``, one file per GPU
architecture ("sm80": A100, "sm90": H100/H200), read by the launchers and the compile gate
(issue 25), and rewritten by a tuning run on a GPU.

A file holds ``arch``, free-text ``notes`` (why the tiles are what they are), ``measured``
(null, or what a tuning run recorded: device, versions, times) and ``entries``: one per
(kernel, dtype class, BLOCK_D, row class) of the tile kernels, with block_m, block_n,
num_warps and num_stages, and optionally ``warp_specialize`` (a bool, false when absent:
the key loop of a tensor-descriptor (TMA) launch split into producer and consumer warps by
Triton's ``tl.range(warp_specialize=True)``; ignored by the pointer-load kernels). Every
combination must be present exactly once: a missing or malformed entry is an error naming
the file and the entry, never a silent default.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Tuple

#: The tile kernels the tables cover, their dtype classes, head-dim buckets and row classes.
KERNELS = ("fwd", "dq", "dkdv")
DTYPE_CLASSES = ("16bit", "fp32")
BLOCK_D = {"16bit": (16, 32, 64, 128, 256), "fp32": (16, 32, 64, 128)}
ROW_CLASSES = ("decode", "prefill")
ARCHS = ("sm80", "sm90")
FIELDS = ("block_m", "block_n", "num_warps", "num_stages")
#: Optional fields and their value when absent.
OPTIONAL = {"warp_specialize": False}

#: One entry's values: FIELDS, then OPTIONAL's in order.
Entry = Tuple[int, int, int, int, bool]

Key = Tuple[str, str, int, str]

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def table_path(arch: str) -> str:
    """The file of architecture ``arch`` ("sm80" or "sm90")."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return os.path.join(_DIR, f"{arch}.json")


def expected_keys() -> Iterable[Key]:
    """Every (kernel, dtype class, BLOCK_D, row class) a table must have."""
    return [(k, dc, bd, rc) for k in KERNELS for dc in DTYPE_CLASSES for bd in BLOCK_D[dc]
            for rc in ROW_CLASSES]


def _pow2(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def parse_table(doc: dict, where: str) -> Dict[Key, Entry]:
    """{key: (block_m, block_n, num_warps, num_stages, warp_specialize)} of a table document; ValueError
    naming ``where`` (the file) and the entry on anything missing, repeated or malformed."""
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: no 'entries' list")
    table: Dict[Key, Entry] = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: entry {i} is not an object")
        key = (e.get("kernel"), e.get("dtype"), e.get("block_d"), e.get("rows"))
        if key not in set(expected_keys()):
            raise ValueError(f"{where}: entry {i} has an unknown key {key} (kernel in "
                             f"{KERNELS}, dtype in {DTYPE_CLASSES}, block_d by dtype "
                             f"{BLOCK_D}, rows in {ROW_CLASSES})")
        if key in table:
            raise ValueError(f"{where}: entry {i} repeats {key}")
        values = tuple(e.get(f) for f in FIELDS)
        bad = [f for f, v in zip(FIELDS, values)
               if not (_pow2(v) if f != "num_stages" else
                       isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8)]
        if bad:
            raise ValueError(f"{where}: entry {i} {key}: {', '.join(bad)} must be "
                             f"{'a power of two' if bad[0] != 'num_stages' else '1 to 8'}, "
                             f"got {dict(zip(FIELDS, values))}")
        unknown = sorted(set(e) - {"kernel", "dtype", "block_d", "rows", *FIELDS, *OPTIONAL})
        if unknown:
            raise ValueError(f"{where}: entry {i} {key}: unknown field(s) {unknown}")
        ws = e.get("warp_specialize", OPTIONAL["warp_specialize"])
        if not isinstance(ws, bool):
            raise ValueError(f"{where}: entry {i} {key}: warp_specialize must be true or "
                             f"false, got {ws!r}")
        table[key] = values + (ws,)
    missing = [k for k in expected_keys() if k not in table]
    if missing:
        raise ValueError(f"{where}: no entry for {missing[:4]}"
                         f"{' and more' if len(missing) > 4 else ''}")
    return table


def load_table(arch: str) -> Dict[Key, Entry]:
    """The tile table of ``arch`` from its file (``parse_table``)."""
    path = table_path(arch)
    with open(path) as f:
        doc = json.load(f)
    if doc.get("arch") != arch:
        raise ValueError(f"{path}: 'arch' is {doc.get('arch')!r}, expected {arch!r}")
    return parse_table(doc, path)
