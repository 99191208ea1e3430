"""The tensor-core wrappers (csrc/cuda/mma.cuh) and their emulation (csrc/emu/cuemu_mma.cpp).

Three statements of the PTX ISA's fragment layouts are compared, so that a kernel and the
emulator cannot share one mistake:

* the emulator's, read back from the layout functions its mma and ldmatrix use
  (``pvm_emu_mma_layout``) or by putting coded values through the wrappers (ldmatrix);
* the PTX ISA tables, transcribed below (``ptx_mma`` / ``ptx_ldmatrix``);
* CuTe's MMA_Traits / Copy_Traits (tests/cute_layouts.cpp, built against the headers of
  the nvidia-cutlass wheel; skipped, with the reason, where those headers are absent).

Then numbers: fragments built from the PTX tables through the emulated mma against a
float64 matmul, and csrc/cuda/mma_selftest.cu (cp.async, every ldmatrix form, mma, pack2)
reproducing a 16 x 16 @ 16 x 16 product. Each emulator check of misuse (a lane missing,
a missing cp_async_wait or barrier, a bad address) is shown to bite, two of them on mutants
of the self-test kernel. Last, the kernel's SASS in the CUDA extension must show the
tensor-core instructions (HMMA.16816, LDSM, LDGSTS) on sm_80 and sm_90.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

from emu_support import MANGLED_DTYPE, REPO, cuobjdump, emulator, sass_counts

# Verifications of GPU code on a CPU: `make gpu-check` leaves them out.
pytestmark = pytest.mark.cpu_verification

LAUNCH_FAILURE, ILLEGAL_ADDRESS = 719, 700
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


# ---- the PTX ISA's layouts, transcribed ---------------------------------------------------------
# "Matrix Fragments for mma.m16n8k16 with floating point type": groupID = lane >> 2,
# threadID_in_group = lane % 4; element i of A (a0..a7), B (b0..b3), C/D (c0..c3).

def ptx_mma(operand: str) -> torch.Tensor:
    """[32, n, 2]: (row, col) of each lane's elements; B's row is k, its col n."""
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        if operand == "A":
            out.append([(g + 8 * ((i // 2) % 2), 2 * t + i % 2 + 8 * (i // 4)) for i in range(8)])
        elif operand == "B":
            out.append([(2 * t + i % 2 + 8 * (i // 2), g) for i in range(4)])
        else:
            out.append([(g + 8 * (i // 2), 2 * t + i % 2) for i in range(4)])
    return torch.tensor(out)


def ptx_ldmatrix(num: int, trans: bool) -> torch.Tensor:
    """[32, 2 num, 3]: (matrix, row, col) of the e-th 16-bit value lane t receives
    (register e // 2, low half first). Lane l supplies row l % 8 of matrix l // 8."""
    out = []
    for t in range(32):
        row = []
        for e in range(2 * num):
            j, h = e // 2, e % 2
            row.append((j, 2 * (t % 4) + h, t // 4) if trans else (j, t // 4, 2 * (t % 4) + h))
        out.append(row)
    return torch.tensor(out)


# ---- CuTe ------------------------------------------------------------------------------------------

def _cute_include():
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return inc if os.path.exists(os.path.join(inc, "cute", "atom", "mma_traits_sm80.hpp")) else None


def _cuda_includes():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    inc = os.path.join(home, "include")
    if not os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
        return None
    cccl = os.path.join(inc, "cccl")  # CUDA 13 keeps cuda/std (libcu++) here
    return [cccl, inc] if os.path.isdir(cccl) else [inc]


@pytest.fixture(scope="module")
def cute():
    """CuTe's layouts as printed by tests/cute_layouts.cpp (built once, cached by hash)."""
    inc = _cute_include()
    if inc is None:
        pytest.skip("CuTe headers absent: pip install nvidia-cutlass (the test extra) to compare the "
                    "emulator's fragment layouts with CuTe's")
    cuda = _cuda_includes()
    if cuda is None:
        pytest.skip("CuTe's headers need the CUDA toolkit's include folder (set CUDA_HOME)")
    src = os.path.join(REPO, "tests", "cute_layouts.cpp")
    cxx = os.environ.get("CXX", "g++")
    cmd = [cxx, "-std=c++17", "-O0", "-w", "-I", inc] + [f"-I{d}" for d in cuda]
    headers = [os.path.join(inc, "cute", "atom", f) for f in ("mma_traits_sm80.hpp", "copy_traits_sm75.hpp")]
    key = hashlib.sha256("".join(open(f).read() for f in [src] + headers).encode()
                         + " ".join(cmd).encode()).hexdigest()[:16]
    exe = os.path.join(REPO, "build", "cute_layouts", key, "cute_layouts")
    if not os.path.exists(exe):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        tmp = exe + f".{os.getpid()}"
        res = subprocess.run(cmd + [src, "-o", tmp], capture_output=True, text=True)
        assert res.returncode == 0, f"building {src} failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
        os.replace(tmp, exe)
    res = subprocess.run([exe], capture_output=True, text=True)
    assert res.returncode == 0, f"cute_layouts: {res.stderr}"
    out = json.loads(res.stdout)
    assert out["errors"] == 0
    return out


MMA_ATOMS = {"bf16": "SM80_16x8x16_F32BF16BF16F32_TN", "f16": "SM80_16x8x16_F32F16F16F32_TN"}
LDSM_ATOMS = [("SM75_U32x1_LDSM_N", 1, False), ("SM75_U32x2_LDSM_N", 2, False),
              ("SM75_U32x4_LDSM_N", 4, False), ("SM75_U16x2_LDSM_T", 1, True),
              ("SM75_U16x4_LDSM_T", 2, True), ("SM75_U16x8_LDSM_T", 4, True)]


# ---- mma layouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("operand", ["A", "B", "C"])
def test_emulator_mma_layout_is_the_ptx_isa_table(lib, operand):
    assert torch.equal(lib.mma_layout(operand), ptx_mma(operand))


@pytest.mark.parametrize("kind", sorted(MMA_ATOMS))
def test_cute_mma_layouts_match_the_emulator_and_the_ptx_table(lib, cute, kind):
    """CuTe's (thread, value) -> (m, k) / (n, k) / (m, n) maps of the m16n8k16 atom against
    the emulator's (lane, element) -> (row, col); CuTe's value order is the PTX element
    order (a0..a7, b0..b3, c0..c3)."""
    atom = cute["mma"][MMA_ATOMS[kind]]
    assert atom["shape"] == [16, 8, 16]
    cute_maps = {
        "A": torch.tensor(atom["A"]),                 # (m, k)
        "B": torch.tensor(atom["B"]).flip(-1),        # (n, k) -> (k, n)
        "C": torch.tensor(atom["C"]),                 # (m, n)
    }
    for operand, want in cute_maps.items():
        got = lib.mma_layout(operand)
        bad = (got != want).any(-1).nonzero().tolist()
        assert not bad, (f"{operand}: emulator and CuTe differ at (lane, element) {bad[:6]}: emulator "
                         f"{[got[l, i].tolist() for l, i in bad[:6]]}, CuTe {[want[l, i].tolist() for l, i in bad[:6]]}")
        assert torch.equal(want, ptx_mma(operand)), operand


# ---- ldmatrix layouts ------------------------------------------------------------------------------

def ldmatrix_probe(lib, num: int, trans: bool) -> torch.Tensor:
    """Through the emulated wrapper: a 32 x 8 tile whose element (R, c) holds the code
    8 R + c, lane l supplying row R = l. Returns [32, 2 num, 2]: (supplying lane, col) of
    each 16-bit value each lane receives."""
    codes = torch.arange(256, dtype=torch.int16).view(32, 8)
    err, msg, out = lib.selftest("ldmatrix", 2 * num + int(trans), n_out=128, inp=codes.view(torch.float32))
    assert err == 0, msg
    regs = out.view(torch.int32).view(32, 4)[:, :num]
    vals = torch.stack([regs & 0xFFFF, (regs >> 16) & 0xFFFF], -1).reshape(32, 2 * num)
    return torch.stack([vals // 8, vals % 8], -1)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True], ids=["n", "trans"])
def test_emulator_ldmatrix_is_the_ptx_isa_layout(lib, num, trans):
    want = ptx_ldmatrix(num, trans)  # (matrix, row, col); the row's supplier is lane 8 matrix + row
    got = ldmatrix_probe(lib, num, trans)
    assert torch.equal(got[..., 0], want[..., 0] * 8 + want[..., 1])
    assert torch.equal(got[..., 1], want[..., 2])


@pytest.mark.parametrize("atom,num,trans", LDSM_ATOMS, ids=[a[0] for a in LDSM_ATOMS])
def test_cute_ldmatrix_layouts_match_the_emulator(lib, cute, atom, num, trans):
    """CuTe's SrcLayout (which row each thread's address names) composed with its DstLayout
    (which element each thread receives) against the emulated wrapper's result."""
    c = cute["ldmatrix"][atom]
    src, dst = c["src"], torch.tensor(c["dst"])
    assert dst.shape == (32, 2 * num)
    # lanes 0 .. 8 num - 1 name rows 0 .. 8 num - 1; CuTe repeats them on the other lanes,
    # whose addresses ldmatrix does not use (sm_80 and newer)
    assert src == [lane % (8 * num) for lane in range(32)]
    supplier = torch.tensor([src.index(r) for r in range(8 * num)])
    want = torch.stack([supplier[dst // 8], dst % 8], -1)
    got = ldmatrix_probe(lib, num, trans)
    bad = (got != want).any(-1).nonzero().tolist()
    assert not bad, f"emulator and CuTe differ at (lane, value) {bad[:6]}"
    ptx = ptx_ldmatrix(num, trans)
    assert torch.equal(dst, ptx[..., 0] * 64 + ptx[..., 1] * 8 + ptx[..., 2])


# ---- numbers ---------------------------------------------------------------------------------------

def fragments(a, b, c):
    """Per-lane registers of A (16 x 16), B (16 x 8) and fp32 C (16 x 8) by the PTX tables:
    the selftest input [a: 32 x 4 | b: 32 x 2 | c: 32 x 4] as 32-bit words."""
    def regs(x, table):
        bits = x.view(torch.int16).to(torch.int32) & 0xFFFF
        v = bits[table[..., 0], table[..., 1]]             # [32, n]
        return v[:, 0::2] | (v[:, 1::2] << 16)
    ca = ptx_mma("C")
    cw = c.float()[ca[..., 0], ca[..., 1]].view(torch.int32)
    return torch.cat([regs(a, ptx_mma("A")).flatten(), regs(b, ptx_mma("B")).flatten(), cw.flatten()])


def run_mma(lib, kind, a, b, c):
    err, msg, out = lib.selftest(f"mma_{kind}", 0, n_out=128, inp=fragments(a, b, c).view(torch.float32))
    assert err == 0, msg
    d = torch.empty(16, 8)
    cd = ptx_mma("C")
    d[cd[..., 0], cd[..., 1]] = out.view(32, 4)
    return d


def fp32_accumulation_bound(a, b, c):
    """|fp32 sum - exact| for C + 16 exact products summed in fp32 in any order."""
    terms = (a.double().abs() @ b.double().abs()) + c.double().abs()
    return 17 * 2.0 ** -24 * terms + 1e-38


@pytest.mark.parametrize("kind", sorted(DTYPES))
def test_mma_matches_a_float64_matmul(lib, kind):
    """Random A (16 x 16), B (16 x 8), C through the emulated mma.sync: D equals A B + C in
    float64 up to fp32 accumulation (products of bf16 / fp16 are exact in fp32)."""
    dt = DTYPES[kind]
    for scale in (1.0, 1e-3, 30.0):
        a = (torch.randn(16, 16) * scale).to(dt)
        b = torch.randn(16, 8).to(dt)
        c = torch.randn(16, 8) * scale
        d = run_mma(lib, kind, a, b, c)
        want = a.double() @ b.double() + c.double()
        err = (d.double() - want).abs()
        assert (err <= fp32_accumulation_bound(a, b, c)).all(), err.max()
    # one product in each output: D[m][n] = A[m][k(m, n)] * B[k][n] exactly (catches an
    # element read from the wrong place even where sums would hide it)
    a = torch.zeros(16, 16)
    for m in range(16):
        a[m, (3 * m + 1) % 16] = m + 1
    b = (torch.arange(16 * 8, dtype=torch.float32).view(16, 8) % 7 + 1).to(dt)
    d = run_mma(lib, kind, a.to(dt), b, torch.zeros(16, 8))
    assert torch.equal(d, a @ b.float())


@pytest.mark.parametrize("ldm", [4, 2, 1], ids=["x4", "x2", "x1"])
@pytest.mark.parametrize("kind", sorted(DTYPES))
def test_selftest_kernel_reproduces_the_tile_product(lib, kind, ldm):
    """csrc/cuda/mma_selftest.cu: cp.async -> ldmatrix(.trans) -> mma reproduces A B + C
    (16 x 16 @ 16 x 16) with B read both ways; A comes back exactly from its fragment, and
    pack2 rounds D as torch does (to nearest even)."""
    dt = DTYPES[kind]
    for a_rows, with_c in ((16, True), (11, False)):
        for seed in (0, 1, 2):
            lib.configure(seed=seed)
            a, b = torch.randn(16, 16).to(dt), torch.randn(16, 16).to(dt)
            c = torch.randn(16, 16) if with_c else None
            err, msg, out = lib.mma_selftest(a, b, c, ldm=ldm, a_rows=a_rows)
            assert err == 0, msg
            a_in = a.float().clone()
            a_in[a_rows:] = 0  # rows past a_rows were zero-filled by cp.async (pred false)
            assert torch.equal(out["a_f32"], a_in)
            want = a_in.double() @ b.double() + (0 if c is None else c.double())
            bound = fp32_accumulation_bound(a_in, b, torch.zeros(16, 16) if c is None else c)
            for name in ("d", "d_t"):
                assert ((out[name].double() - want).abs() <= bound).all(), (name, seed)
            assert torch.equal(out["d16"].view(torch.int16), out["d"].to(dt).view(torch.int16))


# ---- misuse the emulator reports -------------------------------------------------------------------

@pytest.mark.parametrize("mode,match", [
    (1, r"thread \(3,0,0\) \[warp 0 lane 3\] exited while lanes of its warp wait in mma.sync.m16n8k16.bf16 "
        r"\(selftest_kernels.cu:\d+\)|mma.sync.m16n8k16.bf16 at selftest_kernels.cu:\d+ by thread .* after lane 3 "
        r"of its warp exited"),
    (2, r"divergent warp-collective instruction in warp 0: lane \d+ is in mma.sync.m16n8k16.bf16 at "
        r"selftest_kernels.cu:(\d+), lane \d+ in mma.sync.m16n8k16.bf16 at selftest_kernels.cu:(?!\1)\d+"),
    (3, r"warp 0: lanes wait (in a warp-collective instruction while .* enters __syncwarp|at __syncwarp while "
        r".* enters mma.sync)"),
], ids=["lane_exits", "divergent", "syncwarp_instead"])
def test_mma_needs_the_whole_warp_at_one_site(lib, mode, match):
    for seed in (0, 1, 4):
        lib.configure(seed=seed)
        err, msg, _ = lib.selftest("mma_bf16", mode, n_out=128, inp=torch.zeros(320))
        assert err == LAUNCH_FAILURE and re.search(match, msg), msg


def test_ldmatrix_reads_coded_rows_when_used_correctly(lib):
    codes = torch.arange(256, dtype=torch.int16).view(torch.float32)
    for misuse in (0, 5):  # plain stores + __syncwarp; cp.async + wait + __syncwarp
        for seed in (0, 1, 3):
            lib.configure(seed=seed)
            err, msg, _ = lib.selftest("ldmatrix", 16 * misuse + 9, n_out=128, inp=codes)
            assert err == 0, msg


@pytest.mark.parametrize("misuse,match", [
    (1, r"lane 5 supplies the row address 0x[0-9a-f]+, which is not 16-byte aligned \(ldmatrix.x4.trans at "
        r"selftest_kernels.cu:\d+, warp 0\)"),
    (2, r"lane 5 supplies the row address 0x[0-9a-f]+, which is not in the block's shared memory"),
    (3, r"the row at 0x[0-9a-f]+ \(lane 0's address\) is the destination of a cp.async of thread \(0,0,0\) "
        r"\[warp 0 lane 0\] issued at selftest_kernels.cu:\d+ and still in flight: a cp_async_wait that "
        r"retires its group is missing"),
    (4, r"written by a cp.async of thread \(0,0,0\) .*, retired by its cp_async_wait but not yet made "
        r"visible to this warp: a __syncwarp or __syncthreads is missing after the wait"),
    (6, r"thread \(9,0,0\) \[warp 0 lane 9\] exited while lanes of its warp wait in ldmatrix.x4.trans"),
], ids=["misaligned", "global_address", "no_wait", "no_barrier_after_wait", "lane_exits"])
def test_ldmatrix_misuse_is_reported(lib, misuse, match):
    codes = torch.arange(256, dtype=torch.int16).view(torch.float32)
    err, msg, _ = lib.selftest("ldmatrix", 16 * misuse + 9, n_out=128, inp=codes)
    assert err == LAUNCH_FAILURE and re.search(match, msg), msg


def test_ldmatrix_uses_only_the_addresses_of_the_lanes_it_names(lib):
    """.x1 reads the rows lanes 0-7 name, .x2 those of lanes 0-15, .x4 all 32: a misaligned
    address on lane 20 fails only the .x4 (sm_80 and newer ignore the other lanes')."""
    codes = torch.arange(256, dtype=torch.int16).view(torch.float32)
    for num in (1, 2, 4):
        for trans in (0, 1):
            err, msg, _ = lib.selftest("ldmatrix", 16 * 7 + 2 * num + trans, n_out=128, inp=codes)
            if num == 4:
                assert err == LAUNCH_FAILURE and "lane 20 supplies the row address" in msg, msg
            else:
                assert err == 0, msg


def _cp_async(lib, mode, n_in=384, seed=0):
    lib.configure(seed=seed)
    inp = torch.arange(n_in, dtype=torch.float32) + 1
    return lib.selftest("cp_async", mode, n_out=3 * 3 * 32 * 4, inp=inp) + (inp,)


def test_cp_async_groups_retire_in_order_and_zero_fill(lib):
    """cp_async_wait<N> retires every committed group but the newest N: after <2> only the
    first group's chunks have landed, the others still read as NaN (in flight); pred false
    writes zeros and reads nothing (its source is far out of bounds)."""
    for seed in (0, 1, 2):
        err, msg, out, inp = _cp_async(lib, 0, seed=seed)
        assert err == 0, msg
        snaps = out.view(3, 3, 32, 4)
        src = inp.view(3, 32, 4)
        for snap in range(3):
            for k in range(3):
                if k <= snap:
                    assert torch.equal(snaps[snap, k], src[k]), (snap, k)
                else:
                    assert snaps[snap, k].isnan().all(), (snap, k)
        err, msg, out, inp = _cp_async(lib, 1, seed=seed)
        assert err == 0, msg
        last = out.view(3, 3, 32, 4)[2]
        assert torch.equal(last[:, 0::2], inp.view(3, 32, 4)[:, 0::2])
        assert (last[:, 1::2] == 0).all()
    err, msg, out, inp = _cp_async(lib, 11)  # an empty group after each copy
    assert err == 0, msg
    assert torch.equal(out.view(3, 3, 32, 4)[0], inp.view(3, 32, 4))


@pytest.mark.parametrize("mode,code,match", [
    (2, LAUNCH_FAILURE, r"thread \(0,0,0\) \[warp 0 lane 0\] exited with 3 cp.async copies in flight, the first "
                        r"issued at selftest_kernels.cu:\d+ and committed \(group 1 of the thread\) but never waited for"),
    (3, LAUNCH_FAILURE, r"exited with 3 cp.async copies in flight, .* never committed \(cp_async_commit\), so no "
                        r"cp_async_wait retires it"),
    (4, LAUNCH_FAILURE, r"shared memory at 0x[0-9a-f]+ was written while a cp.async to it \(issued at "
                        r"selftest_kernels.cu:\d+ by thread \(0,0,0\) .*\) was in flight"),
    (5, LAUNCH_FAILURE, r"cp.async at selftest_kernels.cu:\d+ by thread \(2,0,0\) .*: the destination 0x[0-9a-f]+ "
                        r"is not 16-byte aligned"),
    (6, LAUNCH_FAILURE, r"the source 0x[0-9a-f]+ is not 16-byte aligned"),
    (7, LAUNCH_FAILURE, r"the destination 0x[0-9a-f]+ is not in the block's shared memory"),
    (8, LAUNCH_FAILURE, r"the source 0x[0-9a-f]+ is in shared memory \(cp.async copies global to shared\)"),
    (9, LAUNCH_FAILURE, r"cp.async at selftest_kernels.cu:\d+ by thread \(2,0,0\) .* into shared memory at "
                        r"0x[0-9a-f]+, where a cp.async of thread \(2,0,0\) .* issued at selftest_kernels.cu:\d+ "
                        r"is still in flight"),
    (10, ILLEGAL_ADDRESS, r"out-of-bounds read of global buffer 'in': byte 0 past its end .* thread \(2,0,0\)"),
], ids=["never_waited", "never_committed", "written_in_flight", "dst_misaligned", "src_misaligned",
        "dst_global", "src_shared", "two_in_flight", "src_out_of_bounds"])
def test_cp_async_misuse_is_reported(lib, mode, code, match):
    err, msg, _, _ = _cp_async(lib, mode)
    assert err == code and re.search(match, msg), msg


def test_cp_async_refill_without_a_barrier_is_a_race_the_schedules_expose(lib):
    """Refilling a slot another warp has yet to read, with no __syncthreads between its read
    and the refill: the refill's NaN (its data lands only at the wait) reaches the reader in
    schedules that run the refilling warp first; with the barrier, never."""
    inp = torch.arange(128 * 4, dtype=torch.float32) + 1
    want = torch.cat([inp.view(128, 4)[:64][torch.arange(64) ^ 32, 0],
                      inp.view(128, 4)[64:][torch.arange(64) ^ 32, 0]])
    racy = 0
    for seed in range(6):
        lib.configure(seed=seed)
        err, msg, out = lib.selftest("cp_async_reuse", 0, n_out=128, inp=inp)
        assert err == 0 and torch.equal(out, want), (seed, msg)
        err, msg, out = lib.selftest("cp_async_reuse", 1, n_out=128, inp=inp)
        assert err == 0, msg
        racy += int(not torch.equal(out, want))
    assert racy >= 2


def test_ldmatrix_of_another_warps_cp_async_needs_a_syncthreads(lib):
    """Warp 1's cp.async data, retired and __syncwarp()ed, is visible to warp 1 only: warp 0's
    ldmatrix of it is reported when warp 1 ran first (seed 1: highest warp first)."""
    lib.configure(seed=1)
    err, msg, _ = lib.selftest("cp_async_reuse", 2, n_out=128,
                               inp=torch.arange(256, dtype=torch.int16).view(torch.float32))
    assert err == LAUNCH_FAILURE and re.search(
        r"written by a cp.async of thread \(32,0,0\) \[warp 1 lane 0\], retired by its cp_async_wait but not yet "
        r"made visible to this warp: a __syncthreads is missing", msg), msg


# ---- mutants of the self-test kernel ------------------------------------------------------------

def _mutant_lib(old: str, new: str) -> str:
    src = open(os.path.join(REPO, "csrc", "cuda", "mma_selftest.cu")).read()
    assert src.count(old) == 1, old
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(REPO, "csrc"), os.path.join(tmp, "csrc"))
        open(os.path.join(tmp, "csrc", "cuda", "mma_selftest.cu"), "w").write(src.replace(old, new))
        return emulator.build_kernel_lib(csrc=os.path.join(tmp, "csrc"))


@pytest.mark.parametrize("old,new,match", [
    ("  cp_async_wait<1>();  // B's\n", "\n",
     r"is the destination of a cp.async .* still in flight: a cp_async_wait that retires its group is missing "
     r"\(ldmatrix.x4.trans at mma_selftest.cu:\d+"),
    ("  cp_async_wait<1>();  // B's\n  __syncwarp();\n", "  cp_async_wait<1>();  // B's\n",
     r"retired by its cp_async_wait but not yet made visible to this warp: a __syncwarp or __syncthreads is "
     r"missing after the wait"),
], ids=["wait_deleted", "syncwarp_deleted"])
def test_selftest_kernel_mutant_is_reported(old, new, match):
    """The self-test kernel with B's cp_async_wait, or the __syncwarp after it, deleted: the
    emulator reports the ldmatrix that reads B's rows too early (on the GPU: stale data)."""
    kl = emulator.kernel_lib(_mutant_lib(old, new))
    kl.configure(0)
    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    err, msg, out = kl.mma_selftest(a, b, ldm=4)
    assert err == LAUNCH_FAILURE and re.search(match, msg), msg


# ---- SASS of the CUDA extension ----------------------------------------------------------------

def selftest_sass(arch: str) -> dict:
    """{dtype: {instruction: count}} over the SASS of mma_selftest_kernel<T>."""
    return sass_counts(arch, r"mma_selftest_kernelI(13__nv_bfloat16|6__half)E", lambda m: MANGLED_DTYPE[m.group(1)])


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_selftest_kernel_sass_uses_the_tensor_cores(arch):
    """The wrappers lower to the instructions they name: HMMA.16816.F32.BF16 (bf16) and
    HMMA.16816.F32 (fp16) for mma_m16n8k16, LDSM.16.M88{,.2,.4} / LDSM.16.MT88{,.2,.4} for
    ldmatrix_x{1,2,4}[_trans], LDGSTS.E.BYPASS.128 + LDGDEPBAR + DEPBAR for cp.async."""
    counts = selftest_sass(arch)
    assert sorted(counts) == ["bf16", "f16"], counts
    for kind, ops in counts.items():
        hmma = "HMMA.16816.F32.BF16" if kind == "bf16" else "HMMA.16816.F32"
        assert ops.get(hmma, 0) >= 4, (kind, ops)        # 2 products x 2 n8 tiles
        assert not any(o.startswith("HMMA") and o != hmma for o in ops), (kind, ops)
        for op in ("LDSM.16.M88", "LDSM.16.M88.2", "LDSM.16.M88.4", "LDSM.16.MT88", "LDSM.16.MT88.2",
                   "LDSM.16.MT88.4", "LDGDEPBAR"):
            assert ops.get(op, 0) >= 1, (kind, op, ops)
        assert ops.get("LDGSTS.E.BYPASS.128", 0) >= 3, (kind, ops)
        assert sum(n for o, n in ops.items() if o.startswith("DEPBAR")) >= 3, (kind, ops)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_selftest_kernel_does_not_spill(arch):
    out = cuobjdump("-res-usage", "-arch", arch)
    usage = re.findall(r"Function (\S*mma_selftest_kernel\S*):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                       out)
    assert len(usage) == 2, out[-2000:]
    for name, regs, stack, shared, local in usage:
        assert int(stack) == 0 and int(local) == 0, (name, regs, stack, local)
        # the three tiles (sm_90 reports 1 KB more: shared memory the system reserves per block)
        assert int(shared) in (3 * 16 * 16 * 2, 3 * 16 * 16 * 2 + 1024), (name, shared)
