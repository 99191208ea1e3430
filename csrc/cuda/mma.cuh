// Thin wrappers of the sm_80+ tensor-core and async-copy instructions, one PTX instruction
// each: mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate), ldmatrix, cp.async, and the
// packing of two floats into one 32-bit register of bf16x2 / half2.
//
// Under nvcc they are inline PTX (sm_80 and newer; on an older target they trap). In the
// CPU emulator (PVM_CUDA_EMULATOR, csrc/emu) the same calls run its warp-level
// implementations, which follow the PTX ISA's fragment layouts (written once, in
// csrc/emu/cuemu_mma.cpp, checked against CuTe's by tests/test_mma_layouts.py) and check
// what the GPU leaves undefined: every lane present, row addresses in shared memory and
// 16-byte aligned, a cp.async retired by a wait (and made visible by a barrier) before
// ldmatrix reads it. docs/cuda_emulator.md has the details.
//
// Fragment layouts of mma_m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16 with
// floating point type"). With g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group),
// element i of a fragment sits in register i / 2, in its low 16 bits when i is even:
//
//   A, 16 x 16 (M x K), a[4] = a0..a7:  row g + 8 * ((i / 2) % 2), col 2t + i % 2 + 8 * (i / 4)
//        a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//        a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   B, 16 x 8 (K x N), b[2] = b0..b3:   k = 2t + i % 2 + 8 * (i / 2), n = g
//        b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C and D, 16 x 8 (M x N), fp32 c[4]: row g + 8 * (i / 2), col 2t + i % 2
//        c[0], c[1] = C[g][2t], C[g][2t+1]    c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
//
// ldmatrix loads 8 x 8 matrices of 16-bit elements from shared memory: lane l passes the
// address of row l % 8 of matrix l / 8 (16 contiguous bytes, 16-byte aligned; only lanes
// 0-7 are used by .x1 and 0-15 by .x2). Register j of lane t gets two elements of matrix j:
// row t / 4, columns 2 * (t % 4) and +1 (low half first); with .trans, column t / 4 of
// rows 2 * (t % 4) and +1. So with a row-major tile in shared memory:
//   A fragment of a 16 x 16 tile at a[row][col]:   ldmatrix_x4(a, &tile[l % 16][8 * (l / 16)])
//   B fragments (two n8 tiles) of a K x N = 16 x 16 row-major tile b[k][n]:
//       ldmatrix_x4_trans(r, &b[l % 16][8 * (l / 16)])  -> {r[0], r[1]} n 0-7, {r[2], r[3]} n 8-15
//   B fragments of an N x K = 16 x 16 row-major tile bt[n][k] (B transposed, e.g. K of Q K^T):
//       ldmatrix_x4(r, &bt[(l % 8) + 8 * (l / 16)][8 * ((l / 8) % 2)])  -> same r as above
//
// Ordering: ldmatrix reads rows other lanes wrote, so a __syncwarp / __syncthreads (which
// also order the compiler's memory accesses) must separate those writes, and a cp.async's
// cp_async_wait, from it. The asm of ldmatrix and mma has no "memory" clobber.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(PVM_CUDA_EMULATOR)
// the emulator names the call site in its reports
#define PVM_WARP_SITE_PARAMS , const char* pvm_site_file = __builtin_FILE(), int pvm_site_line = __builtin_LINE()
#define PVM_WARP_SITE_ONLY_PARAMS const char* pvm_site_file = __builtin_FILE(), int pvm_site_line = __builtin_LINE()
#else
#define PVM_WARP_SITE_PARAMS
#define PVM_WARP_SITE_ONLY_PARAMS
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PVM_HAS_SM80_PTX 1
#endif

namespace pvm {
namespace cuda {

template <typename T>
struct is_mma_type
    : std::integral_constant<bool, std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value> {};

// ---- mma.sync ---------------------------------------------------------------------------------
// d = a * b + c in place, over the warp (all 32 lanes, converged): a 16 x 16 tile of A
// (a[4]: bf16x2 or half2 registers) times a 16 x 8 tile of B (b[2]) plus the fp32 16 x 8
// accumulator c[4]; layouts above. T: __nv_bfloat16 or __half (both operands).
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float c[4], const uint32_t a[4],
                                             const uint32_t b[2] PVM_WARP_SITE_PARAMS) {
  static_assert(is_mma_type<T>::value, "mma_m16n8k16<T>: T is __nv_bfloat16 or __half");
#if defined(PVM_CUDA_EMULATOR)
  ::cuemu::mma_m16n8k16(std::is_same<T, __half>::value ? ::cuemu::kMmaF16 : ::cuemu::kMmaBf16, c, a, b,
                        pvm_site_file, pvm_site_line);
#elif defined(PVM_HAS_SM80_PTX)
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the tensor-core wrappers need sm_80
#endif
}

// ---- ldmatrix ---------------------------------------------------------------------------------
// r[j] = this lane's part of matrix j (layout above); `row` is this lane's row address in
// shared memory (lane l: row l % 8 of matrix l / 8; lanes past 8 * num pass anything).
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16
#if defined(PVM_CUDA_EMULATOR)
#define PVM_LDMATRIX(num, trans, ...) ::cuemu::ldmatrix(num, trans, r, row, pvm_site_file, pvm_site_line)
#elif defined(PVM_HAS_SM80_PTX)
#define PVM_LDMATRIX(num, trans, ...)                                                         \
  asm volatile(__VA_ARGS__ : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))))
#else
#define PVM_LDMATRIX(num, trans, ...) __trap()
#endif

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row PVM_WARP_SITE_PARAMS) {
  PVM_LDMATRIX(4, false, "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row PVM_WARP_SITE_PARAMS) {
  PVM_LDMATRIX(4, true, "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row PVM_WARP_SITE_PARAMS) {
  PVM_LDMATRIX(2, false, "ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row PVM_WARP_SITE_PARAMS) {
  PVM_LDMATRIX(2, true, "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* row PVM_WARP_SITE_PARAMS) {
  PVM_LDMATRIX(1, false, "ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* row PVM_WARP_SITE_PARAMS) {
  PVM_LDMATRIX(1, true, "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]));
}
#undef PVM_LDMATRIX

// ---- cp.async ---------------------------------------------------------------------------------
// Starts an asynchronous copy of 16 bytes from global memory to shared memory (both 16-byte
// aligned), or, when !pred, writes 16 zero bytes and reads nothing (src-size 0; pass any
// valid pointer, e.g. the tensor's base, as `gmem`). The copy joins the thread's next
// cp_async_commit group; the data may be read only after a cp_async_wait has retired that
// group, and by other threads only after a barrier following that wait.
// cp.async.cg.shared.global [smem], [gmem], 16, src-size (L2 only, as .cg requires 16 bytes)
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred PVM_WARP_SITE_PARAMS) {
#if defined(PVM_CUDA_EMULATOR)
  ::cuemu::cp_async_16(smem, gmem, pred, pvm_site_file, pvm_site_line);
#elif defined(PVM_HAS_SM80_PTX)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem), "r"(pred ? 16 : 0));
#else
  __trap();
#endif
}

// Closes the thread's current group of cp.async copies (cp.async.commit_group); an empty
// group counts too.
__device__ __forceinline__ void cp_async_commit(PVM_WARP_SITE_ONLY_PARAMS) {
#if defined(PVM_CUDA_EMULATOR)
  ::cuemu::cp_async_commit(pvm_site_file, pvm_site_line);
#elif defined(PVM_HAS_SM80_PTX)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most the newest N committed groups of this thread are still in flight
// (cp.async.wait_group N): cp_async_wait<0>() retires all committed copies. Copies not yet
// committed are not waited for.
template <int N>
__device__ __forceinline__ void cp_async_wait(PVM_WARP_SITE_ONLY_PARAMS) {
  static_assert(N >= 0, "cp_async_wait<N>: N >= 0");
#if defined(PVM_CUDA_EMULATOR)
  ::cuemu::cp_async_wait(N, pvm_site_file, pvm_site_line);
#elif defined(PVM_HAS_SM80_PTX)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// ---- packing --------------------------------------------------------------------------------
// Two floats rounded to nearest even into one register of two T (bf16x2 / half2), `lo` in
// the low 16 bits: the element order of the fragments above (e.g. an A fragment register
// from two fp32 accumulator values).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(is_mma_type<T>::value, "pack2<T>: T is __nv_bfloat16 or __half");
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  } else {
    return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
           (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
}

// The two T of a register as floats (exact): lo from the low 16 bits.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t v, float& lo, float& hi) {
  static_assert(is_mma_type<T>::value, "unpack2<T>: T is __nv_bfloat16 or __half");
  const unsigned short l = static_cast<unsigned short>(v & 0xffffu), h = static_cast<unsigned short>(v >> 16);
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    lo = __bfloat162float(__ushort_as_bfloat16(l));
    hi = __bfloat162float(__ushort_as_bfloat16(h));
  } else {
    lo = __half2float(__ushort_as_half(l));
    hi = __half2float(__ushort_as_half(h));
  }
}

}  // namespace cuda
}  // namespace pvm
