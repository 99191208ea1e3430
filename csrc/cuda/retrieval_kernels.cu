// Retrieval on CUDA (sm_80 / sm_90): online softmax over visual keys, forward and backward.
//
// Work split, as in the Triton kernels: a block owns one (sample, KV head) and either a
// block of packed query rows r = t * G + g (forward, dQ) or a tile of keys (dK/dV), so a
// KV head's keys are read once for all G query heads sharing it. The grid is 1-D over
// (b * Hkv + kvh) * tiles + tile, tiles fastest: the blocks that read one KV head's keys
// run side by side and find them in L2 (flash-attention's order), and B * Hkv may exceed
// the 65,535 that gridDim.y would allow.
// Inside a block, keys are staged in shared memory 32 at a time, one per lane: lane j
// computes the score of key j, the warp reduces max/sum with shuffles, and each lane then
// accumulates output dims lane + 32 i. K and V rows are padded to hd + 1 floats so the 32
// lanes reading 32 different key rows hit 32 different banks.
// Scores are in the log2 domain (q pre-scaled by scale * log2 e, exp2f); lse is stored in
// natural log, -inf for a row with no valid key, whose output is exactly 0.
//
// Split launches (as the Triton kernels' split_loop): a launch with fewer than 2 blocks per
// SM splits its loop among blocks, in whole tiles, at most 64 ways; the host op plans the
// split (retrieval_split_plan, pvm_params.h: shapes and SM count only, so the same bits on
// every run) and allocates fp32 workspaces. The grid becomes (b * Hkv + kvh) * splits *
// tiles + split * tiles + tile.
// * Forward, split-KV: block (tile, split) takes keys [split * split_keys, +split_keys) and
//   writes its normalised output and lse to o_part / lse_part; combine_splits_kernel merges
//   them in split order, weighting each by exp(lse_s - max lse). A decode step of the 8B
//   layout (B 1, T 1, H 4, Hkv 1: one row tile) was 1 block for the whole GPU, walking all
//   Nv keys alone; on an H100's 132 SMs it is 32 blocks at Nv 1024, 64 at Nv 4096.
// * dK/dV: block (key tile, split) takes packed query rows [split * split_rows, +split_rows)
//   into dk_part / dv_part; sum_dkdv_splits_kernel adds them in split order and casts. At
//   B 1, T 8192, H 4, Hkv 1, Nv 2048: 320 blocks instead of 64, each 6,560 rows long.
// Unsplit (1 split), the kernels write out/lse/dk/dv directly, with no workspace, as before.
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/dtype.cuh"
#include "cuda/launch.h"
#include "cuda/retrieval_common.cuh"

namespace pvm {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kKeys = 32;                         // one key per lane
constexpr int kRowsPerWarp = 4;                   // forward / dQ rows per warp
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kRowsPerIter = 8;                   // dK/dV: rows staged per iteration
// The host op plans splits (retrieval_split_plan, pvm_params.h) in these tiles.
static_assert(kKeys == kRetrievalKeyTile && kRowsPerBlock == kRetrievalRowTile &&
              kRowsPerIter == kRetrievalRowsPerIter, "split plan and kernel tiles disagree");
constexpr int kDimsPerLane = kMaxHeadDim / 32;
// Which (sample, KV head, split, tile) this block serves, and where the calling thread
// sits. `tiles` is the number of row (or key) tiles per (sample, KV head), `splits` the
// number of splits of each tile's loop (1: unsplit, folded away for dQ); blocks are ordered
// tile fastest, then split, then (sample, KV head), so the blocks sharing one KV head run
// side by side. The launch keeps the grid within gridDim.x (< 2^31), so the decomposition
// runs in 32-bit arithmetic: with 64-bit divisions here the forward kernel needed 25 more
// registers and dQ spilled more.
// `rows`: the packed rows of this block's sequence, seq_q_len(p, b) * G (padded: T * G).
struct BlockCoords {
  int64_t G, rows, b, tile;
  int kvh, split, warp, lane;
};

__device__ __forceinline__ BlockCoords block_coords(const RetrievalParams& p, int64_t tiles,
                                                    int64_t splits) {
  const int64_t G = p.H / p.Hkv;
  const unsigned n_tiles = static_cast<unsigned>(tiles), hkv = static_cast<unsigned>(p.Hkv);
  const unsigned n_splits = static_cast<unsigned>(splits);
  const unsigned rest = blockIdx.x / n_tiles;
  const unsigned bh = rest / n_splits;
  const int64_t b = static_cast<int64_t>(bh / hkv);
  return {G, seq_q_len(p, b) * G, b, static_cast<int64_t>(blockIdx.x - rest * n_tiles),
          static_cast<int>(bh % hkv), static_cast<int>(rest - bh * n_splits),
          static_cast<int>(threadIdx.x >> 5), static_cast<int>(threadIdx.x & 31)};
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int d = 0; d < n; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

// Stage `count` packed rows starting at r0 as float (times `mul`; 0 at and past `rows`,
// the sequence's packed rows: nothing there is read).
template <typename T>
__device__ void stage_rows(const T* src, const int64_t* s, const RetrievalParams& p, int64_t b,
                           int64_t G, int64_t rows, int kvh, int64_t r0, int count, float mul, float* dst) {
  const int hd = static_cast<int>(p.hd);
  const int64_t base = row_base(p, s, b);
  for (int i = threadIdx.x; i < count * hd; i += blockDim.x) {
    const int rr = i / hd, d = i - rr * hd;
    const int64_t r = r0 + rr;
    dst[i] = r < rows ? to_float(src[row_offset(base, s, G, kvh, r) + d * s[3]]) * mul : 0.f;
  }
}

// K and V can be read in 16-byte chunks: unit stride along hd, hd and the other strides
// multiples of a chunk, 16-byte aligned bases (the usual contiguous [B, Nv, Hkv, hd] of a
// VisualMemory). Uniform over the launch.
template <typename T>
__device__ __forceinline__ bool keys_in_chunks(const RetrievalParams& p) {
  constexpr int C = Chunk<T>::kSize;
  bool ok = p.hd % C == 0 && aligned16(p.k) && aligned16(p.v);
  for (int i = 0; i < 3; ++i) ok = ok && p.k_stride[i] % C == 0 && p.v_stride[i] % C == 0;
  return ok && p.k_stride[3] == 1 && p.v_stride[3] == 1;
}

// Stage the key tile n0.. (validity, then K and V with invalid keys zeroed: padding may
// hold NaN, which must not reach a result through 0 * x). Rows have stride ld. K/V are
// what a decode step reads (Nv x hd per KV head): 16-byte loads where the layout allows.
template <typename T>
__device__ void stage_keys(const RetrievalParams& p, int64_t b, int kvh, int64_t n0,
                           int64_t n_end, int ld, float* k_s, float* v_s, int* valid_s) {
  const int hd = static_cast<int>(p.hd);
  if (threadIdx.x < kKeys) valid_s[threadIdx.x] = key_valid(p, b, n0 + threadIdx.x, n_end);
  __syncthreads();  // valid_s is complete before the threads staging K/V read it
  if (keys_in_chunks<T>(p)) {
    constexpr int C = Chunk<T>::kSize;
    const int chunks = hd / C;
    // K, then V: one chunk live at a time (both at once spilled 8 B in dQ, bf16, sm_90).
    for (int which = 0; which < 2; ++which) {
      const int64_t* st = which ? p.v_stride : p.k_stride;
      // Key 0 of sequence b (key_base), formed here: one pointer live at a time.
      const T* src = static_cast<const T*>(which ? p.v : p.k) + key_base(p, st, b);
      float* dst = which ? v_s : k_s;
#pragma unroll 1
      for (int i = threadIdx.x; i < kKeys * chunks; i += blockDim.x) {
        const int j = i / chunks, d = (i - j * chunks) * C;
        Chunk<T> x;
        if (valid_s[j]) x = *reinterpret_cast<const Chunk<T>*>(src + (n0 + j) * st[1] + kvh * st[2] + d);
#pragma unroll
        for (int t = 0; t < C; ++t) dst[j * ld + d + t] = valid_s[j] ? to_float(x.v[t]) : 0.f;
      }
    }
    return;
  }
  const T* k = static_cast<const T*>(p.k) + key_base(p, p.k_stride, b);  // key 0 of sequence b
  const T* v = static_cast<const T*>(p.v) + key_base(p, p.v_stride, b);
  for (int i = threadIdx.x; i < kKeys * hd; i += blockDim.x) {
    const int j = i / hd, d = i - j * hd;
    const int64_t n = n0 + j;
    float kx = 0.f, vx = 0.f;
    if (valid_s[j]) {
      kx = to_float(k[n * p.k_stride[1] + kvh * p.k_stride[2] + d * p.k_stride[3]]);
      vx = to_float(v[n * p.v_stride[1] + kvh * p.v_stride[2] + d * p.v_stride[3]]);
    }
    k_s[j * ld + d] = kx;
    v_s[j * ld + d] = vx;
  }
}

// __launch_bounds__(128, 5): 5 blocks per SM is the 96 registers the kernel has always
// used (and what its 41 KB of shared memory at hd 128 allows on an H100). Stated, it makes
// ptxas fit the split path in them; left to its own heuristics it kept the split index in
// 96 registers + 4-16 B of spill (bf16 and fp16, sm_90).
template <typename T>
__global__ void __launch_bounds__(kThreads, 5) retrieval_fwd_kernel(const RetrievalParams p) {
  PVM_DYNAMIC_SHARED(float, smem);
  PVM_SHARED(int, valid_s, [kKeys]);
  const int hd = static_cast<int>(p.hd), ld = hd + 1;
  float* k_s = smem;
  float* v_s = k_s + kKeys * ld;
  float* q_s = v_s + kKeys * ld;
  const BlockCoords c = block_coords(p, ceil_div(p.T * (p.H / p.Hkv), kRowsPerBlock), p.kv_splits);
  const int64_t G = c.G, rows = c.rows, b = c.b;
  const int kvh = c.kvh, warp = c.warp, lane = c.lane;
  const int64_t row0 = c.tile * kRowsPerBlock;
  // Varlen: the grid covers max_seqlen_q; a block past this sequence's rows has nothing to do.
  if (row0 >= rows) return;

  stage_rows(static_cast<const T*>(p.q), p.q_stride, p, b, G, rows, kvh, row0, kRowsPerBlock,
             p.scale * kLog2e, q_s);
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = kNegBig;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[rr][i] = 0.f;
  }

  // This split's keys (unsplit: one split reaching past every key). A split wholly past
  // kv_len, or whose keys are all masked, sums nothing (l = 0) and writes output 0 and lse
  // -inf, which the combine weighs 0.
  const int64_t n_begin = c.split * p.split_keys;
  const int64_t n_end = min64(seq_k_len(p, b), n_begin + p.split_keys);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kKeys) {
    __syncthreads();  // every warp has read the previous tile (valid_s too) before it is restaged
    stage_keys<T>(p, b, kvh, n0, n_end, ld, k_s, v_s, valid_s);
    __syncthreads();  // the tile (K, V) is staged before any warp reads it
    const bool key_ok = valid_s[lane];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      float s = dot(q_s + (warp * kRowsPerWarp + rr) * hd, k_s + lane * ld, hd);
      s = key_ok ? s : -INFINITY;
      const float m_new = fmaxf(m[rr], warp_max(s));
      const float alpha = exp2f(m[rr] - m_new);
      const float pj = exp2f(s - m_new);
      l[rr] = l[rr] * alpha + warp_sum(pj);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) acc[rr][i] *= alpha;
      for (int j = 0; j < kKeys; ++j) {
        const float pb = __shfl_sync(0xffffffffu, pj, j);
        const float* vr = v_s + j * ld;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < hd) acc[rr][i] = fmaf(pb, vr[d], acc[rr][i]);
        }
      }
      m[rr] = m_new;
    }
  }

  // Each row's 1 / l and lse, in place of l and m (one division and log per row, shared by
  // both stores below). Empty only when nothing was summed (l == 0, no valid key): 0 and
  // -inf; a NaN l (bad inputs) propagates like the reference.
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const bool has = l[rr] != 0.f;
    m[rr] = has ? (m[rr] + log2f(l[rr])) * kLn2 : -INFINITY;
    l[rr] = has ? 1.f / l[rr] : 0.f;
  }
  // Unsplit: out and lse. Split: the same normalised output and lse in fp32 to this split's
  // slice of o_part / lse_part, merged by combine_splits_kernel.
  if (p.kv_splits > 1) {
    const int64_t part0 = c.split * stat_rows(p);
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t r = row0 + warp * kRowsPerWarp + rr;
      if (r >= rows) continue;
      const int64_t part = part0 + stat_index(p, b, G, kvh, r);
      float* o = p.o_part + part * hd;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) o[d] = acc[rr][i] * l[rr];
      }
      if (lane == 0) p.lse_part[part] = m[rr];
    }
    return;
  }
  T* out = static_cast<T*>(p.out);
  const int64_t o_base = row_base(p, p.o_stride, b);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = row0 + warp * kRowsPerWarp + rr;
    if (r >= rows) continue;
    const int64_t off = row_offset(o_base, p.o_stride, G, kvh, r);
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) out[off + d * p.o_stride[3]] = from_float<T>(acc[rr][i] * l[rr]);
    }
    if (lane == 0) p.lse[stat_index(p, b, G, kvh, r)] = m[rr];
  }
}

// The split reductions read their fp32 partials 4 floats (16 bytes) a thread when hd is a
// multiple of 4 and the workspaces are 16-byte aligned (the host op's allocations are),
// else one: the same rule on the host (grid size) and in the kernels. Uniform per launch.
__host__ __device__ __forceinline__ int part_width(const RetrievalParams& p, const float* a, const float* b) {
  const auto al = [](const float* x) { return (reinterpret_cast<uintptr_t>(x) & 15) == 0; };
  return p.hd % 4 == 0 && al(a) && al(b) ? 4 : 1;
}

// `width` fp32 partials at x (one 16-byte load for 4), times w, added to acc.
__device__ __forceinline__ void fma_part(const float* x, int width, float w, float* acc) {
  if (width == 4) {
    const Chunk<float> c = *reinterpret_cast<const Chunk<float>*>(x);
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = fmaf(w, c.v[i], acc[i]);
  } else {
    acc[0] = fmaf(w, *x, acc[0]);
  }
}

// The split forward's partials merged, one thread per (row, 4 dims) of out: rows numbered
// (b * H + h) * T + t over every sequence's T slots (varlen: T = max_seqlen_q; slots at or
// past seq_q_len(b) exit, so rows of no sequence, whose partials no block wrote, stay
// untouched), the partials at stat_row(b, h, t). With
// w_s = exp(lse_s - max_s lse_s), out = sum_s w_s o_s / sum_s w_s and lse = max + log sum_s w_s,
// the splits visited in order 0, 1, ... (the same bits on every run). A split that saw no
// key has lse -inf, so w = 0 and its zeros add nothing; a row no split saw a key of stays 0
// with lse -inf. NaN from any split reaches out and lse: fmaxf skips it in the max, but
// its weight exp(NaN) is NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const RetrievalParams p) {
  const int width = part_width(p, p.o_part, p.o_part);
  const int64_t slots = p.B * p.H * p.T, hd = p.hd, per_row = hd / width;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= slots * per_row) return;
  const int64_t slot = e / per_row;
  const int64_t d0 = (e - slot * per_row) * width;
  const int64_t t = slot % p.T, bh = slot / p.T, h = bh % p.H, b = bh / p.H;
  if (t >= seq_q_len(p, b)) return;
  const int64_t n_stats = stat_rows(p), st = stat_row(p, b, h, t);  // padded: st == slot
  const int splits = static_cast<int>(p.kv_splits);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, p.lse_part[s * n_stats + st]);
  const float m_safe = m == -INFINITY ? 0.f : m;
  float l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < splits; ++s) {
    const int64_t part = s * n_stats + st;
    const float w = exp2f((p.lse_part[part] - m_safe) * kLog2e);
    l += w;
    fma_part(p.o_part + part * hd + d0, width, w, acc);
  }
  const bool has = l != 0.f;
  const float inv = has ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + row_base(p, p.o_stride, b) + t * p.o_stride[1] + h * p.o_stride[2];
#pragma unroll
  for (int i = 0; i < 4; ++i)  // unrolled to 4, not width: acc stays in registers
    if (i < width) out[(d0 + i) * p.o_stride[3]] = from_float<T>(acc[i] * inv);
  if (d0 == 0) p.lse[st] = has ? m_safe + logf(l) : -INFINITY;
}

// __launch_bounds__(128, 4) and (128, 8) below: the 128 and 64 registers these kernels have
// always used (4 blocks of dQ at hd 128 fill an H100's registers as its 49 KB of shared
// memory allow). Stated, ptxas fits the varlen bounds (values loaded from cu_seqlens, live
// across the loops) in them; left to its own heuristics it spilled 4-16 B in bf16 / fp16
// on sm_90 (dQ at 96 registers, dK/dV at 56), as the forward did with its split index.
template <typename T>
__global__ void __launch_bounds__(kThreads, 4) retrieval_bwd_dq_kernel(const RetrievalParams p) {
  PVM_DYNAMIC_SHARED(float, smem);
  PVM_SHARED(int, valid_s, [kKeys]);
  const int hd = static_cast<int>(p.hd), ld = hd + 1;
  float* k_s = smem;
  float* v_s = k_s + kKeys * ld;
  float* q_s = v_s + kKeys * ld;
  float* do_s = q_s + kRowsPerBlock * hd;
  const BlockCoords c = block_coords(p, ceil_div(p.T * (p.H / p.Hkv), kRowsPerBlock), 1);
  const int64_t G = c.G, rows = c.rows, b = c.b;
  const int kvh = c.kvh, warp = c.warp, lane = c.lane;
  const int64_t row0 = c.tile * kRowsPerBlock;
  const float scale_log2 = p.scale * kLog2e;
  if (row0 >= rows) return;  // varlen: past this sequence's rows

  stage_rows(static_cast<const T*>(p.q), p.q_stride, p, b, G, rows, kvh, row0, kRowsPerBlock,
             scale_log2, q_s);
  stage_rows(static_cast<const T*>(p.grad_out), p.o_stride, p, b, G, rows, kvh, row0, kRowsPerBlock,
             1.f, do_s);
  float lse2[kRowsPerWarp], delta[kRowsPerWarp], dq[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = row0 + warp * kRowsPerWarp + rr;
    lse2[rr] = 0.f;
    delta[rr] = 0.f;
    if (r < rows) {
      const int64_t st = stat_index(p, b, G, kvh, r);
      lse2[rr] = p.lse[st] * kLog2e;
      delta[rr] = p.delta[st];
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) dq[rr][i] = 0.f;
  }

  const int64_t n_end = seq_k_len(p, b);
  for (int64_t n0 = 0; n0 < n_end; n0 += kKeys) {
    __syncthreads();  // every warp has read the previous tile (valid_s too) before it is restaged
    stage_keys<T>(p, b, kvh, n0, n_end, ld, k_s, v_s, valid_s);
    __syncthreads();  // the tile (K, V) is staged before any warp reads it
    const bool key_ok = valid_s[lane];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int row_in_block = warp * kRowsPerWarp + rr;
      const bool ok = key_ok && row0 + row_in_block < rows;
      const float s = dot(q_s + row_in_block * hd, k_s + lane * ld, hd);
      const float dp = dot(do_s + row_in_block * hd, v_s + lane * ld, hd);
      const float pj = ok ? exp2f(s - lse2[rr]) : 0.f;
      const float ds = pj * (dp - delta[rr]);
      for (int j = 0; j < kKeys; ++j) {
        const float dsb = __shfl_sync(0xffffffffu, ds, j);
        const float* kr = k_s + j * ld;
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < hd) dq[rr][i] = fmaf(dsb, kr[d], dq[rr][i]);
        }
      }
    }
  }

  T* out = static_cast<T*>(p.dq);
  const int64_t dq_base = row_base(p, p.dq_stride, b);
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = row0 + warp * kRowsPerWarp + rr;
    if (r >= rows) continue;
    const int64_t off = row_offset(dq_base, p.dq_stride, G, kvh, r);
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) out[off + d * p.dq_stride[3]] = from_float<T>(dq[rr][i] * p.scale);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 8) retrieval_bwd_dkdv_kernel(const RetrievalParams p) {
  PVM_DYNAMIC_SHARED(float, smem);
  PVM_SHARED(int, valid_s, [kKeys]);
  const int hd = static_cast<int>(p.hd), ld = hd + 1;
  float* k_s = smem;
  float* v_s = k_s + kKeys * ld;
  float* dk_s = v_s + kKeys * ld;
  float* dv_s = dk_s + kKeys * hd;
  float* q_s = dv_s + kKeys * hd;
  float* do_s = q_s + kRowsPerIter * hd;
  float* p_s = do_s + kRowsPerIter * hd;
  float* ds_s = p_s + kRowsPerIter * kKeys;
  const BlockCoords c = block_coords(p, ceil_div(p.Nv, kKeys), p.row_splits);
  const int64_t G = c.G, rows = c.rows, b = c.b;
  const int kvh = c.kvh, warp = c.warp, lane = c.lane;
  const int64_t n0 = c.tile * kKeys;
  const int64_t n_end = seq_k_len(p, b), n_store = key_store_end(p, b);
  const float scale_log2 = p.scale * kLog2e;
  // Varlen: the grid covers max_seqlen_k; a tile past this sequence's keys stores nothing.
  if (n0 >= n_store) return;

  // dK/dV accumulate in shared memory; each thread zeroes, updates and finally writes the
  // same elements e (one mapping throughout), so those need no barrier of their own.
  stage_keys<T>(p, b, kvh, n0, n_end, ld, k_s, v_s, valid_s);
  for (int e = threadIdx.x; e < kKeys * hd; e += blockDim.x) dk_s[e] = dv_s[e] = 0.f;

  // This split's rows (unsplit: split_rows >= T * G, all of them; the loop ends at the
  // sequence's rows). A tile wholly past this sample's last valid key has zero gradient:
  // skip the rows (its partials are zeros).
  const int64_t r_begin = c.split * p.split_rows;
  const int64_t rows_end = n0 < n_end ? min64(rows, r_begin + p.split_rows) : 0;
  for (int64_t r0 = r_begin; r0 < rows_end; r0 += kRowsPerIter) {
    stage_rows(static_cast<const T*>(p.q), p.q_stride, p, b, G, rows_end, kvh, r0, kRowsPerIter, 1.f, q_s);
    stage_rows(static_cast<const T*>(p.grad_out), p.o_stride, p, b, G, rows_end, kvh, r0, kRowsPerIter, 1.f,
               do_s);
    __syncthreads();  // the rows (q, dO), and the first time the keys (K, V), are staged before use
    for (int rr = warp; rr < kRowsPerIter; rr += kWarps) {
      const int64_t r = r0 + rr;
      const bool row_ok = r < rows_end;
      float lse2 = 0.f, delta = 0.f;
      if (row_ok) {
        const int64_t st = stat_index(p, b, G, kvh, r);
        lse2 = p.lse[st] * kLog2e;
        delta = p.delta[st];
      }
      const float s = dot(q_s + rr * hd, k_s + lane * ld, hd) * scale_log2;
      const float dp = dot(do_s + rr * hd, v_s + lane * ld, hd);
      const float pj = (row_ok && valid_s[lane]) ? exp2f(s - lse2) : 0.f;
      p_s[rr * kKeys + lane] = pj;
      ds_s[rr * kKeys + lane] = pj * (dp - delta);
    }
    __syncthreads();  // P and dS of every row are written before the dK/dV update reads them
    // Each thread owns fixed (key, dim) elements of dK/dV: no atomics, deterministic.
    for (int e = threadIdx.x; e < kKeys * hd; e += blockDim.x) {
      const int j = e / hd, d = e - j * hd;
      float a = dv_s[e], c = dk_s[e];
#pragma unroll
      for (int rr = 0; rr < kRowsPerIter; ++rr) {
        a = fmaf(p_s[rr * kKeys + j], do_s[rr * hd + d], a);
        c = fmaf(ds_s[rr * kKeys + j], q_s[rr * hd + d], c);
      }
      dv_s[e] = a;
      dk_s[e] = c;
    }
    __syncthreads();  // the update has read q_s, dO_s, P, dS before the next rows overwrite them
  }

  // Unsplit: dk and dv. Split: fp32 partials in this split's slice of dk_part / dv_part
  // (contiguous [key_rows, Hkv, hd] each), summed by sum_dkdv_splits_kernel. Keys up to
  // n_store only (varlen: this sequence's).
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  const bool split = p.row_splits > 1;
  const int64_t part0 = c.split * key_rows(p) + key_row(p, b, 0);
  const int64_t dkv_base = key_base(p, p.dkv_stride, b);
  for (int e = threadIdx.x; e < kKeys * hd; e += blockDim.x) {
    const int j = e / hd, d = e - j * hd;
    const int64_t n = n0 + j;
    if (n >= n_store) continue;
    if (split) {
      const int64_t off = ((part0 + n) * p.Hkv + kvh) * hd + d;
      p.dk_part[off] = dk_s[e] * p.scale;
      p.dv_part[off] = dv_s[e];
      continue;
    }
    const int64_t off = dkv_base + n * p.dkv_stride[1] + kvh * p.dkv_stride[2] + d * p.dkv_stride[3];
    dk[off] = from_float<T>(dk_s[e] * p.scale);
    dv[off] = from_float<T>(dv_s[e]);
  }
}

// dk and dv of a row-split backward: each element's partials summed in split order
// 0, 1, ... (fixed, so the same bits on every run; no atomics), then cast. One thread per
// 4 elements of [B, Nv, Hkv, hd] (one, if hd is not a multiple of 4): 4 consecutive dims
// of one key. Varlen: Nv = max_seqlen_k slots per sequence; slots at or past seq_k_len(b)
// exit (their partials were never written: another sequence's keys, or none), the others
// read key_row(b, n) of the partials.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_dkdv_splits_kernel(const RetrievalParams p) {
  const int width = part_width(p, p.dk_part, p.dv_part);
  const int64_t slots = p.B * p.Nv * p.Hkv * p.hd;
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * width;
  if (e >= slots) return;
  const int64_t d = e % p.hd, key = e / p.hd, kvh = key % p.Hkv, bn = key / p.Hkv;
  const int64_t n = bn % p.Nv, b = bn / p.Nv;
  if (n >= key_store_end(p, b)) return;
  const int64_t numel = key_rows(p) * p.Hkv * p.hd;
  const int64_t at = (key_row(p, b, n) * p.Hkv + kvh) * p.hd + d;  // padded: at == e
  float dk[4] = {0.f, 0.f, 0.f, 0.f}, dv[4] = {0.f, 0.f, 0.f, 0.f};
  const int splits = static_cast<int>(p.row_splits);
  for (int s = 0; s < splits; ++s) {
    fma_part(p.dk_part + s * numel + at, width, 1.f, dk);
    fma_part(p.dv_part + s * numel + at, width, 1.f, dv);
  }
  const int64_t off = key_base(p, p.dkv_stride, b) + n * p.dkv_stride[1] + kvh * p.dkv_stride[2] +
                      d * p.dkv_stride[3];
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // unrolled to 4, not width: dk and dv stay in registers
    if (i >= width) break;
    static_cast<T*>(p.dk)[off + i * p.dkv_stride[3]] = from_float<T>(dk[i]);
    static_cast<T*>(p.dv)[off + i * p.dkv_stride[3]] = from_float<T>(dv[i]);
  }
}

int64_t row_tiles(const RetrievalParams& p) { return ceil_div(p.T * (p.H / p.Hkv), kRowsPerBlock); }

// One launch of `kernel` over `blocks` blocks on gridDim.x. More than 2^31 - 1 blocks would
// need more memory than any GPU has (>= 2^36 query rows); refused rather than wrapped.
cudaError_t launch_blocks(void (*kernel)(RetrievalParams), int64_t blocks, size_t smem, cudaStream_t stream,
                          const RetrievalParams& p) {
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  return launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), kThreads, smem, stream, p);
}

// A split plan the kernels can run: its splits cover the loop (splits x per-split >= the
// items) with the workspaces given. Anything else (e.g. splits set without partials) is
// refused before a launch rather than read as a null pointer.
bool split_ok(int64_t splits, int64_t per_split, int64_t items, const float* a, const float* b) {
  return splits <= kRetrievalMaxSplits && per_split > 0 && splits * per_split >= items && a && b;
}

// p with an unsplit forward (kv_splits <= 1) / dK/dV (row_splits <= 1) made explicit:
// one split of every key / row. The unsplit forward's split ends past any key (2^62, not
// Nv), so seq_k_len's clamp stays the only bound on the keys, as before splits.
RetrievalParams normalised(const RetrievalParams& p) {
  RetrievalParams q = p;
  if (q.kv_splits <= 1) {
    q.kv_splits = 1;
    q.split_keys = int64_t{1} << 62;
  }
  if (q.row_splits <= 1) {
    q.row_splits = 1;
    q.split_rows = q.T * (q.H / q.Hkv);
  }
  return q;
}

}  // namespace

RetrievalGrid retrieval_grid(const RetrievalParams& p, DType dtype) {
  const RetrievalParams q = normalised(p);
  const int64_t bh = q.B * q.Hkv;
  RetrievalGrid g;
  g.fwd = retrieval_fwd_tensor_cores(q, dtype) ? retrieval_tc_fwd_blocks(q) : row_tiles(q) * q.kv_splits * bh;
  const int64_t o_width = part_width(q, q.o_part, q.o_part), dkv_width = part_width(q, q.dk_part, q.dv_part);
  g.combine = q.kv_splits > 1 ? ceil_div(q.B * q.H * q.T * (q.hd / o_width), kThreads) : 0;
  const bool tc_bwd = retrieval_bwd_tensor_cores(q, dtype);  // retrieval_tc_bwd.cu's 64 x 64 blocks
  g.dq = tc_bwd ? ceil_div(q.T * (q.H / q.Hkv), kRetrievalTcRowTile) * bh : row_tiles(q) * bh;
  g.dkdv = ceil_div(q.Nv, tc_bwd ? kRetrievalTcKeyTile : kKeys) * q.row_splits * bh;
  g.dkdv_sum = q.row_splits > 1 ? ceil_div(q.B * q.Nv * q.Hkv * (q.hd / dkv_width), kThreads) : 0;
  return g;
}

cudaError_t retrieval_fwd(const RetrievalParams& p, DType dtype, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (2 * kKeys * (p.hd + 1) + kRowsPerBlock * p.hd);
  const RetrievalParams q = normalised(p);
  if (q.kv_splits > 1 && !split_ok(q.kv_splits, q.split_keys, q.Nv, q.o_part, q.lse_part))
    return cudaErrorInvalidValue;
  const RetrievalGrid g = retrieval_grid(q, dtype);
  // bf16 / fp16 in 16-byte rows, hd a multiple of 16 up to 128: the tensor-core kernel
  // (retrieval_tc_fwd.cu; the rule, retrieval_fwd_tensor_cores, is the split plan's too).
  const bool tc = retrieval_fwd_tensor_cores(q, dtype);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t err = tc ? retrieval_tc_fwd(q, dtype, stream)
                         : launch_blocks(retrieval_fwd_kernel<T>, g.fwd, smem, stream, q);
    if (err != cudaSuccess || q.kv_splits == 1) return err;
    return launch_blocks(combine_splits_kernel<T>, g.combine, 0, stream, q);
  });
}

cudaError_t retrieval_bwd(const RetrievalParams& p, DType dtype, cudaStream_t stream) {
  const size_t smem_dq = sizeof(float) * (2 * kKeys * (p.hd + 1) + 2 * kRowsPerBlock * p.hd);
  const size_t smem_dkdv = sizeof(float) * (2 * kKeys * (p.hd + 1) + 2 * kKeys * p.hd +
                                            2 * kRowsPerIter * p.hd + 2 * kRowsPerIter * kKeys);
  const RetrievalParams q = normalised(p);
  if (q.row_splits > 1 && !split_ok(q.row_splits, q.split_rows, q.T * (q.H / q.Hkv), q.dk_part, q.dv_part))
    return cudaErrorInvalidValue;
  const RetrievalGrid g = retrieval_grid(q, dtype);
  // bf16 / fp16 in 16-byte rows, hd a multiple of 16 up to 128: the tensor-core dQ and dK/dV
  // (retrieval_tc_bwd.cu; the rule, retrieval_bwd_tensor_cores, is the split plan's too),
  // with the same row-split partials, summed below.
  const bool tc = retrieval_bwd_tensor_cores(q, dtype);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (tc) {
      const cudaError_t err = retrieval_bwd_tc(q, dtype, stream);
      if (err != cudaSuccess || q.row_splits == 1) return err;
      return launch_blocks(sum_dkdv_splits_kernel<T>, g.dkdv_sum, 0, stream, q);
    }
    cudaError_t err = launch_blocks(retrieval_bwd_dq_kernel<T>, g.dq, smem_dq, stream, q);
    if (err != cudaSuccess) return err;
    err = launch_blocks(retrieval_bwd_dkdv_kernel<T>, g.dkdv, smem_dkdv, stream, q);
    if (err != cudaSuccess || q.row_splits == 1) return err;
    return launch_blocks(sum_dkdv_splits_kernel<T>, g.dkdv_sum, 0, stream, q);
  });
}

}  // namespace cuda
}  // namespace pvm
