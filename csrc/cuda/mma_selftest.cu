// The tensor-core wrappers of mma.cuh used the way a kernel uses them (mma_selftest.h):
// one warp loads A, B and B^T (16 x 16 each) into shared memory with cp.async in three
// commit groups, waits for them one group at a time, reads the mma fragments with ldmatrix
// (.x4, .x2 or .x1; B both with .trans from B and without from B^T) and computes
// D = A B + C twice (two n8 tiles each). It also writes A back from its fragment (unpack2)
// and D rounded by pack2. The fragment coordinates below are this kernel's own reading of
// the PTX layouts (mma.cuh); the emulator has its own (csrc/emu/cuemu_mma.cpp), and both
// are checked against CuTe's and a float64 matmul by tests/test_mma_layouts.py.
#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/mma.cuh"
#include "cuda/mma_selftest.h"

namespace pvm {
namespace cuda {
namespace {

template <typename T>
struct alignas(16) Tiles {
  T a[16][16];
  T b[16][16];   // [k][n]
  T bt[16][16];  // [n][k]
};

// A's fragment (a[0..3]) from the row-major 16 x 16 tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T (*tile)[16], int ldm, int lane) {
  if (ldm == 4) {
    ldmatrix_x4(a, &tile[lane % 16][8 * (lane / 16)]);
  } else if (ldm == 2) {  // matrices {rows 0-7, 8-15} x cols 0-7, then x cols 8-15
    ldmatrix_x2(a, &tile[lane % 16][0]);
    ldmatrix_x2(a + 2, &tile[lane % 16][8]);
  } else {
    for (int j = 0; j < 4; ++j) ldmatrix_x1(a + j, &tile[8 * (j % 2) + lane % 8][8 * (j / 2)]);
  }
}

// B's fragments of the two n8 tiles (b[nt][0..1]) from the row-major K x N tile, .trans.
template <typename T>
__device__ __forceinline__ void load_b_trans(uint32_t b[2][2], const T (*tile)[16], int ldm, int lane) {
  if (ldm == 4) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, &tile[lane % 16][8 * (lane / 16)]);
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
  } else if (ldm == 2) {
    for (int nt = 0; nt < 2; ++nt) ldmatrix_x2_trans(b[nt], &tile[lane % 16][8 * nt]);
  } else {
    for (int nt = 0; nt < 2; ++nt)
      for (int h = 0; h < 2; ++h) ldmatrix_x1_trans(&b[nt][h], &tile[8 * h + lane % 8][8 * nt]);
  }
}

// The same fragments from the row-major N x K tile (B transposed), without .trans.
template <typename T>
__device__ __forceinline__ void load_bt(uint32_t b[2][2], const T (*tile)[16], int ldm, int lane) {
  if (ldm == 4) {
    uint32_t r[4];
    ldmatrix_x4(r, &tile[lane % 8 + 8 * (lane / 16)][8 * ((lane / 8) % 2)]);
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
  } else if (ldm == 2) {
    for (int nt = 0; nt < 2; ++nt) ldmatrix_x2(b[nt], &tile[8 * nt + lane % 8][8 * ((lane / 8) % 2)]);
  } else {
    for (int nt = 0; nt < 2; ++nt)
      for (int h = 0; h < 2; ++h) ldmatrix_x1(&b[nt][h], &tile[8 * nt + lane % 8][8 * h]);
  }
}

// D (16 x 16, fp32) = A B + C from A's fragment and B's two n8 fragments; with d16, also D
// rounded to T, two accumulator values per 32-bit store (pack2).
template <typename T>
__device__ __forceinline__ void multiply(const uint32_t a[4], const uint32_t b[2][2], const float* c, float* d,
                                         uint32_t* d16, int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 2; ++nt) {
    float acc[4];  // acc[i] is D[g + 8 (i / 2)][8 nt + 2t + i % 2]
    for (int i = 0; i < 4; ++i) acc[i] = c ? c[(g + 8 * (i / 2)) * 16 + 8 * nt + 2 * t + i % 2] : 0.f;
    mma_m16n8k16<T>(acc, a, b[nt]);
    for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 16 + 8 * nt + 2 * t + i % 2] = acc[i];
    if (d16) {
      d16[(g * 16 + 8 * nt + 2 * t) / 2] = pack2<T>(acc[0], acc[1]);
      d16[((g + 8) * 16 + 8 * nt + 2 * t) / 2] = pack2<T>(acc[2], acc[3]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32) mma_selftest_kernel(MmaSelftestParams p) {
  PVM_SHARED(Tiles<T>, sm, [1]);
  Tiles<T>& s = sm[0];
  const int lane = threadIdx.x;
  const int g = lane / 4, t = lane % 4;

  // 32 chunks of 16 bytes per tile: lane l copies row l / 2, columns 8 * (l % 2) .. + 7.
  const int row = lane / 2, col = 8 * (lane % 2);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const T* bt = static_cast<const T*>(p.bt);
  const bool a_in = row < p.a_rows;
  cp_async_16(&s.a[row][col], a_in ? a + row * 16 + col : a, a_in);  // rows past a_rows: zeros
  cp_async_commit();
  cp_async_16(&s.b[row][col], b + row * 16 + col, true);
  cp_async_commit();
  cp_async_16(&s.bt[row][col], bt + row * 16 + col, true);
  cp_async_commit();

  uint32_t af[4], bf[2][2], btf[2][2];
  cp_async_wait<2>();  // A's group has landed (B's and B^T's may not have)
  __syncwarp();        // and is visible to the whole warp
  load_a(af, s.a, p.ldm, lane);
  cp_async_wait<1>();  // B's
  __syncwarp();
  load_b_trans(bf, s.b, p.ldm, lane);
  cp_async_wait<0>();  // B^T's
  __syncwarp();
  load_bt(btf, s.bt, p.ldm, lane);

  for (int j = 0; j < 4; ++j) {  // a[j] holds A[g + 8 (j % 2)][2t + 8 (j / 2) + 0, 1]
    float lo, hi;
    unpack2<T>(af[j], lo, hi);
    float* out = p.a_f32 + (g + 8 * (j % 2)) * 16 + 2 * t + 8 * (j / 2);
    out[0] = lo;
    out[1] = hi;
  }
  multiply<T>(af, bf, p.c, p.d, static_cast<uint32_t*>(p.d16), lane);
  multiply<T>(af, btf, p.c, p.d_t, nullptr, lane);
}

}  // namespace

cudaError_t mma_selftest(const MmaSelftestParams& p, DType dtype, cudaStream_t stream) {
  const dim3 grid(1), warp(32);
  if (dtype == DType::kBFloat16) return launch_kernel(mma_selftest_kernel<__nv_bfloat16>, grid, warp, 0, stream, p);
  if (dtype == DType::kFloat16) return launch_kernel(mma_selftest_kernel<__half>, grid, warp, 0, stream, p);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pvm
