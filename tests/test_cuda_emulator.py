"""The CUDA kernels of csrc/cuda, run on CPU by the project's CUDA emulator (csrc/emu).

The real .cu sources are compiled as C++ with g++ into a small library whose runtime gives
every CUDA thread its own fiber, with real __syncthreads barriers and warp shuffles, shared
memory filled with NaN before each block, guard pages around every global buffer and a
seeded scheduler that reorders warps to expose races (docs/cuda_emulator.md). The
emulated ops are registered as the backend ``cuda_emulated`` (CPU tensors) and go
through the same host-side op bodies as the CUDA backend, so the cases below are the
other backends' cases, checked against the float64 reference, under several schedules.

Emulator self-tests at the end show that each of its checks bites.
PVM_EMU_SEEDS (default "0,1,2") sets the schedules the kernel cases run under: 0 and 1
are fixed orders (lowest warp first / highest warp first, each run until it blocks),
others are random. tools/sync_mutations.py runs this file against kernel libraries with
one __syncthreads deleted ($PVM_CUDA_EMU_LIB).
"""
import math
import os
import re
import shutil
import tempfile

import pytest
import torch

from emu_support import BACKEND, REPO, emulator

import test_merge as tm
import test_retrieval as tr
from pvm_kernels import pvm_retrieval
from pvm_kernels.ops.registration import get_op
from pvm_kernels.reference import retrieval_reference
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs, random_mask

DEV = "cpu"

# CPU stand-ins for GPU runs: `make gpu-check` (-m "not cpu_verification") leaves them out.
pytestmark = [pytest.mark.cpu_verification, pytest.mark.usefixtures("emulated_backend")]


def _seeds():
    spec = os.environ.get("PVM_EMU_SEEDS", "0,1,2")
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


SEEDS = _seeds()


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def seed(request, lib):
    """Runs the test under one schedule; odd seeds also move buffers to start right after
    their front guard page (even seeds: end at the back one)."""
    lib.configure(seed=request.param, guard_mode=request.param % 2)
    return request.param


def launches(kl):
    return kl.stats()["launches"]


# How the retrieval cases split their launches (retrieval_split_plan, csrc/pvm_params.h).
# "plan": the host op's plan for the emulator's 132 SMs, under which these small shapes
# split nearly every loop, mostly down to one tile a block (tests/test_cuda_split.py has
# the split paths' own tests). "unsplit" (PVM_CUDA_SPLITS=1): one block walks every key
# tile (forward, dQ) and every row step (dK/dV), restaging shared memory each time, so the
# barriers that order restaging are exercised (under "plan" alone, deleting two of them
# went unnoticed: tools/sync_mutations.py). Barriers do not depend on the dtype: unsplit
# in float32 only.
SPLIT_CASES = [("plan", torch.float32), ("plan", torch.bfloat16), ("plan", torch.float16),
               ("unsplit", torch.float32)]


def split_case_id(case):
    return f"{case[0]}-{case[1]}"


def use_splits(monkeypatch, mode):
    if mode == "unsplit":
        monkeypatch.setenv("PVM_CUDA_SPLITS", "1")


# ---- retrieval: the other backends' cases ----------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=split_case_id)
@pytest.mark.parametrize("shape", tr.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_retrieval_matches_reference(seed, monkeypatch, case, shape):
    use_splits(monkeypatch, case[0])
    tr.test_retrieval_matches_reference(BACKEND, DEV, case[1], shape)


# Head dims 8 to 256 (odd ones too), G = H / Hkv from 1 to 5, the 8B layout (H 4, Hkv 1,
# hd 128) at prefill and decode, masks, several key tiles and row blocks.
# (B, T, H, Hkv, hd, Nv, mask kind)
HEAD_SHAPES = [
    (2, 3, 1, 1, 8, 45, "pad"),        # hd 8, G 1
    (1, 7, 6, 2, 24, 33, "holes"),     # hd 24, G 3
    (3, 4, 5, 1, 40, 50, "mixed"),     # hd 40, G 5, a sample with no key
    (1, 3, 4, 2, 64, 31, None),        # G 2, one partial key tile
    (2, 9, 8, 4, 33, 70, "pad"),       # hd 33 (one dim on lane 0 only), kv_len
    (1, 5, 4, 1, 128, 70, "pad"),      # the 8B layout: 20 packed rows, kv_len
    (2, 1, 4, 1, 128, 100, None),      # the 8B decode step
    (1, 2, 2, 1, 160, 40, "holes"),    # hd 160: 5 dims per lane
    (1, 2, 2, 2, 256, 33, "pad"),      # hd 256: dK/dV takes 149 KB of shared memory (opt-in)
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=split_case_id)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_retrieval_head_dims_and_groups(seed, monkeypatch, case, shape):
    use_splits(monkeypatch, case[0])
    tr.test_retrieval_matches_reference(BACKEND, DEV, case[1], shape)


def test_retrieval_tensor_core_backward_turns_its_buffers_over(seed, monkeypatch):
    """bf16 at hd 32 takes the tensor-core backward (retrieval_tc_bwd.cu); unsplit, one dK/dV
    block walks 4 steps of 64 rows (200 packed rows) and a dQ block 3 tiles of 64 keys, so
    each cp.async double buffer is refilled while in use, and the barriers ordering those
    refills matter here (tools/sync_mutations.py runs this file only; the tensor-core
    kernels' own tests are in tests/test_cuda_tensor_cores.py)."""
    use_splits(monkeypatch, "unsplit")
    tr.run_case(BACKEND, DEV, torch.bfloat16, 1, 50, 4, 1, 32, 150, tr.make_mask("holes", 1, 150))


def test_retrieval_non_contiguous_inputs(seed):
    tr.test_retrieval_non_contiguous_inputs(BACKEND, DEV)


def test_retrieval_strided_and_broadcast_inputs(seed):
    """q a strided slice with an offset, k/v broadcast over the batch (stride 0)."""
    base = torch.randn(3, 8, 6, 40)
    q = base[1:, 1::2, :4, 3:35]                       # [2, 4, 4, 32], every stride odd
    k = torch.randn(1, 40, 2, 32).expand(2, 40, 2, 32)
    v = torch.randn(1, 40, 2, 32).expand(2, 40, 2, 32)
    mask = random_mask(2, 40, pad_from={1: 29})
    with poisoned_outputs():
        got = pvm_retrieval(q, k, v, mask, backend=BACKEND)
    want = retrieval_reference(q.double(), k.double(), v.double(), mask)
    assert max_rel_err(got, want) < TOLERANCE[torch.float32]


def test_retrieval_kv_len_bounds_keys(lib):
    tr.test_retrieval_kv_len_bounds_keys(BACKEND, DEV)


def test_retrieval_nan_in_padding_stays_out(seed):
    tr.test_retrieval_nan_in_padding_stays_out(BACKEND, DEV)


def test_retrieval_rejects_bad_arguments(lib):
    tr.test_retrieval_rejects_bad_arguments(BACKEND, DEV)


# kv_len outside [0, Nv]: above Nv means every key, at or below 0 none (clamped in the
# kernels; unclamped, 2^30 reads far past the keys: the guard pages would stop it).
KV_LENS = [[41, 2**30], [-1, 17], [-(2**31), 2**31 - 1], [0, 37], [32, 33]]


@pytest.mark.parametrize("backend", ["cpu", BACKEND])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("lens", KV_LENS, ids=lambda v: "_".join(map(str, v)))
def test_kv_len_outside_range_is_clamped(lib, backend, with_mask, lens):
    B, T, H, Hkv, hd, Nv = 2, 5, 4, 2, 16, 37  # two key tiles of the CUDA kernels
    q = torch.randn(B, T, H, hd, requires_grad=True)
    k = torch.randn(B, Nv, Hkv, hd, requires_grad=True)
    v = torch.randn(B, Nv, Hkv, hd, requires_grad=True)
    mask = random_mask(B, Nv, holes=0.3) if with_mask else torch.ones(B, Nv, dtype=torch.bool)
    kv_len = torch.tensor(lens, dtype=torch.int32)
    valid = mask & (torch.arange(Nv)[None, :] < kv_len.clamp(0, Nv)[:, None])
    qr, kr, vr = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = retrieval_reference(qr, kr, vr, valid)
    grad = torch.randn_like(want)
    want.backward(grad)
    with poisoned_outputs():
        got = pvm_retrieval(q, k, v, mask if with_mask else None, kv_len, backend=backend)
        got.backward(grad.float())
    tol = TOLERANCE[torch.float32]
    assert max_rel_err(got, want) < tol
    for g, r, name in ((q.grad, qr.grad, "dq"), (k.grad, kr.grad, "dk"), (v.grad, vr.grad, "dv")):
        assert max_rel_err(g, r) < tol, name
    empty = ~valid.any(1)
    assert (got.detach()[empty] == 0).all() and (q.grad[empty] == 0).all()


# ---- merge: the other backends' cases --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", tm.SHAPES, ids=str)
@pytest.mark.parametrize("with_ffn", [True, False], ids=["ffn", "no_ffn"])
@pytest.mark.parametrize("with_keep", [True, False], ids=["keep", "all"])
def test_merge_matches_reference(seed, dtype, shape, with_ffn, with_keep):
    tm.test_merge_matches_reference(BACKEND, DEV, dtype, shape, with_ffn, with_keep)


def test_merge_gate_zero_is_exactly_inert(seed):
    tm.test_merge_gate_zero_is_exactly_inert(BACKEND, DEV)


def test_merge_non_contiguous(seed):
    tm.test_merge_non_contiguous(BACKEND, DEV)


def test_merge_keep_broadcast_from_one_flag_per_sample(seed):
    tm.test_merge_keep_broadcast_from_one_flag_per_sample(BACKEND, DEV)


def test_merge_folded_grid(lib, monkeypatch):
    """Rows beyond gridDim.x fold onto y (flat_grid): a build that folds above 5 blocks runs
    the folded path, unused tail blocks included, on small inputs."""
    monkeypatch.setenv(emulator.LIB_ENV, emulator.build_kernel_lib(defines=["PVM_FOLD_GRID_X=5"]))
    for shape in (((3, 7), 100), ((4,), 33)):  # 21 rows: grid (5, 5); 4 rows: (4, 1)
        for keep in (True, False):
            tm.test_merge_matches_reference(BACKEND, DEV, torch.float32, shape, True, keep)


# ---- grids beyond 65,535 (B x Hkv) -------------------------------------------------------------

def test_retrieval_grid_beyond_65535(lib):
    """B x Hkv = 65,538 KV heads, each one block: over the 65,535 that gridDim.y allowed.
    Only the first, the last and 6 random blocks run (block sampling); the rows those
    blocks own are checked, and there must be exactly one per block run."""
    B, T, H, Hkv, hd, Nv, sample = 32769, 1, 2, 2, 8, 5, 6
    q, k, v = torch.randn(B, T, H, hd), torch.randn(B, Nv, Hkv, hd), torch.randn(B, Nv, Hkv, hd)
    scale = hd ** -0.5
    ref_out, ref_lse = get_op("native", "retrieval_fwd")(q, k, v, None, None, scale)
    grad = torch.randn_like(q)
    ref_dq, ref_dk, ref_dv = get_op("native", "retrieval_bwd")(grad, q, k, v, ref_out, ref_lse,
                                                               None, None, scale)
    lib.configure(seed=2, sample_blocks=sample)
    with poisoned_outputs():
        out, lse = get_op(BACKEND, "retrieval_fwd")(q, k, v, None, None, scale)
        dq, dk, dv = get_op(BACKEND, "retrieval_bwd")(grad, q, k, v, ref_out, ref_lse, None, None, scale)
    # forward and dQ: a block owns (b, head kvh) of the one query row; dK/dV: (b, kvh)'s keys
    for got, ref in ((out, ref_out), (dq, ref_dq)):
        rows = ~got.isnan().any(-1)                  # [B, T, H]
        assert rows.sum() == sample + 2
        assert rows[0, 0, 0] and rows[-1, 0, -1]     # the first and the last block
        assert max_rel_err(got[rows], ref[rows]) < 1e-5
    lse_rows = ~lse.isnan()
    assert torch.equal(lse_rows, (~out.isnan().any(-1)).transpose(1, 2))
    assert max_rel_err(lse[lse_rows], ref_lse[lse_rows]) < 1e-5
    for got, ref in ((dk, ref_dk), (dv, ref_dv)):
        heads = ~got.isnan().any(-1).any(1)          # [B, Hkv]
        assert heads.sum() == sample + 2 and heads[0, 0] and heads[-1, -1]
        sel = heads[:, None, :, None].expand_as(got)
        assert max_rel_err(got[sel], ref[sel]) < 1e-5


def test_retrieval_refuses_more_than_2_31_blocks(lib):
    """A grid over gridDim.x's 2^31 - 1 blocks is refused before any block runs (no buffer
    is even passed: a launched block would dereference null)."""
    before = launches(lib)
    assert lib.retrieval_fwd_dry(1 << 20, 1 << 16, 1, 1, 4, 8) == INVALID_CONFIG
    assert launches(lib) == before


# ---- host checks: every tensor, before any launch ----------------------------------------------

def _retrieval_args():
    q = torch.randn(2, 3, 4, 16)
    k = torch.randn(2, 5, 2, 16)
    v = torch.randn(2, 5, 2, 16)
    out, lse = get_op("native", "retrieval_fwd")(q, k, v, None, None, 0.25)
    return dict(grad_out=torch.randn_like(q), q=q, k=k, v=v, out=out, lse=lse, key_mask=None,
                kv_len=None, scale=0.25)


def _merge_args():
    e = torch.randn(3, 4, 32)
    gate = torch.tensor([0.5])
    _, rstd = get_op("native", "merge_fwd")(e, gate, None, None, 1e-6)
    return dict(grad_out=torch.randn_like(e), expanded=e, gate=gate, keep=None, ffn_output=None,
                rstd=rstd, eps=1e-6)


FWD_R = ["q", "k", "v", "key_mask", "kv_len", "scale"]
BWD_R = ["grad_out", "q", "k", "v", "out", "lse", "key_mask", "kv_len", "scale"]
FWD_M = ["expanded", "gate", "keep", "ffn_output", "eps"]
BWD_M = ["grad_out", "expanded", "gate", "keep", "rstd"]

# (op, argument, bad value from the good arguments, expected message)
BAD_ARGS = [
    ("retrieval_fwd", "q", lambda a: a["q"].double(), r"q: pvm_kernels native ops support"),
    ("retrieval_fwd", "k", lambda a: a["k"].half(), r"k must have dtype Float, got Half"),
    ("retrieval_fwd", "v", lambda a: a["v"][:, :4], r"v must have shape \[2, 5, 2, 16\], got \[2, 4, 2, 16\]"),
    ("retrieval_fwd", "key_mask", lambda a: torch.ones(2, 5, dtype=torch.uint8), r"key_mask must have dtype Bool"),
    ("retrieval_fwd", "key_mask", lambda a: torch.ones(2, 6, dtype=torch.bool), r"key_mask must have shape \[2, 5\]"),
    ("retrieval_fwd", "kv_len", lambda a: torch.ones(2, dtype=torch.int64), r"kv_len must have dtype Int, got Long"),
    ("retrieval_fwd", "kv_len", lambda a: torch.ones(3, dtype=torch.int32), r"kv_len must have shape \[2\], got \[3\]"),
    ("retrieval_fwd", "kv_len", lambda a: torch.ones(4, dtype=torch.int32)[::2], r"kv_len must be contiguous"),
    ("retrieval_bwd", "grad_out", lambda a: a["grad_out"].half(), r"grad_out must have dtype Float, got Half"),
    ("retrieval_bwd", "grad_out", lambda a: a["grad_out"][:, :2], r"grad_out must have shape \[2, 3, 4, 16\]"),
    ("retrieval_bwd", "out", lambda a: a["out"][..., :8], r"out must have shape \[2, 3, 4, 16\], got \[2, 3, 4, 8\]"),
    ("retrieval_bwd", "out", lambda a: a["out"].bfloat16(), r"out must have dtype Float, got BFloat16"),
    ("retrieval_bwd", "lse", lambda a: a["lse"].double(), r"lse must have dtype Float, got Double"),
    ("retrieval_bwd", "lse", lambda a: a["lse"].transpose(1, 2).contiguous(), r"lse must have shape \[2, 4, 3\], got \[2, 3, 4\]"),
    ("retrieval_bwd", "lse", lambda a: a["lse"].transpose(1, 2).contiguous().transpose(1, 2), r"lse must be contiguous"),
    ("merge_fwd", "gate", lambda a: torch.tensor([0.5, 0.5]), r"gate must hold one element, got shape \[2\]"),
    ("merge_fwd", "gate", lambda a: torch.tensor([1], dtype=torch.int32), r"gate must have a floating dtype"),
    ("merge_fwd", "keep", lambda a: torch.ones(3, 5, dtype=torch.bool), r"keep must have shape \[3, 4\], got \[3, 5\]"),
    ("merge_fwd", "keep", lambda a: torch.ones(3, 4, dtype=torch.int32), r"keep must have dtype Bool, got Int"),
    ("merge_fwd", "ffn_output", lambda a: a["expanded"].half(), r"ffn_output must have dtype Float, got Half"),
    ("merge_fwd", "ffn_output", lambda a: a["expanded"][:2], r"ffn_output must have shape \[3, 4, 32\], got \[2, 4, 32\]"),
    ("merge_bwd", "grad_out", lambda a: a["grad_out"][..., :16], r"grad_out must have shape \[3, 4, 32\]"),
    ("merge_bwd", "grad_out", lambda a: a["grad_out"].bfloat16(), r"grad_out must have dtype Float, got BFloat16"),
    ("merge_bwd", "rstd", lambda a: a["rstd"][:11], r"rstd must have shape \[12\], got \[11\]"),
    ("merge_bwd", "rstd", lambda a: a["rstd"].double(), r"rstd must have dtype Float, got Double"),
]


@pytest.mark.parametrize("backend", ["native", BACKEND])
@pytest.mark.parametrize("op,arg,bad,match", BAD_ARGS,
                         ids=[f"{o}-{a}-{i}" for i, (o, a, _, _) in enumerate(BAD_ARGS)])
def test_host_wrapper_checks_every_tensor(lib, backend, op, arg, bad, match):
    """Direct op calls (no Python checks): a bad tensor is named, with expected and actual
    values, and nothing is launched (cpu backend: same op bodies, csrc/native_common.h)."""
    args = _retrieval_args() if op.startswith("retrieval") else _merge_args()
    order = {"retrieval_fwd": FWD_R, "retrieval_bwd": BWD_R, "merge_fwd": FWD_M, "merge_bwd": BWD_M}[op]
    args[arg] = bad(args)
    before = launches(lib)
    with pytest.raises(RuntimeError, match=match):
        get_op(backend, op)(*[args[n] for n in order])
    assert launches(lib) == before


def test_host_wrapper_checks_head_dim(lib):
    q = torch.randn(1, 2, 1, 264)
    with pytest.raises(RuntimeError, match="supports head_dim <= 256, got 264"):
        get_op(BACKEND, "retrieval_fwd")(q, q[:, :1], q[:, :1], None, None, 0.1)


# ---- the emulator's own checks: each one bites --------------------------------------------------

LAUNCH_FAILURE, ILLEGAL_ADDRESS, INVALID_VALUE, INVALID_CONFIG, OUT_OF_RESOURCES = 719, 700, 1, 9, 701


def test_selftest_missing_barrier_is_a_race_the_scheduler_exposes(lib):
    """Threads write a shared slot and read another warp's: without the barrier between,
    schedules that run one warp ahead read NaN (shared memory's fill); with it, none do."""
    want = (torch.arange(128) + 32) % 128
    racy = 0
    for s in range(6):
        lib.configure(seed=s)
        err, msg, out = lib.selftest("neighbour", 0)
        assert err == 0 and torch.equal(out, want.float()), (s, msg)
        err, _, out = lib.selftest("neighbour", 1)
        assert err == 0
        racy += int(not torch.equal(out, want.float()))
    assert racy == 6  # every schedule here runs some warp ahead of the one it reads


@pytest.mark.parametrize("mode,match", [
    (0, r"divergent __syncthreads: .*threads 0-63 at __syncthreads \(selftest_kernels.cu:\d+\); "
        r"threads 64-127 at __syncthreads \(selftest_kernels.cu:\d+\)"),
    (1, r"(__syncthreads at selftest_kernels.cu:\d+ reached by .* after thread \d+ of the block exited"
        r"|exited while \d+ threads wait at __syncthreads)"),
    (2, r"(reached by .* after thread \d+ of the block exited|exited while \d+ threads wait)"),
], ids=["divergent", "exit_then_barrier", "barrier_after_exit"])
def test_selftest_barrier_not_reached_by_all_is_reported(lib, mode, match):
    for s in (0, 1, 5):
        lib.configure(seed=s)
        err, msg, _ = lib.selftest("barrier", mode)
        assert err == LAUNCH_FAILURE
        assert re.search(match, msg), msg


def test_selftest_shuffles_exchange_like_the_gpu(lib):
    t = torch.arange(128)
    lane, base = t % 32, t - t % 32
    want = {
        0: base + (lane * 7 + 3) % 32,                                  # __shfl_sync
        1: base + (lane ^ 5),                                           # __shfl_xor_sync
        2: torch.where(lane + 3 < 32, t + 3, t),                        # __shfl_down_sync
        3: torch.where(lane % 16 >= 3, t - 3, t),                       # __shfl_up_sync, width 16
    }
    for s in (0, 3):
        lib.configure(seed=s)
        for mode, w in want.items():
            err, msg, out = lib.selftest("shuffle", mode)
            assert err == 0 and torch.equal(out, w.float()), (mode, msg)


@pytest.mark.parametrize("mode,match", [
    (4, r"thread \(5,0,0\) \[warp 0 lane 5\] exited while lanes of its warp wait in a warp shuffle"),
    (5, r"__shfl_xor_sync at selftest_kernels.cu:\d+ with mask 0x0000ffff"),
    (6, r"deadlock: no CUDA thread can proceed: .*thread 37 at __syncthreads .*threads 38-63 in a warp "
        r"shuffle"),
    (7, r"divergent warp shuffle in warp 0"),
], ids=["lane_missing", "partial_mask", "deadlock", "divergent"])
def test_selftest_shuffle_misuse_is_reported(lib, mode, match):
    err, msg, _ = lib.selftest("shuffle", mode)
    assert err == LAUNCH_FAILURE
    assert re.search(match, msg), msg


def test_selftest_launch_bounds_grid_and_block_limits(lib):
    err, msg, _ = lib.selftest("bounds")
    assert err == OUT_OF_RESOURCES and "exceed the kernel's __launch_bounds__(64)" in msg
    for mode, what in ((0, "gridDim (1,65536,1)"), (1, "gridDim (2147483648,1,1)"),
                       (2, "blockDim (1025,1,1)"), (4, "blockDim (1024,2,1)")):
        err, msg, _ = lib.selftest("grid", mode)
        assert err == INVALID_CONFIG and what in msg, msg
    lib.configure(sample_blocks=3)  # the largest legal y: 65,535 blocks, 5 of them run
    before = lib.stats()["blocks"]
    assert lib.selftest("grid", 3)[0] == 0
    assert lib.stats()["blocks"] - before == 5


def test_selftest_shared_memory_limits(lib):
    """40 KB of static shared memory leave 8 KB of dynamic without the opt-in; the opt-in
    raises it up to the A100's 166,912 B per block, static included."""
    err, msg, _ = lib.selftest("smem_raw", 8192)
    assert err == 0, msg
    err, msg, _ = lib.selftest("smem_raw", 8196)
    assert err == INVALID_VALUE and "did not opt in" in msg, msg
    err, msg, _ = lib.selftest("smem_optin", 9000)
    assert err == 0, msg
    err, msg, _ = lib.selftest("smem_raw", 9000)  # the attribute stays set, as on the GPU
    assert err == 0, msg
    err, msg, _ = lib.selftest("smem_optin", 166912 - 40960 + 4)
    assert err == INVALID_VALUE and "166912" in msg, msg
    err, msg, _ = lib.selftest("smem_optin", 166912 - 40960)
    assert err == 0, msg


def test_selftest_shared_memory_starts_as_nan(lib):
    for s in (0, 1):
        lib.configure(seed=s)
        err, msg, out = lib.selftest("smem", 0, n_out=64 + 4)  # 64 floats dynamic, 4 static
        assert err == 0, msg
        assert out.isnan().all()


@pytest.mark.parametrize("guard_mode,mode,n_in,match", [
    (0, 1, 128, r"out-of-bounds read of global buffer 'in': byte 0 past its end \(it holds 512 B\), "
                r"in thread \(127,0,0\) \(kernel launched at selftest_kernels.cu:\d+, block \(0,0,0\)\)"),
    (1, -1, 128, r"out-of-bounds read of global buffer 'in': 4 B before its start .* thread \(0,0,0\)"),
    (0, 99, 1, r"invalid global memory read at address 0x10, outside every buffer of the launch, "
               r"in thread \(3,0,0\)"),
], ids=["past_end", "before_start", "wild"])
def test_selftest_out_of_bounds_read_hits_a_guard_page(lib, guard_mode, mode, n_in, match):
    """The fault is caught by the emulator's SIGSEGV handler, which names the buffer, the
    offset and the thread; as on a GPU the launch fails (an illegal address) and the
    process goes on."""
    lib.configure(guard_mode=guard_mode)
    err, msg, _ = lib.selftest("read", mode, n_out=128, inp=torch.ones(n_in))
    assert err == ILLEGAL_ADDRESS
    assert re.search(match, msg), msg
    assert lib.selftest("read", 0, n_out=128, inp=torch.ones(128))[0] == 0  # and the next launch runs


def test_selftest_dynamic_shared_memory_overflow_faults(lib):
    err, msg, _ = lib.selftest("smem", 1, n_out=64 + 4)
    assert err == ILLEGAL_ADDRESS
    assert "out-of-bounds write of dynamic shared memory: byte 0 past the 256 B the launch gave" in msg


def test_selftest_fault_in_a_real_kernel_fails_the_op(lib):
    """An out-of-bounds access in one of the project's kernels reaches Python as the CUDA
    backend's RuntimeError, with the emulator's report (here: a kernel library built with
    seq_k_len ignoring Nv, i.e. without the kv_len clamp; seq_k_len lives in pvm_params.h)."""
    src = open(os.path.join(REPO, "csrc", "pvm_params.h")).read()
    clamp = "return p.kv_len ? clamp64(p.kv_len[b], 0, p.Nv) : p.Nv;"
    assert clamp in src
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(REPO, "csrc"), os.path.join(tmp, "csrc"))
        path = os.path.join(tmp, "csrc", "pvm_params.h")
        open(path, "w").write(src.replace(clamp, "return p.kv_len ? p.kv_len[b] : p.Nv;"))
        unclamped = emulator.build_kernel_lib(csrc=os.path.join(tmp, "csrc"))
    old = os.environ[emulator.LIB_ENV]
    os.environ[emulator.LIB_ENV] = unclamped
    try:
        q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 5, 1, 16)
        with pytest.raises(RuntimeError, match=r"an illegal memory access was encountered .*\[emulator: "
                           r"out-of-bounds read of global buffer '[kv]'"):
            pvm_retrieval(q, k, k, None, torch.tensor([1 << 20], dtype=torch.int32), backend=BACKEND)
    finally:
        os.environ[emulator.LIB_ENV] = old


def test_selftest_half_and_bfloat16_conversions_match_torch():
    """The shims' round-to-nearest-even conversions, against torch's, on every 16-bit code
    and on floats around every rounding boundary (ties, subnormals, overflow)."""
    import ctypes
    dll = emulator.kernel_lib().dll
    codes = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for kind, dt in ((0, torch.float16), (1, torch.bfloat16)):
        out = torch.empty(65536, dtype=torch.float32)
        dll.pvm_emu_decode(ctypes.c_void_p(codes.data_ptr()), 65536, kind, ctypes.c_void_p(out.data_ptr()))
        want = codes.view(dt).float()
        assert torch.equal(out.isnan(), want.isnan())
        assert torch.equal(out[~want.isnan()], want[~want.isnan()])
        # floats: every code's value, the midpoints between neighbours (ties), +- one ulp
        vals = want[~want.isnan() & want.isfinite()].sort().values
        mids = (vals[:-1].double() + vals[1:].double()) / 2
        f32 = torch.cat([vals, mids.float(), mids.float().nextafter(torch.tensor(math.inf)),
                         mids.float().nextafter(torch.tensor(-math.inf)), torch.randn(100000) * 1e3,
                         torch.tensor([math.inf, -math.inf, 65520.0, 65519.99, 1e-8, -3e-8, 0.0, -0.0])])
        bits = torch.empty(f32.numel(), dtype=torch.int16)
        back = torch.empty(f32.numel(), dtype=torch.float32)
        dll.pvm_emu_convert(ctypes.c_void_p(f32.data_ptr()), f32.numel(), kind,
                            ctypes.c_void_p(bits.data_ptr()), ctypes.c_void_p(back.data_ptr()))
        assert torch.equal(bits, f32.to(dt).view(torch.int16)), dt
        assert torch.equal(back, f32.to(dt).float())
