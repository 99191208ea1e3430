// Merge on CUDA: out = ffn + keep * gate * rms(e) and its backward, one block per row.
// A row (D = 4096 at 8B) is 16 elements per thread; the second pass re-reads it from L1/L2.
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/dtype.cuh"
#include "cuda/launch.h"

namespace pvm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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
  float ss = 0.f;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
    const float x = to_float(e[d]);
    ss = fmaf(x, x, ss);
  }
  const float rstd = 1.f / sqrtf(block_sum(ss) / static_cast<float>(p.D) + p.eps);
  const bool keep = p.keep == nullptr || p.keep[row];
  const float mul = *p.gate * rstd;
  const T* ffn = p.ffn ? static_cast<const T*>(p.ffn) + row * p.ffn_row : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.out_row;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
    float u = keep ? to_float(e[d]) * mul : 0.f;  // exactly 0 when silenced, even for NaN
    if (ffn) u += to_float(ffn[d]);
    out[d] = from_float<T>(u);
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
  const float rstd = p.rstd[row];
  float gn = 0.f;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) gn = fmaf(to_float(g[d]), to_float(e[d]) * rstd, gn);
  gn = block_sum(gn);
  const float mean_gn = gn / static_cast<float>(p.D), gr = *p.gate * rstd;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads)
    de[d] = from_float<T>(gr * (to_float(g[d]) - to_float(e[d]) * rstd * mean_gn));
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
