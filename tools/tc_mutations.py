#!/usr/bin/env python3
"""Do the tests of the tensor-core retrieval kernels bite? Break a kernel one way at a time
(csrc/cuda/retrieval_tc_fwd.cu: a wrong ldmatrix address, a skipped cp_async_wait, a
dropped rescale, a wrong quad reduction, a missing barrier, ...; retrieval_tc_bwd.cu: a
missing .trans, a skipped wait, a dropped delta, a wrong split offset, ...) and see which
tests of tests/test_cuda_tensor_cores.py fail.

Each mutant is a copy of csrc/ with one textual replacement, built into its own emulator
kernel library and run through the test file via $PVM_CUDA_EMU_LIB (the SASS and resource
tests, which read the CUDA extension, are left out). Prints the break and the tests that
failed (none: the break survived).

    python tools/tc_mutations.py                  # every mutant (~15 min here)
    python tools/tc_mutations.py --only fwd_wait  # the mutants whose name contains this
    python tools/tc_mutations.py --markdown out.md

Exit status 1 if a mutant survives.
"""
from __future__ import annotations

import sys
import time

import mutants

TEST_FILE = "tests/test_cuda_tensor_cores.py"

FWD = "cuda/retrieval_tc_fwd.cu"
FWD_TESTS = "tc_fwd and not sass and not resources"
BWD = "cuda/retrieval_tc_bwd.cu"
COMMON = "cuda/retrieval_common.cuh"  # helpers shared with retrieval_kernels.cu
BWD_TESTS = "tc_bwd and not sass and not resources"

# name: (description, [(file under csrc, old, new)], -k filter of the tests to run)
MUTANTS = {
    "fwd_k_ldmatrix_address": ("forward: K's ldmatrix.x4 row / column halves swapped (lanes 8-15 and 16-23)", [
        (FWD, "(16 * np + (lane & 7) + 8 * (lane >> 4)) * kLd + 16 * kk + 8 * ((lane >> 3) & 1)",
         "(16 * np + (lane & 7) + 8 * ((lane >> 3) & 1)) * kLd + 16 * kk + 8 * (lane >> 4)")], FWD_TESTS),
    "fwd_q_ldmatrix_address": ("forward: Q's ldmatrix.x4 reads the k-step's columns 8-15 for lanes 0-15", [
        (FWD, "16 * kk + 8 * (lane >> 4));\n  __syncthreads();",
         "16 * kk + 8 * (1 - (lane >> 4)));\n  __syncthreads();")], FWD_TESTS),
    "fwd_v_not_transposed": ("forward: V's fragments loaded with ldmatrix.x4 (no .trans)", [
        (FWD, "        ldmatrix_x4_trans(vb, ", "        ldmatrix_x4(vb, ")], FWD_TESTS),
    "fwd_wait_skipped": ("forward: the key loop's cp_async_wait<1> deleted", [
        (FWD, "    cp_async_wait<1>();  // tile j has landed (this thread's copies)\n", "")], FWD_TESTS),
    "fwd_wait_too_lax": ("forward: the key loop waits with cp_async_wait<2> (tile j may be in flight)", [
        (FWD, "    cp_async_wait<1>();  // tile j has landed", "    cp_async_wait<2>();  // tile j has landed")],
        FWD_TESTS),
    "fwd_barrier_after_wait_deleted": ("forward: the __syncthreads publishing tile j deleted", [
        (FWD, "    __syncthreads();     // and every thread's copies and flags are visible to every warp\n", "")],
        FWD_TESTS),
    "fwd_barrier_after_q_deleted": ("forward: the __syncthreads before tile 1 overwrites Q's buffer deleted", [
        (FWD, "  __syncthreads();  // every warp has its Q fragments before tile 1's copies overwrite the buffer\n",
         "")], FWD_TESTS),
    "fwd_trailing_barrier_deleted": ("forward: the __syncthreads closing each key tile deleted", [
        (FWD, "    __syncthreads();  // every warp is done with this stage before iteration j + 1 refills it\n", "")],
        FWD_TESTS),
    "fwd_alpha_rescale_dropped": ("forward: O not rescaled by alpha when the running max grows", [
        (FWD, "for (int i = 0; i < 4; ++i) o[nt][i] *= alpha[i >> 1];", "for (int i = 0; i < 4; ++i) (void)i;")],
        FWD_TESTS),
    "fwd_l_rescale_dropped": ("forward: the row sum l not rescaled by alpha", [
        (FWD, "      l[h] *= alpha[h];\n", "")], FWD_TESTS),
    "fwd_max_quad_wrong": ("forward: the row max's second quad shuffle crosses rows (xor 4, not 2)", [
        (FWD, "mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));",
         "mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 4));")], FWD_TESTS),
    "fwd_max_quad_partial": ("forward: the row max reduced over 2 lanes of the quad, not 4", [
        (FWD, "      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));\n", "")], FWD_TESTS),
    "fwd_sum_quad_partial": ("forward: the final row sum reduced over 2 lanes of the quad, not 4", [
        (FWD, "    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);\n", "")], FWD_TESTS),
    "fwd_mask_ignored": ("forward: the validity flags not applied to the scores", [
        (FWD, "s[nt][i] = ok_s[8 * nt + 2 * t + (i & 1)] ? x : -INFINITY;",
         "s[nt][i] = (ok_s[8 * nt + 2 * t + (i & 1)] || true) ? x : -INFINITY;")], FWD_TESTS),
    "fwd_padding_copied": ("forward: invalid keys' K / V rows copied (pred true) instead of zero-filled", [
        (FWD, "    cp_async_16(k_s + j * kLd + c, ok ? k_col + n * p.k_stride[1] : k, ok);\n"
              "    cp_async_16(v_s + j * kLd + c, ok ? v_col + n * p.v_stride[1] : v, ok);",
         "    cp_async_16(k_s + j * kLd + c, n < p.Nv ? k_col + n * p.k_stride[1] : k, true);\n"
         "    cp_async_16(v_s + j * kLd + c, n < p.Nv ? v_col + n * p.v_stride[1] : v, true);")], FWD_TESTS),
    "fwd_p_fragment_order": ("forward: P's A fragment takes the key halves in the wrong registers", [
        (FWD, "const float* c = s[2 * kk + (r >> 1)] + 2 * (r & 1);",
         "const float* c = s[2 * kk + (r & 1)] + 2 * (r >> 1);")], FWD_TESTS),
    "fwd_scale_not_log2": ("forward: scores scaled by scale, not scale * log2 e", [
        (FWD, "const float scale_log2 = p.scale * kLog2e;", "const float scale_log2 = p.scale;")], FWD_TESTS),
    "fwd_lse_log2": ("forward: lse left in log2 (no * ln 2)", [
        (FWD, "m[h] = has ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;",
         "m[h] = has ? (m[h] + log2f(l[h])) : -INFINITY;")], FWD_TESTS),
    "fwd_empty_row_divides": ("forward: a row with no valid key divides by l = 0", [
        (FWD, "l[h] = has ? 1.f / l[h] : 0.f;", "l[h] = 1.f / l[h];")], FWD_TESTS),
    "fwd_gqa_head_wrong": ("forward: packed row r read from head kvh + r % G (not kvh * G + r % G)", [
        (COMMON, "  return base + (r / G) * s[1] + (kvh * G + r % G) * s[2];",
         "  return base + (r / G) * s[1] + (kvh + r % G) * s[2];")], FWD_TESTS),
    "fwd_tile_stride_wrong": ("forward: tile j + 1 staged from keys 32 (j + 1), not 64 (j + 1)", [
        (FWD, "n_begin + int64_t{j + 1} * kKeys", "n_begin + int64_t{j + 1} * 32")], FWD_TESTS),
    "fwd_split_slice_wrong": ("forward: every split writes split 0's slice of o_part / lse_part", [
        (FWD, "const int64_t part = split * stat_rows(p) + stat_index(p, b, G, kvh, r);",
         "const int64_t part = 0 * split + stat_index(p, b, G, kvh, r);")], FWD_TESTS),
    "fwd_out_halves_swapped": ("forward: the two dims of each output store swapped", [
        (FWD, "pack2<T>(o[nt][2 * h] * l[h], o[nt][2 * h + 1] * l[h])",
         "pack2<T>(o[nt][2 * h + 1] * l[h], o[nt][2 * h] * l[h])")], FWD_TESTS),
    # ---- backward: retrieval_tc_bwd.cu ----
    "bwd_dv_operand_not_transposed": ("backward: dO's B fragments of dV += P^T dO loaded without .trans", [
        (BWD, "ldmatrix_x4_trans(b, a_row(ot + r16 * kLd + 16 * h, kLd, lane));",
         "ldmatrix_x4(b, a_row(ot + r16 * kLd + 16 * h, kLd, lane));")], BWD_TESTS),
    "bwd_dq_operand_not_transposed": ("backward: K's B fragments of dQ += dS K loaded without .trans", [
        (BWD, "ldmatrix_x4_trans(b, a_row(kt + k16 * kLd + 16 * h, kLd, lane));",
         "ldmatrix_x4(b, a_row(kt + k16 * kLd + 16 * h, kLd, lane));")], BWD_TESTS),
    "bwd_dkdv_wait_skipped": ("backward: dK/dV's cp_async_wait<1> for the row step deleted", [
        (BWD, "      cp_async_wait<1>();  // this step's rows", "      /* wait deleted */  // this step's rows")],
        BWD_TESTS),
    "bwd_dq_wait_skipped": ("backward: dQ's cp_async_wait<1> for the key tile deleted", [
        (BWD, "      cp_async_wait<1>();  // this step's keys have landed\n", "")], BWD_TESTS),
    "bwd_dkdv_refill_barrier_deleted": ("backward: dK/dV's barrier before a row buffer is refilled deleted", [
        (BWD, "      __syncthreads();  // every warp is done with buffer `buf` before step + 2 refills it\n"
              "    }\n    cp_async_wait<0>();  // (only", "    }\n    cp_async_wait<0>();  // (only")], BWD_TESTS),
    "bwd_dkdv_delta_dropped": ("backward: dS^T = P^T dP^T in dK/dV (delta dropped)", [
        (BWD, "dp[j][i] = pv * (dp[j][i] - dls[col + i % 2]);", "dp[j][i] = pv * (dp[j][i] - 0.f * dls[col + i % 2]);")],
        BWD_TESTS),
    "bwd_dq_delta_dropped": ("backward: dS = P dP in dQ (delta dropped)", [
        (BWD, "dp[j][i] = pv * (dp[j][i] - delta[i / 2]);", "dp[j][i] = pv * (dp[j][i] - 0.f * delta[i / 2]);")],
        BWD_TESTS),
    "bwd_ds_fragment_order": ("backward: dS^T's A fragment takes rows g + 8 and columns 8-15 in swapped registers", [
        (BWD, "  a[1] = pack2<T>(c0[2], c0[3]);\n  a[2] = pack2<T>(c1[0], c1[1]);",
         "  a[1] = pack2<T>(c1[0], c1[1]);\n  a[2] = pack2<T>(c0[2], c0[3]);")], BWD_TESTS),
    "bwd_key_mask_ignored": ("backward: dK/dV's P^T not zeroed at invalid keys", [
        (BWD, "const float pv = key_ok[i / 2] ? exp2f", "const float pv = (key_ok[i / 2] || true) ? exp2f")],
        BWD_TESTS),
    "bwd_padding_copied": ("backward: invalid keys' K / V rows copied (pred true) instead of zero-filled", [
        (BWD, "const bool ok = d < hd && key_valid(p, c.b, n, n_end);", "const bool ok = d < hd && n < p.Nv + 0 * n_end;")],
        BWD_TESTS),
    "bwd_split_slice_wrong": ("backward: dK/dV partials at [b][split] instead of [split][b]", [
        (BWD, "const int64_t part0 = c.split * key_rows(p) + key_row(p, c.b, 0);",
         "const int64_t part0 = (c.b * p.row_splits + c.split) * p.Nv;")], BWD_TESTS),
    "bwd_split_rows_offset": ("backward: every split after the first starts one 64-row step late", [
        (BWD, "const int64_t r_begin = c.split * p.split_rows;",
         "const int64_t r_begin = c.split * p.split_rows + (c.split > 0 ? kTcRows : 0);")], BWD_TESTS),
}


def main() -> int:
    args = mutants.parse_args(__doc__)
    rows, survived = [], 0
    for name, (what, edits, filt) in MUTANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        try:
            lib = mutants.build(name, edits, "tc_mutants")
        except RuntimeError as e:  # a mutant that does not compile is a broken tool entry
            print(f"{name}: BUILD FAILED\n{str(e)[:2000]}", flush=True)
            return 2
        failed, summary, rc = mutants.run_tests(lib, TEST_FILE, filt, timeout=3600)
        tests = mutants.failing_tests(failed)
        survived += rc == 0
        rows.append((what, len(failed), tests))
        mutants.report(name, rc != 0, time.perf_counter() - start, summary, tests)
    if args.markdown:
        mutants.write_markdown(args.markdown, rows)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
