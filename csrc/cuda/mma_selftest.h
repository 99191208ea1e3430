// A self-test of the tensor-core wrappers (mma.cuh) as a kernel uses them: cp.async loads
// of three tiles, ldmatrix in every form, mma, pack2 / unpack2 and stores. Built into the
// CUDA extension (its SASS is checked for HMMA, LDSM and LDGSTS by tests/test_mma_layouts.py)
// and into the emulator's kernel library (run by the same test through capi.cpp).
#pragma once
#include <cuda_runtime.h>

#include "pvm_params.h"

namespace pvm {
namespace cuda {

struct MmaSelftestParams {
  const void* a = nullptr;   // A, 16 x 16 row-major, of the dtype (M x K)
  const void* b = nullptr;   // B, 16 x 16 row-major (K x N)
  const void* bt = nullptr;  // B transposed, 16 x 16 row-major (N x K)
  const float* c = nullptr;  // C, 16 x 16 fp32, or null for zeros
  float* a_f32 = nullptr;    // out: A as read back from its mma fragment (ldmatrix + unpack2)
  float* d = nullptr;        // out: A B + C, B's fragments from b by ldmatrix .trans
  float* d_t = nullptr;      // out: A B + C, B's fragments from bt by ldmatrix
  void* d16 = nullptr;       // out: d rounded to the dtype by pack2, 16 x 16
  int a_rows = 16;           // rows of A read; the others are zero-filled (cp.async with !pred)
  int ldm = 4;               // ldmatrix form: 4 (x4), 2 (x2) or 1 (x1)
};

// One warp; dtype kBFloat16 or kFloat16 (kFloat32: cudaErrorInvalidValue).
cudaError_t mma_selftest(const MmaSelftestParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace pvm
