// Merge on CUDA: out = ffn + keep * gate * rms(e) and its backward, one block per row.
// A row (D = 4096 at 8B) is 16 elements per thread, two 16-byte chunks in bf16; the second
// pass re-reads it from L1/L2.
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/dtype.cuh"
#include "cuda/launch.h"

namespace pvm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// A row read and written in 16-byte chunks (Chunk, dtype.cuh: 8 bf16/fp16 or 4 fp32) when
// D is a multiple of the chunk and the row pointers are 16-byte aligned, else one element
// at a time. The test is uniform over the block (row pointers and D only), so both paths
// reach block_sum together. A merge moves 3 bytes per byte of work, so load width is what
// its time is made of (2-byte loads issue 8x the instructions).
template <typename T>
__device__ __forceinline__ bool use_chunks(int64_t D, const void* a, const void* b, const void* c) {
  return D % Chunk<T>::kSize == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

// sum_d a[d] * b[d] over this thread's share of the row.
template <typename T>
__device__ __forceinline__ float row_dot(const T* a, const T* b, int64_t D, bool chunks) {
  float acc = 0.f;
  if (chunks) {
    const auto* ac = reinterpret_cast<const Chunk<T>*>(a);
    const auto* bc = reinterpret_cast<const Chunk<T>*>(b);
    for (int64_t c = threadIdx.x; c < D / Chunk<T>::kSize; c += kThreads) {
      const Chunk<T> x = ac[c], y = bc[c];
      for (int j = 0; j < Chunk<T>::kSize; ++j) acc = fmaf(to_float(x.v[j]), to_float(y.v[j]), acc);
    }
  } else {
    for (int64_t d = threadIdx.x; d < D; d += kThreads) acc = fmaf(to_float(a[d]), to_float(b[d]), acc);
  }
  return acc;
}

// Sum over the block; every thread gets the result. At most one call per block: a second
// call would first need a barrier, or a warp running ahead would overwrite `partial`
// before a slower one has read it (the kernels do nothing with shared memory after it).
__device__ float block_sum(float v) {
  PVM_SHARED(float, partial, [kThreads / 32]);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();  // every warp's partial is written before any warp reads them
  v = lane < kThreads / 32 ? partial[lane] : 0.f;
  return warp_sum(v);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_fwd_kernel(const MergeParams p) {
  const int64_t row = flat_block_index();
  if (row >= p.N) return;  // the unused tail of a folded grid
  const T* e = static_cast<const T*>(p.e) + row * p.e_row;
  const T* ffn = p.ffn ? static_cast<const T*>(p.ffn) + row * p.ffn_row : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.out_row;
  const bool chunks = use_chunks<T>(p.D, e, ffn, out);
  const float ss = row_dot(e, e, p.D, chunks);
  const float rstd = 1.f / sqrtf(block_sum(ss) / static_cast<float>(p.D) + p.eps);
  const bool keep = p.keep == nullptr || p.keep[row];
  const float mul = *p.gate * rstd;
  if (chunks) {
    constexpr int kSize = Chunk<T>::kSize;
    const auto* ec = reinterpret_cast<const Chunk<T>*>(e);
    const auto* fc = reinterpret_cast<const Chunk<T>*>(ffn);
    auto* oc = reinterpret_cast<Chunk<T>*>(out);
    for (int64_t c = threadIdx.x; c < p.D / kSize; c += kThreads) {
      const Chunk<T> x = ec[c];
      Chunk<T> f, o;
      if (ffn) f = fc[c];
      for (int j = 0; j < kSize; ++j) {
        float u = keep ? to_float(x.v[j]) * mul : 0.f;  // exactly 0 when silenced, even for NaN
        if (ffn) u += to_float(f.v[j]);
        o.v[j] = from_float<T>(u);
      }
      oc[c] = o;
    }
  } else {
    for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
      float u = keep ? to_float(e[d]) * mul : 0.f;
      if (ffn) u += to_float(ffn[d]);
      out[d] = from_float<T>(u);
    }
  }
  if (threadIdx.x == 0) p.rstd[row] = rstd;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_bwd_kernel(const MergeParams p) {
  const int64_t row = flat_block_index();
  if (row >= p.N) return;
  T* de = static_cast<T*>(p.de) + row * p.de_row;
  if (p.keep != nullptr && !p.keep[row]) {  // uniform over the block: no sync is skipped
    for (int64_t d = threadIdx.x; d < p.D; d += kThreads) de[d] = from_float<T>(0.f);
    if (threadIdx.x == 0) p.dgate_row[row] = 0.f;
    return;
  }
  const T* g = static_cast<const T*>(p.grad) + row * p.grad_row;
  const T* e = static_cast<const T*>(p.e) + row * p.e_row;
  const bool chunks = use_chunks<T>(p.D, g, e, de);
  const float rstd = p.rstd[row];
  const float gn = block_sum(row_dot(g, e, p.D, chunks)) * rstd;
  const float mean_gn = gn / static_cast<float>(p.D), gr = *p.gate * rstd;
  if (chunks) {
    constexpr int kSize = Chunk<T>::kSize;
    const auto* gc = reinterpret_cast<const Chunk<T>*>(g);
    const auto* ec = reinterpret_cast<const Chunk<T>*>(e);
    auto* dc = reinterpret_cast<Chunk<T>*>(de);
    for (int64_t c = threadIdx.x; c < p.D / kSize; c += kThreads) {
      const Chunk<T> x = gc[c], y = ec[c];
      Chunk<T> o;
      for (int j = 0; j < kSize; ++j)
        o.v[j] = from_float<T>(gr * (to_float(x.v[j]) - to_float(y.v[j]) * rstd * mean_gn));
      dc[c] = o;
    }
  } else {
    for (int64_t d = threadIdx.x; d < p.D; d += kThreads)
      de[d] = from_float<T>(gr * (to_float(g[d]) - to_float(e[d]) * rstd * mean_gn));
  }
  if (threadIdx.x == 0) p.dgate_row[row] = gn;
}

}  // namespace

cudaError_t merge_fwd(const MergeParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch_kernel(merge_fwd_kernel<decltype(tag)>, flat_grid(p.N), kThreads, 0, stream, p);
  });
}

cudaError_t merge_bwd(const MergeParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch_kernel(merge_bwd_kernel<decltype(tag)>, flat_grid(p.N), kThreads, 0, stream, p);
  });
}

}  // namespace cuda
}  // namespace pvm
