// See microkernels.h. No torch headers: this file compiles in about a second.
#include "cpu/microkernels.h"

#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PVM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PVM_MULTIVERSION
#endif

namespace pvm {
namespace cpu {

// Four output rows per pass: each B row is loaded once for four FMA streams.
PVM_MULTIVERSION
void gemm_nn_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t M, int64_t K, int64_t N) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    float* __restrict c0 = C + i * ldc;
    float* __restrict c1 = c0 + ldc;
    float* __restrict c2 = c1 + ldc;
    float* __restrict c3 = c2 + ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a0 = A[i * lda + k], a1 = A[(i + 1) * lda + k];
      const float a2 = A[(i + 2) * lda + k], a3 = A[(i + 3) * lda + k];
      const float* __restrict b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) {
        c0[j] += a0 * b[j];
        c1[j] += a1 * b[j];
        c2[j] += a2 * b[j];
        c3[j] += a3 * b[j];
      }
    }
  }
  for (; i < M; ++i) {
    float* __restrict c = C + i * ldc;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * lda + k];
      const float* __restrict b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

PVM_MULTIVERSION
void gemm_nt_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t M, int64_t K, int64_t N) {
  for (int64_t i = 0; i < M; ++i) {
    const float* __restrict a = A + i * lda;
    for (int64_t j = 0; j < N; ++j) {
      const float* __restrict b = B + j * ldb;
      float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int u = 0; u < 8; ++u) part[u] += a[k + u] * b[k + u];
      float sum = 0.f;
      for (; k < K; ++k) sum += a[k] * b[k];
      for (int u = 0; u < 8; ++u) sum += part[u];
      C[i * ldc + j] += sum;
    }
  }
}

PVM_MULTIVERSION
void gemm_tn_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, int64_t M, int64_t K, int64_t N) {
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict b = B + k * ldb;
    for (int64_t i = 0; i < M; ++i) {
      const float a = A[k * lda + i];
      if (a == 0.f) continue;  // masked keys / silenced rows contribute nothing
      float* __restrict c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

PVM_MULTIVERSION
void exp_inplace(float* x, int64_t n) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 split in two
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float c = v < -87.3f ? -87.3f : (v > 88.3f ? 88.3f : v);
    const float k = __builtin_roundf(c * kLog2e);
    const float r = (c - k * kLn2Hi) - k * kLn2Lo;
    // Taylor terms to r^6: |r| <= ln2/2 keeps the truncation below float epsilon.
    float poly = 1.f / 720.f;
    poly = poly * r + 1.f / 120.f;
    poly = poly * r + 1.f / 24.f;
    poly = poly * r + 1.f / 6.f;
    poly = poly * r + 0.5f;
    poly = poly * r + 1.f;
    poly = poly * r + 1.f;
    // scale by 2^k through the exponent bits
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float two_k;
    std::memcpy(&two_k, &bits, sizeof(two_k));
    x[i] = v < -87.3f ? 0.f : poly * two_k;
  }
}

}  // namespace cpu
}  // namespace pvm
