"""``make gpu-tune``: on a GPU, the retrieval's tile table tuned for the 8B regimes in about
four minutes, and rewritten with the winners.

Regimes (bf16, head dim 128 so BLOCK_D 128, the 8B layout q [B, T, 4, 128], k/v
[B, Nv, 1, 128], key_mask None so that sm_90's tensor-descriptor (TMA) path is what runs):

    fwd-decode    a decode step: B 1 and B 16, T 1, Nv 4096, kv_len given (forward)
    fwd-prefill   B 1, T 8192, Nv 2048, kv_len given (forward)
    dq-prefill    the whole backward (delta, dK/dV, dQ, finish) at T 8192, Nv 2048
    dkdv-prefill  the same backward, the candidate in the dK/dV entry
    dq-decode, dkdv-decode (optional, ``--regimes``): the backward of the decode shapes

For each regime the candidates (``CANDIDATES``: a few powers of two per architecture,
the table's current entry always first) are tried one at a time, the candidate replacing
the one table entry (``retrieval.CONFIGS``) and every other entry left as it is:

1. checked against float64 (tools/tile_probe.py's ``check``: forward and backward,
   relative to the largest reference element, tolerances ``tile_probe.TOL``) in bf16 AND
   fp16 (the two share the "16bit" entry) on small problems whose T * G lands in the
   regime's row class (``CHECK_SHAPES``: odd T, B 2, kv_len below Nv, G 1 and G 4 without
   a key_mask (the TMA path), a key_mask with 2 KV heads (the pointer path)). A tile that
   compiles can still compute wrongly (seen at hd 128 on the H100): a wrong candidate is
   recorded with its error and never timed;
2. timed with ``triton.testing.do_bench`` (median of a short run: ``WARMUP_MS`` /
   ``REP_MS``), the geometric mean over the regime's timed shapes. A right candidate whose
   compiled kernel spills registers (``n_spills`` of the kernels its check compiled) is
   timed but not eligible: make test's compile gate refuses a spilling entry.

A compile or launch error (out of shared memory, say) is recorded and the candidate
skipped; if the CUDA context itself is lost, every remaining candidate is skipped and
nothing is written. The winner is the fastest correct candidate that does not spill; the
current entry is kept unless one is at least ``--min-gain`` faster (do_bench medians jitter
by about 1%). The candidate lists hold only tiles the compile gate accepted when they were
written (no spill under triton 3.8 and 3.6: tools/tile_sweep.py on a CPU machine), so a
winner should pass make test's gate too; make test recompiles it there either way.

Time: ``--budget`` seconds from the tool's start (default 230: under four minutes with the
write), compile time included. Each regime gets a share of what is left in proportion to
its candidates (time a regime leaves unused goes to the next); before each candidate the
tool predicts its cost from the candidates already done in that regime (compile + check
+ timing, the slowest of them) and, when it would end past the share, skips the remaining
candidates and says so on the output and in the record. The current entry always runs
while any budget is left.

Writes ``triton_ops/configs/<arch>.json`` (``--out PATH``: elsewhere; ``--dry-run``:
nowhere): only the tuned entries change, and ``measured`` records the device, versions,
date and, per regime, the shapes, every candidate's time or why it was wrong / failed /
skipped, the winner, and the previous entry with its time.

Exit status: 0; 1 if a current entry is wrong (or fails) on this GPU and no correct
winner replaced it in the written table, or the CUDA context was lost; 2 without a GPU
(one line says so; nothing is tuned).

    python tools/gpu_tune.py                      # what make gpu-tune runs
    python tools/gpu_tune.py --dry-run --regimes fwd-prefill
    python tools/gpu_tune.py --interpret --max-candidates 2 --regimes fwd-decode  # CPU
      (TRITON_INTERPRET=1: the check path on the interpreter, wall-clock "timing", tiny
      shapes; never writes the repository's table)
"""
from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts from here: imports and compiles included

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import tile_probe  # noqa: E402  (check, problem, TOL, DTYPES: shared with the probe)

#: The 8B layout: H query heads, HKV KV heads, head dim HD (BLOCK_D 128).
H, HKV, HD = 4, 1, 128
#: The dtype timed; the dtypes checked (they share the "16bit" table entry).
TIMED_DTYPE = "bf16"
CHECK_DTYPES = ("bf16", "fp16")
DTYPE_CLASS = "16bit"

#: do_bench's warmup and repetition (ms): short, the kernels take 0.01-1 ms.
WARMUP_MS, REP_MS = 10, 40
#: Seconds from the tool's start to the end of the last candidate, and kept for the write.
BUDGET_S, RESERVE_S = 230.0, 5.0
#: A candidate replaces the current entry only if at least this much faster.
MIN_GAIN = 0.02


class Tile(NamedTuple):
    """A candidate: an entry's block_m, block_n, num_warps, num_stages, warp_specialize
    (the fields of tile_tables.Entry and retrieval.TileConfig, in their order)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False


def parse_tile(text: str) -> Tile:
    """"MxNxWARPSxSTAGES" (tile_probe's syntax), "-ws" appended for warp_specialize."""
    ws = text.endswith("-ws")
    m, n, w, s = (int(x) for x in text[:-3 if ws else None].split("x"))
    return Tile(m, n, w, s, ws)


def tile_name(tile: Sequence) -> str:
    t = Tile(*tile)
    ws = "-ws" if t.warp_specialize else ""
    return f"{t.block_m}x{t.block_n}x{t.num_warps}x{t.num_stages}{ws}"


class Shape(NamedTuple):
    """One problem: (B, T, H, Hkv, Nv), kv_len per sample (None: no kv_len), a key_mask or
    not (None: the TMA path's condition)."""
    B: int
    T: int
    H: int
    Hkv: int
    Nv: int
    kv_len: Optional[Tuple[int, ...]] = None
    masked: bool = False

    @property
    def dims(self) -> Tuple[int, int, int, int, int]:
        return (self.B, self.T, self.H, self.Hkv, self.Nv)

    @property
    def rows(self) -> int:
        """Packed query rows T * G: what picks the table's row class."""
        return self.T * (self.H // self.Hkv)

    def describe(self) -> str:
        lens = "" if self.kv_len is None else (
            " kv_len=Nv" if set(self.kv_len) == {self.Nv} else
            f" kv_len={','.join(map(str, self.kv_len))}")
        return (f"B{self.B} T{self.T} H{self.H} Hkv{self.Hkv} Nv{self.Nv} hd{HD}{lens}"
                f"{' key_mask' if self.masked else ''}")


def _full(B: int, T: int, Nv: int) -> Shape:
    """A timed problem at the 8B layout, kv_len given (every key), no key_mask."""
    return Shape(B, T, H, HKV, Nv, (Nv,) * B, False)


#: Small problems checked against float64 per row class; every T * G lands in the class.
CHECK_SHAPES: Dict[str, Tuple[Shape, ...]] = {
    "decode": (
        Shape(1, 1, 4, 1, 300, (257,)),           # a decode step, kv_len below Nv
        Shape(2, 3, 4, 1, 37, (37, 20)),          # odd T, B 2, T * G = 12
        Shape(1, 4, 4, 1, 1000, (900,)),          # T * G = 16: the class's edge, many key blocks
        Shape(2, 1, 4, 2, 129, None, True),       # key_mask, 2 KV heads (pointer loads)
    ),
    "prefill": (
        Shape(1, 5, 4, 1, 64, (64,)),             # T * G = 20: just past decode
        Shape(2, 67, 4, 1, 130, (130, 77)),       # odd T, B 2, kv_len below Nv
        Shape(1, 200, 4, 1, 300, (250,)),         # several row and key blocks
        Shape(1, 37, 2, 2, 100, (90,)),           # G 1 (the other evenly strided layout)
        Shape(2, 33, 4, 2, 97, None, True),       # key_mask, 2 KV heads (pointer loads)
    ),
}


class Regime(NamedTuple):
    name: str
    kernel: str                 # the table entry tuned: fwd / dq / dkdv
    rows: str                   # its row class: decode / prefill
    timed: Tuple[Shape, ...]    # bf16, at the 8B layout
    judged: Tuple[str, ...]     # the outputs a candidate must get right

    @property
    def key(self) -> Tuple[str, str, int, str]:
        """The tile table key (kernel, dtype class, BLOCK_D, row class)."""
        return (self.kernel, DTYPE_CLASS, HD, self.rows)

    @property
    def timed_by(self) -> str:
        return ("the forward" if self.kernel == "fwd" else
                "the whole backward (delta, dkdv, dq, finish), the forward's entry fixed")


_DECODE = (_full(1, 1, 4096), _full(16, 1, 4096))
_PREFILL = (_full(1, 8192, 2048),)
#: The forward's candidates are judged on every output: a wrong lse shows in the gradients.
REGIMES: Dict[str, Regime] = {r.name: r for r in (
    Regime("fwd-decode", "fwd", "decode", _DECODE, ("out", "dq", "dk", "dv")),
    Regime("fwd-prefill", "fwd", "prefill", _PREFILL, ("out", "dq", "dk", "dv")),
    Regime("dq-prefill", "dq", "prefill", _PREFILL, ("dq",)),
    Regime("dkdv-prefill", "dkdv", "prefill", _PREFILL, ("dk", "dv")),
    Regime("dq-decode", "dq", "decode", _DECODE, ("dq",)),
    Regime("dkdv-decode", "dkdv", "decode", _DECODE, ("dk", "dv")),
)}
DEFAULT_REGIMES = ("fwd-decode", "fwd-prefill", "dq-prefill", "dkdv-prefill")

#: arch -> regime -> candidates, the committed table's entry first, then in order of
#: preference (a deadline skips from the end). Decode rows are 16 (the MMA minimum; T * G
#: <= 16), so decode tiles vary keys, warps and stages only. sm_90 starts from published
#: H100 tiles: the Triton fused-attention tutorial's forward (128 x 64 on 8 warps, 3-4
#: stages; the prefill forward also with its key loop warp-specialised, "-ws": the TMA
#: path only) and dQ 128 x 64. Every candidate compiled without a spill for its target
#: under both triton 3.8 and 3.6 (tools/tile_sweep.py's compile_candidate, the compile
#: gate's check, with the TMA kernels): a spilling entry fails make test, so these never
#: could win and are left out: sm_90 forward 128 x 128 x 8 (+ws, 136 B), 128 x 64 x 4
#: (1 KB), 64 x 128 x 8 (3.6: 128 B), 64 x 64 x 4 (3.6: 8 B); dQ 128 x 128 and 64 x 128
#: (56-104 B); the published dK/dV tiles over 128 keys (64 x 128, 32 x 128, 128 x 128:
#: 248-712 B) and 32 x 64 x 4 (240 B); decode dK/dV 16 x 128 (256 B). sm_80: forward
#: 128 x 64 x 8 and 64 x 64 x 4 (24-40 B), dQ 128 x 64, 128 x 32, 64 x 128 and 64 x 64 x
#: 4 (16-192 B), dK/dV over 128 keys and on 4 warps (288-600 B), decode forward 16 x 32
#: x 4 and 16 x 64 x 8 (3.6: 8 B), decode dQ 16 x 128 (8-16 B).
CANDIDATES: Dict[str, Dict[str, List[str]]] = {
    "sm90": {
        "fwd-decode": ["16x64x4x2", "16x128x4x2", "16x64x4x3", "16x128x4x3", "16x32x4x2",
                       "16x64x8x2"],
        "fwd-prefill": ["128x64x8x3", "128x64x8x3-ws", "128x64x8x4", "128x64x8x4-ws",
                        "128x64x8x2", "128x64x8x2-ws", "64x64x8x3", "128x32x8x3"],
        "dq-prefill": ["128x64x8x3", "128x64x8x4", "128x64x8x2", "128x32x8x3", "64x64x8x3",
                       "64x64x4x3"],
        "dkdv-prefill": ["64x64x8x3", "64x64x8x2", "64x64x8x4", "128x64x8x2", "32x64x8x3",
                         "64x32x8x3", "128x32x8x3"],
        "dq-decode": ["16x64x4x2", "16x128x4x2", "16x64x4x3", "16x64x8x2"],
        "dkdv-decode": ["16x64x8x2", "16x64x8x3", "16x32x8x2", "16x32x8x3", "16x64x8x4"],
    },
    "sm80": {
        "fwd-decode": ["16x64x4x2", "16x128x4x2", "16x64x4x3", "16x128x4x3", "16x128x8x2",
                       "16x64x4x4"],
        "fwd-prefill": ["64x64x8x2", "64x64x8x3", "64x128x8x2", "64x128x8x3", "128x32x8x2",
                        "128x32x8x3", "64x32x8x3"],
        "dq-prefill": ["64x64x8x2", "64x64x8x3", "64x64x8x4", "64x32x8x2", "64x32x8x3",
                       "64x32x4x2", "32x64x4x2"],
        "dkdv-prefill": ["64x64x8x2", "64x64x8x3", "64x64x8x1", "32x64x8x2", "32x64x8x3",
                         "64x32x8x2", "64x32x8x3"],
        "dq-decode": ["16x64x4x2", "16x64x4x3", "16x64x8x2", "16x32x4x2", "16x64x4x4"],
        "dkdv-decode": ["16x64x8x2", "16x64x8x1", "16x64x8x3", "16x32x8x2", "16x32x8x3"],
    },
}


def candidates_for(arch: str, regime: str, current: Tile, limit: Optional[int] = None
                   ) -> List[Tile]:
    """The regime's candidates on ``arch``: the current entry first, then the list's
    others in order (``limit``: at most that many in all)."""
    listed = [parse_tile(c) for c in CANDIDATES[arch][regime]]
    tiles = list(dict.fromkeys([Tile(*current)] + listed))
    return tiles[:limit] if limit else tiles


# ---- the tuning loop (no GPU in here: checker, timer, clock and health are passed in) ------

def _short(exc: BaseException, width: int = 150) -> str:
    """An exception in one line: its type and first non-empty line, cut to ``width``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= width else text[:width - 3] + "..."


def _ms(x: float) -> float:
    return float(f"{x:.4g}")


def tune_regime(name: str, candidates: Sequence[Tile], check: Callable[[Tile], dict],
                time_tile: Callable[[Tile], dict], clock: Callable[[], float],
                deadline: float, end: float, health: Callable[[], Optional[str]] = lambda: None,
                log: Callable[[str], None] = print, step: Callable[[], None] = lambda: None
                ) -> Tuple[List[dict], Optional[str], Optional[str]]:
    """Check, then time, each candidate (the first is the current entry). ``check(tile)``
    returns {"ok": True, "max_err": {dtype: err}, "spills": bytes or None} or {"ok": False,
    "detail": why}, and may raise (a compile or launch error: recorded, the candidate
    skipped); ``time_tile(tile)`` returns {"ms": ..., "ms_by_shape": [...]}. A right
    candidate that spills (bytes of local memory) is timed but recorded "spills": never a
    winner (the compile gate refuses a spilling table entry). Before each candidate after
    the first, its cost (the slowest candidate so far) is predicted and, if it would end past
    ``deadline``, it and the rest are skipped; the first runs while ``clock() < end``.
    After an error, ``health()`` (None, or why the device is unusable) decides whether the
    rest can run. Returns (one record per candidate, why candidates were skipped or None,
    why the device was lost or None)."""
    records: List[dict] = []
    costs: List[float] = []
    skipped: Optional[str] = None
    lost: Optional[str] = None
    for i, tile in enumerate(candidates):
        rec: dict = {"tile": tile_name(tile)}
        if i == 0:
            rec["current"] = True
        now = clock()
        if lost is None and skipped is None:
            if i == 0 and now >= end:
                skipped = "deadline: the run's budget was spent before this regime"
                log(f"  {name}: {skipped}; skipping its {len(candidates)} candidate(s)")
            elif i > 0:
                estimate = max(costs[1:]) if len(costs) > 1 else costs[0]
                if now + estimate > deadline:
                    skipped = (f"deadline: {max(deadline - now, 0):.0f} s left of this regime's "
                               f"share, a candidate takes about {estimate:.0f} s")
                    log(f"  {name}: {skipped}; skipping the {len(candidates) - i} remaining "
                        f"candidate(s)")
        if lost is not None or skipped is not None:
            rec.update(status="skipped", why=lost or skipped)
            records.append(rec)
            step()
            continue
        t0 = clock()
        try:
            verdict = check(tile)
        except Exception as exc:  # noqa: BLE001 - a compile or launch error is a result
            rec.update(status="error", error="check: " + _short(exc),
                       check_s=round(clock() - t0, 1))
        else:
            rec["check_s"] = round(clock() - t0, 1)
            if not verdict.get("ok"):
                rec.update(status="wrong", error=verdict.get("detail", "wrong"))
            else:
                for dname, err in verdict.get("max_err", {}).items():
                    rec[f"{dname}_err"] = float(f"{err:.2g}")
                t1 = clock()
                try:
                    timing = time_tile(tile)
                except Exception as exc:  # noqa: BLE001
                    rec.update(status="error", error="timing: " + _short(exc))
                else:
                    rec.update(status="ok", ms=_ms(timing["ms"]),
                               ms_by_shape=[_ms(x) for x in timing.get("ms_by_shape", [])])
                    if verdict.get("spills") is not None:
                        rec["spills"] = verdict["spills"]
                    if verdict.get("spills"):  # right, but the compile gate refuses it
                        rec["status"] = "spills"
                rec["bench_s"] = round(clock() - t1, 1)
        costs.append(clock() - t0)
        if rec["status"] == "error":
            lost = health()
            if lost is not None:
                log(f"  {name}: the device is unusable after {rec['tile']} ({lost}): "
                    "skipping every remaining candidate")
        rec = _ordered(rec)
        outcome = (f"{rec['ms']:.4g} ms" if rec["status"] == "ok" else
                   f"{rec['ms']:.4g} ms, SPILLS {rec['spills']} B (not eligible)"
                   if rec["status"] == "spills" else
                   f"{rec['status'].upper()}: {rec.get('error')}")
        log(f"  {name} {rec['tile']}{' (current)' if i == 0 else ''}: {outcome}  "
            f"[{costs[-1]:.1f} s]")
        records.append(rec)
        step()
    return records, skipped, lost


_ORDER = ("tile", "current", "status", "ms", "ms_by_shape", "spills", "error", "why",
          "bf16_err", "fp16_err", "check_s", "bench_s")


def _ordered(rec: dict) -> dict:
    """A candidate's record with its fields in a fixed, readable order."""
    return {**{k: rec[k] for k in _ORDER if k in rec}, **rec}


def choose_winner(records: Sequence[dict], min_gain: float = MIN_GAIN) -> Optional[dict]:
    """The fastest correct (status "ok") record; the current entry's if none is at least
    ``min_gain`` faster than it; None if no candidate is correct."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("ms") is not None]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["ms"])
    current = next((r for r in ok if r.get("current")), None)
    if current is not None and best["ms"] > current["ms"] * (1.0 - min_gain):
        return current
    return best


def tune(arch: str, regimes: Sequence[Regime], table: Dict, make_check, make_timer,
         clock: Callable[[], float], end: float, health=lambda: None, log=print,
         limit: Optional[int] = None, min_gain: float = MIN_GAIN, progress: bool = True,
         start: Optional[float] = None
         ) -> Tuple[Dict[str, dict], Dict[Tuple, Tile], Optional[str]]:
    """Tune ``regimes`` (``table``: the parsed tile table, key -> entry values) until
    ``end``: each regime's share of the time left is proportional to its candidates.
    ``make_check(regime, key)`` / ``make_timer(regime, key)`` give the regime's checker
    and timer. Returns (per regime name: its record, the winners {table key: tile} of the
    regimes that have one, why the device was lost or None). ``start``: when the run
    began (the printed elapsed times count from it)."""
    run_start = clock() if start is None else start
    plans = [(r, candidates_for(arch, r.name, Tile(*table[r.key]), limit)) for r in regimes]
    bar = _progress(sum(len(c) for _, c in plans), progress)
    say = bar.write if bar is not None else log
    out: Dict[str, dict] = {}
    winners: Dict[Tuple, Tile] = {}
    lost: Optional[str] = None
    for i, (regime, cands) in enumerate(plans):
        began = clock()
        weight_left = sum(len(c) for _, c in plans[i:])
        deadline = began + max(end - began, 0.0) * len(cands) / weight_left
        if bar is not None:
            bar.set_description(regime.name)
        say(f"{regime.name}: {len(cands)} candidates, {max(deadline - began, 0):.0f} s of "
            f"{max(end - began, 0):.0f} s left ({regime.timed_by}; "
            + "; ".join(s.describe() for s in regime.timed) + ")")
        if lost is None:
            records, skipped, lost = tune_regime(
                regime.name, cands, make_check(regime, regime.key),
                make_timer(regime, regime.key), clock, deadline, end, health, say,
                bar.update if bar is not None else (lambda: None))
        else:
            records = [{"tile": tile_name(t), "status": "skipped", "why": lost} for t in cands]
            records[0]["current"] = True
            skipped = None
        winner = None if lost is not None else choose_winner(records, min_gain)
        previous = records[0]
        rec = {
            "key": [arch, *regime.key],
            "timed_by": regime.timed_by,
            "timed_shapes": [f"{s.describe()} {TIMED_DTYPE}" for s in regime.timed],
            "checked": f"{' and '.join(CHECK_DTYPES)} vs float64 (outputs "
                       f"{', '.join(regime.judged)}) at: "
                       + "; ".join(s.describe() for s in CHECK_SHAPES[regime.rows]),
            "candidates": records,
            "winner": None if winner is None else winner["tile"],
            "winner_ms": None if winner is None else winner["ms"],
            "previous": previous["tile"],
            "previous_status": previous["status"],
            "previous_ms": previous.get("ms"),
            "changed": winner is not None and winner["tile"] != previous["tile"],
            "skipped": None if skipped is None else
            f"{sum(r['status'] == 'skipped' for r in records)} candidate(s): {skipped}",
            "elapsed_s": round(clock() - began, 1),
        }
        if lost is not None:
            rec["skipped"] = f"device lost: {lost}"
        out[regime.name] = rec
        if winner is not None:
            winners[regime.key] = parse_tile(winner["tile"])
        counts = {s: sum(r["status"] == s for r in records)
                  for s in ("ok", "spills", "wrong", "error", "skipped")}
        verdict = ("no correct candidate" if winner is None else
                   f"winner {winner['tile']} {winner['ms']:.4g} ms" + (
                       "" if previous.get("ms") is None else
                       f" vs current {previous['tile']} {previous['ms']:.4g} ms "
                       f"({100 * (winner['ms'] / previous['ms'] - 1):+.1f}%)"))
        say(f"{regime.name}: {verdict}; {counts['ok']} eligible, {counts['spills']} spilled, "
            f"{counts['wrong']} wrong, "
            f"{counts['error']} failed, {counts['skipped']} skipped; {rec['elapsed_s']:.0f} s "
            f"(run at {clock() - run_start:.0f} s)")
    if bar is not None:
        bar.close()
    return out, winners, lost


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="tile", file=sys.stderr, dynamic_ncols=True)


def problems(records: Dict[str, dict], written: bool) -> List[str]:
    """Loud lines for every regime whose current entry is wrong or fails on this GPU; a
    line starting "FAIL" unless a correct winner replaced it in a written table."""
    lines = []
    for name, rec in records.items():
        if rec["previous_status"] in ("ok", "spills", "skipped"):
            continue
        why = next((c.get("error") for c in rec["candidates"] if c.get("current")), "")
        head = (f"{name}: the current entry {rec['previous']} of {tuple(rec['key'])} is "
                f"{rec['previous_status'].upper()} on this GPU ({why})")
        if rec["winner"] is not None and rec["changed"] and written:
            lines.append(f"!!! {head}; replaced by {rec['winner']}, correct here.")
        else:
            lines.append(f"FAIL {head}; " + ("no correct candidate was found: the table still "
                                              "holds it." if rec["winner"] is None else
                                              f"{rec['winner']} is correct, but the table was "
                                              "not written (--dry-run)."))
    return lines


# ---- the table file ---------------------------------------------------------------------

#: A JSON object or array whose values are all scalars (or arrays of scalars) stays on one
#: line up to this width: the files' one entry per line.
INLINE_WIDTH = 240


def _scalar(v) -> bool:
    return not isinstance(v, (dict, list))


def _inline(v) -> bool:
    if _scalar(v):
        return True
    items = v.values() if isinstance(v, dict) else v
    flat = all(_scalar(x) or (isinstance(x, list) and all(map(_scalar, x))) for x in items)
    return flat and len(json.dumps(v, ensure_ascii=False)) <= INLINE_WIDTH


def _fmt(v, indent: int) -> str:
    if _inline(v):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        pad = " " * (indent + 4)
        body = ",\n".join(f"{pad}{json.dumps(k, ensure_ascii=False)}: {_fmt(x, indent + 4)}"
                          for k, x in v.items())
        return "{\n" + body + "\n" + " " * indent + "}"
    pad = " " * (indent + 2)
    return "[\n" + ",\n".join(pad + _fmt(x, indent + 2) for x in v) + "\n" + " " * indent + "]"


def dump_table(doc: dict) -> str:
    """A table document as the files lay it out: top-level fields two spaces in, an
    object's fields four further, an array's items two further, one entry per line."""
    body = ",\n".join(f"  {json.dumps(k, ensure_ascii=False)}: {_fmt(v, 2)}"
                      for k, v in doc.items())
    return "{\n" + body + "\n}\n"


def rewrite_table(doc: dict, winners: Dict[Tuple, Tile], measured: Optional[dict],
                  where: str = "table") -> dict:
    """A new table document: ``doc`` with each entry keyed (kernel, dtype class, BLOCK_D,
    row class) in ``winners`` set to its tile (warp_specialize written only when true) and
    ``measured`` recorded; every other entry and field as it was. Validated by
    tile_tables.parse_table."""
    from pvm_kernels.triton_ops.tile_tables import FIELDS, parse_table
    new = copy.deepcopy(doc)
    found = set()
    for e in new["entries"]:
        key = (e.get("kernel"), e.get("dtype"), e.get("block_d"), e.get("rows"))
        if key in winners:
            tile = Tile(*winners[key])
            e.update(zip(FIELDS, tile[:4]))
            if tile.warp_specialize:
                e["warp_specialize"] = True
            else:
                e.pop("warp_specialize", None)
            found.add(key)
    missing = set(winners) - found
    if missing:
        raise ValueError(f"{where}: no entry for {sorted(missing)}")
    new["measured"] = measured
    parse_table(new, where)
    return new


def write_text(path: str, text: str) -> None:
    """``text`` into ``path`` atomically (a reader never sees half a table)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ---- the device --------------------------------------------------------------------------

_KERNEL_FN = {"fwd": "retrieval_fwd_kernel", "dq": "retrieval_bwd_dq_kernel",
              "dkdv": "retrieval_bwd_dkdv_kernel"}


def _compiled(kernel_fn) -> dict:
    """{id: compiled kernel} of a Triton JITFunction's in-process caches, every device
    (Triton 3.x's ``device_caches``; empty where there are none: the interpreter). The
    kernels a candidate's check added are its own: their ``n_spills`` (local memory per
    thread in 4-byte words, read when the kernel is loaded) is what the compile gate
    refuses."""
    out = {}
    try:
        for caches in kernel_fn.device_caches.values():
            for k in caches[0].values():
                out[id(k)] = k
    except Exception:  # noqa: BLE001 - another Triton's internals: spills then unknown
        return {}
    return out


class GpuBackend:
    """The real checker and timer: the retrieval on the GPU (or, ``interpret``, on the
    Triton interpreter with CPU tensors: the check path exercised, wall-clock timing of
    tiny shapes)."""

    def __init__(self, interpret: bool = False):
        self.interpret = interpret

    def available(self) -> bool:
        import torch
        return self.interpret or torch.cuda.is_available()

    def setup(self) -> None:
        import torch
        from pvm_kernels import triton_ops  # noqa: F401 - the launchers
        from pvm_kernels.triton_ops import retrieval as R
        self.torch, self.R = torch, R
        self.dev = torch.device("cpu" if self.interpret else "cuda")
        self.arch = R.arch_of(self.dev)

    def info(self) -> dict:
        import torch
        import triton
        info = {"device": "cpu (TRITON_INTERPRET=1: no real timings)" if self.interpret
                else torch.cuda.get_device_name(self.dev),
                "capability": None, "sms": None, "arch": self.arch,
                "torch": torch.__version__, "triton": triton.__version__,
                "cuda": torch.version.cuda}
        if not self.interpret:
            props = torch.cuda.get_device_properties(self.dev)
            info.update(capability=f"{props.major}.{props.minor}",
                        sms=props.multi_processor_count)
        return info

    def _installed(self, key, tile):
        """A context with CONFIGS[(arch,) + key] = tile, restored after."""
        import contextlib
        R, full = self.R, (self.arch,) + tuple(key)

        @contextlib.contextmanager
        def ctx():
            previous = R.CONFIGS[full]
            R.CONFIGS[full] = R.TileConfig(*tile)
            try:
                yield
            finally:
                R.CONFIGS[full] = previous
        return ctx()

    def make_check(self, regime: Regime, key):
        R, dev = self.R, self.dev
        for s in CHECK_SHAPES[regime.rows]:  # every problem must select the tuned entry
            for dname in CHECK_DTYPES:
                got = R.config_key(regime.kernel, tile_probe.DTYPES[dname], s.rows, HD, dev)
                assert got == (self.arch,) + tuple(key), (s, got, key)

        kernel_fn = getattr(R, _KERNEL_FN[regime.kernel])

        def check(tile: Tile) -> dict:
            worst = {}
            before = _compiled(kernel_fn)
            with self._installed(key, tile):
                for dname in CHECK_DTYPES:
                    dtype = tile_probe.DTYPES[dname]
                    tol = tile_probe.TOL[dtype]
                    worst[dname] = 0.0
                    for s in CHECK_SHAPES[regime.rows]:
                        q, k, v, mask, lens, go = tile_probe.problem(
                            s.dims, HD, dtype, dev, masked=s.masked, kv_len=s.kv_len)
                        errs = tile_probe.check(q, k, v, mask, go, kv_len=lens)
                        for out in regime.judged:
                            if not errs[out] < tol:  # NaN and inf included
                                return {"ok": False, "detail": f"{out} error {errs[out]:.3g} > "
                                        f"{tol:g} in {dname} at {s.describe()}"}
                            worst[dname] = max(worst[dname], errs[out])
            new = [k for i, k in _compiled(kernel_fn).items() if i not in before]
            words = [getattr(k, "n_spills", None) for k in new]
            return {"ok": True, "max_err": worst,  # spills in bytes, as the gate counts
                    "spills": 4 * max(words) if words and None not in words else None}
        return check

    def make_timer(self, regime: Regime, key):
        torch, dev = self.torch, self.dev
        from pvm_kernels import pvm_retrieval
        shapes = regime.timed
        inputs = []  # made on first use, kept for every candidate of the regime

        def bench(fn) -> float:
            if self.interpret:
                fn()
                t0 = time.perf_counter()
                fn()
                return 1e3 * (time.perf_counter() - t0)
            import triton.testing
            return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS,
                                           return_mode="median")

        def time_tile(tile: Tile) -> dict:
            if not inputs:
                inputs.extend(tile_probe.problem(s.dims, HD, tile_probe.DTYPES[TIMED_DTYPE], dev,
                                                 masked=False, kv_len=s.kv_len) for s in shapes)
            times = []
            with self._installed(key, tile):
                for q, k, v, _, lens, go in inputs:
                    if regime.kernel == "fwd":
                        def fn(q=q, k=k, v=v, lens=lens):
                            return pvm_retrieval(q, k, v, None, lens, backend="triton")
                    else:
                        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
                        out = pvm_retrieval(qs, ks, vs, None, lens, backend="triton")

                        def fn(out=out, qs=qs, ks=ks, vs=vs, go=go):
                            return torch.autograd.grad(out, (qs, ks, vs), go, retain_graph=True)
                    times.append(bench(fn))
            return {"ms": math.exp(sum(map(math.log, times)) / len(times)), "ms_by_shape": times}
        return time_tile

    def health(self) -> Optional[str]:
        """None if the device still runs work after a failed candidate, else why not (an
        illegal address or similar poisons the CUDA context for the rest of the process)."""
        if self.interpret:
            return None
        torch = self.torch
        try:
            torch.cuda.synchronize()
            if torch.ones(8, device=self.dev).sum().item() != 8.0:
                return "a test kernel computed wrongly"
        except Exception as exc:  # noqa: BLE001
            return _short(exc)
        return None


NO_GPU = ("gpu_tune: no CUDA GPU found (torch.cuda.is_available() is False): nothing "
          "tuned, the tile tables are unchanged.")


def main(argv=None, backend=None, clock: Callable[[], float] = time.monotonic,
         start: Optional[float] = None) -> int:
    """The tool (module docstring); ``backend`` (default GpuBackend), ``clock`` and
    ``start`` (default: this module's import) are for the tests."""
    start = _T0 if start is None else start
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default=",".join(DEFAULT_REGIMES),
                   help=f"comma-separated, of {', '.join(REGIMES)}")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds from the start for everything (default %(default)s)")
    p.add_argument("--min-gain", type=float, default=MIN_GAIN,
                   help="fraction a candidate must beat the current entry by (%(default)s)")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="at most this many per regime (the current entry first)")
    p.add_argument("--dry-run", action="store_true", help="print, write nothing")
    p.add_argument("--out", help="write the table here instead of triton_ops/configs/<arch>.json")
    p.add_argument("--json", help="also write the measured record here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--interpret", action="store_true",
                   help="the Triton interpreter on the CPU (TRITON_INTERPRET=1): checks the "
                        "tool, not the tiles; writes only with --out")
    args = p.parse_args(argv)
    unknown = [r for r in args.regimes.split(",") if r not in REGIMES]
    if unknown:
        p.error(f"unknown regime(s) {unknown}: choose from {', '.join(REGIMES)}")
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("gpu_tune: --interpret needs TRITON_INTERPRET=1 in the environment",
                  file=sys.stderr)
            return 2
    backend = backend or GpuBackend(interpret=args.interpret)
    if not backend.available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1" and not args.interpret:
        print("gpu_tune: TRITON_INTERPRET=1 is set, so the kernels would run on the "
              "interpreter: unset it (make gpu-tune does)", file=sys.stderr)
        return 2
    from pvm_kernels.triton_ops import tile_tables
    backend.setup()
    arch = backend.arch
    src = tile_tables.table_path(arch)
    with open(src, encoding="utf-8") as f:
        doc = json.load(f)
    table = tile_tables.parse_table(doc, src)
    info = backend.info()
    regimes = [REGIMES[r] for r in args.regimes.split(",")]
    if args.interpret:  # the interpreter times tiny problems (the 8B ones take minutes)
        regimes = [r._replace(timed=(_full(1, 1 if r.rows == "decode" else 20, 64),))
                   for r in regimes]
    print(f"gpu_tune: {info['device']} ({arch}), torch {info['torch']}, triton "
          f"{info['triton']}, CUDA {info['cuda']}; regimes {', '.join(r.name for r in regimes)}; "
          f"budget {args.budget:.0f} s ({clock() - start:.0f} s spent starting)", flush=True)
    end = start + args.budget - RESERVE_S
    records, winners, lost = tune(arch, regimes, table, backend.make_check, backend.make_timer,
                                  clock, end, backend.health, print, args.max_candidates,
                                  args.min_gain, progress=not args.no_progress, start=start)
    measured = dict(info, date=datetime.datetime.now(datetime.timezone.utc)
                    .strftime("%Y-%m-%dT%H:%M:%SZ"),
                    tool="tools/gpu_tune.py (make gpu-tune)", budget_s=args.budget,
                    elapsed_s=round(clock() - start, 1),
                    timing=("wall clock of one call on the interpreter" if args.interpret else
                            f"triton.testing.do_bench median, warmup {WARMUP_MS} ms, rep "
                            f"{REP_MS} ms") + f", {TIMED_DTYPE}; a regime's time: the "
                           "geometric mean over its timed shapes",
                    min_gain=args.min_gain, regimes=records)
    if lost is not None:
        measured["device_lost"] = lost
    target = args.out or (None if args.interpret else src)
    written = False
    if lost is None and not args.dry_run and target is not None:
        new = rewrite_table(doc, winners, measured, target)
        write_text(target, dump_table(new))
        written = True
        changed = [n for n, r in records.items() if r["changed"]]
        print(f"gpu_tune: wrote {os.path.relpath(target)}: "
              + (f"{', '.join(changed)} changed" if changed else "no entry changed")
              + "; measured recorded")
    else:
        why = ("the device was lost" if lost is not None else "--dry-run" if args.dry_run
               else "--interpret without --out")
        print(f"gpu_tune: nothing written ({why}); winners: "
              + ", ".join(f"{n} {r['winner']}" for n, r in records.items()))
    if args.json:
        write_text(args.json, json.dumps(measured, indent=1) + "\n")
    loud = problems(records, written)
    for line in loud:
        print(line, file=sys.stderr)
    bad = lost is not None or any(line.startswith("FAIL") for line in loud)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
