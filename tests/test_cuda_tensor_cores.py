"""The tensor-core retrieval kernels (csrc/cuda/retrieval_tc_*.cu), run on CPU by the CUDA
emulator: mma.sync, ldmatrix and cp.async through csrc/cuda/mma.cuh, emulated warp-level
with the checks of docs/cuda_emulator.md (NaN until a cp.async is waited for, ldmatrix of
rows no barrier published reported, every lane converged), against float64.

Each kernel has its own section below. Every case asserts that the tensor-core kernel really
ran (the emulator counts launches and blocks per launch-site file: KernelLib.site_stats), so
a dispatch bug cannot silently test the CUDA-core kernel instead.
"""
import math
import re

import pytest
import torch

from emu_support import BACKEND, MANGLED_DTYPE, SMS, TC_OPS, cuobjdump, emulator, sass_counts

from pvm_kernels.ops.registration import get_op
from pvm_kernels.testing import TOLERANCE, max_rel_err, poisoned_outputs, random_mask

# CPU stand-ins for GPU runs: `make gpu-check` (-m "not cpu_verification") leaves them out.
pytestmark = [pytest.mark.cpu_verification, pytest.mark.usefixtures("emulated_backend")]


# =============================================================================================
# Forward: csrc/cuda/retrieval_tc_fwd.cu
# =============================================================================================
# The tensor-core forward runs for bf16 / fp16, hd a multiple of 16 up to 128, q/k/v/out in
# 16-byte rows (retrieval_fwd_tensor_cores, csrc/pvm_params.h); blocks of 64 packed query
# rows (r = t * G + g), keys in 64-key tiles, split-KV planned in those tiles. Here: values
# and lse against float64 over head dims, GQA and MHA, row counts and key counts off the
# tiles, masks with holes, kv_len cutting a tile, an empty sample, NaN in the padding and in
# a query row, split and unsplit; the plan's tiles; the dispatch rule; identical bits on
# every run and schedule; agreement with the CUDA-core kernel; and the SASS.

TC_FWD = "retrieval_tc_fwd.cu"
TC_DTYPES = [torch.bfloat16, torch.float16]
TC_HEAD_DIMS = [16, 32, 64, 128]


def split_loop(n_items, tile, blocks, sm_count=SMS, force=0):
    """split_loop of csrc/pvm_params.h (Triton's rule): (splits, items per split)."""
    items = max(n_items, 1)
    tiles = -(-items // tile)
    want = force if force > 0 else -(-2 * max(sm_count, 1) // max(blocks, 1))
    want = max(1, min(want, tiles, 64))
    per = -(-tiles // want) * tile
    return -(-items // per), per


def tc_fwd_plan(B, T, H, Hkv, Nv, force=0):
    """(kv_splits, blocks of the tensor-core launch) the host op should plan: 64-row tiles,
    64-key tiles."""
    row_tiles = -(-(T * H // Hkv) // 64)
    splits, _ = split_loop(Nv, 64, row_tiles * B * Hkv, force=force)
    return splits, row_tiles * splits * B * Hkv


def set_split_mode(monkeypatch, mode):
    """"plan": the host op's plan for 132 SMs (these small shapes mostly split); "unsplit":
    PVM_CUDA_SPLITS=1; an int: that many splits forced. Returns the force value."""
    monkeypatch.delenv("PVM_CUDA_SPLITS", raising=False)
    if mode == "unsplit":
        monkeypatch.setenv("PVM_CUDA_SPLITS", "1")
        return 1
    if isinstance(mode, int):
        monkeypatch.setenv("PVM_CUDA_SPLITS", str(mode))
        return mode
    return 0


def run_fwd(lib, q, k, v, mask=None, kv_len=None, scale=None):
    """The emulated CUDA forward on poisoned outputs: (out, lse, launches and blocks run
    from retrieval_tc_fwd.cu during the call)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    before = lib.site_stats(TC_FWD)
    with poisoned_outputs():
        out, lse = get_op(BACKEND, "retrieval_fwd")(q, k, v, mask, kv_len, scale)
    after = lib.site_stats(TC_FWD)
    return out, lse, (after["launches"] - before["launches"], after["blocks"] - before["blocks"])


def valid_keys(B, Nv, mask, kv_len):
    valid = torch.ones(B, Nv, dtype=torch.bool) if mask is None else mask.clone()
    if kv_len is not None:
        valid &= torch.arange(Nv)[None, :] < kv_len.long().clamp(0, Nv)[:, None]
    return valid


def reference_fwd(q, k, v, valid, scale=None):
    """float64 out [B, T, H, hd] and lse [B, H, T] (natural log; -inf, out 0 with no valid
    key; invalid keys' K and V never read, so NaN there stays out)."""
    B, T, H, hd = q.shape
    G = H // k.shape[2]
    scale = hd ** -0.5 if scale is None else scale
    keep = valid[:, :, None, None]
    kx = k.double().masked_fill(~keep, 0).repeat_interleave(G, dim=2)
    vx = v.double().masked_fill(~keep, 0).repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bnhd->bhtn", q.double(), kx) * scale
    s = s.masked_fill(~valid[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0, lse)[..., None])  # empty row: all 0
    return torch.einsum("bhtn,bnhd->bthd", p, vx), lse


def inputs(dtype, B, T, H, Hkv, hd, Nv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype)
            for shape in ((B, T, H, hd), (B, Nv, Hkv, hd), (B, Nv, Hkv, hd))]


def check_against_float64(dtype, out, lse, q, k, v, valid):
    ref, ref_lse = reference_fwd(q, k, v, valid)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert max_rel_err(out, ref) < TOLERANCE[dtype], max_rel_err(out, ref)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    # fp32 accumulation of exact bf16 / fp16 products, fp32 row sums: lse to ~1e-5
    assert ((lse.double() - ref_lse)[~empty].abs() < 1e-4).all()
    no_key = ~valid.any(1)  # samples with no valid key: exactly 0
    assert (out[no_key] == 0).all()


# (B, T, H, Hkv, Nv, mask kind, kv_len): packed rows T * G off the 64-row tile, key counts
# below one 64-key tile and between tiles, GQA (G 4, the 8B layout) and MHA.
TC_CASES = {
    "gqa4-rows36-keys150-pad-kvlen": (2, 9, 4, 1, 150, "pad", True),    # kv_len cuts mid-tile
    "gqa4-rows80-keys37-mixed": (3, 20, 4, 1, 37, "mixed", False),     # a sample with no key
    "mha-rows67-keys130-holes": (2, 67, 2, 2, 130, "holes", False),    # 2 row tiles, 3 key tiles
    "gqa2-rows6-keys1": (1, 3, 4, 2, 1, None, False),                  # one key
    "decode-gqa4-keys300": (1, 1, 4, 1, 300, None, False),             # an 8B decode step
}


def case_mask(kind, B, Nv, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    if kind is None:
        return None
    if kind == "pad":
        return random_mask(B, Nv, pad_from={b: Nv - 9 * (b + 1) for b in range(B)}, generator=g)
    if kind == "mixed":
        return random_mask(B, Nv, empty_rows=[1], pad_from={2: 5}, holes=0.2, generator=g)
    return random_mask(B, Nv, holes=0.35, generator=g)


@pytest.mark.parametrize("mode", ["plan", "unsplit", 3])
@pytest.mark.parametrize("case", sorted(TC_CASES))
@pytest.mark.parametrize("hd", TC_HEAD_DIMS)
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tc_fwd_matches_float64(lib, monkeypatch, dtype, hd, case, mode):
    """Values and lse against float64 on the tensor-core kernel (asserted to be the one that
    ran, with the planned blocks): bf16 / fp16, hd 16-128, split-KV as planned for 132 SMs,
    unsplit, and forced into 3 splits."""
    B, T, H, Hkv, Nv, kind, with_len = TC_CASES[case]
    force = set_split_mode(monkeypatch, mode)
    q, k, v = inputs(dtype, B, T, H, Hkv, hd, Nv, seed=hd)
    mask = case_mask(kind, B, Nv)
    kv_len = None
    if with_len:  # cut inside key tile 1 (keys 64-127) and inside tile 0, before the padding
        kv_len = torch.tensor([100, 40], dtype=torch.int32)
    out, lse, (launches, blocks) = run_fwd(lib, q, k, v, mask, kv_len)
    splits, want_blocks = tc_fwd_plan(B, T, H, Hkv, Nv, force)
    assert (launches, blocks) == (1, want_blocks), (splits, launches, blocks)
    check_against_float64(dtype, out, lse, q, k, v, valid_keys(B, Nv, mask, kv_len))


@pytest.mark.parametrize("mode", ["plan", "unsplit"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tc_fwd_sample_without_visual_tokens(lib, monkeypatch, dtype, mode):
    """A sample whose keys are all masked, and one with kv_len 0: output exactly 0 and lse
    -inf, beside a normal sample; nothing NaN though the outputs start as NaN."""
    set_split_mode(monkeypatch, mode)
    B, T, H, Hkv, hd, Nv = 3, 5, 4, 1, 64, 100
    q, k, v = inputs(dtype, B, T, H, Hkv, hd, Nv)
    mask = torch.ones(B, Nv, dtype=torch.bool)
    mask[0] = False
    kv_len = torch.tensor([Nv, 0, 77], dtype=torch.int32)
    out, lse, (launches, _) = run_fwd(lib, q, k, v, mask, kv_len)
    assert launches == 1
    assert (out[:2] == 0).all() and torch.isneginf(lse[:2]).all()
    check_against_float64(dtype, out, lse, q, k, v, valid_keys(B, Nv, mask, kv_len))


@pytest.mark.parametrize("mode", ["plan", "unsplit"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tc_fwd_nan_in_padding_stays_out(lib, monkeypatch, dtype, mode):
    """NaN / inf in K and V at masked keys, past kv_len (inside the last tile and whole tiles
    past it) and in a hole: the copies zero-fill invalid keys, nothing reaches a result."""
    set_split_mode(monkeypatch, mode)
    B, T, H, Hkv, hd, Nv = 2, 6, 4, 1, 32, 200
    q, k, v = inputs(dtype, B, T, H, Hkv, hd, Nv)
    mask = torch.ones(B, Nv, dtype=torch.bool)
    mask[0, 10] = mask[0, 63] = mask[0, 64] = False   # holes on both sides of a tile edge
    mask[1, 90:] = False
    kv_len = torch.tensor([70, Nv], dtype=torch.int32)  # sample 0 cut 6 keys into tile 1
    invalid = ~valid_keys(B, Nv, mask, kv_len)
    k[invalid] = float("nan")
    v[invalid] = float("inf")
    v[0, 150] = float("nan")
    out, lse, (launches, _) = run_fwd(lib, q, k, v, mask, kv_len)
    assert launches == 1
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_against_float64(dtype, out, lse, q, k, v, ~invalid)


@pytest.mark.parametrize("mode", ["plan", "unsplit"])
@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tc_fwd_nan_query_row_gives_nan(lib, monkeypatch, dtype, mode):
    """One element of one query row NaN: that row's output (every dim) and lse are NaN, as
    in the reference; the other rows of its 64-row block and quad are untouched."""
    set_split_mode(monkeypatch, mode)
    B, T, H, Hkv, hd, Nv = 1, 20, 4, 1, 64, 150
    q, k, v = inputs(dtype, B, T, H, Hkv, hd, Nv)
    q[0, 7, 2, 5] = float("nan")
    out, lse, (launches, _) = run_fwd(lib, q, k, v)
    assert launches == 1
    assert torch.isnan(out[0, 7, 2]).all() and torch.isnan(lse[0, 2, 7])
    ok = torch.ones(B, T, H, dtype=torch.bool)
    ok[0, 7, 2] = False
    ref, ref_lse = reference_fwd(q, k, v, torch.ones(B, Nv, dtype=torch.bool))
    assert max_rel_err(out[ok], ref[ok]) < TOLERANCE[dtype]
    assert (lse.transpose(1, 2)[ok].double() - ref_lse.transpose(1, 2)[ok]).abs().max() < 1e-4


def test_tc_fwd_split_plan_uses_the_tensor_core_tiles(lib, monkeypatch):
    """The host op plans split-KV in the kernel's 64-key tiles: an 8B decode step at Nv 1024
    is 16 splits of 64 keys (16 tensor-core blocks + the combine), not the CUDA-core
    kernel's 32 splits of 32 keys; at Nv 4096, 64 splits of 64. In fp32 (CUDA cores) the
    same shape is still 32 blocks of 32 keys."""
    set_split_mode(monkeypatch, "plan")
    q, k, v = inputs(torch.bfloat16, 1, 1, 4, 1, 128, 1024)
    before = lib.stats()
    out, lse, (launches, blocks) = run_fwd(lib, q, k, v)
    after = lib.stats()
    assert tc_fwd_plan(1, 1, 4, 1, 1024) == (16, 16)
    assert (launches, blocks) == (1, 16)
    assert (after["launches"] - before["launches"], after["blocks"] - before["blocks"]) == (2, 16 + 1)
    check_against_float64(torch.bfloat16, out, lse, q, k, v, torch.ones(1, 1024, dtype=torch.bool))
    q4, k4, v4 = inputs(torch.float16, 1, 1, 4, 1, 128, 4096)
    assert run_fwd(lib, q4, k4, v4)[2] == (1, 64)
    before = lib.stats()
    _, _, (launches, _) = run_fwd(lib, q.float(), k.float(), v.float())
    after = lib.stats()
    assert launches == 0 and after["blocks"] - before["blocks"] == 32 + 1


def _strided(t):
    """The same values in a [.., hd] view whose rows are not 16-byte rows (hd stride 2)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


def _offset(t):
    """The same values 2 bytes past a 16-byte boundary (contiguous, misaligned base)."""
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


@pytest.mark.parametrize("variant,tensor_cores", [
    ("bf16", True), ("fp16", True), ("fp32", False), ("hd24", False), ("hd8", False),
    ("hd144", False), ("hd256", False), ("q_strided", False), ("k_strided", False),
    ("v_offset", False), ("env_off", False),
])
def test_tc_fwd_dispatch_rule(lib, monkeypatch, variant, tensor_cores):
    """Which launches take the tensor cores (retrieval_fwd_tensor_cores): bf16 / fp16 with hd
    a multiple of 16 up to 128 in 16-byte rows; fp32, other head dims, strided or
    misaligned views and PVM_CUDA_TENSOR_CORES=0 stay on the CUDA-core kernel. Every
    variant matches float64 either way."""
    monkeypatch.delenv("PVM_CUDA_TENSOR_CORES", raising=False)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(variant, torch.bfloat16)
    hd = int(variant[2:]) if variant.startswith("hd") else 32
    q, k, v = inputs(dtype, 2, 5, 4, 2, hd, 45)
    if variant == "q_strided":
        q = _strided(q)
    elif variant == "k_strided":
        k = _strided(k)
    elif variant == "v_offset":
        v = _offset(v)
        assert v.data_ptr() % 16 == 2
    elif variant == "env_off":
        monkeypatch.setenv("PVM_CUDA_TENSOR_CORES", "0")
    out, lse, (launches, _) = run_fwd(lib, q, k, v)
    assert launches == (1 if tensor_cores else 0)
    check_against_float64(dtype, out, lse, q, k, v, torch.ones(2, 45, dtype=torch.bool))


@pytest.mark.parametrize("dtype", TC_DTYPES, ids=str)
def test_tc_fwd_agrees_with_the_cuda_core_kernel(lib, monkeypatch, dtype):
    """The same inputs through both kernels (PVM_CUDA_TENSOR_CORES=0 for the CUDA-core
    one): outputs within the dtype's tolerance of each other, lse within 1e-4."""
    q, k, v = inputs(dtype, 2, 33, 4, 1, 128, 260)
    mask = case_mask("holes", 2, 260)
    tc_out, tc_lse, (launches, _) = run_fwd(lib, q, k, v, mask)
    assert launches == 1
    monkeypatch.setenv("PVM_CUDA_TENSOR_CORES", "0")
    cc_out, cc_lse, (launches, _) = run_fwd(lib, q, k, v, mask)
    assert launches == 0
    assert max_rel_err(tc_out, cc_out.double()) < TOLERANCE[dtype]
    assert (tc_lse - cc_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["plan", "unsplit"])
def test_tc_fwd_same_bits_on_every_run_and_schedule(lib, monkeypatch, mode):
    """Reruns and the emulator's schedules (warp orders, random pauses, reversed and
    shuffled blocks; seeds 0-5, buffers end- or start-aligned) give bit-identical out and
    lse: fixed reduction orders, no atomics. The schedules also expose a missing barrier
    around the double buffer (a warp running ahead reads NaN or the wrong tile)."""
    set_split_mode(monkeypatch, mode)
    B, T, H, Hkv, hd, Nv = 2, 21, 4, 1, 64, 300  # 84 rows: 2 row tiles; 5 key tiles
    q, k, v = inputs(torch.bfloat16, B, T, H, Hkv, hd, Nv)
    mask = case_mask("holes", B, Nv)
    first = None
    for seed in range(6):
        lib.configure(seed=seed, guard_mode=seed % 2)
        for _ in range(2 if seed == 0 else 1):
            out, lse, (launches, _) = run_fwd(lib, q, k, v, mask)
            assert launches == 1
            if first is None:
                first = (out, lse)
                check_against_float64(torch.bfloat16, out, lse, q, k, v, valid_keys(B, Nv, mask, None))
            assert torch.equal(out.view(torch.int16), first[0].view(torch.int16)), seed
            assert torch.equal(lse.view(torch.int32), first[1].view(torch.int32)), seed


# ---- SASS and resources of the CUDA extension (sm_80, sm_90) ----------------------------------

TC_FWD_KERNEL = r"retrieval_tc_fwd_kernelI(13__nv_bfloat16|6__half)Li(\d+)E"


def tc_fwd_sass(arch: str) -> dict:
    """{(dtype, hd): {instruction: count}} over the SASS of retrieval_tc_fwd_kernel<T, HD>."""
    return sass_counts(arch, TC_FWD_KERNEL, lambda m: (MANGLED_DTYPE[m.group(1)], int(m.group(2))))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tc_fwd_sass_uses_the_tensor_cores(arch):
    """Every instance (bf16 / fp16 x hd 16, 32, ..., 128) lowers to HMMA.16816.F32.BF16 /
    HMMA.16816.F32 (Q K^T and P V: 2 * hd / 16 * 4 + 4 * hd / 16 * 2 per 64-key tile, the
    key loop not unrolled), LDSM.16.M88.4 (Q, K) and LDSM.16.MT88.4 (V), and
    LDGSTS.E.BYPASS.128 (cp.async of Q, K, V) with LDGDEPBAR / DEPBAR."""
    counts = tc_fwd_sass(arch)
    assert sorted(counts) == [(d, hd) for d in ("bf16", "f16") for hd in range(16, 129, 16)], sorted(counts)
    for (kind, hd), ops in counts.items():
        hmma = "HMMA.16816.F32.BF16" if kind == "bf16" else "HMMA.16816.F32"
        assert ops.get(hmma, 0) >= 16 * hd // 16, (kind, hd, ops)  # 8 (S) + 8 (O) per k-step pair
        assert not any(o.startswith("HMMA") and o != hmma for o in ops), (kind, hd, ops)
        for op in ("LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128", "LDGDEPBAR"):
            assert ops.get(op, 0) >= 1, (kind, hd, op, ops)
        assert sum(n for o, n in ops.items() if o.startswith("DEPBAR")) >= 2, (kind, hd, ops)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tc_fwd_resources(arch):
    """No stack frame or local memory in any instance (the registers stay below 255: the
    K/V staging loop is not unrolled, or hd 128 spilled 68 B on sm_80), and 512 B of static
    shared memory (the validity flags; the tiles are dynamic)."""
    out = cuobjdump("-res-usage", "-arch", arch)
    usage = re.findall(r"Function (\S*retrieval_tc_fwd_kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) "
                       r"LOCAL:(\d+)", out)
    assert len(usage) == 16, out[-2000:]
    for name, regs, stack, shared, local in usage:
        assert int(stack) == 0 and int(local) == 0, (name, regs, stack, local)
        assert int(shared) in (512, 512 + 1024), (name, shared)  # sm_90: + 1 KB system reserve


# =============================================================================================
# Backward: csrc/cuda/retrieval_tc_bwd.cu
# =============================================================================================
# dQ and dK/dV on the tensor cores for bf16 / fp16, hd a multiple of 16 up to 128, 16-byte
# rows (retrieval_bwd_tensor_cores, csrc/pvm_params.h): 64-row dQ blocks walking 64-key
# tiles, 64-key dK/dV blocks walking 64-row steps, the rows split among blocks as planned
# for 132 SMs (fp32 partials summed in split order). The backward runs on the float64
# reference's out and lse (rounded to the kernels' dtypes), so only its own error is
# measured; every case asserts that the tensor-core kernels ran, with the planned blocks
# (launches and blocks from retrieval_tc_bwd.cu's launch sites: KernelLib.site_stats).

TC_BWD = "retrieval_tc_bwd.cu"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BWD_PLAN_FIELDS = ("kv_splits", "split_keys", "fwd_blocks", "combine_blocks", "row_splits",
                   "split_rows", "dkdv_blocks", "sum_blocks", "dq_blocks", "fwd_tensor_cores",
                   "tensor_cores")


def bwd_plan(B, T, H, Hkv, Nv, hd, dtype, sm_count=SMS, force=0):
    """The host op's plan for contiguous tensors of dtype and each launch's blocks
    (pvm_emu_retrieval_plan_dtype); tensor_cores: the backward's rule."""
    import ctypes
    dll = emulator.kernel_lib().dll
    dll.pvm_emu_retrieval_plan_dtype.argtypes = [ctypes.c_int64] * 6 + [ctypes.c_int] + \
        [ctypes.c_int64] * 2 + [ctypes.POINTER(ctypes.c_int64)]
    out = (ctypes.c_int64 * len(BWD_PLAN_FIELDS))()
    dll.pvm_emu_retrieval_plan_dtype(B, T, H, Hkv, Nv, hd, DTYPE_CODE[dtype], sm_count, force, out)
    return dict(zip(BWD_PLAN_FIELDS, out))


def tc_bwd_runs():
    """(launches, blocks) run from retrieval_tc_bwd.cu's launch sites so far."""
    s = emulator.kernel_lib().site_stats(TC_BWD)
    return s["launches"], s["blocks"]


def bwd_reference_fwd(q, k, v, valid, scale):
    """float64 out and lse (natural log, -inf for a row with no valid key), GQA."""
    H, Hkv = q.shape[2], k.shape[2]
    kx = k.double().repeat_interleave(H // Hkv, dim=2)
    vx = v.double().repeat_interleave(H // Hkv, dim=2)
    s = torch.einsum("bthd,bnhd->bhtn", q.double(), kx) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(s), torch.exp(s - lse[..., None]))
    return torch.einsum("bhtn,bnhd->bthd", p, vx), lse


def bwd_inputs(dtype, B, T, H, Hkv, hd, Nv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
                   for s in ((B, T, H, hd), (B, Nv, Hkv, hd), (B, Nv, Hkv, hd), (B, T, H, hd)))
    return q, k, v, go


def bwd_case(q, k, v, go, mask, kv_len, scale=None, poison=None):
    """(got, want): the emulated backward's dq, dk, dv (outputs and workspaces NaN-poisoned)
    and float64's, on the reference's out / lse. `poison`: a value written into k and v at
    every invalid key (masked or past kv_len) before the kernels run; the reference sees
    the clean tensors (its keys are invalid anyway)."""
    B, Nv = k.shape[0], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    valid = torch.ones(B, Nv, dtype=torch.bool) if mask is None else mask.clone()
    if kv_len is not None:
        valid &= torch.arange(Nv)[None] < kv_len.clamp(0, Nv)[:, None].long()
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64, lse64 = bwd_reference_fwd(q64, k64, v64, valid, scale)
    want = torch.autograd.grad(out64, (q64, k64, v64), go.double())
    kk, vv = k, v
    if poison is not None:
        kk, vv = k.clone(), v.clone()
        kk[~valid] = poison
        vv[~valid] = poison
    with poisoned_outputs():
        got = get_op(BACKEND, "retrieval_bwd")(go, q, kk, vv, out64.detach().to(q.dtype),
                                               lse64.detach().float(), mask, kv_len, scale)
    return got, want, valid


def assert_bwd_close(got, want, valid, dtype):
    tol = TOLERANCE[dtype]
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        assert max_rel_err(a, e) < tol, f"{name}: {max_rel_err(a, e):.2e}"
    dq, dk, dv = got
    invalid = ~valid[:, :, None, None].expand_as(dk)
    assert (dk[invalid] == 0).all() and (dv[invalid] == 0).all(), "gradient reached an invalid key"
    empty = ~valid.any(1)
    assert (dq[empty] == 0).all(), "a sample with no valid key got a dq"


def use_split_mode(monkeypatch, mode):
    for name in ("PVM_CUDA_SPLITS", "PVM_CUDA_SM_COUNT", "PVM_CUDA_TENSOR_CORES"):
        monkeypatch.delenv(name, raising=False)
    if mode == "unsplit":
        monkeypatch.setenv("PVM_CUDA_SPLITS", "1")
    elif mode == "force3":
        monkeypatch.setenv("PVM_CUDA_SPLITS", "3")


# (B, T, H, Hkv, hd, Nv, mask kind, kv_len kind). Packed rows T * H / Hkv and Nv mostly not
# multiples of 64, several below one tile; hd 16 / 48 / 80 run the HD 32 / 64 / 96
# instances with zero-filled columns.
BWD_SHAPES = [
    (1, 1, 4, 1, 64, 5, None, None),         # 4 rows, 5 keys: both far below one tile
    (2, 9, 4, 1, 32, 70, "holes", "mid"),    # G 4: 36 rows; 2 key tiles, kv_len mid-tile
    (3, 5, 4, 2, 16, 37, "empty", None),     # hd 16, G 2, sample 1 without a visual token
    (2, 40, 4, 4, 64, 150, "pad", "mid"),    # MHA (G 1): 40 rows; 3 key tiles
    (1, 50, 4, 1, 128, 130, "holes", None),  # the 8B layout: 200 rows (4 steps), 3 key tiles
    (2, 7, 6, 2, 48, 65, "pad", "mid"),      # hd 48 (HD 64), G 3; a 1-key last tile
    (1, 3, 2, 1, 80, 100, "holes", "mid"),   # hd 80 (HD 96)
    (1, 33, 4, 1, 96, 64, None, None),       # hd 96, 132 rows: 3 steps, one exact key tile
    (2, 40, 4, 1, 64, 100, "holes", "mid"),  # 160 rows per sample: row splits with B > 1
    (3, 40, 4, 2, 32, 80, "empty", "mid"),   # G 2, 80 rows: 2 row splits, an empty sample
]


def bwd_mask_and_len(kind, len_kind, B, Nv, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    mask = None
    if kind == "holes":
        mask = random_mask(B, Nv, holes=0.3, generator=g)
    elif kind == "pad":
        mask = random_mask(B, Nv, pad_from={b: Nv - 9 * (b + 1) for b in range(B)}, generator=g)
    elif kind == "empty":
        mask = random_mask(B, Nv, empty_rows=[1], holes=0.2, generator=g)
    kv_len = None
    if len_kind == "mid":  # mid-tile: keys after it are valid in the mask but must not count
        kv_len = torch.tensor([Nv - 1 - 23 * b for b in range(B)], dtype=torch.int32).clamp(min=1)
    return mask, kv_len


@pytest.mark.parametrize("mode", ["plan", "unsplit", "force3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-{s[6]}-{s[7]}")
def test_tc_bwd_matches_float64(lib, monkeypatch, mode, dtype, shape):
    """dq, dk, dv against float64 under the emulator's split plan (132 SMs: rows split in
    64-row steps), unsplit (one dK/dV block walks every row step: the cp.async double
    buffer turns over) and 3 forced splits; exact zeros for invalid keys and empty samples."""
    use_split_mode(monkeypatch, mode)
    B, T, H, Hkv, hd, Nv, kind, len_kind = shape
    assert bwd_plan(B, T, H, Hkv, Nv, hd, dtype)["tensor_cores"] == 1
    q, k, v, go = bwd_inputs(dtype, B, T, H, Hkv, hd, Nv)
    mask, kv_len = bwd_mask_and_len(kind, len_kind, B, Nv)
    d = bwd_plan(B, T, H, Hkv, Nv, hd, dtype, force={"plan": 0, "unsplit": 1, "force3": 3}[mode])
    before = tc_bwd_runs()
    got, want, valid = bwd_case(q, k, v, go, mask, kv_len)
    after = tc_bwd_runs()
    # dQ and dK/dV, with the planned blocks: the tensor-core backward ran, not the CUDA cores
    assert (after[0] - before[0], after[1] - before[1]) == (2, d["dq_blocks"] + d["dkdv_blocks"])
    assert_bwd_close(got, want, valid, dtype)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_tc_bwd_under_other_schedules(lib, monkeypatch, seed):
    """Seeds other than 0 reorder warps and blocks (and place buffers after their front
    guard page on odd seeds): a missing barrier or cp.async wait shows as NaN or a report."""
    lib.configure(seed=seed, guard_mode=seed % 2)
    for mode in ("unsplit", "plan"):
        use_split_mode(monkeypatch, mode)
        q, k, v, go = bwd_inputs(torch.bfloat16, 2, 50, 4, 1, 64, 150, seed=seed)
        mask, kv_len = bwd_mask_and_len("holes", "mid", 2, 150, seed=seed)
        got, want, valid = bwd_case(q, k, v, go, mask, kv_len)
        assert_bwd_close(got, want, valid, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_tc_bwd_nan_padding_stays_out(lib, monkeypatch, dtype, poison):
    """NaN / inf in k and v at every masked key and past kv_len (mid-tile) never reaches a
    gradient: the cp.async of an invalid key reads nothing (zero-fill) and its P is 0."""
    for mode in ("unsplit", "plan"):
        use_split_mode(monkeypatch, mode)
        q, k, v, go = bwd_inputs(dtype, 2, 20, 4, 1, 32, 100, seed=7)
        mask, kv_len = bwd_mask_and_len("holes", "mid", 2, 100, seed=7)
        got, want, valid = bwd_case(q, k, v, go, mask, kv_len, poison=poison)
        assert_bwd_close(got, want, valid, dtype)


def test_tc_bwd_sample_without_visual_tokens_gets_zero_gradients(lib, monkeypatch):
    """kv_len 0 (no tile at all: dQ walks no key, dK/dV blocks skip their rows) and an
    all-False mask (every tile walked, every P 0): exactly zero dq, dk, dv."""
    for mode in ("unsplit", "plan"):
        use_split_mode(monkeypatch, mode)
        q, k, v, go = bwd_inputs(torch.float16, 3, 6, 4, 2, 32, 90, seed=3)
        mask = torch.ones(3, 90, dtype=torch.bool)
        mask[1] = False
        kv_len = torch.tensor([90, 90, 0], dtype=torch.int32)
        got, want, valid = bwd_case(q, k, v, go, mask, kv_len)
        assert_bwd_close(got, want, valid, torch.float16)
        for g in got:
            assert (g[1:] == 0).all()


def test_tc_bwd_is_deterministic(lib, monkeypatch):
    """Row-split partials summed in split order, no atomics: two runs under different block
    orders and warp schedules (seeds 2 and 3, buffers placed differently) give identical
    bits, without NaN-poisoned workspaces (a partial read before written would differ)."""
    B, T, H, Hkv, hd, Nv = 2, 40, 4, 1, 64, 200
    d = bwd_plan(B, T, H, Hkv, Nv, hd, torch.bfloat16)
    assert d["tensor_cores"] == 1 and d["row_splits"] > 1
    q, k, v, go = bwd_inputs(torch.bfloat16, B, T, H, Hkv, hd, Nv, seed=2)
    kv_len = torch.tensor([150, 90], dtype=torch.int32)
    out, lse = get_op("native", "retrieval_fwd")(q.float(), k.float(), v.float(), None, kv_len, 0.125)
    results = []
    for seed in (2, 3):
        lib.configure(seed=seed, guard_mode=seed % 2)
        results.append(get_op(BACKEND, "retrieval_bwd")(go, q, k, v, out.to(q.dtype), lse, None, kv_len, 0.125))
    for name, a, b in zip(("dq", "dk", "dv"), *results):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name


def test_tc_bwd_row_splits_on_and_off_agree(lib, monkeypatch):
    """Forced splits 1, 2, 3, 7 and 64 (the cap; one 64-row step each) against float64 and
    each other: only the fp32 summation order of the partials differs."""
    B, T, H, Hkv, hd, Nv = 1, 100, 4, 1, 32, 90  # 400 rows: 7 steps unsplit
    q, k, v, go = bwd_inputs(torch.float16, B, T, H, Hkv, hd, Nv, seed=5)
    mask, kv_len = bwd_mask_and_len("holes", "mid", B, Nv, seed=5)
    runs = {}
    for n in (1, 2, 3, 7, 64):
        monkeypatch.setenv("PVM_CUDA_SPLITS", str(n))
        d = bwd_plan(B, T, H, Hkv, Nv, hd, torch.float16, force=n)
        assert d["row_splits"] == min(n, 7) and d["split_rows"] % 64 == 0
        got, want, valid = bwd_case(q, k, v, go, mask, kv_len)
        assert_bwd_close(got, want, valid, torch.float16)
        runs[n] = got
    for n in (2, 3, 7, 64):
        for name, a, b in zip(("dq", "dk", "dv"), runs[n], runs[1]):
            assert max_rel_err(a, b) < 2e-3, f"{n} splits: {name}"
    assert torch.equal(runs[2][0], runs[1][0])  # dQ is never split


def test_tc_bwd_training_shape_plan():
    """The 8B training shape (B 1, T 8192, H 4, Hkv 1, hd 128, Nv 2048) on 132 SMs, bf16: the
    tensor-core dK/dV has 32 key tiles of 64, split over the rows into 9 splits of 57 64-row
    steps: 288 blocks >= 2 per SM (unsplit: 32); dQ 512 blocks of 64 rows. Plan only."""
    d = bwd_plan(1, 8192, 4, 1, 2048, 128, torch.bfloat16)
    assert d["tensor_cores"] == 1
    assert (d["row_splits"], d["split_rows"], d["dkdv_blocks"]) == (9, 57 * 64, 288)
    assert d["dkdv_blocks"] >= 2 * SMS
    assert d["dq_blocks"] == 8192 * 4 // 64
    assert d["sum_blocks"] == 2048 * 128 // 4 // 128
    assert bwd_plan(1, 8192, 4, 1, 2048, 128, torch.bfloat16, force=1)["dkdv_blocks"] == 32
    # fp32 keeps the CUDA-core kernels and their tiles (32 keys, 8-row steps)
    f = bwd_plan(1, 8192, 4, 1, 2048, 128, torch.float32)
    assert f["tensor_cores"] == 0 and (f["row_splits"], f["dkdv_blocks"]) == (5, 320)


def _runs_tc(fn):
    before = tc_bwd_runs()
    fn()
    return tc_bwd_runs() != before


@pytest.mark.parametrize("case", ["fp32", "hd24", "hd40", "hd144", "hd256", "hd-stride", "misaligned",
                                  "env-off", "strided-ok"])
def test_tc_bwd_dispatch_scope(lib, monkeypatch, case):
    """Which calls take the tensor cores (bf16 / fp16, hd % 16 == 0 up to 128, 16-byte rows,
    PVM_CUDA_TENSOR_CORES not 0) and which stay on the CUDA cores; right either way."""
    use_split_mode(monkeypatch, "plan")
    dtype, hd, tc = torch.bfloat16, 32, False
    B, T, H, Hkv, Nv = 2, 5, 4, 2, 40
    transform = lambda t: t  # noqa: E731
    if case == "fp32":
        dtype = torch.float32
    elif case.startswith("hd") and case[2:].isdigit():
        hd = int(case[2:])
    elif case == "hd-stride":  # hd not the unit stride
        transform = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    elif case == "misaligned":  # strides multiples of 8, rows 2 bytes past a 16-byte boundary
        transform = lambda t: torch.cat([t[..., :1], t, t[..., :7]], -1)[..., 1:1 + t.shape[-1]]  # noqa: E731
    elif case == "env-off":
        monkeypatch.setenv("PVM_CUDA_TENSOR_CORES", "0")
    else:  # a slice of wider rows at a 16-byte offset, strides multiples of 8: still TC
        transform = lambda t: torch.cat([t[..., :8], t, t[..., :8]], -1)[..., 8:8 + t.shape[-1]]  # noqa: E731
        tc = True
    q, k, v, go = (transform(t) for t in bwd_inputs(dtype, B, T, H, Hkv, hd, Nv, seed=4))
    mask, kv_len = bwd_mask_and_len("holes", "mid", B, Nv, seed=4)
    res = {}
    ran = _runs_tc(lambda: res.update(zip(("got", "want", "valid"), bwd_case(q, k, v, go, mask, kv_len))))
    assert ran == tc, f"{case}: tensor cores {'ran' if ran else 'did not run'}"
    assert_bwd_close(res["got"], res["want"], res["valid"], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tc_bwd_close_to_the_cuda_core_kernels(lib, monkeypatch, dtype):
    """Both paths on the same call (PVM_CUDA_TENSOR_CORES=0 for the CUDA cores): they differ
    only by the rounding of P and dS to the input dtype and the summation order."""
    q, k, v, go = bwd_inputs(dtype, 2, 30, 4, 1, 128, 140, seed=6)
    mask, kv_len = bwd_mask_and_len("pad", "mid", 2, 140, seed=6)
    tc, want, valid = bwd_case(q, k, v, go, mask, kv_len)
    monkeypatch.setenv("PVM_CUDA_TENSOR_CORES", "0")
    assert not _runs_tc(lambda: bwd_case(q, k, v, go, mask, kv_len))
    cc, _, _ = bwd_case(q, k, v, go, mask, kv_len)
    for name, a, b, e in zip(("dq", "dk", "dv"), tc, cc, want):
        assert max_rel_err(a, b) < TOLERANCE[dtype], name
        # neither is far worse than the other against float64
        assert max_rel_err(a, e) < 3 * max(max_rel_err(b, e), 1e-3), name


# ---- SASS and resources of the tensor-core backward (sm_80, sm_90) ------------------------------

TC_BWD_KERNEL = r"retrieval_tc_bwd_(dq|dkdv)_kernelI(13__nv_bfloat16|6__half)Li(\d+)E"


def tc_bwd_sass(arch: str) -> dict:
    """{(kernel, dtype, HD): {instruction: count}} over retrieval_tc_bwd_{dq,dkdv}_kernel<T, HD>."""
    return sass_counts(arch, TC_BWD_KERNEL, lambda m: (m.group(1), MANGLED_DTYPE[m.group(2)], int(m.group(3))),
                       TC_OPS + ("LDL", "STL"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tc_bwd_sass_uses_the_tensor_cores(arch):
    """Every instance (dQ and dK/dV x bf16 / fp16 x HD 32, 64, 96, 128) lowers to
    HMMA.16816.F32.BF16 / HMMA.16816.F32 (per 16 rows or keys, the row / key loop not
    unrolled: dK/dV 2 x HD / 16 x 2 for S^T, dP^T and 2 x HD / 8 for dV, dK; dQ HD / 16 x 4 +
    HD / 8), LDSM.16.M88.4 (K, V, q, dO rows) and LDSM.16.MT88.4 (the B operands of dV, dK,
    dQ), LDGSTS.E.BYPASS.128 (cp.async) with LDGDEPBAR / DEPBAR, and no local memory."""
    counts = tc_bwd_sass(arch)
    assert sorted(counts) == sorted((k, d, hd) for k in ("dq", "dkdv") for d in ("bf16", "f16")
                                    for hd in (32, 64, 96, 128)), sorted(counts)
    for (kernel, kind, hd), ops in counts.items():
        hmma = "HMMA.16816.F32.BF16" if kind == "bf16" else "HMMA.16816.F32"
        want = 8 * hd // 16 if kernel == "dkdv" else 6 * hd // 16
        assert ops.get(hmma, 0) >= want, (kernel, kind, hd, ops)
        assert not any(o.startswith("HMMA") and o != hmma for o in ops), (kernel, kind, hd, ops)
        for op in ("LDSM.16.M88.4", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128", "LDGDEPBAR"):
            assert ops.get(op, 0) >= 1, (kernel, kind, hd, op, ops)
        assert sum(n for o, n in ops.items() if o.startswith("DEPBAR")) >= 2, (kernel, kind, hd, ops)
        assert not any(o.startswith(("LDL", "STL")) for o in ops), (kernel, kind, hd, ops)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_tc_bwd_resources(arch):
    """No stack frame or local memory in any instance (dK/dV at HD 128: 229 / 231 registers
    on sm_80 / sm_90 under __launch_bounds__(128, 2); without the 2, ptxas capped HD 64 at 128
    registers and spilled 16 B on sm_90); dQ's only static shared memory is its 512 B of
    key-validity flags, dK/dV has none (the tiles are dynamic)."""
    out = cuobjdump("-res-usage", "-arch", arch)
    usage = re.findall(r"Function (\S*retrieval_tc_bwd_(dq|dkdv)_kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+) "
                       r"SHARED:(\d+) LOCAL:(\d+)", out)
    assert len(usage) == 16, out[-2000:]
    reserve = 1024 if arch == "sm_90" else 0  # the system's shared-memory reserve on sm_90
    for name, kernel, regs, stack, shared, local in usage:
        assert int(stack) == 0 and int(local) == 0, (name, regs, stack, local)
        assert int(regs) <= 255 and int(shared) == (512 if kernel == "dq" else 0) + reserve, (name, regs, shared)
