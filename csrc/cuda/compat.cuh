// What lets the same .cu source build with nvcc and run in the CPU emulator (csrc/emu):
// shared-memory declarations and kernel launches go through here. Under nvcc everything
// expands to the plain CUDA constructs; with the emulator's shim headers first on the
// include path (PVM_CUDA_EMULATOR) they map to its runtime.
//
//   PVM_SHARED(float, partial, [8]);     // __shared__ float partial[8];
//   PVM_DYNAMIC_SHARED(float, smem);     // extern __shared__ float smem[];
//   return launch_kernel(kernel, grid, block, smem_bytes, stream, params);
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#if defined(PVM_CUDA_EMULATOR)
#define PVM_SHARED(T, name, dims) CUEMU_SHARED(T, name, dims)
#define PVM_DYNAMIC_SHARED(T, name) CUEMU_DYNAMIC_SHARED(T, name)
// the emulator names the launch site in its reports
#define PVM_LAUNCH_SITE_PARAMS , const char* pvm_site_file = __builtin_FILE(), int pvm_site_line = __builtin_LINE()
#else
#define PVM_SHARED(T, name, dims) __shared__ T name dims
#define PVM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define PVM_LAUNCH_SITE_PARAMS
#endif

namespace pvm {
namespace cuda {

// Without cudaFuncSetAttribute a block gets at most 48 KB of shared memory, static and
// dynamic together. The kernels here declare well under kStaticSmemReserve bytes of
// static __shared__ memory (the emulator checks the exact rule), so a launch opts in
// whenever its dynamic size could cross the limit.
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kStaticSmemReserve = 1024;
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x; y and z allow 65,535

// flat_grid folds grids above this many blocks onto y. Only the emulator's tests lower it
// (-DPVM_FOLD_GRID_X=5), to run the folded path on small grids.
#ifndef PVM_FOLD_GRID_X
#define PVM_FOLD_GRID_X kMaxGridX
#endif

// A 1-D grid of n blocks: x up to 2^31-1, the remainder folded onto y;
// flat_block_index() undoes it, and blocks >= n must return at once.
inline dim3 flat_grid(int64_t n) {
  const int64_t max_x = PVM_FOLD_GRID_X;
  if (n <= max_x) return dim3(static_cast<unsigned>(n));
  const int64_t y = (n + max_x - 1) / max_x;
  return dim3(static_cast<unsigned>((n + y - 1) / y), static_cast<unsigned>(y));
}

__device__ __forceinline__ int64_t flat_block_index() {
  return static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
}

// The one way kernels are launched: opts into large dynamic shared memory, launches, and
// returns the launch status (cudaGetLastError). An empty grid launches nothing.
template <typename Params>
cudaError_t launch_kernel(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, const Params& params PVM_LAUNCH_SITE_PARAMS) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (smem + kStaticSmemReserve > kDefaultSmemLimit) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // reported here; the next launch must not see it again
      return err;
    }
  }
#if defined(PVM_CUDA_EMULATOR)
  ::cuemu::launch(kernel, grid, block, smem, stream, pvm_site_file, pvm_site_line, params);
#else
  kernel<<<grid, block, smem, stream>>>(params);
#endif
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pvm
