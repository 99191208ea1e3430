// C API of the emulated CUDA kernel library (libpvm_cuda_emu.so): the real launchers of
// csrc/cuda (pvm::cuda::retrieval_fwd, ...) run on buffers copied between guard pages,
// plus configuration, statistics and the emulator's own self-test kernels. Used by the
// torch harness (torch_ops.cpp) and from Python through ctypes (csrc/emu/emulator.py).
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cuda/launch.h"
#include "cuda/mma_selftest.h"
#include "cuemu.h"
#include "cuemu_internal.h"
#include "pvm_params.h"

#define PVM_EMU_API extern "C" __attribute__((visibility("default")))

namespace {

using pvm::MergeParams;
using pvm::RetrievalParams;

size_t elem_size(int dtype) { return dtype == static_cast<int>(pvm::DType::kFloat32) ? 4 : 2; }

// Bytes spanned by a strided view: one past its farthest element (0 if empty).
size_t extent(std::initializer_list<int64_t> sizes, const int64_t* strides, size_t elem) {
  int64_t last = 0, i = 0;
  for (const int64_t n : sizes) {
    if (n == 0) return 0;
    last += (n - 1) * strides[i++];
  }
  return static_cast<size_t>(last + 1) * elem;
}

// The guarded copies of one launch's buffers; outputs are copied back when it ends.
class Buffers {
 public:
  template <typename P>
  void add(const char* name, P*& ptr, size_t bytes, bool output) {
    if (ptr == nullptr) return;
    bufs_.push_back(std::make_unique<cuemu::GuardedBuffer>(
        name, const_cast<void*>(static_cast<const void*>(ptr)), bytes, output));
    ptr = static_cast<P*>(bufs_.back()->data());
  }

 private:
  std::vector<std::unique_ptr<cuemu::GuardedBuffer>> bufs_;
};

// Bytes spanned by n rows of d contiguous elements, `row` elements apart.
size_t rows_extent(int64_t n, int64_t d, int64_t row, size_t elem) {
  return n == 0 || d == 0 ? 0 : static_cast<size_t>((n - 1) * row + d) * elem;
}

int finish(cudaError_t err) { return static_cast<int>(err); }

// Bytes of a q-like tensor (q, out, grad_out, dq) with strides s: [B, T, H, hd], or varlen
// [total_q, H, hd] (strides {0, row, head, dim}, pvm_params.h).
size_t q_extent(const RetrievalParams& p, const int64_t* s, size_t es) {
  return pvm::is_varlen(p) ? extent({p.total_q, p.H, p.hd}, s + 1, es) : extent({p.B, p.T, p.H, p.hd}, s, es);
}

// Bytes of a k-like tensor (k, v, dk, dv): [B, Nv, Hkv, hd], or varlen [total_k, Hkv, hd].
size_t k_extent(const RetrievalParams& p, const int64_t* s, size_t es) {
  return pvm::is_varlen(p) ? extent({p.total_k, p.Hkv, p.hd}, s + 1, es) : extent({p.B, p.Nv, p.Hkv, p.hd}, s, es);
}

// q, k, v, key_mask, kv_len and the varlen cu_seqlens_q / cu_seqlens_k ([B + 1] int32):
// what the forward and backward both read.
void add_retrieval_inputs(Buffers& b, RetrievalParams& p, size_t es) {
  b.add("q", p.q, q_extent(p, p.q_stride, es), false);
  b.add("k", p.k, k_extent(p, p.k_stride, es), false);
  b.add("v", p.v, k_extent(p, p.v_stride, es), false);
  b.add("key_mask", p.key_mask, extent({p.B, p.Nv}, p.mask_stride, 1), false);
  b.add("kv_len", p.kv_len, static_cast<size_t>(p.B) * 4, false);
  b.add("cu_seqlens_q", p.cu_seqlens_q, static_cast<size_t>(p.B + 1) * 4, false);
  b.add("cu_seqlens_k", p.cu_seqlens_k, static_cast<size_t>(p.B + 1) * 4, false);
}

}  // namespace

// ---- the project's kernels ----------------------------------------------------------------
PVM_EMU_API int pvm_emu_retrieval_fwd(const RetrievalParams* in, int dtype) {
  cuemu::clear_last_message();
  RetrievalParams p = *in;
  const size_t es = elem_size(dtype);
  Buffers b;
  add_retrieval_inputs(b, p, es);
  b.add("out", p.out, q_extent(p, p.o_stride, es), true);
  b.add("lse", p.lse, static_cast<size_t>(pvm::stat_rows(p)) * 4, true);
  if (p.kv_splits > 1) {  // split-KV workspaces, exactly [splits, stat_rows, hd] / [splits, stat_rows]
    const size_t rows = static_cast<size_t>(p.kv_splits * pvm::stat_rows(p));
    b.add("o_part", p.o_part, rows * static_cast<size_t>(p.hd) * 4, false);
    b.add("lse_part", p.lse_part, rows * 4, false);
  }
  return finish(pvm::cuda::retrieval_fwd(p, static_cast<pvm::DType>(dtype), nullptr));
}

PVM_EMU_API int pvm_emu_retrieval_bwd(const RetrievalParams* in, int dtype) {
  cuemu::clear_last_message();
  RetrievalParams p = *in;
  const size_t es = elem_size(dtype);
  Buffers b;
  add_retrieval_inputs(b, p, es);
  b.add("grad_out", p.grad_out, q_extent(p, p.o_stride, es), false);
  b.add("lse", p.lse, static_cast<size_t>(pvm::stat_rows(p)) * 4, false);
  b.add("delta", p.delta, static_cast<size_t>(pvm::stat_rows(p)) * 4, false);
  b.add("dq", p.dq, q_extent(p, p.dq_stride, es), true);
  b.add("dk", p.dk, k_extent(p, p.dkv_stride, es), true);
  b.add("dv", p.dv, k_extent(p, p.dkv_stride, es), true);
  if (p.row_splits > 1) {  // row-split dK/dV workspaces, exactly [splits, key_rows, Hkv, hd] each
    const size_t n = static_cast<size_t>(p.row_splits * pvm::key_rows(p) * p.Hkv * p.hd) * 4;
    b.add("dk_part", p.dk_part, n, false);
    b.add("dv_part", p.dv_part, n, false);
  }
  return finish(pvm::cuda::retrieval_bwd(p, static_cast<pvm::DType>(dtype), nullptr));
}

PVM_EMU_API int pvm_emu_merge_fwd(const MergeParams* in, int dtype) {
  cuemu::clear_last_message();
  MergeParams p = *in;
  const size_t es = elem_size(dtype);
  Buffers b;
  b.add("expanded", p.e, rows_extent(p.N, p.D, p.e_row, es), false);
  b.add("ffn_output", p.ffn, rows_extent(p.N, p.D, p.ffn_row, es), false);
  b.add("keep", p.keep, static_cast<size_t>(p.N), false);
  b.add("gate", p.gate, 4, false);
  b.add("out", p.out, rows_extent(p.N, p.D, p.out_row, es), true);
  b.add("rstd", p.rstd, static_cast<size_t>(p.N) * 4, true);
  return finish(pvm::cuda::merge_fwd(p, static_cast<pvm::DType>(dtype), nullptr));
}

PVM_EMU_API int pvm_emu_merge_bwd(const MergeParams* in, int dtype) {
  cuemu::clear_last_message();
  MergeParams p = *in;
  const size_t es = elem_size(dtype);
  Buffers b;
  b.add("expanded", p.e, rows_extent(p.N, p.D, p.e_row, es), false);
  b.add("grad_out", p.grad, rows_extent(p.N, p.D, p.grad_row, es), false);
  b.add("keep", p.keep, static_cast<size_t>(p.N), false);
  b.add("gate", p.gate, 4, false);
  b.add("rstd", p.rstd, static_cast<size_t>(p.N) * 4, false);
  b.add("d_expanded", p.de, rows_extent(p.N, p.D, p.de_row, es), true);
  b.add("dgate_row", p.dgate_row, static_cast<size_t>(p.N) * 4, true);
  return finish(pvm::cuda::merge_bwd(p, static_cast<pvm::DType>(dtype), nullptr));
}

// Retrieval parameters with the sizes set and nothing else (no buffers, no strides).
static RetrievalParams sizes_only(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Nv, int64_t hd) {
  RetrievalParams p;
  p.B = B;
  p.T = T;
  p.H = H;
  p.Hkv = Hkv;
  p.Nv = Nv;
  p.hd = hd;
  return p;
}

// The launch status of a retrieval forward over the given sizes, with no buffers: for the
// grid-limit checks, which must refuse before any block runs.
PVM_EMU_API int pvm_emu_retrieval_fwd_dry(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Nv,
                                          int64_t hd) {
  cuemu::clear_last_message();
  const RetrievalParams p = sizes_only(B, T, H, Hkv, Nv, hd);
  return finish(pvm::cuda::retrieval_fwd(p, pvm::DType::kFloat32, nullptr));
}

// The split plan the host op makes for these sizes on `sm_count` SMs (force > 0: that many
// splits, as PVM_CUDA_SPLITS) and the blocks each launch then has, for contiguous
// [B, T, H, hd] / [B, Nv, Hkv, hd] tensors of `dtype` (pvm::DType's code) at 16-byte aligned
// addresses, as the host op plans them: in the tiles of the kernels that run for that dtype
// (retrieval_tiles). out = {kv_splits, split_keys, forward blocks, combine blocks,
// row_splits, split_rows, dK/dV blocks, sum blocks, dQ blocks, 1 if the forward and 1 if
// the backward runs on the tensor cores}. No buffers, nothing launched.
PVM_EMU_API void pvm_emu_retrieval_plan_dtype(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Nv,
                                              int64_t hd, int dtype, int64_t sm_count, int64_t force,
                                              int64_t* out) {
  RetrievalParams p = sizes_only(B, T, H, Hkv, Nv, hd);
  const int64_t q_strides[4] = {T * H * hd, H * hd, hd, 1}, k_strides[4] = {Nv * Hkv * hd, Hkv * hd, hd, 1};
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = p.o_stride[i] = p.dq_stride[i] = q_strides[i];
    p.k_stride[i] = p.v_stride[i] = p.dkv_stride[i] = k_strides[i];
  }
  void* const aligned = reinterpret_cast<void*>(uintptr_t{256});  // never dereferenced
  p.q = p.k = p.v = p.grad_out = aligned;
  p.out = p.dq = p.dk = p.dv = aligned;
  const auto dt = static_cast<pvm::DType>(dtype);
  pvm::retrieval_split_plan(p, sm_count, force, dt);
  const pvm::cuda::RetrievalGrid g = pvm::cuda::retrieval_grid(p, dt);
  const int64_t vals[] = {p.kv_splits, p.split_keys, g.fwd, g.combine, p.row_splits, p.split_rows, g.dkdv,
                          g.dkdv_sum, g.dq, pvm::retrieval_fwd_tensor_cores(p, dt),
                          pvm::retrieval_bwd_tensor_cores(p, dt)};
  for (int i = 0; i < 11; ++i) out[i] = vals[i];
}

// pvm_emu_retrieval_plan_dtype's out[0..8] for fp32 (the CUDA-core kernels' tiles, which
// no stride or address changes).
PVM_EMU_API void pvm_emu_retrieval_plan(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t Nv, int64_t hd,
                                        int64_t sm_count, int64_t force, int64_t* out) {
  int64_t all[11];
  pvm_emu_retrieval_plan_dtype(B, T, H, Hkv, Nv, hd, static_cast<int>(pvm::DType::kFloat32), sm_count, force, all);
  for (int i = 0; i < 9; ++i) out[i] = all[i];
}

PVM_EMU_API int pvm_emu_max_head_dim() { return pvm::cuda::kMaxHeadDim; }

// ---- configuration and reports ------------------------------------------------------------
PVM_EMU_API void pvm_emu_configure(uint64_t seed, int64_t sample_blocks, int guard_mode) {
  cuemu::Config c;
  c.seed = seed;
  c.sample_blocks = sample_blocks;
  c.guard_mode = guard_mode;
  cuemu::configure(c);
}

PVM_EMU_API const char* pvm_emu_error_string(int err) {
  return cuemu::error_string(static_cast<cudaError_t>(err));
}

PVM_EMU_API const char* pvm_emu_last_message() { return cuemu::last_message().c_str(); }

PVM_EMU_API void pvm_emu_stats(int64_t* launches, int64_t* blocks, int64_t* switches) {
  const cuemu::Stats s = cuemu::stats();
  *launches = s.launches;
  *blocks = s.blocks;
  *switches = s.context_switches;
}

// Launches and blocks run from the launch sites in source file `file` (a file name, e.g.
// "retrieval_tc_fwd.cu"), since the library was loaded.
PVM_EMU_API void pvm_emu_site_stats(const char* file, int64_t* launches, int64_t* blocks) {
  const cuemu::Stats s = cuemu::site_stats(file);
  *launches = s.launches;
  *blocks = s.blocks;
}

// ---- tensor-core wrappers (csrc/cuda/mma.cuh) ---------------------------------------------------
// The emulator's m16n8k16 fragment layout of operand `which` (0: A, 1: B, 2: C/D): rows and
// cols [32][n] with n = 8 for A, 4 otherwise (B: row = k, col = n).
PVM_EMU_API int pvm_emu_mma_layout(int which, int* rows, int* cols) {
  if (which < 0 || which > 2) return -1;
  const int n = which == 0 ? 8 : 4;
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < n; ++i)
      cuemu::mma_layout(static_cast<cuemu::MmaOperand>(which), lane, i, &rows[lane * n + i], &cols[lane * n + i]);
  return n;
}

// The self-test kernel of csrc/cuda/mma_selftest.cu (one warp, 16 x 16 tiles): a, b, bt of
// the dtype (2 bytes each), c fp32 or null; outputs a_f32, d, d_t (fp32) and d16 (dtype).
PVM_EMU_API int pvm_emu_mma_selftest(int dtype, int ldm, int a_rows, const void* a, const void* b,
                                     const void* bt, const float* c, float* a_f32, float* d, float* d_t,
                                     void* d16) {
  cuemu::clear_last_message();
  pvm::cuda::MmaSelftestParams p;
  p.a = a;
  p.b = b;
  p.bt = bt;
  p.c = c;
  p.a_f32 = a_f32;
  p.d = d;
  p.d_t = d_t;
  p.d16 = d16;
  p.a_rows = a_rows;
  p.ldm = ldm;
  const size_t tile = 16 * 16;
  Buffers bufs;
  bufs.add("a", p.a, tile * 2, false);
  bufs.add("b", p.b, tile * 2, false);
  bufs.add("bt", p.bt, tile * 2, false);
  bufs.add("c", p.c, tile * 4, false);
  bufs.add("a_f32", p.a_f32, tile * 4, true);
  bufs.add("d", p.d, tile * 4, true);
  bufs.add("d_t", p.d_t, tile * 4, true);
  bufs.add("d16", p.d16, tile * 2, true);
  return finish(pvm::cuda::mma_selftest(p, static_cast<pvm::DType>(dtype), nullptr));
}
