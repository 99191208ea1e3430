// ATen-side helpers shared by the CPU and CUDA glue: argument checks, output
// allocation (NaN-poisoned under PVM_POISON_OUTPUTS=1, for tests) and the parameter
// blocks filled from tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>
#include <c10/util/accumulate.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>

#include "pvm_params.h"

namespace pvm {

using at::Tensor;

inline bool poison_outputs() {
  const char* env = std::getenv("PVM_POISON_OUTPUTS");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

inline Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (poison_outputs()) return at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts);
  return at::empty(shape, opts);
}

inline DType dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "pvm_kernels native ops support float32, float16 and bfloat16; got ",
                  t.scalar_type());
  }
}

// Calls f(scalar_t{}) for the tensor's dtype: float, c10::Half or c10::BFloat16 only, so
// no unused double instantiation is compiled.
template <typename F>
inline void dispatch_float_types(const Tensor& t, F&& f) {
  switch (dtype_code(t)) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(c10::Half{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
  }
}

// ---- argument checks ------------------------------------------------------------------------
// Every tensor an op receives is checked before anything is launched: device, dtype and
// shape, each message naming the argument, what was expected and what it got. A direct op
// call with, e.g., lse on another device must fail here, not hand a kernel a foreign pointer.

inline void check_float_dtype(const Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              ": pvm_kernels native ops support float32, float16 and bfloat16; got ", st);
}

// `t` (argument `name`) must be defined, on `ref`'s device, of `dtype` and of `shape`.
inline void check_tensor(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name,
                         at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got an undefined one");
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref_name, "'s device ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// The CUDA kernels keep hd / 32 accumulators per lane: head_dim <= max_head_dim.
inline void check_head_dim(const Tensor& q, int64_t max_head_dim, const char* backend) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, T, H, hd], got shape ", q.sizes());
  TORCH_CHECK(q.size(3) <= max_head_dim, "the ", backend, " backend supports head_dim <= ", max_head_dim,
              ", got ", q.size(3));
}

inline void check_retrieval_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const c10::optional<Tensor>& key_mask,
                                 const c10::optional<Tensor>& kv_len) {
  TORCH_CHECK(q.defined() && q.dim() == 4, "q must be 4-D [B, T, H, hd], got shape ",
              q.defined() ? q.sizes() : at::IntArrayRef{});
  check_float_dtype(q, "q");
  TORCH_CHECK(k.defined() && k.dim() == 4, "k must be 4-D [B, Nv, Hkv, hd], got shape ",
              k.defined() ? k.sizes() : at::IntArrayRef{});
  const int64_t B = q.size(0), H = q.size(2), hd = q.size(3), Nv = k.size(1), Hkv = k.size(2);
  check_tensor(k, "k", q, "q", q.scalar_type(), {B, Nv, Hkv, hd});
  check_tensor(v, "v", q, "q", q.scalar_type(), {B, Nv, Hkv, hd});
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "q heads must be a multiple of k heads: ", H, " vs ", Hkv);
  if (key_mask.has_value()) check_tensor(*key_mask, "key_mask", q, "q", at::kBool, {B, Nv});
  if (kv_len.has_value()) {
    check_tensor(*kv_len, "kv_len", q, "q", at::kInt, {B});
    TORCH_CHECK(kv_len->is_contiguous(), "kv_len must be contiguous, got strides ", kv_len->strides());
  }
}

// The backward's extra inputs: grad_out and out like q, lse float32 [B, H, T] contiguous.
inline void check_retrieval_bwd_args(const Tensor& grad_out, const Tensor& q, const Tensor& out,
                                     const Tensor& lse) {
  check_tensor(grad_out, "grad_out", q, "q", q.scalar_type(), q.sizes());
  check_tensor(out, "out", q, "q", q.scalar_type(), q.sizes());
  check_tensor(lse, "lse", q, "q", at::kFloat, {q.size(0), q.size(2), q.size(1)});
  TORCH_CHECK(lse.is_contiguous(), "lse must be contiguous, got strides ", lse.strides());
}

// A 4-D [B, rows, heads, hd] tensor's strides, or a 3-D packed (varlen) [total, heads, hd]
// tensor's as {0, row, head, dim} (pvm_params.h), into a 4-entry stride array.
inline void copy_strides(const Tensor& t, int64_t* dst) {
  const int lead = 4 - static_cast<int>(t.dim());
  for (int i = 0; i < lead; ++i) dst[i] = 0;
  for (int i = 0; i < t.dim(); ++i) dst[lead + i] = t.stride(i);
}

// q, k, v pointers and strides (either layout).
inline void set_qkv(RetrievalParams& p, const Tensor& q, const Tensor& k, const Tensor& v) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
  copy_strides(v, p.v_stride);
}

inline RetrievalParams retrieval_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const c10::optional<Tensor>& key_mask,
                                        const c10::optional<Tensor>& kv_len, double scale) {
  RetrievalParams p;
  set_qkv(p, q, k, v);
  if (key_mask.has_value()) {
    p.key_mask = key_mask->data_ptr<bool>();
    p.mask_stride[0] = key_mask->stride(0);
    p.mask_stride[1] = key_mask->stride(1);
  }
  if (kv_len.has_value()) p.kv_len = kv_len->data_ptr<int32_t>();
  p.B = q.size(0);
  p.T = q.size(1);
  p.H = q.size(2);
  p.hd = q.size(3);
  p.Nv = k.size(1);
  p.Hkv = k.size(2);
  p.scale = static_cast<float>(scale);
  return p;
}

// delta[b, h, t] = <grad_out[b, t, h], out[b, t, h]>, float32 [B, H, T] contiguous.
inline Tensor softmax_bwd_delta(const Tensor& grad_out, const Tensor& out) {
  return grad_out.to(at::kFloat).mul(out.to(at::kFloat)).sum(-1).transpose(1, 2).contiguous();
}

// ---- varlen (packed) retrieval: flash-attention's cu_seqlens layout ------------------------
// q [total_q, H, hd]; k, v [total_k, Hkv, hd]; cu_seqlens_q / cu_seqlens_k int32 [N + 1],
// contiguous, on q's device. Their values are not read here (that would sync a GPU): the
// kernels clamp every bound (pvm_params.h, seq_*), and the Python op validates them on CPU.
inline void check_cu_seqlens(const Tensor& cu, const char* name, const Tensor& q, int64_t n_plus_1) {
  TORCH_CHECK(cu.defined() && cu.dim() == 1, name, " must be a 1-D int32 tensor [N + 1], got shape ",
              cu.defined() ? cu.sizes() : at::IntArrayRef{});
  check_tensor(cu, name, q, "q", at::kInt, {n_plus_1 < 0 ? cu.size(0) : n_plus_1});
  TORCH_CHECK(cu.size(0) >= 1, name, " must hold at least one entry (N + 1 with N >= 0)");
  TORCH_CHECK(cu.is_contiguous(), name, " must be contiguous, got strides ", cu.strides());
}

inline void check_retrieval_varlen_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                        int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK(q.defined() && q.dim() == 3, "q must be 3-D [total_q, H, hd], got shape ",
              q.defined() ? q.sizes() : at::IntArrayRef{});
  check_float_dtype(q, "q");
  TORCH_CHECK(k.defined() && k.dim() == 3, "k must be 3-D [total_k, Hkv, hd], got shape ",
              k.defined() ? k.sizes() : at::IntArrayRef{});
  const int64_t H = q.size(1), hd = q.size(2), total_k = k.size(0), Hkv = k.size(1);
  check_tensor(k, "k", q, "q", q.scalar_type(), {total_k, Hkv, hd});
  check_tensor(v, "v", q, "q", q.scalar_type(), {total_k, Hkv, hd});
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "q heads must be a multiple of k heads: ", H, " vs ", Hkv);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, -1);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, cu_seqlens_q.size(0));
  TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
}

inline RetrievalParams retrieval_varlen_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k, double scale) {
  RetrievalParams p;
  set_qkv(p, q, k, v);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.B = cu_seqlens_q.size(0) - 1;
  p.T = max_seqlen_q;
  p.H = q.size(1);
  p.hd = q.size(2);
  p.Nv = max_seqlen_k;
  p.Hkv = k.size(1);
  p.scale = static_cast<float>(scale);
  return p;
}

inline void check_merge_args(const Tensor& e, const Tensor& gate,
                             const c10::optional<Tensor>& keep,
                             const c10::optional<Tensor>& ffn) {
  TORCH_CHECK(e.defined() && e.dim() >= 1, "expanded must be [..., D], got shape ",
              e.defined() ? e.sizes() : at::IntArrayRef{});
  check_float_dtype(e, "expanded");
  TORCH_CHECK(gate.defined(), "gate must be a tensor, got an undefined one");
  TORCH_CHECK(gate.device() == e.device(), "gate must be on expanded's device ", e.device(), ", got ",
              gate.device());
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()), "gate must have a floating dtype, got ",
              gate.scalar_type());
  TORCH_CHECK(gate.numel() == 1, "gate must hold one element, got shape ", gate.sizes());
  const at::IntArrayRef lead = e.sizes().slice(0, e.dim() - 1);
  if (keep.has_value()) check_tensor(*keep, "keep", e, "expanded", at::kBool, lead);
  if (ffn.has_value()) check_tensor(*ffn, "ffn_output", e, "expanded", e.scalar_type(), e.sizes());
}

// The backward's extra inputs: grad_out like expanded, rstd float32 [N] (N rows).
inline void check_merge_bwd_args(const Tensor& grad_out, const Tensor& e, const Tensor& rstd) {
  check_tensor(grad_out, "grad_out", e, "expanded", e.scalar_type(), e.sizes());
  const int64_t n = c10::multiply_integers(e.sizes().slice(0, e.dim() - 1));
  check_tensor(rstd, "rstd", e, "expanded", at::kFloat, {n});
}

// [..., D] -> [N, D] with unit last stride (a view when the layout allows).
inline Tensor as_rows(const Tensor& t) {
  Tensor r = t.reshape({-1, t.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// ---- split launches of the CUDA retrieval kernels -------------------------------------------
// The CUDA kernels (real and emulated) split a retrieval loop among blocks when a launch
// would have fewer than 2 blocks per SM (retrieval_split_plan, pvm_params.h); the host op
// plans the split from the device's SM count and allocates the fp32 workspaces, so the GPU
// and the emulator run the same path. Two environment variables override the plan, for
// tests: PVM_CUDA_SPLITS=n asks for n splits of every split loop (1: never split; still at
// most one per tile and 64), PVM_CUDA_SM_COUNT=n plans for n SMs.

// What the CUDA kernels' launch plan needs of the device: its SM count (0, the CPU
// backend's: never split) and whether it runs the tensor-core kernels (sm_80 and newer).
struct CudaDevice {
  int64_t sm_count = 0;
  bool tensor_cores = false;
};

inline int64_t env_int(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && *env ? std::strtoll(env, nullptr, 10) : 0;
}

// Plans p's splits for the device's SMs (0: the CPU backend, never split), overrides applied,
// in the tiles of the kernels that will run p in `dtype` (retrieval_tiles, pvm_params.h:
// the tensor-core kernels' 64 x 64 or the CUDA-core kernels'). Whether the launch takes
// the tensor cores is decided here, once, on the tensors' own pointers, and carried in
// p.tensor_cores, which the launcher obeys: the CUDA emulator's C API runs the launcher on
// guarded copies of the buffers, whose alignment may differ from the tensors'. A forward's
// parameters name no gradient and a backward's no output, so of the two rules only the
// op's own can hold. PVM_CUDA_TENSOR_CORES=0 keeps the forward and the backward on the
// CUDA-core kernels (tests compare the two; a fallback on a GPU).
// CUDA devices below sm_80 have no bf16 mma.sync, ldmatrix or cp.async (the wrappers trap
// there), so `device.tensor_cores` is false for them and they keep the CUDA-core kernels.
inline void plan_retrieval_splits(RetrievalParams& p, const CudaDevice& device, DType dtype) {
  if (device.sm_count <= 0) return;
  const char* tc = std::getenv("PVM_CUDA_TENSOR_CORES");
  p.tensor_cores = device.tensor_cores && !(tc != nullptr && std::strcmp(tc, "0") == 0) &&
                   (retrieval_fwd_tensor_cores(p, dtype) || retrieval_bwd_tensor_cores(p, dtype));
  const int64_t sms = env_int("PVM_CUDA_SM_COUNT");
  retrieval_split_plan(p, sms > 0 ? sms : device.sm_count, env_int("PVM_CUDA_SPLITS"), dtype);
}

// ---- op bodies shared by the CPU and CUDA implementations --------------------------------
// Each checks, allocates the outputs, fills the parameter block and calls `launch(params)`,
// the device-specific part (a CPU dtype dispatch or a checked CUDA launch). `device`: what
// the CUDA kernels' plan needs (the CPU's default: no split, no tensor cores).

// The forward after the checks, for either layout: p filled but for its outputs; out like q
// and lse [B, H, T] or [H, total_q] already allocated.
template <typename Launch>
void launch_retrieval_fwd(RetrievalParams& p, const Tensor& q, const Tensor& out, const Tensor& lse,
                          const CudaDevice& device, Launch&& launch) {
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  copy_strides(out, p.o_stride);
  plan_retrieval_splits(p, device, dtype_code(q));
  p.row_splits = 1;  // the backward's split
  Tensor o_part, lse_part;  // split partials: [splits, stat_rows, hd] and [splits, stat_rows]
  if (p.kv_splits > 1) {
    const int64_t n_stats = stat_rows(p);
    o_part = new_output({p.kv_splits, n_stats, p.hd}, q.options().dtype(at::kFloat));
    lse_part = new_output({p.kv_splits, n_stats}, q.options().dtype(at::kFloat));
    p.o_part = o_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  launch(p);
}

template <typename Launch>
std::tuple<Tensor, Tensor> retrieval_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const c10::optional<Tensor>& key_mask,
                                            const c10::optional<Tensor>& kv_len, double scale,
                                            const CudaDevice& device, Launch&& launch) {
  check_retrieval_args(q, k, v, key_mask, kv_len);
  Tensor out = new_output(q.sizes(), q.options());
  Tensor lse = new_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  RetrievalParams p = retrieval_params(q, k, v, key_mask, kv_len, scale);
  launch_retrieval_fwd(p, q, out, lse, device, std::forward<Launch>(launch));
  return {out, lse};
}

// Varlen forward: out [total_q, H, hd] like q, lse [H, total_q] float32.
template <typename Launch>
std::tuple<Tensor, Tensor> retrieval_varlen_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                                   const CudaDevice& device, Launch&& launch) {
  check_retrieval_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  // Rows no sequence owns (past cu_seqlens_q[N], as a serving engine's padded batch has) are
  // never visited by a kernel: they stay 0. lse rows there are unspecified and never read.
  Tensor out = at::zeros(q.sizes(), q.options());
  Tensor lse = new_output({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0 || cu_seqlens_q.size(0) < 2) return {out, lse};
  RetrievalParams p = retrieval_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, scale);
  launch_retrieval_fwd(p, q, out, lse, device, std::forward<Launch>(launch));
  return {out, lse};
}

template <typename Launch>
std::tuple<Tensor, Tensor> retrieval_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const c10::optional<Tensor>& key_mask,
                                            const c10::optional<Tensor>& kv_len, double scale,
                                            Launch&& launch) {
  return retrieval_fwd_op(q, k, v, key_mask, kv_len, scale, CudaDevice{}, std::forward<Launch>(launch));
}

// The backward after the checks, for either layout: p filled with the forward's inputs;
// dq, dk, dv allocated; delta laid out like lse.
template <typename Launch>
void launch_retrieval_bwd(RetrievalParams& p, const Tensor& grad_out, const Tensor& q, const Tensor& lse,
                          const Tensor& delta, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                          const CudaDevice& device, Launch&& launch) {
  p.grad_out = grad_out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  copy_strides(grad_out, p.o_stride);
  copy_strides(dq, p.dq_stride);
  copy_strides(dk, p.dkv_stride);
  plan_retrieval_splits(p, device, dtype_code(q));
  p.kv_splits = 1;  // the forward's split
  Tensor dk_part, dv_part;  // split partials: [splits, key_rows, Hkv, hd] each, contiguous
  if (p.row_splits > 1 && dk.numel() > 0) {
    dk_part = new_output({p.row_splits, key_rows(p), p.Hkv, p.hd}, q.options().dtype(at::kFloat));
    dv_part = new_output({p.row_splits, key_rows(p), p.Hkv, p.hd}, q.options().dtype(at::kFloat));
    p.dk_part = dk_part.data_ptr<float>();
    p.dv_part = dv_part.data_ptr<float>();
  } else {
    p.row_splits = 1;
  }
  launch(p);
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_op(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale, const CudaDevice& device, Launch&& launch) {
  check_retrieval_args(q, k, v, key_mask, kv_len);
  check_retrieval_bwd_args(grad_out, q, out, lse);
  Tensor dq = new_output(q.sizes(), q.options());
  Tensor dk = new_output(k.sizes(), k.options());
  Tensor dv = new_output(v.sizes(), v.options());
  if (q.numel() == 0) {  // no query: no gradient reaches the keys
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const Tensor delta = softmax_bwd_delta(grad_out, out);
  RetrievalParams p = retrieval_params(q, k, v, key_mask, kv_len, scale);
  launch_retrieval_bwd(p, grad_out, q, lse, delta, dq, dk, dv, device, std::forward<Launch>(launch));
  return {dq, dk, dv};
}

// Varlen backward: grad_out and out like q, lse [H, total_q] float32 contiguous. Keys of no
// sequence (outside every [cu_seqlens_k[b], cu_seqlens_k[b + 1])) get exactly 0 gradient.
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> retrieval_varlen_bwd_op(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, const CudaDevice& device, Launch&& launch) {
  check_retrieval_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  check_tensor(grad_out, "grad_out", q, "q", q.scalar_type(), q.sizes());
  check_tensor(out, "out", q, "q", q.scalar_type(), q.sizes());
  check_tensor(lse, "lse", q, "q", at::kFloat, {q.size(1), q.size(0)});
  TORCH_CHECK(lse.is_contiguous(), "lse must be contiguous, got strides ", lse.strides());
  // Rows and keys no sequence owns are never visited by a kernel: their gradients stay 0.
  Tensor dq = at::zeros(q.sizes(), q.options());
  Tensor dk = at::zeros(k.sizes(), k.options());
  Tensor dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0 || cu_seqlens_q.size(0) < 2) return {dq, dk, dv};
  // delta[h, i] = <grad_out[i, h], out[i, h]>: [H, total_q], laid out like lse.
  const Tensor delta = grad_out.to(at::kFloat).mul(out.to(at::kFloat)).sum(-1).t().contiguous();
  RetrievalParams p = retrieval_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, scale);
  launch_retrieval_bwd(p, grad_out, q, lse, delta, dq, dk, dv, device, std::forward<Launch>(launch));
  return {dq, dk, dv};
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_op(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale, Launch&& launch) {
  return retrieval_bwd_op(grad_out, q, k, v, out, lse, key_mask, kv_len, scale, CudaDevice{},
                          std::forward<Launch>(launch));
}

inline MergeParams merge_params(const Tensor& e2, const Tensor& gate_f, const Tensor* keep_c,
                                const Tensor* ffn2, double eps) {
  MergeParams p;
  p.e = e2.data_ptr();
  p.e_row = e2.stride(0);
  p.N = e2.size(0);
  p.D = e2.size(1);
  p.gate = gate_f.data_ptr<float>();
  p.keep = keep_c ? keep_c->data_ptr<bool>() : nullptr;
  if (ffn2) {
    p.ffn = ffn2->data_ptr();
    p.ffn_row = ffn2->stride(0);
  }
  p.eps = static_cast<float>(eps);
  return p;
}

template <typename Launch>
std::tuple<Tensor, Tensor> merge_fwd_op(const Tensor& expanded, const Tensor& gate,
                                        const c10::optional<Tensor>& keep,
                                        const c10::optional<Tensor>& ffn_output, double eps,
                                        Launch&& launch) {
  check_merge_args(expanded, gate, keep, ffn_output);
  const Tensor e2 = as_rows(expanded);
  const Tensor gate_f = gate.to(at::kFloat).contiguous();
  Tensor keep_c, ffn2;
  if (keep.has_value()) keep_c = keep->contiguous();
  if (ffn_output.has_value()) ffn2 = as_rows(*ffn_output);
  Tensor out = new_output(expanded.sizes(), expanded.options());
  Tensor rstd = new_output({e2.size(0)}, expanded.options().dtype(at::kFloat));
  MergeParams p = merge_params(e2, gate_f, keep.has_value() ? &keep_c : nullptr,
                               ffn_output.has_value() ? &ffn2 : nullptr, eps);
  p.out = out.data_ptr();
  p.out_row = e2.size(1);
  p.rstd = rstd.data_ptr<float>();
  launch(p);
  return {out, rstd};
}

template <typename Launch>
std::tuple<Tensor, Tensor> merge_bwd_op(const Tensor& grad_out, const Tensor& expanded,
                                        const Tensor& gate, const c10::optional<Tensor>& keep,
                                        const Tensor& rstd, Launch&& launch) {
  check_merge_args(expanded, gate, keep, c10::nullopt);
  check_merge_bwd_args(grad_out, expanded, rstd);
  const Tensor e2 = as_rows(expanded), g2 = as_rows(grad_out);
  const Tensor gate_f = gate.to(at::kFloat).contiguous();
  const Tensor rstd_c = rstd.contiguous();
  Tensor keep_c;
  if (keep.has_value()) keep_c = keep->contiguous();
  Tensor de = new_output(expanded.sizes(), expanded.options());
  Tensor dgate_row = new_output({e2.size(0)}, expanded.options().dtype(at::kFloat));
  MergeParams p = merge_params(e2, gate_f, keep.has_value() ? &keep_c : nullptr, nullptr, 0.0);
  p.grad = g2.data_ptr();
  p.grad_row = g2.stride(0);
  p.rstd = rstd_c.data_ptr<float>();
  p.de = de.data_ptr();
  p.de_row = e2.size(1);
  p.dgate_row = dgate_row.data_ptr<float>();
  launch(p);
  // per-row partials summed here: deterministic, and no atomics on one scalar
  return {de, dgate_row.sum().reshape(gate.sizes()).to(gate.scalar_type())};
}

}  // namespace pvm
