// cuemu: a small CUDA emulator that runs the project's real .cu kernels as host C++.
//
// The .cu files are compiled with g++ (-x c++) and the shim headers in csrc/emu/include
// (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) first on the include path; those shims
// include this file. Every CUDA thread of a block runs on its own fiber (a stack and a
// hand-written context switch) on the calling OS thread, and fibers switch only at the
// points where CUDA threads synchronise: __syncthreads, __syncwarp, warp shuffles and
// thread exit. What the runtime checks and how it schedules: docs/cuda_emulator.md.
//
// Nothing here depends on torch; the kernels' sources need no change beyond going through
// csrc/cuda/compat.cuh for shared memory and launches.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define PVM_CUDA_EMULATOR 1

// ---- CUDA qualifiers --------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
// __launch_bounds__(n[, m]) puts n one-byte NOPs at the kernel's entry (GCC's
// patchable_function_entry; the `+ 0` makes GCC fold a constexpr name), which the launch
// counts to check blockDim against the bound, as the GPU does.
#define CUEMU_FIRST_ARG_(a, ...) a
#define __launch_bounds__(...) \
  __attribute__((patchable_function_entry(CUEMU_FIRST_ARG_(__VA_ARGS__, 0) + 0, 0)))
#define warpSize 32

// ---- vector types and runtime enums ------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT: implicit, as in CUDA
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The values of the CUDA runtime's enumerators, so codes read the same in messages.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

namespace cuemu {

// ---- the running thread and block (read through threadIdx, blockIdx, ...) -------------
struct Thread {
  uint3 idx;
  int linear, warp, lane;
};
extern Thread* g_thread;  // the CUDA thread whose fiber runs now
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// ---- synchronisation points (each may switch to another fiber) ---------------------------
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
enum ShflKind : int { kShflIdx = 0, kShflXor = 1, kShflDown = 2, kShflUp = 3 };
uint64_t shuffle(ShflKind kind, unsigned mask, uint64_t bits, int arg, int width, const char* file,
                 int line);

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type over 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// ---- shared memory -----------------------------------------------------------------------
// One slot per static __shared__ declaration (a function-local static, so one per template
// instance); its storage is per block, filled with NaN before the block starts.
struct SharedSlot {
  size_t size, align;
  const char* name;
  const char* file;
  int line;
  long offset;      // in the static arena, assigned on first use
  uint64_t stamp;   // last block that touched it (for the per-kernel static size)
};
void* static_shared(SharedSlot& slot);
void* dynamic_shared();

// ---- launches ----------------------------------------------------------------------------
using Thunk = void (*)(const void* kernel, const void* args);
cudaError_t launch_raw(const void* kernel, dim3 grid, dim3 block, size_t smem, Thunk thunk,
                       const void* args, const char* file, int line);
cudaError_t func_set_attribute(const void* kernel, int attr, int value);
cudaError_t peek_last_error();
cudaError_t take_last_error();
const char* error_string(cudaError_t err);

template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   const char* file, int line, const A&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  using Args = std::tuple<std::decay_t<P>...>;
  const Args packed(args...);  // converted to the parameter types, as a launch does
  Thunk thunk = [](const void* k, const void* a) {
    std::apply(reinterpret_cast<void (*)(P...)>(const_cast<void*>(k)), *static_cast<const Args*>(a));
  };
  return launch_raw(reinterpret_cast<const void*>(kernel), grid, block, smem, thunk, &packed, file, line);
}

}  // namespace cuemu

#define threadIdx (static_cast<const uint3&>(::cuemu::g_thread->idx))
#define blockIdx (static_cast<const uint3&>(::cuemu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::cuemu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::cuemu::g_grid_dim))

#define CUEMU_SHARED(T, name, dims)                                                         \
  static ::cuemu::SharedSlot name##_cuemu_slot_{sizeof(T dims), alignof(T), #name, __FILE__, \
                                                 __LINE__, -1, 0};                          \
  T(&name) dims = *reinterpret_cast<T(*) dims>(::cuemu::static_shared(name##_cuemu_slot_))
#define CUEMU_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::cuemu::dynamic_shared())

// ---- device functions ----------------------------------------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuemu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::cuemu::syncwarp(mask, file, line);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::from_bits<T>(
      ::cuemu::shuffle(::cuemu::kShflIdx, mask, ::cuemu::to_bits(var), src_lane, width, file, line));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::from_bits<T>(
      ::cuemu::shuffle(::cuemu::kShflXor, mask, ::cuemu::to_bits(var), lane_mask, width, file, line));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::from_bits<T>(::cuemu::shuffle(::cuemu::kShflDown, mask, ::cuemu::to_bits(var),
                                                static_cast<int>(delta), width, file, line));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cuemu::from_bits<T>(::cuemu::shuffle(::cuemu::kShflUp, mask, ::cuemu::to_bits(var),
                                                static_cast<int>(delta), width, file, line));
}

// Fibers never interleave between synchronisation points, so plain read-modify-writes are
// atomic here (and the result is what one serial order of the GPU's atomics would give).
template <class T>
inline T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}
template <class T>
inline T atomicMax(T* address, T val) {
  const T old = *address;
  *address = old < val ? val : old;
  return old;
}

// Math intrinsics the host's libm lacks (the host versions are at least as accurate).
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// ---- runtime API -------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() { return ::cuemu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return ::cuemu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return ::cuemu::error_string(err); }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cuemu::func_set_attribute(reinterpret_cast<const void*>(entry), static_cast<int>(attr), value);
}

// ---- warp-collective instructions and cp.async (csrc/cuda/mma.cuh calls these) ------------
namespace cuemu {

// A warp-collective instruction (mma.sync, ldmatrix.sync): every lane of the warp calls
// warp_collective at the same site with the same `op` and a pointer to its own fragment
// (operands and results, on its own stack). The lanes wait as at __syncwarp; once all 32
// are there, `op(frags)` runs once with frags[lane] of every lane, then every lane goes
// on. A lane that exits, waits elsewhere or reaches another collective is reported as a
// misused shuffle is, and so is a warp short of 32 threads.
using WarpOp = void (*)(void* const* frags);
void warp_collective(const char* name, WarpOp op, void* frag, const char* file, int line);
// From inside a WarpOp: fail the launch; the message gets " (<name> at <file>:<line>)".
[[noreturn]] void warp_op_fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
// From inside a WarpOp: fail unless [p, p + 16) is a 16-byte aligned row of shared memory
// that the warp may read: no cp.async still in flight to it, and any cp.async that wrote it
// retired by a wait and made visible to this warp by a __syncwarp (same warp) or
// __syncthreads since. `lane` supplied the address (named in the report).
void check_warp_smem_row(const void* p, int lane);

// The PTX instructions (emulated in cuemu_mma.cpp and cuemu.cpp): see csrc/cuda/mma.cuh
// for their fragment layouts and docs/cuda_emulator.md for what is checked.
enum MmaType : int { kMmaBf16 = 0, kMmaF16 = 1 };
void mma_m16n8k16(MmaType type, float* c, const uint32_t* a, const uint32_t* b, const char* file, int line);
void ldmatrix(int num, bool trans, uint32_t* r, const void* smem, const char* file, int line);
void cp_async_16(void* smem, const void* gmem, bool pred, const char* file, int line);
void cp_async_commit(const char* file, int line);
void cp_async_wait(int n, const char* file, int line);

}  // namespace cuemu
