// Device helpers shared by the retrieval kernels (retrieval_kernels.cu, retrieval_tc_fwd.cu,
// retrieval_tc_bwd.cu): constants, where a packed row r = t * G + g lives, its lse / partial
// index, and which keys of a sample are valid. Helpers whose arithmetic differs between the
// kernels (32-bit row math, block coordinates) stay in their files.
#pragma once
#include <cstdint>

#include "cuda/compat.cuh"
#include "pvm_params.h"

namespace pvm {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegBig = -1.0e30f;               // finite running-max start: no inf - inf

// Where packed row r of sample b, KV head kvh lives in a [B, T, H, hd] tensor with strides
// s, and its lse / partial index ((b * H + head) * T + t).
__device__ __forceinline__ int64_t row_offset(const int64_t* s, int64_t b, int64_t G, int kvh,
                                              int64_t r) {
  return b * s[0] + (r / G) * s[1] + (kvh * G + r % G) * s[2];
}

__device__ __forceinline__ int64_t stat_index(const RetrievalParams& p, int64_t b, int64_t G,
                                              int kvh, int64_t r) {
  return (b * p.H + kvh * G + r % G) * p.T + r / G;
}

// One past the last key of sample b: kv_len[b] clamped to [0, Nv] (above Nv means every
// key, 0 or below none), so no kv_len can make a kernel read past the keys.
__device__ __forceinline__ int64_t key_end(const RetrievalParams& p, int64_t b) {
  if (!p.kv_len) return p.Nv;
  const int64_t n = p.kv_len[b];
  return n < 0 ? 0 : (n > p.Nv ? p.Nv : n);
}

__device__ __forceinline__ bool key_valid(const RetrievalParams& p, int64_t b, int64_t n,
                                          int64_t n_end) {
  return n < n_end && (!p.key_mask || p.key_mask[b * p.mask_stride[0] + n * p.mask_stride[1]]);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace cuda
}  // namespace pvm
