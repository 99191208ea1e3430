// ATen-side helpers shared by the CPU and CUDA glue: argument checks, output
// allocation (NaN-poisoned under PVM_POISON_OUTPUTS=1, for tests) and the parameter
// blocks filled from tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

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

inline void check_retrieval_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const c10::optional<Tensor>& key_mask,
                                 const c10::optional<Tensor>& kv_len) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "q, k, v must be 4-D ([B, T, H, hd] and [B, Nv, Hkv, hd])");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v shapes differ: ", k.sizes(), " vs ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "q ", q.sizes(), " and k ", k.sizes(), " disagree on B or hd");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0,
              "q heads must be a multiple of k heads: ", q.size(2), " vs ", k.size(2));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "q, k, v must be on one device");
  dtype_code(q);
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool, "key_mask must be bool");
    TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == k.size(0) &&
                key_mask->size(1) == k.size(1), "key_mask must be [B, Nv]");
    TORCH_CHECK(key_mask->device() == q.device(), "key_mask must be on q's device");
  }
  if (kv_len.has_value()) {
    TORCH_CHECK(kv_len->scalar_type() == at::kInt && kv_len->dim() == 1 &&
                kv_len->size(0) == k.size(0), "kv_len must be int32 [B]");
    TORCH_CHECK(kv_len->is_contiguous() && kv_len->device() == q.device(),
                "kv_len must be contiguous and on q's device");
  }
}

inline void copy_strides(const Tensor& t, int64_t* dst) {
  for (int i = 0; i < t.dim(); ++i) dst[i] = t.stride(i);
}

inline RetrievalParams retrieval_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const c10::optional<Tensor>& key_mask,
                                        const c10::optional<Tensor>& kv_len, double scale) {
  RetrievalParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
  copy_strides(v, p.v_stride);
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

inline void check_merge_args(const Tensor& e, const Tensor& gate,
                             const c10::optional<Tensor>& keep,
                             const c10::optional<Tensor>& ffn) {
  TORCH_CHECK(e.dim() >= 1, "expanded must be [..., D]");
  dtype_code(e);
  TORCH_CHECK(gate.numel() == 1 && gate.device() == e.device(),
              "gate must be a one-element tensor on expanded's device");
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->numel() * e.size(-1) == e.numel(),
                "keep must be bool with expanded's leading shape");
    TORCH_CHECK(keep->device() == e.device(), "keep must be on expanded's device");
  }
  if (ffn.has_value()) {
    TORCH_CHECK(ffn->sizes() == e.sizes() && ffn->scalar_type() == e.scalar_type() &&
                ffn->device() == e.device(), "ffn_output must match expanded");
  }
}

// [..., D] -> [N, D] with unit last stride (a view when the layout allows).
inline Tensor as_rows(const Tensor& t) {
  Tensor r = t.reshape({-1, t.size(-1)});
  return r.stride(-1) == 1 ? r : r.contiguous();
}

// ---- op bodies shared by the CPU and CUDA implementations --------------------------------
// Each checks, allocates the outputs, fills the parameter block and calls `launch(params)`,
// the device-specific part (a CPU dtype dispatch or a checked CUDA launch).

template <typename Launch>
std::tuple<Tensor, Tensor> retrieval_fwd_op(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const c10::optional<Tensor>& key_mask,
                                            const c10::optional<Tensor>& kv_len, double scale,
                                            Launch&& launch) {
  check_retrieval_args(q, k, v, key_mask, kv_len);
  Tensor out = new_output(q.sizes(), q.options());
  Tensor lse = new_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  RetrievalParams p = retrieval_params(q, k, v, key_mask, kv_len, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  copy_strides(out, p.o_stride);
  launch(p);
  return {out, lse};
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_op(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale, Launch&& launch) {
  check_retrieval_args(q, k, v, key_mask, kv_len);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out/out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be contiguous float32");
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
  p.grad_out = grad_out.data_ptr();
  copy_strides(grad_out, p.o_stride);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  copy_strides(dq, p.dq_stride);
  copy_strides(dk, p.dkv_stride);
  launch(p);
  return {dq, dk, dv};
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
  TORCH_CHECK(grad_out.sizes() == expanded.sizes(), "grad_out must match expanded");
  const Tensor e2 = as_rows(expanded), g2 = as_rows(grad_out);
  const Tensor gate_f = gate.to(at::kFloat).contiguous();
  const Tensor rstd_c = rstd.to(at::kFloat).contiguous();
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
