// Small float GEMM kernels for the CPU retrieval: the inner loops are contiguous FMA
// streams over the output row, so they vectorise without -ffast-math. Built once per
// instruction set (x86-64-v3 = AVX2 + FMA, and a generic fallback) and chosen at load
// time, so the library stays portable while using the wide units where present.
#pragma once
#include <cstdint>

namespace pvm {
namespace cpu {

// C[M][N] += A[M][K] * B[K][N]   (row-major, leading dimensions lda, ldb, ldc)
void gemm_nn_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t M, int64_t K, int64_t N);

// C[M][N] += A * B^T with B stored [N][K] (dot-product form: eight partial sums)
void gemm_nt_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t M, int64_t K, int64_t N);

// C[M][N] += A^T * B with A stored [K][M] and B [K][N]
void gemm_tn_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t M, int64_t K, int64_t N);

// x[i] = exp(x[i]) in place; arguments below -87.3 (including -inf, masked keys) give
// exactly 0. Range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial: ~1 ulp,
// written branch-free so it vectorises (std::exp does not).
void exp_inplace(float* x, int64_t n);

// s[j] += bias[j] (0 for a valid key, -inf for a masked one); returns the largest s[j],
// NaN if any is NaN (a NaN score poisons its row, as in the reference), -inf if all are.
float add_bias_max(float* s, const float* bias, int64_t n);

// s[j] = exp(s[j] - shift) (as exp_inplace); returns their sum, in a fixed order.
float exp_shifted_sum(float* s, float shift, int64_t n);

}  // namespace cpu
}  // namespace pvm
