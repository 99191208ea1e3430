"""The retrieval's tile tables as data (triton_ops/configs/<arch>.json, issue 25): both
files load, cover every (kernel, dtype class, BLOCK_D, row class) once, are what the
launchers use, and a malformed file is an error naming the file and the entry."""
import copy
import json

import pytest

from pvm_kernels.triton_ops import retrieval, tile_tables as tt


@pytest.fixture(scope="module")
def doc():
    with open(tt.table_path("sm90")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch", tt.ARCHS)
def test_each_file_covers_every_tile_kernel_key_once(arch):
    table = tt.load_table(arch)
    assert set(table) == set(tt.expected_keys())
    for key, values in table.items():  # the launchers' table is the file's
        assert retrieval.CONFIGS[(arch,) + key] == retrieval.TileConfig(*values)


def test_the_row_kernels_follow_the_tile_tables():
    for arch in tt.ARCHS:
        for kernel, source in (("delta", "dq"), ("finish", "dkdv")):
            keys = {k[2:] for k in retrieval.CONFIGS if k[:2] == (arch, kernel)}
            assert keys == {k[1:] for k in tt.expected_keys() if k[0] == source}


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["entries"].pop(), "no entry for"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), "repeats"),
    (lambda d: d["entries"][3].update(block_m=48), "block_m must be a power of two"),
    (lambda d: d["entries"][3].update(num_stages=0), "num_stages must be 1 to 8"),
    (lambda d: d["entries"][0].update(kernel="combine"), "unknown key"),
    (lambda d: d.pop("entries"), "no 'entries' list"),
    (lambda d: d["entries"][2].update(warp_specialize=1), "warp_specialize must be true or"),
    (lambda d: d["entries"][2].update(warp_specialise=True), "unknown field"),
])
def test_a_malformed_table_names_the_file_and_the_entry(doc, edit, message):
    bad = copy.deepcopy(doc)
    edit(bad)
    with pytest.raises(ValueError, match=message) as err:
        tt.parse_table(bad, "configs/sm90.json")
    assert "configs/sm90.json" in str(err.value)


def test_a_table_for_another_architecture_is_refused(tmp_path, monkeypatch, doc):
    wrong = dict(doc, arch="sm80")
    (tmp_path / "sm90.json").write_text(json.dumps(wrong))
    monkeypatch.setattr(tt, "_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="'arch' is 'sm80', expected 'sm90'"):
        tt.load_table("sm90")
    with pytest.raises(ValueError, match="arch must be one of"):
        tt.table_path("sm75")


def test_warp_specialize_is_optional_and_read(doc):
    edited = copy.deepcopy(doc)
    edited["entries"][5]["warp_specialize"] = True
    table = tt.parse_table(edited, "configs/sm90.json")
    e = edited["entries"][5]
    key = (e["kernel"], e["dtype"], e["block_d"], e["rows"])
    assert table[key][-1] is True
    assert sum(values[-1] for values in table.values()) == 1  # absent reads as false
