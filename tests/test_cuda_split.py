"""Split launches of the CUDA retrieval kernels, run on CPU by the CUDA emulator.

When a retrieval launch would have fewer than 2 blocks per SM, the CUDA kernels split a
loop among blocks, as the Triton kernels do (triton_ops/retrieval.py, split_loop):

* forward (split-KV): the keys of each (row tile, sample, KV head) block, in whole 32-key
  tiles, at most 64 splits; each split writes an fp32 partial output and lse, and
  combine_splits_kernel merges them in split order. A decode step of the 8B layout (B 1,
  T 1, H 4, Hkv 1) was 1 block on a 132-SM H100; at Nv 1024 it is 32 (64 at Nv 4096);
* dK/dV backward: the packed query rows of each (key tile, sample, KV head) block, into
  fp32 partials summed in split order by sum_dkdv_splits_kernel. At B 1, T 8192, H 4,
  Hkv 1, Nv 2048 that is 320 blocks instead of 64.

The plan (retrieval_split_plan, csrc/pvm_params.h) depends on the shapes and the SM count
only, the emulator plans for an H100's 132 SMs, and PVM_CUDA_SPLITS / PVM_CUDA_SM_COUNT
override it (csrc/native_common.h). Here: the rule itself, the blocks the op really
launches, split against forced-unsplit against float64 (values, lse and every gradient,
with padding, an empty sample, kv_len cutting mid-split and masked-out splits),
identical bits on every run, and NaN propagation through the combine.
"""
import ctypes
import math

import pytest
import torch

from emu_support import BACKEND, SMS, emulator

from pvm_kernels.ops.registration import get_op
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs, random_mask

pytestmark = [pytest.mark.cpu_verification, pytest.mark.usefixtures("emulated_backend")]


PLAN_FIELDS = ("kv_splits", "split_keys", "fwd_blocks", "combine_blocks", "row_splits",
               "split_rows", "dkdv_blocks", "sum_blocks", "dq_blocks")


def plan(B, T, H, Hkv, Nv, hd, sm_count=SMS, force=0):
    """The host op's split plan and each launch's blocks (pvm_emu_retrieval_plan)."""
    dll = emulator.kernel_lib().dll
    dll.pvm_emu_retrieval_plan.argtypes = [ctypes.c_int64] * 8 + [ctypes.POINTER(ctypes.c_int64)]
    out = (ctypes.c_int64 * len(PLAN_FIELDS))()
    dll.pvm_emu_retrieval_plan(B, T, H, Hkv, Nv, hd, sm_count, force, out)
    return dict(zip(PLAN_FIELDS, out))


def triton_rule(n_items, tile, blocks, sm_count):
    """triton_ops.retrieval.split_loop's arithmetic (PROGRAMS_PER_SM 2, MAX_SPLITS 64)."""
    n_tiles = -(-max(n_items, 1) // tile)
    want = -(-2 * sm_count // max(blocks, 1))
    splits = max(1, min(want, n_tiles, 64))
    per = -(-n_tiles // splits) * tile
    return -(-max(n_items, 1) // per), per


# ---- the rule ---------------------------------------------------------------------------------

def test_decode_and_training_shapes_fill_the_gpu():
    """The issue's shapes on 132 SMs: the 8B decode step goes from 1 block to 32 (Nv 1024)
    or 64 (Nv 4096, the 64-split cap); the dK/dV backward at B1 T8192 Nv2048 from 64 blocks
    to 320 (>= 2 per SM)."""
    d = plan(1, 1, 4, 1, 1024, 128)
    assert (d["kv_splits"], d["split_keys"], d["fwd_blocks"]) == (32, 32, 32)
    assert plan(1, 1, 4, 1, 1024, 128, force=1)["fwd_blocks"] == 1
    d = plan(1, 1, 4, 1, 4096, 128)
    assert (d["kv_splits"], d["split_keys"], d["fwd_blocks"]) == (64, 64, 64)
    t = plan(1, 8192, 4, 1, 2048, 128)
    assert t["kv_splits"] == 1 and t["fwd_blocks"] == 2048 and t["combine_blocks"] == 0
    assert (t["row_splits"], t["split_rows"], t["dkdv_blocks"]) == (5, 6560, 320)
    assert t["dkdv_blocks"] >= 2 * SMS
    assert plan(1, 8192, 4, 1, 2048, 128, force=1)["dkdv_blocks"] == 64
    assert t["sum_blocks"] == 2048 * 128 // 4 // 128  # one thread per 4 dk elements


@pytest.mark.parametrize("sm_count", [1, 80, 108, 132])
def test_split_rule_is_tritons_in_kernel_tiles(sm_count):
    """Same arithmetic as the Triton launchers' split_loop, in the CUDA kernels' tiles (32
    keys, 8 rows per dK/dV step), over decode, prefill and batch sizes; never below one
    tile, at most 64 splits, and the splits cover the loop."""
    for B, T, H, Hkv, Nv in [(1, 1, 4, 1, 1), (1, 1, 4, 1, 31), (1, 1, 4, 1, 100), (1, 1, 4, 1, 4096),
                             (1, 1, 4, 1, 1024), (8, 1, 4, 1, 4096), (16, 1, 4, 1, 4096),
                             (264, 1, 4, 1, 4096), (2, 9, 4, 1, 70), (1, 8192, 4, 1, 2048),
                             (3, 20, 4, 1, 300), (1, 63, 4, 1, 40), (4, 2048, 32, 8, 1024)]:
        rows = T * H // Hkv
        d = plan(B, T, H, Hkv, Nv, 128, sm_count=sm_count)
        row_tiles, key_tiles = -(-rows // 16), -(-Nv // 32)
        assert (d["kv_splits"], d["split_keys"]) == triton_rule(Nv, 32, row_tiles * B * Hkv, sm_count)
        assert (d["row_splits"], d["split_rows"]) == triton_rule(rows, 8, key_tiles * B * Hkv, sm_count)
        for splits, per, items, tile in ((d["kv_splits"], d["split_keys"], Nv, 32),
                                         (d["row_splits"], d["split_rows"], rows, 8)):
            assert 1 <= splits <= 64 and per % tile == 0 and per >= tile
            assert (splits - 1) * per < max(items, 1) <= splits * per  # no empty split by shape
        assert d["fwd_blocks"] == row_tiles * d["kv_splits"] * B * Hkv
        assert d["dkdv_blocks"] == key_tiles * d["row_splits"] * B * Hkv
        if d["kv_splits"] == 1 and d["row_splits"] == 1:
            assert d["fwd_blocks"] == d["dq_blocks"]


def test_the_op_launches_the_planned_blocks(lib, monkeypatch):
    """The blocks the emulator runs per op call are the plan's: the decode step's 32 split
    blocks + 1 combine block (a thread per 4 output dims: 4 rows x 32 = 128 threads), and
    with PVM_CUDA_SPLITS=1 the one block of before; PVM_CUDA_SM_COUNT plans for other GPUs.
    Likewise the backward's dQ, row-split dK/dV and sum launches."""
    q, k = torch.randn(1, 1, 4, 128), torch.randn(1, 1024, 1, 128)
    fwd = get_op(BACKEND, "retrieval_fwd")

    def blocks(**env):
        for name in ("PVM_CUDA_SPLITS", "PVM_CUDA_SM_COUNT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        before = lib.stats()
        fwd(q, k, k, None, None, 128 ** -0.5)
        after = lib.stats()
        return after["launches"] - before["launches"], after["blocks"] - before["blocks"]

    assert blocks() == (2, 32 + 1)
    assert blocks(PVM_CUDA_SPLITS=1) == (1, 1)
    assert blocks(PVM_CUDA_SPLITS=5) == (2, 5 + 1)  # 32 tiles in 5 splits of 7 tiles
    assert blocks(PVM_CUDA_SM_COUNT=1) == (2, 2 + 1)  # 2 blocks per SM
    assert blocks(PVM_CUDA_SPLITS=1000) == (2, 32 + 1)  # at most one split per key tile

    # The backward at 252 packed rows and 2 key tiles: dQ 16 blocks, dK/dV 2 tiles x 32 row
    # splits, the partials' sum 40 x 32 / 4 / 128 -> 3 blocks; unsplit dK/dV is 2 blocks.
    q, k = torch.randn(1, 63, 4, 32), torch.randn(1, 40, 1, 32)
    out, lse = fwd(q, k, k, None, None, 0.2)
    d = plan(1, 63, 4, 1, 40, 32)
    assert (d["dq_blocks"], d["dkdv_blocks"], d["sum_blocks"]) == (16, 64, 3)
    for env, want in (({}, (3, 16 + 64 + 3)), ({"PVM_CUDA_SPLITS": 1}, (2, 16 + 2))):
        for name, value in env.items():
            monkeypatch.setenv(name, str(value))
        before = lib.stats()
        get_op(BACKEND, "retrieval_bwd")(q, q, k, k, out, lse, None, None, 0.2)
        after = lib.stats()
        assert (after["launches"] - before["launches"], after["blocks"] - before["blocks"]) == want


# ---- split against unsplit against float64 ----------------------------------------------------

def reference(q, k, v, valid, scale):
    """float64 out and lse (natural log, -inf for a row with no valid key), GQA."""
    H, Hkv = q.shape[2], k.shape[2]
    kx = k.double().repeat_interleave(H // Hkv, dim=2)
    vx = v.double().repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bthd,bnhd->bhtn", q.double(), kx) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)                                    # [B, H, T]
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return torch.einsum("bhtn,bnhd->bthd", p, vx), lse


def run(q, k, v, mask, kv_len, go, scale):
    """out, lse, dq, dk, dv of the emulated CUDA ops (outputs and workspaces NaN-poisoned)."""
    with poisoned_outputs():
        out, lse = get_op(BACKEND, "retrieval_fwd")(q, k, v, mask, kv_len, scale)
        dq, dk, dv = get_op(BACKEND, "retrieval_bwd")(go, q, k, v, out, lse, mask, kv_len, scale)
    return out, lse, dq, dk, dv


def case(dtype, B, T, H, Hkv, hd, Nv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
               for s in ((B, T, H, hd), (B, Nv, Hkv, hd), (B, Nv, Hkv, hd)))
    go = torch.randn(B, T, H, hd, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, go


def expected(q, k, v, valid, go, scale):
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = reference(q64, k64, v64, valid, scale)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), go.double())
    return out.detach(), lse.detach(), dq, dk, dv


# (B, T, H, Hkv, hd, Nv): both loops split at 132 SMs (asserted), GQA, odd sizes.
SPLIT_SHAPES = [
    (3, 20, 4, 1, 64, 300),   # 10 key splits of 32, 5 row splits of 16 rows
    (2, 7, 6, 2, 40, 150),    # G 3, hd 40; 21 packed rows: a row split with 5 rows
    (1, 63, 4, 1, 128, 40),   # 252 rows: 32 row splits, the last 4 rows; 2 key splits, 8 keys
    (2, 9, 4, 2, 18, 100),    # hd 18: the reductions' one-float path (4-float chunks need hd % 4 == 0)
    (1, 1, 4, 1, 128, 300),   # the 8B decode step: 10 key splits, the last 12 keys (4 rows: 1 row split)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_split_and_unsplit_agree_with_float64(lib, monkeypatch, dtype, shape):
    """Split and forced-unsplit launches against float64, values, lse and all gradients: a
    padded sample, kv_len cutting mid-split, a whole split masked out (an empty split
    inside the keys), and, where B > 2, a sample with no valid key (exactly 0, lse -inf)."""
    B, T, H, Hkv, hd, Nv = shape
    d = plan(B, T, H, Hkv, Nv, hd)
    assert d["kv_splits"] > 1 and (d["row_splits"] > 1 or T * H // Hkv <= 8), d
    q, k, v, go = case(dtype, B, T, H, Hkv, hd, Nv)
    mask = random_mask(B, Nv, pad_from={0: Nv - 5}, holes=0.2)
    mask[:, 32:64] = False  # one whole 32-key split (or tile) masked in every sample
    kv_len = torch.full((B,), Nv, dtype=torch.int32)
    kv_len[-1] = Nv // 2 + 7  # mid-split: the splits after it see no key
    if B > 2:
        mask[1] = False       # a sample with no visual token
    valid = mask & (torch.arange(Nv)[None] < kv_len[:, None])
    scale = hd ** -0.5

    split = run(q, k, v, mask, kv_len, go, scale)
    monkeypatch.setenv("PVM_CUDA_SPLITS", "1")
    whole = run(q, k, v, mask, kv_len, go, scale)
    want = expected(q, k, v, valid, go, scale)
    tol = TOLERANCE[dtype]
    for name, a, b, e in zip(("out", "lse", "dq", "dk", "dv"), split, whole, want):
        if name == "lse":  # -inf rows compared exactly, the rest as values
            inf = torch.isinf(e)
            assert torch.equal(torch.isinf(a), inf) and torch.equal(torch.isinf(b), inf), name
            assert (a[inf] < 0).all() and (b[inf] < 0).all()
            a, b, e = a[~inf], b[~inf], e[~inf]
        assert max_rel_err(a, e) < tol, f"split {name}"
        assert max_rel_err(b, e) < tol, f"unsplit {name}"
    out, lse, dq, dk, dv = split
    empty = ~valid.any(1)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all()
    # Gradients never reach invalid keys, through any split.
    invalid = ~valid[:, :, None, None].expand_as(dk)
    assert (dk[invalid] == 0).all() and (dv[invalid] == 0).all()


def test_forced_split_counts_agree(lib, monkeypatch):
    """Uneven and extreme forced splits (2, 3, 7 and the 64 cap; 1 key / 8 rows per tile)
    give the same values as unsplit, within fp32 rounding."""
    B, T, H, Hkv, hd, Nv = 2, 30, 4, 2, 32, 200
    q, k, v, go = case(torch.float32, B, T, H, Hkv, hd, Nv, seed=1)
    kv_len = torch.tensor([Nv, 77], dtype=torch.int32)
    monkeypatch.setenv("PVM_CUDA_SPLITS", "1")
    whole = run(q, k, v, None, kv_len, go, 0.2)
    for n in (2, 3, 7, 64):
        monkeypatch.setenv("PVM_CUDA_SPLITS", str(n))
        got = run(q, k, v, None, kv_len, go, 0.2)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, whole):
            assert max_rel_err(a, b) < 1e-5, f"{n} splits: {name}"


# ---- determinism and NaN ----------------------------------------------------------------------

def test_split_results_are_the_same_bits_on_every_run(lib):
    """Partials summed in split order, no atomics: two runs, under different block orders
    and warp schedules (emulator seeds 2 and 3, buffers placed differently), give identical
    bits for out, lse, dq, dk and dv, without poisoned (NaN-filled) workspaces: a partial
    read before it is written would differ between runs."""
    B, T, H, Hkv, hd, Nv = 2, 12, 4, 1, 64, 200
    q, k, v, go = case(torch.bfloat16, B, T, H, Hkv, hd, Nv, seed=2)
    kv_len = torch.tensor([150, 90], dtype=torch.int32)
    d = plan(B, T, H, Hkv, Nv, hd)
    assert d["kv_splits"] > 1 and d["row_splits"] > 1
    results = []
    for seed in (2, 3):
        lib.configure(seed=seed, guard_mode=seed % 2)
        out, lse = get_op(BACKEND, "retrieval_fwd")(q, k, v, None, kv_len, 0.125)
        results.append((out, lse, *get_op(BACKEND, "retrieval_bwd")(go, q, k, v, out, lse, None,
                                                                        kv_len, 0.125)))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a.view(torch.int16) if a.dtype == torch.bfloat16 else a,
                           b.view(torch.int16) if b.dtype == torch.bfloat16 else b), name


def test_nan_reaches_the_combined_row(lib):
    """A NaN query row comes out NaN (out and lse) through the split-KV combine, as on every
    backend; a NaN in one valid value makes the rows that see it NaN; the other rows and
    samples stay finite and right."""
    B, T, H, Hkv, hd, Nv = 2, 1, 4, 1, 128, 300
    q, k, v, _ = case(torch.float32, B, T, H, Hkv, hd, Nv, seed=3)
    assert plan(B, T, H, Hkv, Nv, hd)["kv_splits"] > 1
    q[0, 0, 2] = float("nan")            # one query row of sample 0
    v[1, 200, 0, 5] = float("nan")       # one value of sample 1, in its 7th split
    with poisoned_outputs():
        out, lse = get_op(BACKEND, "retrieval_fwd")(q, k, v, None, None, hd ** -0.5)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isnan(lse[0, 2, 0])
    assert torch.isnan(out[1, 0, :, 5]).all()  # every head of sample 1 reads value 200
    ok = torch.ones_like(out, dtype=torch.bool)
    ok[0, 0, 2] = False
    ok[1, 0, :, 5] = False
    want, want_lse = reference(q, k, v, torch.ones(B, Nv, dtype=torch.bool), hd ** -0.5)
    assert max_rel_err(out[ok], want.float()[ok]) < 1e-5
    lse_ok = torch.ones_like(lse, dtype=torch.bool)
    lse_ok[0, 2, 0] = False
    assert max_rel_err(lse[lse_ok], want_lse.float()[lse_ok]) < 1e-5
    assert torch.isfinite(lse[1]).all()  # a NaN value leaves the softmax weights finite


def test_workspaces_fit_the_splits_exactly(lib, monkeypatch):
    """The workspaces the host op allocates are exactly [splits, B*H*T, hd] (forward) and
    [splits, B, Nv, Hkv, hd] (dK/dV), and the emulator places them against guard pages: a
    partial written one element out of place faults. Checked at 64 splits (the cap; the
    last one 24 keys, the last row split 2 rows) and at 7 uneven key splits."""
    B, T, H, Hkv, hd, Nv = 1, 9, 2, 1, 24, 2040
    q, k, v, go = case(torch.float32, B, T, H, Hkv, hd, Nv, seed=4)
    assert [plan(B, T, H, Hkv, Nv, hd, force=n)[f] for n in (0, 7)
            for f in ("kv_splits", "row_splits")] == [64, 3, 7, 3]
    for guard in (0, 1):  # buffers ending at, then starting right after, a guard page
        lib.configure(seed=guard, guard_mode=guard)
        for n in (0, 7):
            monkeypatch.setenv("PVM_CUDA_SPLITS", str(n))  # 0: the plan's own
            out, lse, dq, dk, dv = run(q, k, v, None, None, go, 0.2)
            want = expected(q, k, v, torch.ones(B, Nv, dtype=torch.bool), go, 0.2)
            for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
                assert max_rel_err(a, e) < 1e-4, f"{n} splits, guard {guard}: {name}"


def test_lse_of_split_rows_is_natural_log(lib):
    """lse from the combine is in natural log like the unsplit kernel's, checked on a row
    whose value is known: q = 0 gives equal scores, lse = log(number of valid keys)."""
    q = torch.zeros(1, 1, 4, 32)
    k = torch.randn(1, 1000, 1, 32)
    kv_len = torch.tensor([777], dtype=torch.int32)
    assert plan(1, 1, 4, 1, 1000, 32)["kv_splits"] > 1
    out, lse = get_op(BACKEND, "retrieval_fwd")(q, k, k, None, kv_len, 1.0)
    assert torch.allclose(lse, torch.full_like(lse, math.log(777)), rtol=0, atol=1e-5)
    assert max_rel_err(out[0, 0], k[0, :777, 0].mean(0).expand(4, 32)) < 1e-5
