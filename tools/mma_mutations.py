#!/usr/bin/env python3
"""Do the tensor-core checks bite? Break the emulator's fragment layouts, its cp.async and
ldmatrix checks, the wrappers (csrc/cuda/mma.cuh) and the self-test kernel
(csrc/cuda/mma_selftest.cu) one way at a time, and see which tests of
tests/test_mma_layouts.py fail.

Each mutant is a copy of csrc/ with one or two textual replacements, built into its own
emulator kernel library and run through the tests via $PVM_CUDA_EMU_LIB (the SASS tests,
which read the CUDA extension, and the tests that build their own mutants are left out).
Prints a table: the break, and the tests that failed (none: the break survived).

    python tools/mma_mutations.py                 # every mutant (~4 min)
    python tools/mma_mutations.py --only A_rows   # the mutants whose name contains this
    python tools/mma_mutations.py --markdown out.md

Exit status 1 if a mutant survives that is not marked as expected to.
"""
from __future__ import annotations

import sys
import time

import mutants

TEST_FILE = "tests/test_mma_layouts.py"
TEST_FILTER = "not sass and not spill and not mutant"

# name: (description, [(file under csrc, old, new)], survives: expected to pass every test)
MUTANTS = {
    "A_rows_0_1_swapped": ("emulator: rows 0 and 1 of A's fragment layout swapped", [
        ("emu/cuemu_mma.cpp", "      *row = g + 8 * ((i >> 1) & 1);",
         "      *row = (g < 2 ? 1 - g : g) + 8 * ((i >> 1) & 1);")], False),
    "B_k_pair_swapped": ("emulator: the two k of each B register swapped", [
        ("emu/cuemu_mma.cpp", "      *row = 2 * t + (i & 1) + 8 * (i >> 1);",
         "      *row = 2 * t + 1 - (i & 1) + 8 * (i >> 1);")], False),
    "C_row_halves_swapped": ("emulator: rows g and g + 8 of C/D swapped", [
        ("emu/cuemu_mma.cpp", "      *row = g + 8 * (i >> 1);", "      *row = g + 8 * (1 - (i >> 1));")], False),
    "AB_k_halves_swapped_together": (
        "emulator: k 0-7 and 8-15 swapped in A and in B alike (leaves every product unchanged)", [
            ("emu/cuemu_mma.cpp", "      *col = 2 * t + (i & 1) + 8 * (i >> 2);",
             "      *col = 2 * t + (i & 1) + 8 * (1 - (i >> 2));"),
            ("emu/cuemu_mma.cpp", "      *row = 2 * t + (i & 1) + 8 * (i >> 1);",
             "      *row = 2 * t + (i & 1) + 8 * (1 - (i >> 1));")], False),
    "mma_ignores_C": ("emulator: mma computes A B, dropping C", [
        ("emu/cuemu_mma.cpp", "      float acc = C[r][c];", "      float acc = 0.f * static_cast<float>(sizeof C);")], False),
    "ldmatrix_halves_swapped": ("emulator: ldmatrix puts a register's two elements the other way round", [
        ("emu/cuemu_mma.cpp", "    *col = 2 * (lane & 3) + e;", "    *col = 2 * (lane & 3) + 1 - e;")], False),
    "ldmatrix_trans_ignored": ("emulator: ldmatrix .trans loads like the plain form", [
        ("emu/cuemu_mma.cpp", "  if (trans) {", "  if (false && trans) {")], False),
    "wait_retires_everything": ("emulator: cp_async_wait<N> retires every group, whatever N", [
        ("emu/cuemu.cpp",
         "  const uint32_t upto = f->async_groups > static_cast<uint32_t>(n) ? f->async_groups - n : 0;",
         "  const uint32_t upto = f->async_groups;")], False),
    "zero_fill_missing": ("emulator: cp.async with !pred leaves its destination poisoned, not zero", [
        ("emu/cuemu.cpp", "    std::memset(c.data, 0, 16);", "    fill_pattern(c.data, 16);")], False),
    "no_poison_at_issue": ("emulator: a cp.async destination keeps its old bytes until the wait", [
        ("emu/cuemu.cpp", "  fill_pattern(c.dst, 16);          // what a read before the wait sees\n", "")], False),
    "ldmatrix_row_checks_off": ("emulator: ldmatrix checks no row address (shared, aligned, cp.async state)", [
        ("emu/cuemu.cpp", "void check_warp_smem_row(const void* p, int lane) {\n",
         "void check_warp_smem_row(const void* p, int lane) {\n  if (p) return;\n")], False),
    "landed_is_visible": ("emulator: a retired cp.async is visible to every thread at once (no barrier needed)", [
        ("emu/cuemu.cpp", "    g_chunks[c.chunk] = kChunkLanded | static_cast<uint32_t>(f->t.linear + 1);",
         "    g_chunks[c.chunk] = 0;")], False),
    "collective_sites_unchecked": ("emulator: lanes of a warp-collective instruction may be at different calls", [
        ("emu/cuemu.cpp", "      if (o.coll_op != op || o.line != line || std::strcmp(o.file, file) != 0)",
         "      if (o.coll_op != op)")], False),
    "exit_in_flight_unreported": ("emulator: a thread may exit with cp.async copies in flight", [
        ("emu/cuemu.cpp", "  } else if (!f->async.empty()) {", "  } else if (false) {")], False),
    "wrapper_types_swapped": ("mma.cuh: the emulated mma takes bf16 for fp16 and the reverse", [
        ("cuda/mma.cuh", "std::is_same<T, __half>::value ? ::cuemu::kMmaF16 : ::cuemu::kMmaBf16",
         "std::is_same<T, __half>::value ? ::cuemu::kMmaBf16 : ::cuemu::kMmaF16")], False),
    "pack2_halves_swapped": ("mma.cuh: pack2<bf16> puts lo in the high half", [
        ("cuda/mma.cuh", "    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |\n"
         "           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);",
         "    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) |\n"
         "           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) << 16);")], False),
    "kernel_wait_deleted": ("kernel: B's cp_async_wait<1> deleted", [
        ("cuda/mma_selftest.cu", "  cp_async_wait<1>();  // B's\n", "")], False),
    "kernel_syncwarp_deleted": ("kernel: the __syncwarp after B's wait deleted", [
        ("cuda/mma_selftest.cu", "  cp_async_wait<1>();  // B's\n  __syncwarp();\n",
         "  cp_async_wait<1>();  // B's\n")], False),
    "kernel_A_address_wrong": ("kernel: A's ldmatrix.x4 addresses name the matrices in B^T's order", [
        ("cuda/mma_selftest.cu", "    ldmatrix_x4(a, &tile[lane % 16][8 * (lane / 16)]);",
         "    ldmatrix_x4(a, &tile[lane % 8 + 8 * (lane / 16)][8 * ((lane / 8) % 2)]);")], False),
    "kernel_Bt_with_trans": ("kernel: B^T's x4 fragments loaded with .trans", [
        ("cuda/mma_selftest.cu", "    ldmatrix_x4(r, &tile[lane % 8 + 8 * (lane / 16)][8 * ((lane / 8) % 2)]);",
         "    ldmatrix_x4_trans(r, &tile[lane % 8 + 8 * (lane / 16)][8 * ((lane / 8) % 2)]);")], False),
    "kernel_zero_fill_off": ("kernel: A's rows past a_rows copied (pred true) instead of zero-filled", [
        ("cuda/mma_selftest.cu", "a_in ? a + row * 16 + col : a, a_in);", "a_in ? a + row * 16 + col : a, true);")],
        False),
}


def main() -> int:
    args = mutants.parse_args(__doc__)
    rows, bad = [], 0
    for name, (what, edits, survives) in MUTANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        lib = mutants.build(name, edits, "mma_mutants")
        failed, summary, rc = mutants.run_tests(lib, TEST_FILE, TEST_FILTER, timeout=1800)
        tests = mutants.failing_tests(failed)
        caught = rc != 0
        if caught == survives:
            bad += 1
        rows.append((what, len(failed), tests))
        mutants.report(name, caught, time.perf_counter() - start, summary, tests)
    if args.markdown:
        mutants.write_markdown(args.markdown, rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
