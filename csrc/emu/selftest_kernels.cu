// Kernels that show each emulator check bites (tests/test_cuda_emulator.py runs them
// through pvm_emu_selftest). Written as ordinary CUDA and compiled like the project's
// kernels; each is wrong in one specific way, or is the correct twin of one that is.
#include <cstdint>
#include <cstring>
#include <string>

#include "cuda/compat.cuh"
#include "cuda/mma.cuh"
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


// ---- tensor-core wrappers (csrc/cuda/mma.cuh) -------------------------------------------------

using pvm::cuda::cp_async_16;
using pvm::cuda::cp_async_commit;
using pvm::cuda::cp_async_wait;

inline uint32_t bits_at(const float* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void store_bits(float* p, uint32_t v) { std::memcpy(p, &v, 4); }

// One mma.sync on fragments given per lane: in = a [32][4] and b [32][2] (bf16x2 / half2
// bits), then c [32][4] fp32; out = d [32][4]. mode 0: every lane; 1: lane 3 exits first;
// 2: lanes 16-31 reach the mma at another line; 3: lane 7 waits at __syncwarp instead.
template <typename T>
__global__ void __launch_bounds__(32) mma_frag_kernel(Args a) {
  const int l = threadIdx.x;
  uint32_t af[4], bf[2];
  float c[4];
  for (int i = 0; i < 4; ++i) af[i] = bits_at(a.in + l * 4 + i);
  for (int i = 0; i < 2; ++i) bf[i] = bits_at(a.in + 128 + l * 2 + i);
  for (int i = 0; i < 4; ++i) c[i] = a.in[192 + l * 4 + i];
  if (a.mode == 1 && l == 3) return;
  if (a.mode == 2 && l >= 16) {
    pvm::cuda::mma_m16n8k16<T>(c, af, bf);
  } else if (a.mode == 3 && l == 7) {
    __syncwarp();
  } else {
    pvm::cuda::mma_m16n8k16<T>(c, af, bf);
  }
  for (int i = 0; i < 4; ++i) a.out[l * 4 + i] = c[i];
}

// ldmatrix of a 32 x 8 tile of 16-bit codes (in: 512 bytes) that lane l wrote row l of;
// lane l passes row l's address; out[l * 4 + j] = the bits of register j.
// mode % 16 = 2 * num + trans (num 1, 2 or 4); mode / 16 picks a misuse:
//   1: lane 5's address 2 bytes off;  2: lane 5 passes a global address;
//   3: the tile written by cp.async, ldmatrix with no cp_async_wait;
//   4: by cp.async, waited for but without the __syncwarp after the wait;
//   5: by cp.async, waited for and then __syncwarp (correct);
//   6: lane 9 exits before the ldmatrix;  7: lane 20's address 2 bytes off (unused by .x1, .x2).
__global__ void __launch_bounds__(32) ldmatrix_kernel(Args a) {
  struct alignas(16) Tile {
    uint16_t v[32][8];
  };
  PVM_SHARED(Tile, tile, [1]);
  const int l = threadIdx.x, num = (a.mode % 16) / 2, misuse = a.mode / 16;
  const bool trans = a.mode % 2;
  if (misuse >= 3 && misuse <= 5) {
    cp_async_16(tile[0].v[l], a.in + 4 * l, true);
    cp_async_commit();
    if (misuse >= 4) cp_async_wait<0>();
    if (misuse == 5) __syncwarp();
  } else {
    std::memcpy(tile[0].v[l], a.in + 4 * l, 16);
    __syncwarp();
  }
  const char* row = reinterpret_cast<const char*>(tile[0].v[l]);
  if ((misuse == 1 && l == 5) || (misuse == 7 && l == 20)) row += 2;
  if (misuse == 2 && l == 5) row = reinterpret_cast<const char*>(a.in);
  if (misuse == 6 && l == 9) return;
  uint32_t r[4] = {0, 0, 0, 0};
  switch (num * 2 + trans) {
    case 2: pvm::cuda::ldmatrix_x1(r, row); break;
    case 3: pvm::cuda::ldmatrix_x1_trans(r, row); break;
    case 4: pvm::cuda::ldmatrix_x2(r, row); break;
    case 5: pvm::cuda::ldmatrix_x2_trans(r, row); break;
    case 8: pvm::cuda::ldmatrix_x4(r, row); break;
    default: pvm::cuda::ldmatrix_x4_trans(r, row); break;
  }
  for (int j = 0; j < 4; ++j) store_bits(a.out + l * 4 + j, r[j]);
}

// cp.async by one warp from in (3 x 32 chunks of 4 floats) into shared memory, chunk (k, l)
// by lane l in commit group k.
//   mode 0: after cp_async_wait<2>, <1> and <0> in turn, each lane copies its three chunks
//           of shared memory to out (3 snapshots x 3 x 32 x 4 floats);
//   1: as 0, odd lanes with pred false (and a source far out of bounds: not read);
//   2: no wait at all (pending at exit);  3: never committed, then cp_async_wait<0>;
//   4: a plain store into a destination in flight;  5: destination 8 bytes off;
//   6: source 4 bytes off;  7: destination in global memory;  8: source in shared memory;
//   9: a second cp.async to a destination still in flight;  10: source out of bounds;
//   11: an empty group committed after each copy: cp_async_wait<1> retires the copies.
__global__ void __launch_bounds__(32) cp_async_kernel(Args a) {
  struct alignas(16) Buf {
    float v[3][32][4];
  };
  PVM_SHARED(Buf, buf, [1]);
  const int l = threadIdx.x;
  float(*s)[32][4] = buf[0].v;
  if (a.mode >= 5 && a.mode <= 10 && l == 2) {
    const float* src = a.in + 4 * l;
    void* dst = s[0][l];
    if (a.mode == 5) dst = s[0][l] + 2;
    if (a.mode == 6) src += 1;
    if (a.mode == 7) dst = a.out;
    if (a.mode == 8) src = s[1][l];
    if (a.mode == 10) src = a.in + 3 * 32 * 4;
    if (a.mode == 9) cp_async_16(dst, src, true);
    cp_async_16(dst, src, true);
    cp_async_commit();
    cp_async_wait<0>();
    return;
  }
  for (int k = 0; k < 3; ++k) {
    const bool pred = a.mode != 1 || l % 2 == 0;
    cp_async_16(s[k][l], pred ? a.in + (k * 32 + l) * 4 : a.in + (1 << 20), pred);
    if (a.mode != 3) cp_async_commit();
    if (a.mode == 11) cp_async_commit();
  }
  if (a.mode == 2) return;
  if (a.mode == 3) {
    cp_async_wait<0>();
    return;
  }
  if (a.mode == 4) {
    s[1][l][0] = 1.f;
    cp_async_wait<0>();
    return;
  }
  if (a.mode == 11) {
    cp_async_wait<1>();
    for (int k = 0; k < 3; ++k)
      for (int e = 0; e < 4; ++e) a.out[(k * 32 + l) * 4 + e] = s[k][l][e];
    return;
  }
  for (int snap = 0; snap < 3; ++snap) {
    if (snap == 0) cp_async_wait<2>();
    if (snap == 1) cp_async_wait<1>();
    if (snap == 2) cp_async_wait<0>();
    for (int k = 0; k < 3; ++k)
      for (int e = 0; e < 4; ++e) a.out[((snap * 3 + k) * 32 + l) * 4 + e] = s[k][l][e];
  }
}

// Two warps reuse one buffer: each thread copies in[t] into slot t by cp.async, waits,
// __syncthreads, reads the other warp's slot t ^ 32 into out[t], then refills its own slot
// with in[64 + t] for a second round (out[64 + t]). mode 0: a __syncthreads between the read
// and the refill; mode 1: none (the refill can overwrite a slot before the other warp read
// it: a race the schedules expose, the refill's NaN poison being what the reader sees).
// mode 2: warp 1 fills a 32 x 8 tile of 16-bit codes, waits and __syncwarp()s only, and
// warp 0 reads it by ldmatrix after a __syncthreads that warp 1 reaches only later.
__global__ void __launch_bounds__(64) cp_async_reuse_kernel(Args a) {
  struct alignas(16) Buf {
    float v[64][4];
  };
  PVM_SHARED(Buf, buf, [1]);
  const int t = threadIdx.x;
  if (a.mode == 2) {
    if (t >= 32) {
      cp_async_16(buf[0].v[t - 32], a.in + 4 * (t - 32), true);
      cp_async_commit();
      cp_async_wait<0>();
      __syncwarp();
    } else {
      uint32_t r[4];
      pvm::cuda::ldmatrix_x4(r, buf[0].v[t]);
      for (int j = 0; j < 4; ++j) store_bits(a.out + t * 4 + j, r[j]);
    }
    __syncthreads();
    return;
  }
  for (int round = 0; round < 2; ++round) {
    cp_async_16(buf[0].v[t], a.in + (round * 64 + t) * 4, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    a.out[round * 64 + t] = buf[0].v[t ^ 32][0];
    if (a.mode == 0) __syncthreads();
  }
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
  // the tensor-core wrappers (mma.cuh): see the kernels above
  if (s == "mma_bf16") return launch_kernel(mma_frag_kernel<__nv_bfloat16>, one, 32, 0, nullptr, a);
  if (s == "mma_f16") return launch_kernel(mma_frag_kernel<__half>, one, 32, 0, nullptr, a);
  if (s == "ldmatrix") return launch_kernel(ldmatrix_kernel, one, 32, 0, nullptr, a);
  if (s == "cp_async") return launch_kernel(cp_async_kernel, one, 32, 0, nullptr, a);
  if (s == "cp_async_reuse") return launch_kernel(cp_async_reuse_kernel, one, 64, 0, nullptr, a);
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
