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

// Where packed row r (token r / G, query head kvh * G + r % G) of a sequence lives in a
// q-like tensor with strides s, from the sequence's base = row_base(p, s, b) (pvm_params.h:
// b * s[0] padded, its first packed row * s[1] varlen), read once by the caller.
__device__ __forceinline__ int64_t row_offset(int64_t base, const int64_t* s, int64_t G, int kvh,
                                              int64_t r) {
  return base + (r / G) * s[1] + (kvh * G + r % G) * s[2];
}

// lse / delta / forward-partial index of packed row r of sequence b: stat_row (padded
// (b * H + head) * T + t, varlen head * total_q + q_begin + t).
__device__ __forceinline__ int64_t stat_index(const RetrievalParams& p, int64_t b, int64_t G,
                                              int kvh, int64_t r) {
  return stat_row(p, b, kvh * G + r % G, r / G);
}

// One past the last key whose gradient a dK/dV launch stores for sequence b: padded Nv (keys
// past kv_len get their zeros written: dk / dv are not zero-filled), varlen seq_k_len (keys
// past it belong to the next sequence, or to none: never written; the op zero-fills them).
__device__ __forceinline__ int64_t key_store_end(const RetrievalParams& p, int64_t b) {
  return is_varlen(p) ? seq_k_len(p, b) : p.Nv;
}

// Key n of sequence b is valid: n < n_end (seq_k_len: kv_len clamped, or the varlen
// sequence's key count) and not masked out (padded only: varlen has no key_mask).
__device__ __forceinline__ bool key_valid(const RetrievalParams& p, int64_t b, int64_t n,
                                          int64_t n_end) {
  return n < n_end && (!p.key_mask || p.key_mask[b * p.mask_stride[0] + n * p.mask_stride[1]]);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace cuda
}  // namespace pvm
