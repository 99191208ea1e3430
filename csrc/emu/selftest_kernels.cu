// Kernels that show each emulator check bites (tests/test_cuda_emulator.py runs them
// through pvm_emu_selftest). Written as ordinary CUDA and compiled like the project's
// kernels; each is wrong in one specific way, or is the correct twin of one that is.
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/compat.cuh"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuemu_internal.h"

#define PVM_EMU_API extern "C" __attribute__((visibility("default")))

namespace {

using pvm::cuda::launch_kernel;

struct Args {
  float* out;
  const float* in;
  int64_t n;
  int mode;
};

constexpr int kThreads = 128;

// Each thread writes its slot, then reads its neighbour's (32 lanes on: another warp).
// mode 0: with the barrier between; mode 1: without it (a race every schedule but the
// luckiest exposes).
__global__ void __launch_bounds__(kThreads) neighbour_kernel(Args a) {
  PVM_SHARED(float, buf, [kThreads]);
  const int t = threadIdx.x;
  buf[t] = static_cast<float>(t);
  if (a.mode == 0) __syncthreads();
  a.out[t] = buf[(t + 32) % kThreads];
}

// mode 0: half the block at one __syncthreads, half at another (divergent);
// mode 1: threads >= 64 return, the rest wait at a barrier they can never pass;
// mode 2: a barrier reached after some threads exited.
__global__ void __launch_bounds__(kThreads) barrier_kernel(Args a) {
  const int t = threadIdx.x;
  if (a.mode == 0) {
    if (t < 64) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (a.mode == 1) {
    if (t >= 64) return;
    __syncthreads();
  } else {
    if (t < 32) return;
    for (int i = 0; i < 100; ++i) a.out[t] += 1.f;  // no synchronisation before the barrier
    __syncthreads();
  }
  a.out[t] = 1.f;
}

// mode 0..3: __shfl_sync / xor / down / up of each lane's id (every lane takes part);
// mode 4: lane 5 skips the shuffle; mode 5: a half-warp mask;
// mode 6: lane 5 goes to __syncthreads while its warp shuffles (a deadlock);
// mode 7: lanes split between two different shuffles.
__global__ void __launch_bounds__(kThreads) shuffle_kernel(Args a) {
  const int t = threadIdx.x, lane = t & 31;
  float v = static_cast<float>(t);
  switch (a.mode) {
    case 0: v = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) & 31); break;
    case 1: v = __shfl_xor_sync(0xffffffffu, v, 5); break;
    case 2: v = __shfl_down_sync(0xffffffffu, v, 3); break;
    case 3: v = __shfl_up_sync(0xffffffffu, v, 3, 16); break;
    case 4:
      if (lane != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 5: v = __shfl_xor_sync(0x0000ffffu, v, 1); break;
    case 6:
      if (t == 37) {
        __syncthreads();
      } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
        __syncthreads();
      }
      break;
    default:
      if (lane < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      } else {
        v = __shfl_xor_sync(0xffffffffu, v, 2);
      }
  }
  a.out[t] = v;
}

// Reads a.in[t + mode]: with mode 1 the last thread reads one element past the buffer,
// with mode -1 thread 0 reads the element before it; mode 99 reads address 16 (no buffer).
__global__ void __launch_bounds__(kThreads) read_kernel(Args a) {
  const int t = threadIdx.x;
  if (a.mode == 99) {
    if (t == 3) a.out[t] = *reinterpret_cast<const float*>(static_cast<uintptr_t>(a.n) * 16);
    return;
  }
  if (t < a.n) a.out[t] = a.in[t + a.mode];
}

// Copies the first a.n floats of (uninitialised) dynamic shared memory out, or with
// mode 1 writes one float past the dynamic allocation of a.n floats.
__global__ void __launch_bounds__(kThreads) smem_kernel(Args a) {
  PVM_DYNAMIC_SHARED(float, dyn);
  PVM_SHARED(float, stat, [4]);
  const int t = threadIdx.x;
  if (a.mode == 1) {
    if (t == 0) dyn[a.n] = 1.f;
    return;
  }
  if (t < a.n) a.out[t] = dyn[t];
  if (t < 4) a.out[a.n + t] = stat[t];
}

__global__ void __launch_bounds__(64) bounded_kernel(Args a) { a.out[threadIdx.x] = 1.f; }

// Uses 40 KB of static shared memory (legal), with a.mode bytes of dynamic on top.
__global__ void __launch_bounds__(kThreads) static40k_kernel(Args a) {
  PVM_SHARED(float, big, [10240]);
  big[threadIdx.x] = 1.f;
  __syncthreads();
  a.out[threadIdx.x] = big[(threadIdx.x + 1) % kThreads];
}

}  // namespace

// Runs self-test `name` (see the table below) with `mode`, writing up to n_out floats of its
// output to `out`; `in` (n_in floats) is its input. Returns the CUDA status of the launch.
PVM_EMU_API int pvm_emu_selftest(const char* name, int mode, float* out, int64_t n_out, const float* in,
                                 int64_t n_in) {
  cuemu::clear_last_message();
  cuemu::GuardedBuffer out_buf("out", out, static_cast<size_t>(n_out) * 4, true);
  cuemu::GuardedBuffer in_buf("in", const_cast<float*>(in), static_cast<size_t>(n_in) * 4, false);
  Args a{static_cast<float*>(out_buf.data()), static_cast<const float*>(in_buf.data()), n_in, mode};
  const std::string s = name;
  const dim3 one(1);
  if (s == "neighbour") return launch_kernel(neighbour_kernel, one, kThreads, 0, nullptr, a);
  if (s == "barrier") return launch_kernel(barrier_kernel, one, kThreads, 0, nullptr, a);
  if (s == "shuffle") return launch_kernel(shuffle_kernel, one, kThreads, 0, nullptr, a);
  if (s == "read") return launch_kernel(read_kernel, one, kThreads, 0, nullptr, a);
  if (s == "bounds") return launch_kernel(bounded_kernel, one, kThreads, 0, nullptr, a);
  if (s == "smem") {  // a.n floats of dynamic shared memory
    a.n = n_out - 4;
    return launch_kernel(smem_kernel, one, kThreads, static_cast<size_t>(a.n) * 4, nullptr, a);
  }
  // Shared-memory limits through the raw launch (launch_kernel would opt in by itself):
  // mode = dynamic bytes; "smem_optin" opts in to that many first.
  if (s == "smem_raw" || s == "smem_optin") {
    if (s == "smem_optin") {
      const cudaError_t err = cudaFuncSetAttribute(static40k_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, mode);
      if (err != cudaSuccess) {
        (void)cudaGetLastError();  // as launch_kernel does: the error is reported here
        return err;
      }
    }
    cuemu::launch(static40k_kernel, dim3(1), dim3(kThreads), static_cast<size_t>(mode), nullptr, __FILE__,
                  __LINE__, a);
    return cudaGetLastError();
  }
  // Grid and block limits: mode 0 grid (1, 65536), 1 grid (2^31), 2 block 1025 threads,
  // 3 grid (1, 65535) [legal], 4 block (1024, 2).
  if (s == "grid") {
    static const dim3 grids[] = {dim3(1, 65536), dim3(2147483648u), dim3(1), dim3(1, 65535), dim3(1)};
    static const dim3 blocks[] = {dim3(32), dim3(32), dim3(1025), dim3(32), dim3(1024, 2)};
    a.mode = 0;
    cuemu::launch(read_kernel, grids[mode], blocks[mode], 0, nullptr, __FILE__, __LINE__, a);
    return cudaGetLastError();
  }
  return cudaErrorInvalidValue;
}

// float -> half / bfloat16 -> float through the shims' conversions (kind 0: half, 1: bf16),
// to compare with torch's; bits receives the 16-bit encodings.
PVM_EMU_API void pvm_emu_convert(const float* in, int64_t n, int kind, uint16_t* bits, float* back) {
  for (int64_t i = 0; i < n; ++i) {
    if (kind == 0) {
      const __half h = __float2half_rn(in[i]);
      bits[i] = h.__x;
      back[i] = __half2float(h);
    } else {
      const __nv_bfloat16 h = __float2bfloat16_rn(in[i]);
      bits[i] = h.__x;
      back[i] = __bfloat162float(h);
    }
  }
}

// 16-bit encodings -> float (kind as above), for an exhaustive check of the decoders.
PVM_EMU_API void pvm_emu_decode(const uint16_t* bits, int64_t n, int kind, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (kind == 0) {
      __half h;
      h.__x = bits[i];
      out[i] = __half2float(h);
    } else {
      __nv_bfloat16 h;
      h.__x = bits[i];
      out[i] = __bfloat162float(h);
    }
  }
}
