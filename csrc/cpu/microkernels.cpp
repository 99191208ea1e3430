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

namespace {

// The row loops are written on GCC/Clang vector types: 8 floats, one AVX register on the
// x86-64-v3 clone and two SSE registers on the generic one. Written as plain loops, GCC
// left them scalar (vmaxss / vfmadd132ss in the v3 clone's disassembly): it does not
// vectorise a float max without -ffast-math, nor this exp with its bit-cast.
// (GCC's -Wpsabi note about passing 32-byte vectors concerns calls across objects built
// with and without AVX; these helpers are internal and inlined.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
constexpr int kVec = 8;
constexpr float kNegInf = -__builtin_inff();

inline f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }

// exp(v) for 8 lanes: arguments below -87.3 (including -inf, masked keys) give exactly 0;
// NaN stays NaN. Range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial: ~1 ulp.
inline f8 exp8(f8 v) {
  const f8 lo = splat(-87.3f), hi = splat(88.3f);
  const f8 c = v < lo ? lo : (v > hi ? hi : v);
  // Nearest integer by the 1.5 * 2^23 trick (|c log2 e| < 128 stays exact): roundf has no
  // SSE/AVX instruction, and GCC called libm per element (3.8% of a prefill forward).
  const f8 magic = splat(12582912.f);
  const f8 k = (c * splat(1.44269504088896341f) + magic) - magic;
  const f8 r = (c - k * splat(0.693359375f)) - k * splat(-2.12194440e-4f);  // ln 2 in two
  // Taylor terms to r^6: |r| <= ln2/2 keeps the truncation below float epsilon.
  f8 poly = splat(1.f / 720.f);
  poly = poly * r + splat(1.f / 120.f);
  poly = poly * r + splat(1.f / 24.f);
  poly = poly * r + splat(1.f / 6.f);
  poly = poly * r + splat(0.5f);
  poly = poly * r + splat(1.f);
  poly = poly * r + splat(1.f);
  // scale by 2^k through the exponent bits
  const i8 bits = (__builtin_convertvector(k, i8) + 127) << 23;
  return v < lo ? splat(0.f) : poly * (f8)bits;  // a vector cast reinterprets the bits
}

// Tails (n % 8 elements) go through the same 8-lane code on a padded copy, so every
// element takes one formula.
template <class F>
inline void tail8(float* s, int64_t n, F&& f) {
  if (n <= 0) return;
  float buf[kVec];
  for (int t = 0; t < kVec; ++t) buf[t] = t < n ? s[t] : kNegInf;
  f(buf);
  for (int64_t t = 0; t < n; ++t) s[t] = buf[t];
}

inline float hsum(f8 v) {
  float x = 0.f;
  for (int t = 0; t < kVec; ++t) x += v[t];
  return x;
}

}  // namespace

PVM_MULTIVERSION
void exp_inplace(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) store8(x + j, exp8(load8(x + j)));
  tail8(x + j, n - j, [](float* b) { store8(b, exp8(load8(b))); });
}

PVM_MULTIVERSION
float add_bias_max(float* s, const float* bias, int64_t n) {
  f8 vmax = splat(kNegInf), nan = splat(0.f);
  auto step = [&](float* p, const float* q) {
    const f8 v = load8(p) + load8(q);
    store8(p, v);
    nan += v != v ? splat(1.f) : splat(0.f);  // counted apart: a max instruction drops NaN
    vmax = v > vmax ? v : vmax;
  };
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) step(s + j, bias + j);
  if (j < n) {
    float pad[kVec];  // missing bias lanes are -inf: the padded lanes add nothing to the max
    for (int t = 0; t < kVec; ++t) pad[t] = j + t < n ? bias[j + t] : kNegInf;
    tail8(s + j, n - j, [&](float* b) { step(b, pad); });
  }
  float m = kNegInf;
  for (int t = 0; t < kVec; ++t) m = vmax[t] > m ? vmax[t] : m;
  return hsum(nan) != 0.f ? __builtin_nanf("") : m;
}

PVM_MULTIVERSION
float exp_shifted_sum(float* s, float shift, int64_t n) {
  f8 sum = splat(0.f);
  const f8 sh = splat(shift);
  auto step = [&](float* p) {
    const f8 e = exp8(load8(p) - sh);
    store8(p, e);
    sum += e;
  };
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) step(s + j);
  tail8(s + j, n - j, step);  // padded lanes are -inf: exp gives 0, the sum is unchanged
  return hsum(sum);
}

}  // namespace cpu
}  // namespace pvm
