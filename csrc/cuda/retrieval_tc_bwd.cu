// Retrieval backward on tensor cores (sm_80 / sm_90): dQ and dK/dV with mma.sync m16n8k16
// (bf16 / fp16 in, fp32 accumulate), ldmatrix and cp.async, through the wrappers of
// mma.cuh. Same semantics as the CUDA-core kernels of retrieval_kernels.cu
// (retrieval_bwd_dq_kernel, retrieval_bwd_dkdv_kernel), which keep fp32, the other head
// dims and the layouts this file does not take (retrieval_bwd_tensor_cores, pvm_params.h):
//
//   P = exp(S * scale - lse) on valid keys (0 elsewhere), S = Q K^T, dP = dO V^T,
//   dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO,
//
// over packed rows r = t * G + g (the G query heads of one KV head in one block), lse in
// natural log (-inf for a row with no valid key), delta = rowsum(dO * O) from the host op.
// P and dS are rounded to the input dtype as mma operands (as FlashAttention-2 does);
// everything else is the inputs' exact values, accumulated in fp32.
//
// FlashAttention-2's schedule, 4 warps (128 threads) a block, 64 x 64 tiles:
// * dK/dV (retrieval_tc_bwd_dkdv_kernel): a block owns 64 keys of one (sample, KV head),
//   staged once in shared memory; warp w owns keys 16w .. 16w + 15 and their dK and dV
//   rows (all hd columns) as fp32 mma accumulators in registers. The block walks its
//   split's packed query rows 64 at a time, q and dO tiles double-buffered by cp.async
//   (tile i + 1 in flight while tile i is used), lse and delta beside them. Per 16 rows:
//     S^T  = K_w Q^T    (A: K_w by ldmatrix, B: Q rows by ldmatrix: Q^T's columns)
//     dP^T = V_w dO^T
//     P^T, dS^T elementwise in registers,
//     dV  += P^T dO     (A: P^T from the registers above, B: dO by ldmatrix.trans)
//     dK  += dS^T Q     (A: dS^T likewise, B: Q by ldmatrix.trans).
//   Why S^T and not S: a warp computes the transposed scores of its own keys, so P^T and
//   dS^T come out as mma C fragments, and the C fragment of two adjacent n8 tiles is,
//   register for register, the A fragment of one m16k16 tile (pack2 of c[0..1], c[2..3]
//   of each). So the operands of dV and dK never leave registers: no shared-memory
//   round trip of P / dS, no ldmatrix.trans of them and no barrier between the two
//   products, at the price of lse / delta being per column (read from shared memory,
//   two floats a lane per n8 tile). FlashAttention-2 writes P and dS to shared memory
//   instead because its warps split the M x N tile differently (and share dS with dQ).
// * dQ (retrieval_tc_bwd_dq_kernel): a block owns 64 packed rows, warp w rows 16w ..,
//   their Q and dO A fragments held in registers for the whole loop; it walks the keys 64
//   at a time, K and V tiles double-buffered by cp.async. Per 16 keys: S = Q_w K^T,
//   dP = dO_w V^T (B: K / V rows by ldmatrix), dS in registers (C -> A as above), then
//   dQ += dS K (B: K by ldmatrix.trans). No atomics: each block writes its own rows.
// Row splits: the dK/dV launch keeps the CUDA-core kernels' deterministic parallel
// backward (retrieval_split_plan, in this kernel's tiles: 64 keys, 64-row steps): split s
// of a key tile takes rows [s * split_rows, + split_rows) into fp32 partials that
// sum_dkdv_splits_kernel (retrieval_kernels.cu) adds in split order.
//
// Shared-memory rows are hd + 8 elements long (HD + 8: 16 bytes of padding): ldmatrix's
// 8 row addresses of one 8 x 8 matrix then fall in 8 different 16-byte bank groups
// (a 256-byte row stride would put all 8 on the same banks: an 8-way conflict). Padding
// costs 6 % of the tiles at HD 128; an XOR swizzle would cost nothing there but needs the
// swizzled column in every cp.async and ldmatrix address.
//
// Head dims: kernels are instantiated for HD = 32, 64, 96, 128 (compile-time sizes for
// the register arrays); a head dim that is a multiple of 16 up to 128 runs the smallest
// HD >= hd, its columns past hd zero-filled by cp.async (src-size 0) and never written.
// HD 256 does not fit: dK and dV of a warp's 16 keys alone are 256 fp32 registers a lane.
//
// Resources (ptxas of CUDA 13.0, cuobjdump -res-usage; no stack frame or local memory in any
// instance, tests/test_cuda_tensor_cores.py checks it):
//   registers at HD 32 / 64 / 96 / 128 (with the varlen bounds): dK/dV 112 / 153 / 192 / 228
//   on sm_80 and 116 / 156 / 194 / 236 on sm_90 (__launch_bounds__(128, 2): without the 2,
//   ptxas held HD 64 to 128 registers and spilled 16 B on sm_90); dQ 80 / 122 / 162 / 206
//   on both;
//   dynamic shared memory 6 tiles x 64 x (HD + 8) x 2 B: dK/dV (K, V, 2 q, 2 dO, + 1 KB of
//   lse / delta) 31,744 / 56,320 / 80,896 / 105,472 B, dQ (q, dO, 2 K, 2 V) 30,720 /
//   55,296 / 79,872 / 104,448 B + 512 B static (key flags).
// At HD 128 that is 2 blocks (8 warps) per SM on an H100 (2 x 105 KB of its 228 KB; 2 x 128
// x 232 of its 65,536 registers) and 1 on an A100 (164 KB).
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/dtype.cuh"
#include "cuda/launch.h"
#include "cuda/mma.cuh"
#include "cuda/retrieval_common.cuh"

namespace pvm {
namespace cuda {
namespace {

constexpr int kTcThreads = 128;               // 4 warps
constexpr int kTcKeys = kRetrievalTcKeyTile;  // dK/dV: keys per block; dQ: keys per step
constexpr int kTcRows = kRetrievalTcRowTile;  // dK/dV: rows per step; dQ: rows per block
static_assert(kTcKeys == 16 * (kTcThreads / 32) && kTcRows == 16 * (kTcThreads / 32),
              "one 16-row (16-key) mma tile per warp");
constexpr int kPad = 8;                       // elements of padding per shared-memory row

// Dynamic shared memory in 16-byte units (cp.async and ldmatrix rows are 16-byte aligned),
// and two fp32 partials for one 8-byte store.
struct alignas(16) SmemChunk {
  unsigned char bytes[16];
};
struct alignas(8) Float2 {
  float x, y;
};

// Where packed row r of (sequence b, kvh) starts in a q-like tensor with strides s, from
// base = row_base(p, s, b) (pvm_params.h). The dispatch rule keeps T * G below 2^31 (T:
// max_seqlen_q in varlen, so every sequence's rows too), so r / G and r % G run in 32 bits.
__device__ __forceinline__ int64_t tc_row_offset(int64_t base, const int64_t* s, unsigned G, int kvh, unsigned r) {
  const unsigned t = r / G;
  return base + static_cast<int64_t>(t) * s[1] + static_cast<int64_t>(kvh * G + (r - t * G)) * s[2];
}

// stat_row (pvm_params.h) of packed row r of (sequence b, kvh), its divisions in 32 bits.
__device__ __forceinline__ int64_t tc_stat_index(const RetrievalParams& p, int64_t b, unsigned G, int kvh,
                                                 unsigned r) {
  const unsigned t = r / G;
  return stat_row(p, b, kvh * G + (r - t * G), t);
}

// (sample, KV head, split, tile) of this block: tile fastest, then split, as in
// retrieval_kernels.cu (the blocks reading one KV head run side by side).
struct TcCoords {
  int64_t b, tile;
  int kvh, split;
  unsigned G;
};

__device__ __forceinline__ TcCoords tc_coords(const RetrievalParams& p, int64_t tiles, int64_t splits) {
  const unsigned n_tiles = static_cast<unsigned>(tiles), n_splits = static_cast<unsigned>(splits);
  const unsigned hkv = static_cast<unsigned>(p.Hkv);
  const unsigned rest = blockIdx.x / n_tiles, bh = rest / n_splits;
  return {static_cast<int64_t>(bh / hkv), static_cast<int64_t>(blockIdx.x - rest * n_tiles),
          static_cast<int>(bh % hkv), static_cast<int>(rest - bh * n_splits),
          static_cast<unsigned>(p.H / p.Hkv)};
}

// cp.async of 64 packed rows [r0, r0 + 64) of q and dO (rows at or past r_end, and
// columns at or past hd, zero-filled) into row-major [64][HD + kPad] tiles. Thread i
// copies 16-byte chunk i % (HD / 8) of rows i / (HD / 8) + 128 / (HD / 8) * j.
template <typename T, int HD>
__device__ __forceinline__ void stage_rows_async(const RetrievalParams& p, const TcCoords& c, int64_t r0,
                                                 int64_t r_end, T* q_dst, T* do_dst) {
  constexpr int kChunks = HD / 8, kLd = HD + kPad;
  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.grad_out);
  const int64_t q_base = row_base(p, p.q_stride, c.b), o_base = row_base(p, p.o_stride, c.b);
  const int hd = static_cast<int>(p.hd);
#pragma unroll 1
  for (int i = threadIdx.x; i < kTcRows * kChunks; i += kTcThreads) {
    const int row = i / kChunks, d = (i - row * kChunks) * 8;
    const int64_t r = r0 + row;
    const bool ok = r < r_end && d < hd;
    int64_t oq = 0, oo = 0;
    if (ok) {
      oq = tc_row_offset(q_base, p.q_stride, c.G, c.kvh, static_cast<unsigned>(r)) + d;
      oo = tc_row_offset(o_base, p.o_stride, c.G, c.kvh, static_cast<unsigned>(r)) + d;
    }
    cp_async_16(q_dst + row * kLd + d, q + oq, ok);
    cp_async_16(do_dst + row * kLd + d, go + oo, ok);
  }
}

// cp.async of the 64 keys [n0, n0 + 64) of K and V (invalid keys, padding included,
// and columns past hd zero-filled: NaN in padding never reaches a product) into
// [64][HD + kPad] tiles.
template <typename T, int HD>
__device__ __forceinline__ void stage_keys_async(const RetrievalParams& p, const TcCoords& c, int64_t n0,
                                                 int64_t n_end, T* k_dst, T* v_dst) {
  constexpr int kChunks = HD / 8, kLd = HD + kPad;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t k_base = key_base(p, p.k_stride, c.b), v_base = key_base(p, p.v_stride, c.b);
  const int hd = static_cast<int>(p.hd);
#pragma unroll 1
  for (int i = threadIdx.x; i < kTcKeys * kChunks; i += kTcThreads) {
    const int j = i / kChunks, d = (i - j * kChunks) * 8;
    const int64_t n = n0 + j;
    const bool ok = d < hd && key_valid(p, c.b, n, n_end);
    int64_t ok_off = 0, ov_off = 0;
    if (ok) {
      ok_off = k_base + n * p.k_stride[1] + c.kvh * p.k_stride[2] + d;
      ov_off = v_base + n * p.v_stride[1] + c.kvh * p.v_stride[2] + d;
    }
    cp_async_16(k_dst + j * kLd + d, k + ok_off, ok);
    cp_async_16(v_dst + j * kLd + d, v + ov_off, ok);
  }
}

// mma fragments (mma.cuh): with l the lane,
//  A of a 16 x 16 tile at a[row][col] (row-major, ld):   ldmatrix_x4(&a[l % 16][8 (l / 16)])
//  B of two n8 tiles from rows bt[n][k] (B^T row-major):  ldmatrix_x4(&bt[l % 8 + 8 (l / 16)][8 ((l / 8) % 2)])
//  B of two n8 tiles from b[k][n] (row-major):           ldmatrix_x4_trans(&b[l % 16][8 (l / 16)])
// each B giving {r[0], r[1]} for n 0-7 and {r[2], r[3]} for n 8-15.
template <typename T>
__device__ __forceinline__ const T* a_row(const T* tile, int ld, int lane) {
  return tile + (lane % 16) * ld + 8 * (lane / 16);
}
template <typename T>
__device__ __forceinline__ const T* bt_row(const T* tile, int ld, int lane) {
  return tile + (lane % 8 + 8 * (lane / 16)) * ld + 8 * ((lane / 8) % 2);
}

// The C fragments of two adjacent n8 tiles (16 columns) rounded to T as the A fragment
// of the 16 x 16 tile they form: a[0] = C[g][2t..], a[1] = C[g + 8][2t..] from the first
// n8 tile, a[2], a[3] the same from the second (mma.cuh's layouts).
template <typename T>
__device__ __forceinline__ void c_to_a(const float c0[4], const float c1[4], uint32_t a[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// ---- dK / dV ------------------------------------------------------------------------------

template <int HD>
constexpr size_t dkdv_smem_bytes(size_t elem) {
  // K, V, then q and dO twice (double buffer), then lse2 and delta twice.
  return static_cast<size_t>(6 * kTcKeys * (HD + kPad)) * elem + 2 * 2 * kTcRows * sizeof(float);
}

template <typename T, int HD>
__global__ void __launch_bounds__(kTcThreads, 2) retrieval_tc_bwd_dkdv_kernel(const RetrievalParams p) {
  constexpr int kLd = HD + kPad, kTile = kTcKeys * kLd, kNt = HD / 8;
  PVM_DYNAMIC_SHARED(SmemChunk, tc_smem);
  T* const k_s = reinterpret_cast<T*>(tc_smem);
  T* const v_s = k_s + kTile;
  T* const q_s = v_s + kTile;        // [2][64][kLd]
  T* const do_s = q_s + 2 * kTile;   // [2][64][kLd]
  float* const lse_s = reinterpret_cast<float*>(do_s + 2 * kTile);  // [2][64]: lse * log2 e
  float* const delta_s = lse_s + 2 * kTcRows;                        // [2][64]

  const int64_t key_tiles = (p.Nv + kTcKeys - 1) / kTcKeys;
  const TcCoords c = tc_coords(p, key_tiles, p.row_splits);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = c.tile * kTcKeys, n_end = seq_k_len(p, c.b), n_store = key_store_end(p, c.b);
  const int64_t rows = seq_q_len(p, c.b) * static_cast<int64_t>(c.G);  // this sequence's
  const float scale_log2 = p.scale * kLog2e;
  // Varlen: the grid covers max_seqlen_k; a tile past this sequence's keys stores nothing.
  if (n0 >= n_store) return;

  // dK, dV of this warp's keys n0 + 16 warp + {g, g + 8}, columns 8 j + 2t, + 1.
  float dk[kNt][4], dv[kNt][4];
#pragma unroll
  for (int j = 0; j < kNt; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[j][i] = dv[j][i] = 0.f;

  // This split's rows; none for a tile wholly past the sample's last valid key (its
  // gradient, or its partials, are zeros).
  const int64_t r_begin = c.split * p.split_rows;
  const int64_t r_end = n0 < n_end ? min64(rows, r_begin + p.split_rows) : 0;
  if (r_begin < r_end) {
    const bool key_ok[2] = {key_valid(p, c.b, n0 + 16 * warp + g, n_end),
                            key_valid(p, c.b, n0 + 16 * warp + g + 8, n_end)};
    const int64_t n_steps = (r_end - r_begin + kTcRows - 1) / kTcRows;

    // lse (log2 units) and delta of the 64 rows of step `step` into buffer `buf`: rows
    // past r_end get lse +inf (P = 0 exactly) and delta 0, so their zero-filled q and dO
    // add nothing. Plain loads, made visible by the barrier that follows the step's wait.
    const auto stage_stats = [&](int64_t step, int buf) {
      if (threadIdx.x < kTcRows) {
        const int64_t r = r_begin + step * kTcRows + threadIdx.x;
        float l2 = INFINITY, dl = 0.f;
        if (r < r_end) {
          const int64_t st = tc_stat_index(p, c.b, c.G, c.kvh, static_cast<unsigned>(r));
          l2 = p.lse[st] * kLog2e;
          dl = p.delta[st];
        }
        lse_s[buf * kTcRows + threadIdx.x] = l2;
        delta_s[buf * kTcRows + threadIdx.x] = dl;
      }
    };

    stage_keys_async<T, HD>(p, c, n0, n_end, k_s, v_s);
    stage_rows_async<T, HD>(p, c, r_begin, r_end, q_s, do_s);
    stage_stats(0, 0);
    cp_async_commit();

    const T* const kw = k_s + 16 * warp * kLd;  // this warp's 16 keys
    const T* const vw = v_s + 16 * warp * kLd;
#pragma unroll 1
    for (int64_t step = 0; step < n_steps; ++step) {
      const int buf = static_cast<int>(step & 1);
      if (step + 1 < n_steps) {  // the next rows fly while these are used
        stage_rows_async<T, HD>(p, c, r_begin + (step + 1) * kTcRows, r_end, q_s + (buf ^ 1) * kTile,
                                do_s + (buf ^ 1) * kTile);
        stage_stats(step + 1, buf ^ 1);
      }
      cp_async_commit();  // (an empty group on the last step: the wait below stays <1>)
      cp_async_wait<1>();  // this step's rows (and, the first time, K and V) have landed
      __syncthreads();     // ... for every thread's copies and stats
      const T* const qt = q_s + buf * kTile;
      const T* const ot = do_s + buf * kTile;
      const float* const l2s = lse_s + buf * kTcRows;
      const float* const dls = delta_s + buf * kTcRows;
#pragma unroll 1
      for (int r16 = 0; r16 < kTcRows; r16 += 16) {
        // S^T = K_w Q^T and dP^T = V_w dO^T over these 16 rows: two n8 tiles each.
        float s[2][4] = {}, dp[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
          uint32_t a[4], b[4];
          ldmatrix_x4(a, a_row(kw + 16 * kk, kLd, lane));
          ldmatrix_x4(b, bt_row(qt + r16 * kLd + 16 * kk, kLd, lane));
          mma_m16n8k16<T>(s[0], a, b);
          mma_m16n8k16<T>(s[1], a, b + 2);
          ldmatrix_x4(a, a_row(vw + 16 * kk, kLd, lane));
          ldmatrix_x4(b, bt_row(ot + r16 * kLd + 16 * kk, kLd, lane));
          mma_m16n8k16<T>(dp[0], a, b);
          mma_m16n8k16<T>(dp[1], a, b + 2);
        }
        // P^T and dS^T: element i of n8 tile j is key g + 8 (i / 2), row r16 + 8 j + 2t + i % 2.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = r16 + 8 * j + 2 * t;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float pv = key_ok[i / 2] ? exp2f(fmaf(s[j][i], scale_log2, -l2s[col + i % 2])) : 0.f;
            s[j][i] = pv;
            dp[j][i] = pv * (dp[j][i] - dls[col + i % 2]);
          }
        }
        uint32_t pa[4], dsa[4];
        c_to_a<T>(s[0], s[1], pa);
        c_to_a<T>(dp[0], dp[1], dsa);
        // dV += P^T dO, dK += dS^T Q: B from the 16 rows x HD tiles, 16 columns a load.
#pragma unroll
        for (int h = 0; h < HD / 16; ++h) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, a_row(ot + r16 * kLd + 16 * h, kLd, lane));
          mma_m16n8k16<T>(dv[2 * h], pa, b);
          mma_m16n8k16<T>(dv[2 * h + 1], pa, b + 2);
          ldmatrix_x4_trans(b, a_row(qt + r16 * kLd + 16 * h, kLd, lane));
          mma_m16n8k16<T>(dk[2 * h], dsa, b);
          mma_m16n8k16<T>(dk[2 * h + 1], dsa, b + 2);
        }
      }
      __syncthreads();  // every warp is done with buffer `buf` before step + 2 refills it
    }
    cp_async_wait<0>();  // (only the last, empty group can be open here)
  }

  // Unsplit: dk, dv. Split: fp32 partials (dk scaled) in this split's slice of
  // dk_part / dv_part [splits, key_rows, Hkv, hd]. Two adjacent columns a store. Keys up
  // to n_store only (varlen: this sequence's).
  const int hd = static_cast<int>(p.hd);
  const bool split = p.row_splits > 1;
  const int64_t part0 = c.split * key_rows(p) + key_row(p, c.b, 0);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t n = n0 + 16 * warp + g + 8 * half;
    if (n >= n_store) continue;
    if (split) {
      float* const dkp = p.dk_part + ((part0 + n) * p.Hkv + c.kvh) * hd;
      float* const dvp = p.dv_part + ((part0 + n) * p.Hkv + c.kvh) * hd;
#pragma unroll
      for (int j = 0; j < kNt; ++j) {
        const int d = 8 * j + 2 * t;
        if (d >= hd) continue;
        *reinterpret_cast<Float2*>(dkp + d) = Float2{dk[j][2 * half] * p.scale, dk[j][2 * half + 1] * p.scale};
        *reinterpret_cast<Float2*>(dvp + d) = Float2{dv[j][2 * half], dv[j][2 * half + 1]};
      }
      continue;
    }
    const int64_t off = key_base(p, p.dkv_stride, c.b) + n * p.dkv_stride[1] + c.kvh * p.dkv_stride[2];
    T* const dkr = static_cast<T*>(p.dk) + off;
    T* const dvr = static_cast<T*>(p.dv) + off;
#pragma unroll
    for (int j = 0; j < kNt; ++j) {
      const int d = 8 * j + 2 * t;
      if (d >= hd) continue;
      *reinterpret_cast<uint32_t*>(dkr + d) = pack2<T>(dk[j][2 * half] * p.scale, dk[j][2 * half + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvr + d) = pack2<T>(dv[j][2 * half], dv[j][2 * half + 1]);
    }
  }
}

// ---- dQ -------------------------------------------------------------------------------------

template <int HD>
constexpr size_t dq_smem_bytes(size_t elem) {
  // q and dO, then K and V twice (double buffer).
  return static_cast<size_t>(6 * kTcKeys * (HD + kPad)) * elem;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kTcThreads) retrieval_tc_bwd_dq_kernel(const RetrievalParams p) {
  constexpr int kLd = HD + kPad, kTile = kTcKeys * kLd, kNt = HD / 8, kKt = HD / 16;
  PVM_DYNAMIC_SHARED(SmemChunk, tc_smem);
  PVM_SHARED(int, valid_s, [2 * kTcKeys]);  // per key of the two buffered tiles
  T* const q_s = reinterpret_cast<T*>(tc_smem);
  T* const do_s = q_s + kTile;
  T* const k_s = do_s + kTile;  // [2][64][kLd]
  T* const v_s = k_s + 2 * kTile;

  const TcCoords c = tc_coords(p, (p.T * (p.H / p.Hkv) + kTcRows - 1) / kTcRows, 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t row0 = c.tile * kTcRows;
  const int64_t rows = seq_q_len(p, c.b) * static_cast<int64_t>(c.G);  // this sequence's
  if (row0 >= rows) return;  // varlen: the grid covers max_seqlen_q
  const int64_t n_end = seq_k_len(p, c.b);
  const int64_t n_steps = (n_end + kTcKeys - 1) / kTcKeys;
  const float scale_log2 = p.scale * kLog2e;

  // lse (log2 units) and delta of this lane's rows row0 + 16 warp + {g, g + 8}; rows past
  // the last compute finite garbage that is never stored.
  float lse2[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row0 + 16 * warp + g + 8 * h;
    lse2[h] = 0.f;
    delta[h] = 0.f;
    if (r < rows) {
      const int64_t st = tc_stat_index(p, c.b, c.G, c.kvh, static_cast<unsigned>(r));
      lse2[h] = p.lse[st] * kLog2e;
      delta[h] = p.delta[st];
    }
  }
  float dq[kNt][4];
#pragma unroll
  for (int j = 0; j < kNt; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) dq[j][i] = 0.f;

  if (n_steps > 0) {
    const auto stage_valid = [&](int64_t step, int buf) {
      if (threadIdx.x < kTcKeys)
        valid_s[buf * kTcKeys + threadIdx.x] = key_valid(p, c.b, step * kTcKeys + threadIdx.x, n_end);
    };
    stage_rows_async<T, HD>(p, c, row0, rows, q_s, do_s);
    cp_async_commit();
    stage_keys_async<T, HD>(p, c, 0, n_end, k_s, v_s);
    stage_valid(0, 0);
    cp_async_commit();
    cp_async_wait<1>();  // q and dO have landed (keys may still fly)
    __syncthreads();     // ... every thread's rows, before any warp reads its fragments
    // This warp's 16 rows of q and dO as A fragments, for every key tile.
    uint32_t qa[kKt][4], oa[kKt][4];
#pragma unroll
    for (int kk = 0; kk < kKt; ++kk) {
      ldmatrix_x4(qa[kk], a_row(q_s + 16 * warp * kLd + 16 * kk, kLd, lane));
      ldmatrix_x4(oa[kk], a_row(do_s + 16 * warp * kLd + 16 * kk, kLd, lane));
    }

#pragma unroll 1
    for (int64_t step = 0; step < n_steps; ++step) {
      const int buf = static_cast<int>(step & 1);
      if (step + 1 < n_steps) {
        stage_keys_async<T, HD>(p, c, (step + 1) * kTcKeys, n_end, k_s + (buf ^ 1) * kTile,
                                v_s + (buf ^ 1) * kTile);
        stage_valid(step + 1, buf ^ 1);
      }
      cp_async_commit();
      cp_async_wait<1>();  // this step's keys have landed
      __syncthreads();     // ... for every thread's copies and validity flags
      const T* const kt = k_s + buf * kTile;
      const T* const vt = v_s + buf * kTile;
      const int* const vld = valid_s + buf * kTcKeys;
#pragma unroll 1
      for (int k16 = 0; k16 < kTcKeys; k16 += 16) {
        // S = Q_w K^T, dP = dO_w V^T over these 16 keys.
        float s[2][4] = {}, dp[2][4] = {};
#pragma unroll
        for (int kk = 0; kk < kKt; ++kk) {
          uint32_t b[4];
          ldmatrix_x4(b, bt_row(kt + k16 * kLd + 16 * kk, kLd, lane));
          mma_m16n8k16<T>(s[0], qa[kk], b);
          mma_m16n8k16<T>(s[1], qa[kk], b + 2);
          ldmatrix_x4(b, bt_row(vt + k16 * kLd + 16 * kk, kLd, lane));
          mma_m16n8k16<T>(dp[0], oa[kk], b);
          mma_m16n8k16<T>(dp[1], oa[kk], b + 2);
        }
        // dS: element i of n8 tile j is row g + 8 (i / 2), key k16 + 8 j + 2t + i % 2.
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int key = k16 + 8 * j + 2 * t;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float pv = vld[key + i % 2] ? exp2f(fmaf(s[j][i], scale_log2, -lse2[i / 2])) : 0.f;
            dp[j][i] = pv * (dp[j][i] - delta[i / 2]);
          }
        }
        uint32_t dsa[4];
        c_to_a<T>(dp[0], dp[1], dsa);
        // dQ += dS K: B from the 16 keys x HD tile, 16 columns a load.
#pragma unroll
        for (int h = 0; h < HD / 16; ++h) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, a_row(kt + k16 * kLd + 16 * h, kLd, lane));
          mma_m16n8k16<T>(dq[2 * h], dsa, b);
          mma_m16n8k16<T>(dq[2 * h + 1], dsa, b + 2);
        }
      }
      __syncthreads();  // every warp is done with buffer `buf` before step + 2 refills it
    }
    cp_async_wait<0>();
  }

  const int hd = static_cast<int>(p.hd);
  T* const out = static_cast<T*>(p.dq) + row_base(p, p.dq_stride, c.b);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row0 + 16 * warp + g + 8 * h;
    if (r >= rows) continue;
    T* const row = out + tc_row_offset(0, p.dq_stride, c.G, c.kvh, static_cast<unsigned>(r));
#pragma unroll
    for (int j = 0; j < kNt; ++j) {
      const int d = 8 * j + 2 * t;
      if (d < hd)
        *reinterpret_cast<uint32_t*>(row + d) = pack2<T>(dq[j][2 * h] * p.scale, dq[j][2 * h + 1] * p.scale);
    }
  }
}

// ---- launch -----------------------------------------------------------------------------------

// f(std::integral_constant<int, HD>) for the smallest instance HD >= hd.
template <typename F>
cudaError_t dispatch_hd(int64_t hd, F&& f) {
  if (hd <= 32) return f(std::integral_constant<int, 32>{});
  if (hd <= 64) return f(std::integral_constant<int, 64>{});
  if (hd <= 96) return f(std::integral_constant<int, 96>{});
  if (hd <= 128) return f(std::integral_constant<int, 128>{});
  return cudaErrorInvalidValue;
}

cudaError_t launch_tc(void (*kernel)(RetrievalParams), int64_t blocks, size_t smem, cudaStream_t stream,
                      const RetrievalParams& p) {
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  return launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), kTcThreads, smem, stream, p);
}

}  // namespace

cudaError_t retrieval_bwd_tc(const RetrievalParams& p, DType dtype, cudaStream_t stream) {
  if (!retrieval_bwd_tensor_cores(p, dtype)) return cudaErrorInvalidValue;
  const RetrievalGrid grid = retrieval_grid(p, dtype);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    return dispatch_hd(p.hd, [&](auto hd_tag) {
      constexpr int HD = decltype(hd_tag)::value;
      cudaError_t err = launch_tc(retrieval_tc_bwd_dq_kernel<T, HD>, grid.dq, dq_smem_bytes<HD>(sizeof(T)),
                                  stream, p);
      if (err != cudaSuccess) return err;
      return launch_tc(retrieval_tc_bwd_dkdv_kernel<T, HD>, grid.dkdv, dkdv_smem_bytes<HD>(sizeof(T)), stream,
                       p);
    });
  };
  return dtype == DType::kBFloat16 ? run(__nv_bfloat16{}) : run(__half{});
}

}  // namespace cuda
}  // namespace pvm
