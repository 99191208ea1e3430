// Plain parameter blocks for the PVM kernels: pointers, strides and sizes only.
// Shared by the CPU code and the CUDA kernels; deliberately free of torch headers so
// the .cu files compile without them (a .cu that includes torch costs ~1 min to build).
#pragma once
#include <cstdint>

namespace pvm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Retrieval forward and backward. Layouts: q/out/grad_out/dq [B, T, H, hd];
// k/v/dk/dv [B, Nv, Hkv, hd]; lse/delta [B, H, T] float32 (contiguous);
// key_mask [B, Nv] bool (nullable); kv_len [B] int32 (nullable). Strides in elements.
struct RetrievalParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* key_mask = nullptr;
  const int32_t* kv_len = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  // backward only
  const void* grad_out = nullptr;
  const float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  int64_t o_stride[4] = {0, 0, 0, 0};   // out (fwd) or grad_out (bwd)
  int64_t dq_stride[4] = {0, 0, 0, 0};
  int64_t dkv_stride[4] = {0, 0, 0, 0};  // dk and dv share one layout
  int64_t mask_stride[2] = {0, 0};

  int64_t B = 0, T = 0, H = 0, Hkv = 0, Nv = 0, hd = 0;
  float scale = 1.f;
};

// Merge: out = ffn + keep * gate * rms(e); rows of length D with row strides.
struct MergeParams {
  const void* e = nullptr;
  const void* ffn = nullptr;      // nullable
  const bool* keep = nullptr;     // nullable
  const float* gate = nullptr;    // one float32 on the device of e
  void* out = nullptr;
  float* rstd = nullptr;
  // backward only
  const void* grad = nullptr;
  void* de = nullptr;
  float* dgate_row = nullptr;     // [N] per-row partials of d(gate)

  int64_t N = 0, D = 0;
  int64_t e_row = 0, ffn_row = 0, out_row = 0, grad_row = 0, de_row = 0;
  float eps = 1e-6f;
};

}  // namespace pvm
