// Retrieval forward on the tensor cores (sm_80 / sm_90): mma.sync m16n8k16 with bf16 / fp16
// operands and fp32 accumulation, through the project's wrappers (csrc/cuda/mma.cuh), on the
// FlashAttention-2 schedule. Same contract as retrieval_fwd_kernel (retrieval_kernels.cu):
// packed query rows r = t * G + g (the G = H / Hkv query heads sharing a KV head read its
// keys once), keys [0, kv_len) clamped to [0, Nv] and key_mask (varlen: a sequence's own
// rows and keys, seq_q_len / seq_k_len, pvm_params.h), log2-domain online softmax,
// lse in natural log (-inf and an output of exactly 0 for a row with no valid key), NaN
// propagated, the split-KV partials (o_part / lse_part) when the host op splits the keys.
//
// Which launches come here (retrieval_fwd_tensor_cores, pvm_params.h, the rule the host op's
// split plan and the launcher share): bf16 / fp16, hd a multiple of 16 up to 128, q, k, v
// and out with unit stride along hd and 16-byte aligned rows (every other stride a multiple
// of 8 elements, 16-byte aligned bases), and PVM_CUDA_TENSOR_CORES not 0. Everything else
// (fp32, other head dims, views with other strides) stays on the CUDA-core kernel, which
// takes any layout: no silent copy, no change of results without a reason in the rule.
//
// Schedule. A block of 4 warps (128 threads) owns 64 packed query rows of one (sample, KV
// head[, key split]); warp w owns rows 16 w .. 16 w + 15, one m16 tile of every mma.
// * Q: staged once with cp.async (rows past T * G zero-filled), read into A fragments with
//   ldmatrix.x4 and kept in registers for the whole key loop: hd / 16 k-steps x 4 registers
//   (32 at hd 128). Q stays UNSCALED: the bf16 / fp16 input is exact in the fragment, and
//   S = Q K^T is multiplied by scale * log2 e in fp32 (one rounding of 2^-24). Pre-scaling
//   Q in the fragment would round every q * scale * log2 e to 8 (bf16) or 11 (fp16) bits: a
//   second input rounding (2^-9 relative in bf16) the reference and the CUDA-core kernel
//   (fp32 q_s) do not have. Measured (bf16, hd 64, Nv 50-1000, |q| ~1 and ~3): lse within
//   2e-6 of float64 unscaled, 1e-3 to 1e-2 pre-scaled; output error 1.6-3.1e-3 of max |out|
//   unscaled (its own bf16 rounding), 1.7-5.0e-3 pre-scaled; fp16 likewise (lse 3e-6 vs
//   1.7e-3). The fp32 multiply costs 32 FMULs per lane per 64-key tile.
// * K / V: 64-key tiles, hd wide, staged with cp.async into a double buffer: tile j + 1 is
//   in flight while tile j is computed (cp_async_wait<1>). A key that is not valid (masked,
//   at or past kv_len, past Nv or past this split) is zero-filled by the copy (src-size 0:
//   nothing is read), so NaN in padding never reaches a result through 0 * x, and its score
//   is set to -inf from a validity flag staged beside the tile.
// * S = Q K^T: per warp 16 x 64 fp32 (8 n8 tiles x 4 = 32 registers), K read with
//   ldmatrix.x4 (non-trans: K's rows are the mma's B^T rows), 2 mmas per ldmatrix.
// * Online softmax on the C fragments: lane (g, t) holds rows g and g + 8, keys 8 nt + 2t
//   and + 1; row max and sum over a quad (4 lanes) by __shfl_xor 1 and 2. The running max
//   starts at -1e30 (finite: exp2(m_old - m_new) is never inf - inf); fmaxf drops NaN from
//   the max, so a NaN score makes exp2(NaN - m) = NaN reach l and the output, as the
//   reference does.
// * P rounded to bf16 / fp16 becomes the A operand of O += P V as it lies in the C
//   fragments (FlashAttention-2's register reuse: C tiles 2 kk and 2 kk + 1 are A's k-step
//   kk), V read with ldmatrix.x4.trans. The row sum l adds the fp32 P (as FlashAttention-2
//   does), not the rounded one: measured here on bf16 / fp16 cases (Nv 50-1000), the output
//   error is the same either way (the output's own rounding dominates it, ~2e-3 bf16,
//   ~3e-4 fp16 of max |out|), but lse, which the backward reads, stays within ~2e-6 of the
//   float64 value with the fp32 sum and drifts to ~1e-3 (bf16) / ~1e-4 (fp16) with the
//   rounded one.
// * O: per warp 16 x hd fp32 (hd / 8 n8 tiles x 4: 64 registers at hd 128), rescaled by
//   alpha = exp2(m_old - m_new) each tile, normalised once at the end.
//
// Shared memory (dynamic): 2 stages x (K, V) x 64 rows x (hd + 8) elements x 2 bytes =
// 512 (hd + 8) B: 69,632 B at hd 128 (launch_kernel opts in above 48 KB; 3 blocks per SM
// fit an H100's 228 KB, 2 an A100's 164 KB), 36,864 B at hd 64, 12,288 B at hd 16. Q is
// staged in stage 1's K buffer (free until tile 1 is issued, after Q's fragments are read:
// 16 KB less at hd 128). Rows are padded by 8 elements (16 bytes): with a row of hd * 2 =
// 256 bytes the 8 row addresses of an ldmatrix phase would all start in bank 0 (8-way
// conflict); 16 bytes more per row puts them in 8 different 4-bank groups (conflict-free)
// and keeps every row 16-byte aligned for cp.async and ldmatrix. Plus 2 x 64 int validity
// flags (static, 512 B).
//
// Registers (cuobjdump -res-usage, ptxas of CUDA 12; tests/test_native.py checks that no
// kernel has a stack frame or local memory): see the README's CUDA section.
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/dtype.cuh"
#include "cuda/launch.h"
#include "cuda/mma.cuh"
#include "cuda/retrieval_common.cuh"

namespace pvm {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRows = 64;                 // packed query rows per block: 4 warps x 16
constexpr int kKeys = 64;                 // keys per staged tile
constexpr int kPad = 8;                   // elements of padding per shared row (16 bytes)
constexpr int kChunk = 8;                 // bf16 / fp16 elements per 16-byte cp.async
static_assert(kRows == kRetrievalTcRowTile && kKeys == kRetrievalTcKeyTile,
              "split plan and tensor-core kernel tiles disagree");
struct alignas(16) SharedChunk {
  uint32_t w[4];
};
// Stages one 64-key tile starting at n0 (K and V rows of hd elements, row stride HD + kPad
// in shared memory) with one cp.async per 16 bytes, and the keys' validity flags. Invalid
// keys are zero-filled (pred false: nothing is read, the source is only a valid address).
// Thread i takes chunks i, i + 128, ...: consecutive threads copy consecutive 16 bytes of a
// row (coalesced). The copies join the caller's open cp.async group.
template <typename T, int HD>
__device__ __forceinline__ void stage_keys(const RetrievalParams& p, int64_t b, int kvh, int64_t n0,
                                           int64_t n_end, T* k_s, T* v_s, int* valid_s) {
  constexpr int kRowChunks = HD / kChunk, kLd = HD + kPad;
  // A thread copies one fixed 16-byte column of rows j0, j0 + kRowsPerPass, ... (8 rows a
  // pass at hd 128, 64 at hd 16; at hd 48, 80, 96, 112 the last 128 % (hd / 8) threads idle).
  constexpr int kRowsPerPass = kThreads / kRowChunks;
  const int c = (threadIdx.x % kRowChunks) * kChunk;
  const int j0 = threadIdx.x < kRowsPerPass * kRowChunks ? threadIdx.x / kRowChunks : kKeys;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* k_col = k + key_base(p, p.k_stride, b) + kvh * p.k_stride[2] + c;  // key 0 of sequence b
  const T* v_col = v + key_base(p, p.v_stride, b) + kvh * p.v_stride[2] + c;
  // Not unrolled: unrolled, ptxas kept every pass's addresses live across the tile's
  // compute (the prefetch is issued in the loop that computes): 255 registers and 68 B of
  // spill at hd 128 on sm_80 instead of the ~200 without it.
#pragma unroll 1
  for (int j = j0; j < kKeys; j += kRowsPerPass) {  // hd / 16 passes (rounded up)
    const int64_t n = n0 + j;
    const bool ok = key_valid(p, b, n, n_end);
    cp_async_16(k_s + j * kLd + c, ok ? k_col + n * p.k_stride[1] : k, ok);
    cp_async_16(v_s + j * kLd + c, ok ? v_col + n * p.v_stride[1] : v, ok);
    if (c == 0) valid_s[j] = ok;  // a plain store: published by the barrier after the wait
  }
}

// One block: 64 packed rows [row0, row0 + 64) of (sample b, KV head kvh), keys
// [n_begin, n_end) of its split. 128 threads; __launch_bounds__(128, 2): ptxas may use up to
// 255 registers (2 blocks x 128 threads), what 2 blocks per SM of an A100 (hd 128: 2 x 68 KB
// of shared memory) leave anyway.
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 2) retrieval_tc_fwd_kernel(const RetrievalParams p) {
  static_assert(HD % 16 == 0 && HD >= 16 && HD <= 128, "hd: a multiple of 16 up to 128");
  constexpr int kLd = HD + kPad;            // shared row stride, elements
  constexpr int kTile = kKeys * kLd;        // one K (or V) buffer, elements
  constexpr int kKSteps = HD / 16;          // k-steps of S = Q K^T; dim pairs of O += P V
  constexpr int kDimTiles = HD / 8;         // n8 tiles of O
  constexpr int kKeyTiles = kKeys / 8;      // n8 tiles of S
  // [stage][K, V][64][kLd]; declared as 16-byte units (one extern type for every instance,
  // and the alignment cp.async and ldmatrix need)
  PVM_DYNAMIC_SHARED(SharedChunk, smem_chunks);
  T* const smem = reinterpret_cast<T*>(smem_chunks);
  PVM_SHARED(int, valid_s, [2][kKeys]);

  // Block coordinates, as block_coords in retrieval_kernels.cu (32-bit divisions: the grid
  // is within gridDim.x): tile fastest, then split, then (sample, KV head).
  // `rows`: the packed rows of this block's sequence (padded T * G; varlen seq_q_len * G,
  // the grid covering max_seqlen_q: a block past them exits before any load).
  const int64_t G = p.H / p.Hkv;
  const unsigned n_tiles = static_cast<unsigned>((p.T * G + kRows - 1) / kRows);
  const unsigned n_splits = static_cast<unsigned>(p.kv_splits), hkv = static_cast<unsigned>(p.Hkv);
  const unsigned rest = blockIdx.x / n_tiles, bh = rest / n_splits;
  const int64_t b = bh / hkv, row0 = static_cast<int64_t>(blockIdx.x - rest * n_tiles) * kRows;
  const int kvh = static_cast<int>(bh % hkv), split = static_cast<int>(rest - bh * n_splits);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;    // the mma fragments' groupID / threadID_in_group
  const int64_t rows = seq_q_len(p, b) * G;
  if (row0 >= rows) return;

  // This split's keys (unsplit: split_keys reaches past every key). A split wholly past
  // kv_len sums nothing and writes 0 / -inf, which the combine weighs 0.
  const int64_t n_begin = split * p.split_keys;
  const int64_t kend = seq_k_len(p, b);
  const int64_t n_end = kend < n_begin + p.split_keys ? kend : n_begin + p.split_keys;
  const int tiles = n_end > n_begin ? static_cast<int>((n_end - n_begin + kKeys - 1) / kKeys) : 0;

  // Q -> stage 1's K buffer (one commit group), key tile 0 -> stage 0 (a second group).
  {
    T* q_s = smem + 2 * kTile;
    const T* q = static_cast<const T*>(p.q);
    const int64_t q_base = row_base(p, p.q_stride, b);
    constexpr int kRowChunks = HD / kChunk;
#pragma unroll
    for (int it = 0; it < kRows * kRowChunks / kThreads; ++it) {  // hd / 16 passes
      const int i = threadIdx.x + it * kThreads;
      const int rr = i / kRowChunks, c = (i - rr * kRowChunks) * kChunk;
      const int64_t r = row0 + rr;
      const bool ok = r < rows;  // rows past the sequence's: zeros (scores 0, never stored)
      cp_async_16(q_s + rr * kLd + c, ok ? q + row_offset(q_base, p.q_stride, G, kvh, r) + c : q, ok);
    }
    cp_async_commit();
  }
  if (tiles > 0) stage_keys<T, HD>(p, b, kvh, n_begin, n_end, smem, smem + kTile, valid_s[0]);
  cp_async_commit();

  uint32_t qf[kKSteps][4];  // A fragments of this warp's 16 rows of Q, all hd
  cp_async_wait<1>();       // Q has landed (tile 0 may still be in flight)
  __syncthreads();          // and is visible to every warp (each reads the rows others copied)
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
    ldmatrix_x4(qf[kk], smem + 2 * kTile + (warp * 16 + (lane & 15)) * kLd + 16 * kk + 8 * (lane >> 4));
  __syncthreads();  // every warp has its Q fragments before tile 1's copies overwrite the buffer

  float o[kDimTiles][4];    // O: o[nt][i] is row g + 8 (i / 2), dim 8 nt + 2t + i % 2
#pragma unroll
  for (int nt = 0; nt < kDimTiles; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  float m[2] = {kNegBig, kNegBig};  // running max of rows g, g + 8 (log2 domain, scaled)
  float l[2] = {0.f, 0.f};          // this lane's part of their sums (its 16 keys a tile)
  const float scale_log2 = p.scale * kLog2e;

#pragma unroll 1
  for (int j = 0; j < tiles; ++j) {
    // Prefetch tile j + 1 into the other stage (read last at iteration j - 1, before that
    // iteration's closing barrier), then wait for tile j only: one group may stay in
    // flight. The group is committed even when empty, so the count is the same each time.
    if (j + 1 < tiles) {
      T* nxt = smem + ((j + 1) & 1) * 2 * kTile;
      stage_keys<T, HD>(p, b, kvh, n_begin + int64_t{j + 1} * kKeys, n_end, nxt, nxt + kTile,
                        valid_s[(j + 1) & 1]);
    }
    cp_async_commit();
    cp_async_wait<1>();  // tile j has landed (this thread's copies)
    __syncthreads();     // and every thread's copies and flags are visible to every warp
    const T* k_s = smem + (j & 1) * 2 * kTile;
    const T* v_s = k_s + kTile;
    const int* ok_s = valid_s[j & 1];

    // S = Q K^T (raw): s[nt][i] is row g + 8 (i / 2), key 8 nt + 2t + i % 2. One
    // ldmatrix.x4 of K rows 16 np .. + 15 gives the B fragments of n8 tiles 2 np, 2 np + 1:
    // lanes 0-7 address rows 0-7 at dims 0-7 of the k-step, 8-15 the same rows at dims
    // 8-15, 16-23 rows 8-15 at dims 0-7, 24-31 rows 8-15 at dims 8-15 (mma.cuh, B^T tile).
    float s[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kKeyTiles / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_s + (16 * np + (lane & 7) + 8 * (lane >> 4)) * kLd + 16 * kk + 8 * ((lane >> 3) & 1));
        mma_m16n8k16<T>(s[2 * np], qf[kk], kb);
        mma_m16n8k16<T>(s[2 * np + 1], qf[kk], kb + 2);
      }
    }

    // Scale into the log2 domain, mask, and the tile's row max over the quad's 64 keys.
    float mx[2] = {kNegBig, kNegBig};
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float x = s[nt][i] * scale_log2;
        s[nt][i] = ok_s[8 * nt + 2 * t + (i & 1)] ? x : -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the 4 lanes of a quad hold the same row's 64 keys
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      const float m_new = fmaxf(m[h], mx[h]);
      alpha[h] = exp2f(m[h] - m_new);
      m[h] = m_new;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int nt = 0; nt < kDimTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[nt][i] *= alpha[i >> 1];
    }

    // P = exp2(s - m) rounded to T, packed as the A operand of k-step kk (keys 16 kk ..
    // + 15): a[0] = rows g, keys 2t, +1 = C tile 2 kk's c[0..1]; a[1] = rows g + 8 (c[2..3]);
    // a[2], a[3] = the same of C tile 2 kk + 1 (keys 8 more). Then O += P V with V's B
    // fragments by ldmatrix.x4.trans (V rows 16 kk .. + 15, dims 16 dp .. + 15: lanes 0-15
    // address rows 0-15 at dims 0-7, lanes 16-31 the same rows at dims 8-15).
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float* c = s[2 * kk + (r >> 1)] + 2 * (r & 1);
        const float p0 = exp2f(c[0] - m[r & 1]), p1 = exp2f(c[1] - m[r & 1]);
        l[r & 1] += p0 + p1;  // the fp32 weights: lse to fp32 accuracy (see the top)
        a[r] = pack2<T>(p0, p1);
      }
#pragma unroll
      for (int dp = 0; dp < kKSteps; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_s + (16 * kk + (lane & 15)) * kLd + 16 * dp + 8 * (lane >> 4));
        mma_m16n8k16<T>(o[2 * dp], a, vb);
        mma_m16n8k16<T>(o[2 * dp + 1], a, vb + 2);
      }
    }
    __syncthreads();  // every warp is done with this stage before iteration j + 1 refills it
  }

  // Row sums over the quad (fixed order: the same bits every run), then 1 / l and lse in
  // place of l and m. No valid key: l == 0, output 0 and lse -inf; NaN propagates.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const bool has = l[h] != 0.f;
    m[h] = has ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;
    l[h] = has ? 1.f / l[h] : 0.f;
  }

  // Lane (g, t) writes dims 8 nt + 2t, +1 of rows g and g + 8: one 4-byte store of two T
  // (or two fp32 partials); a quad writes 16 contiguous bytes of a row per n8 tile.
  const bool split_out = p.kv_splits > 1;
  const int64_t o_base = row_base(p, p.o_stride, b);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row0 + warp * 16 + g + 8 * h;
    if (r >= rows) continue;
    if (split_out) {
      const int64_t part = split * stat_rows(p) + stat_index(p, b, G, kvh, r);
      float* dst = p.o_part + part * HD + 2 * t;
#pragma unroll
      for (int nt = 0; nt < kDimTiles; ++nt) {
        dst[8 * nt] = o[nt][2 * h] * l[h];
        dst[8 * nt + 1] = o[nt][2 * h + 1] * l[h];
      }
      if (t == 0) p.lse_part[part] = m[h];
    } else {
      T* dst = static_cast<T*>(p.out) + row_offset(o_base, p.o_stride, G, kvh, r) + 2 * t;
#pragma unroll
      for (int nt = 0; nt < kDimTiles; ++nt)
        *reinterpret_cast<uint32_t*>(dst + 8 * nt) = pack2<T>(o[nt][2 * h] * l[h], o[nt][2 * h + 1] * l[h]);
      if (t == 0) p.lse[stat_index(p, b, G, kvh, r)] = m[h];
    }
  }
}

template <typename T, int HD>
cudaError_t launch(const RetrievalParams& p, int64_t blocks, cudaStream_t stream) {
  const size_t smem = sizeof(T) * 4 * kKeys * (HD + kPad);  // 2 stages x (K, V)
  return launch_kernel(retrieval_tc_fwd_kernel<T, HD>, dim3(static_cast<unsigned>(blocks)), kThreads, smem,
                       stream, p);
}

template <typename T>
cudaError_t launch_hd(const RetrievalParams& p, int64_t blocks, cudaStream_t stream) {
  switch (p.hd) {
    case 16: return launch<T, 16>(p, blocks, stream);
    case 32: return launch<T, 32>(p, blocks, stream);
    case 48: return launch<T, 48>(p, blocks, stream);
    case 64: return launch<T, 64>(p, blocks, stream);
    case 80: return launch<T, 80>(p, blocks, stream);
    case 96: return launch<T, 96>(p, blocks, stream);
    case 112: return launch<T, 112>(p, blocks, stream);
    case 128: return launch<T, 128>(p, blocks, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int64_t retrieval_tc_fwd_blocks(const RetrievalParams& p) {
  const int64_t rows = p.T * (p.H / p.Hkv), splits = p.kv_splits > 1 ? p.kv_splits : 1;
  return (rows + kRows - 1) / kRows * splits * p.B * p.Hkv;
}

cudaError_t retrieval_tc_fwd(const RetrievalParams& p, DType dtype, cudaStream_t stream) {
  if (!retrieval_fwd_tensor_cores(p, dtype)) return cudaErrorInvalidValue;
  const int64_t blocks = retrieval_tc_fwd_blocks(p);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  if (dtype == DType::kBFloat16) return launch_hd<__nv_bfloat16>(p, blocks, stream);
  return launch_hd<__half>(p, blocks, stream);
}

}  // namespace cuda
}  // namespace pvm
