"""tools/gpu_tune.py (make gpu-tune) without a GPU: the no-GPU exit, the table rewrite and its
layout, the deadline, wrong and failing candidates, the candidate lists and problem shapes;
the device is replaced by fake checkers, timers and clocks."""
import copy
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_tune as gt  # noqa: E402
import tile_probe  # noqa: E402

from pvm_kernels.triton_ops import retrieval as R, tile_tables as tt  # noqa: E402


def _doc(arch="sm90"):
    with open(tt.table_path(arch), encoding="utf-8") as f:
        return json.load(f)


class Clock:
    """A fake monotonic clock: advanced by the fake checkers and timers."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def _fakes(clock, wrong=(), raising=(), ms=None, check_s=10.0, bench_s=1.0, timed=None,
           spills=None):
    """A checker and timer: tiles named in ``wrong`` are wrong, in ``raising`` raise; the
    time of a tile is ms[name] (default 1.0), its spills spills[name] (default 0); each call
    advances the clock."""
    spills = spills or {}
    ms = ms or {}
    timed = timed if timed is not None else []

    def check(tile):
        clock.t += check_s
        name = gt.tile_name(tile)
        if name in raising:
            raise RuntimeError("out of resource: shared memory, Required: 262144\nmore text")
        if name in wrong:
            return {"ok": False, "detail": "dk error 0.5 > 0.02 in bf16 at B2 T67"}
        return {"ok": True, "max_err": {"bf16": 0.004, "fp16": 0.001},
                "spills": spills.get(name, 0)}

    def time_tile(tile):
        clock.t += bench_s
        timed.append(gt.tile_name(tile))
        t = ms.get(gt.tile_name(tile), 1.0)
        return {"ms": t, "ms_by_shape": [t]}
    return check, time_tile


# ---- without a GPU ------------------------------------------------------------------------

def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gt.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == gt.NO_GPU and err.count("\n") == 1
    assert "no CUDA GPU" in err and "nothing tuned" in err


# ---- the table file -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", tt.ARCHS)
def test_dump_keeps_the_committed_layout_byte_for_byte(arch):
    with open(tt.table_path(arch), encoding="utf-8") as f:
        text = f.read()
    assert gt.dump_table(json.loads(text)) == text, (
        f"configs/{arch}.json is not in the layout gpu_tune writes (gt.dump_table): a tuning "
        "run would reformat it")


def test_rewrite_changes_only_the_tuned_entries_and_records_measured():
    doc = _doc("sm90")
    before = copy.deepcopy(doc)
    winners = {("fwd", "16bit", 128, "prefill"): gt.parse_tile("128x128x8x3-ws"),
               ("dkdv", "16bit", 128, "prefill"): gt.parse_tile("64x128x8x2")}
    measured = {"device": "NVIDIA H100", "regimes": {"fwd-prefill": {
        "candidates": [{"tile": "128x64x8x3", "status": "ok", "ms": 0.5},
                       {"tile": "128x128x8x3-ws", "status": "ok", "ms": 0.4}]}}}
    new = gt.rewrite_table(doc, winners, measured, "configs/sm90.json")
    assert doc == before  # the input is not modified
    assert new["measured"] == measured and new["notes"] == doc["notes"]
    assert new["arch"] == "sm90"
    changed = []
    for old, e in zip(doc["entries"], new["entries"]):
        key = (e["kernel"], e["dtype"], e["block_d"], e["rows"])
        if old != e:
            changed.append(key)
    assert sorted(changed) == sorted(winners)
    table = tt.parse_table(new, "new")
    assert table[("fwd", "16bit", 128, "prefill")] == (128, 128, 8, 3, True)
    assert table[("dkdv", "16bit", 128, "prefill")] == (64, 128, 8, 2, False)
    # the text: valid JSON equal to the document, one entry per line
    text = gt.dump_table(new)
    assert json.loads(text) == new
    lines = [ln for ln in text.splitlines() if ln.startswith('    {"kernel"')]
    assert [json.loads(ln.rstrip(",")) for ln in lines] == new["entries"]
    assert '"warp_specialize": true}' in text
    # ... and back: a warp_specialize winner replaced by a plain tile drops the field
    old = tt.parse_table(doc, "old")
    again = gt.rewrite_table(new, {key: gt.Tile(*old[key]) for key in winners}, None)
    assert again["entries"] == doc["entries"] and again["measured"] is None
    assert gt.dump_table(again) == gt.dump_table(doc)


def test_rewrite_refuses_a_winner_without_an_entry_or_an_invalid_tile():
    with pytest.raises(ValueError, match="no entry for"):
        gt.rewrite_table(_doc(), {("fwd", "16bit", 512, "prefill"): gt.Tile(64, 64, 4, 2)}, None)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        gt.rewrite_table(_doc(), {("fwd", "16bit", 128, "prefill"): gt.Tile(48, 64, 4, 2)}, None)


# ---- the tuning loop ----------------------------------------------------------------------

def _tiles(*names):
    return [gt.parse_tile(n) for n in names]


def test_the_deadline_skips_the_remaining_candidates_and_says_so():
    clock, logs = Clock(), []
    check, time_tile = _fakes(clock)  # 11 s a candidate
    cands = _tiles("64x64x8x3", "64x128x8x3", "32x128x8x3", "128x128x8x2", "32x64x4x3")
    recs, skipped, lost = gt.tune_regime("dkdv-prefill", cands, check, time_tile, clock,
                                         deadline=30.0, end=100.0, log=logs.append)
    # 0 s: the current runs; 11 s + 11 <= 30: the second; 22 s + 11 > 30: the rest skipped
    assert [r["status"] for r in recs] == ["ok", "ok", "skipped", "skipped", "skipped"]
    assert skipped.startswith("deadline") and lost is None
    assert all(r["why"] == skipped for r in recs[2:])
    assert any("skipping the 3 remaining" in line for line in logs)
    assert clock.t == 22.0  # nothing ran after the deadline's decision


def test_the_current_entry_runs_unless_the_whole_budget_is_spent():
    clock = Clock(50.0)
    check, time_tile = _fakes(clock)
    cands = _tiles("64x64x8x3", "64x128x8x3")
    recs, _, _ = gt.tune_regime("r", cands, check, time_tile, clock, deadline=40.0, end=60.0)
    assert [r["status"] for r in recs] == ["ok", "skipped"]  # past its share, not the end
    clock.t = 60.0
    recs, skipped, _ = gt.tune_regime("r", cands, check, time_tile, clock, deadline=40.0, end=60.0)
    assert [r["status"] for r in recs] == ["skipped", "skipped"] and "budget" in skipped


def test_regimes_share_the_time_left_and_the_record_says_what_was_skipped():
    clock = Clock()
    check, time_tile = _fakes(clock, check_s=20.0, bench_s=0.0)
    table = tt.parse_table(_doc("sm90"), "sm90")
    regimes = [gt.REGIMES["fwd-decode"], gt.REGIMES["dkdv-prefill"]]
    recs, winners, lost = gt.tune("sm90", regimes, table, lambda r, k: check,
                                  lambda r, k: time_tile, clock, end=130.0, progress=False,
                                  log=lambda s: None)
    n_dec, n_pre = (len(gt.candidates_for("sm90", r.name, gt.Tile(*table[r.key]))) for r in regimes)
    # fwd-decode's share: 130 * 6 / 13 = 60 s -> 3 candidates (0, 20, 40 s); dkdv-prefill
    # gets the 70 s left -> 3 more (60, 80, 100 s) and skips the rest at 120 s
    dec, pre = recs["fwd-decode"], recs["dkdv-prefill"]
    assert [c["status"] for c in dec["candidates"]] == ["ok"] * 3 + ["skipped"] * (n_dec - 3)
    assert [c["status"] for c in pre["candidates"]] == ["ok"] * 3 + ["skipped"] * (n_pre - 3)
    assert dec["skipped"].startswith(f"{n_dec - 3} candidate(s): deadline")
    assert lost is None and dec["previous_ms"] == 1.0 and dec["changed"] is False
    assert winners == {r.key: gt.Tile(*table[r.key]) for r in regimes}  # ties keep the current


def test_a_wrong_candidate_is_never_timed_nor_chosen_even_if_fastest():
    clock, timed = Clock(), []
    check, time_tile = _fakes(clock, wrong={"128x128x8x3"}, timed=timed,
                              ms={"128x64x8x3": 1.0, "128x128x8x3": 0.1, "128x64x8x4": 0.9})
    cands = _tiles("128x64x8x3", "128x128x8x3", "128x64x8x4")
    recs, _, _ = gt.tune_regime("fwd-prefill", cands, check, time_tile, clock, 1e9, 1e9)
    assert recs[1]["status"] == "wrong" and "dk error 0.5" in recs[1]["error"]
    assert "128x128x8x3" not in timed
    assert gt.choose_winner(recs)["tile"] == "128x64x8x4"
    # even a wrong record that carries a time is never the winner
    recs[1]["ms"] = 0.01
    assert gt.choose_winner(recs)["tile"] == "128x64x8x4"


def test_a_spilling_candidate_is_timed_but_never_chosen():
    clock = Clock()
    check, time_tile = _fakes(clock, spills={"128x128x8x3": 104},
                              ms={"128x64x8x3": 1.0, "128x128x8x3": 0.5, "128x64x8x4": 0.9})
    cands = _tiles("128x64x8x3", "128x128x8x3", "128x64x8x4")
    recs, _, _ = gt.tune_regime("fwd-prefill", cands, check, time_tile, clock, 1e9, 1e9)
    assert [r["status"] for r in recs] == ["ok", "spills", "ok"]
    assert recs[1]["spills"] == 104 and recs[1]["ms"] == 0.5 and recs[0]["spills"] == 0
    assert gt.choose_winner(recs)["tile"] == "128x64x8x4"


def test_a_failing_candidate_is_recorded_and_the_run_goes_on():
    clock = Clock()
    check, time_tile = _fakes(clock, raising={"128x128x8x3"}, ms={"128x64x8x4": 0.5})
    cands = _tiles("128x64x8x3", "128x128x8x3", "128x64x8x4")
    recs, _, lost = gt.tune_regime("fwd-prefill", cands, check, time_tile, clock, 1e9, 1e9)
    assert [r["status"] for r in recs] == ["ok", "error", "ok"] and lost is None
    assert recs[1]["error"].startswith("check: RuntimeError: out of resource: shared memory")
    assert "\n" not in recs[1]["error"]
    assert gt.choose_winner(recs)["tile"] == "128x64x8x4"


def test_a_lost_device_skips_everything_after_it():
    clock = Clock()
    check, time_tile = _fakes(clock, raising={"128x128x8x3"})
    cands = _tiles("128x64x8x3", "128x128x8x3", "128x64x8x4")
    recs, _, lost = gt.tune_regime("fwd-prefill", cands, check, time_tile, clock, 1e9, 1e9,
                                   health=lambda: "CUDA error: an illegal memory access")
    assert lost == "CUDA error: an illegal memory access"
    assert [r["status"] for r in recs] == ["ok", "error", "skipped"]


def test_min_gain_keeps_the_current_entry_within_noise():
    recs = [{"tile": "a", "current": True, "status": "ok", "ms": 1.0},
            {"tile": "b", "status": "ok", "ms": 0.99}, {"tile": "c", "status": "error"}]
    assert gt.choose_winner(recs, 0.02)["tile"] == "a"
    assert gt.choose_winner(recs, 0.0)["tile"] == "b"
    assert gt.choose_winner([{"tile": "a", "current": True, "status": "wrong"}]) is None


# ---- the whole tool, on a fake device -----------------------------------------------------

class FakeBackend:
    arch = "sm90"

    def __init__(self, clock, **fakes):
        self.clock = clock
        self.check, self.time_tile = _fakes(clock, **fakes)
        self.lost = None

    def available(self):
        return True

    def setup(self):
        pass

    def info(self):
        return {"device": "Fake H100", "capability": "9.0", "sms": 132, "arch": self.arch,
                "torch": "2.11", "triton": "3.6", "cuda": "12.8"}

    def make_check(self, regime, key):
        return self.check

    def make_timer(self, regime, key):
        return self.time_tile

    def health(self):
        return self.lost


def _backend(**fakes):
    return FakeBackend(Clock(), check_s=1.0, **fakes)


def _main(tmp_path, monkeypatch, backend, *args):
    # conftest sets TRITON_INTERPRET=1 where there is no GPU; the fake device needs none
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "sm90.json"
    rc = gt.main(["--no-progress", "--regimes", "fwd-prefill,dkdv-prefill", "--out", str(out),
                  *args], backend=backend, clock=backend.clock, start=0.0)
    return rc, out


def test_main_writes_the_winners_and_what_was_measured(tmp_path, monkeypatch, capsys):
    b = _backend(ms={"128x64x8x4-ws": 0.5, "128x64x8x4": 0.1, "128x64x8x2": 0.7},
                 wrong={"128x64x8x4"}, raising={"32x64x8x3"})
    rc, out = _main(tmp_path, monkeypatch, b)
    assert rc == 0
    new = json.loads(out.read_text())
    table = tt.parse_table(new, str(out))
    assert table[("fwd", "16bit", 128, "prefill")] == (128, 64, 8, 4, True)
    assert table[("dkdv", "16bit", 128, "prefill")] == (128, 64, 8, 2, False)
    m = new["measured"]
    assert m["device"] == "Fake H100" and m["triton"] == "3.6" and m["date"].endswith("Z")
    fwd = m["regimes"]["fwd-prefill"]
    assert fwd["winner"] == "128x64x8x4-ws" and fwd["previous"] == "128x64x8x3"
    assert fwd["previous_ms"] == 1.0 and fwd["changed"] is True
    statuses = {c["tile"]: c["status"] for c in fwd["candidates"]}
    assert statuses["128x64x8x4"] == "wrong"
    assert {c["tile"]: c["status"] for c in m["regimes"]["dkdv-prefill"]["candidates"]
            }["32x64x8x3"] == "error"
    assert len(fwd["candidates"]) == len(gt.CANDIDATES["sm90"]["fwd-prefill"])
    before = _doc("sm90")
    others = [e for e, o in zip(new["entries"], before["entries"]) if e != o]
    assert len(others) == 2
    assert "wrote" in capsys.readouterr().out


def test_main_fails_loudly_when_the_current_entry_is_wrong_and_stays(tmp_path, monkeypatch, capsys):
    # no correct candidate at all: the table keeps the wrong entry -> exit 1
    every = set(gt.CANDIDATES["sm90"]["fwd-prefill"])
    rc, out = _main(tmp_path, monkeypatch, _backend(wrong=every))
    err = capsys.readouterr().err
    assert rc == 1 and "FAIL fwd-prefill: the current entry 128x64x8x3" in err and "WRONG" in err
    assert tt.parse_table(json.loads(out.read_text()), "x")[("fwd", "16bit", 128, "prefill")] \
        == (128, 64, 8, 3, False)


def test_a_correct_winner_replacing_a_wrong_current_entry_exits_0_loudly(tmp_path, monkeypatch,
                                                                        capsys):
    rc, out = _main(tmp_path, monkeypatch, _backend(wrong={"128x64x8x3"}))
    err = capsys.readouterr().err
    assert rc == 0 and "!!! fwd-prefill: the current entry 128x64x8x3" in err
    assert tt.parse_table(json.loads(out.read_text()), "x")[("fwd", "16bit", 128, "prefill")] \
        != (128, 64, 8, 3, False)


def test_dry_run_writes_nothing_and_a_wrong_current_entry_still_fails(tmp_path, monkeypatch,
                                                                       capsys):
    rc, out = _main(tmp_path, monkeypatch, _backend(wrong={"128x64x8x3"}), "--dry-run")
    assert rc == 1 and not out.exists()
    assert "nothing written (--dry-run)" in capsys.readouterr().out


def test_a_lost_device_writes_nothing_and_exits_1(tmp_path, monkeypatch):
    b = _backend(raising={"128x64x8x3-ws"})  # the second fwd-prefill candidate
    b.lost = "CUDA error: an illegal memory access was encountered"
    rc, out = _main(tmp_path, monkeypatch, b)
    assert rc == 1 and not out.exists()


# ---- candidates and problems --------------------------------------------------------------

@pytest.mark.parametrize("arch", tt.ARCHS)
def test_every_candidate_list_is_valid_and_holds_the_current_entry(arch):
    doc = _doc(arch)
    table = tt.parse_table(doc, arch)
    assert set(gt.CANDIDATES[arch]) == set(gt.REGIMES)
    for name, regime in gt.REGIMES.items():
        listed = gt.CANDIDATES[arch][name]
        tiles = [gt.parse_tile(c) for c in listed]
        assert len(set(tiles)) == len(tiles), f"{arch} {name}: a repeated candidate"
        assert 4 <= len(tiles) <= 8
        current = gt.Tile(*table[regime.key])
        assert tiles[0] == current, f"{arch} {name}: the table's entry must come first"
        assert gt.candidates_for(arch, name, current) == tiles
        for tile in tiles:
            assert gt.tile_name(tile) in listed  # names round-trip
            tt.parse_table(gt.rewrite_table(doc, {regime.key: tile}, None), f"{arch} {name}")
            if tile.warp_specialize:  # the TMA path: sm_90's 16-bit prefill only
                assert arch == "sm90" and regime.rows == "prefill"
            if regime.rows == "decode":
                assert tile.block_m == 16  # T * G <= 16 rows
    assert any(gt.parse_tile(c).warp_specialize for c in gt.CANDIDATES["sm90"]["fwd-prefill"])


def test_the_problems_land_in_their_row_class_at_the_8b_layout():
    for rows, shapes in gt.CHECK_SHAPES.items():
        assert all(R.row_class(s.rows) == rows for s in shapes), rows
        assert any(s.T % 2 for s in shapes) and any(s.B == 2 for s in shapes)
        assert any(s.kv_len and min(s.kv_len) < s.Nv for s in shapes)
        assert any(s.masked for s in shapes) and any(not s.masked and s.H // s.Hkv == 4
                                                     for s in shapes)
        assert all(s.kv_len is None or len(s.kv_len) == s.B for s in shapes)
    assert any(s.rows == 16 for s in gt.CHECK_SHAPES["decode"])  # the class's edge
    assert any(s.rows == 20 for s in gt.CHECK_SHAPES["prefill"])
    for r in gt.REGIMES.values():
        for s in r.timed:
            assert R.row_class(s.rows) == r.rows
            assert (s.H, s.Hkv, s.masked, s.kv_len) == (4, 1, False, (s.Nv,) * s.B)
    dec, pre = gt.REGIMES["fwd-decode"].timed, gt.REGIMES["fwd-prefill"].timed
    assert [(s.B, s.T, s.Nv) for s in dec] == [(1, 1, 4096), (16, 1, 4096)]
    assert [(s.B, s.T, s.Nv) for s in pre] == [(1, 8192, 2048)]
    assert gt.REGIMES["dkdv-prefill"].timed == pre and gt.REGIMES["dq-prefill"].timed == pre


def test_the_reference_mask_reads_kv_len_like_the_kernels():
    mask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    lens = torch.tensor([3, 9], dtype=torch.int32)
    assert tile_probe.reference_mask(None, None, 2, 4) is None
    assert tile_probe.reference_mask(mask, None, 2, 4).equal(mask)
    assert tile_probe.reference_mask(None, lens, 2, 4).tolist() == [
        [True, True, True, False], [True] * 4]
    assert tile_probe.reference_mask(mask, lens, 2, 4).tolist() == [
        [True, False, True, False], [True, True, True, False]]
    assert not tile_probe.reference_mask(None, torch.tensor([-1, 0], dtype=torch.int32), 2,
                                         4).any()
