// CUDA implementations of the native PVM ops: argument checks, allocation, launch, and a
// check of every launch. The kernels themselves live in the .cu files (no torch headers).
#ifdef PVM_PYTHON_MODULE
#include <Python.h>
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda/launch.h"
#include "native_common.h"

#ifdef PVM_PYTHON_MODULE  // set by setup.py; CMake builds a plain library
extern "C" {
// Importing pvm_kernels._C_cuda loads this library, which runs the registrations below.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}
#endif

namespace pvm {
namespace {

#define PVM_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t pvm_err_ = (expr);                                              \
    TORCH_CHECK(pvm_err_ == cudaSuccess, "pvm_kernels CUDA kernel failed: ",          \
                cudaGetErrorString(pvm_err_), " (", #expr, ")");                      \
  } while (0)

void check_cuda_retrieval(const Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors");
  TORCH_CHECK(q.size(3) <= cuda::kMaxHeadDim, "the cuda backend supports head_dim <= ",
              cuda::kMaxHeadDim, ", got ", q.size(3));
}

std::tuple<Tensor, Tensor> retrieval_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const c10::optional<Tensor>& key_mask,
                                              const c10::optional<Tensor>& kv_len, double scale) {
  check_retrieval_args(q, k, v, key_mask, kv_len);
  check_cuda_retrieval(q);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = new_output(q.sizes(), q.options());
  Tensor lse = new_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  RetrievalParams p = retrieval_params(q, k, v, key_mask, kv_len, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  copy_strides(out, p.o_stride);
  PVM_CUDA_CHECK(cuda::retrieval_fwd(p, dtype_code(q), c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale) {
  check_retrieval_args(q, k, v, key_mask, kv_len);
  check_cuda_retrieval(q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "grad_out/out must match q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be contiguous float32");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor dq = new_output(q.sizes(), q.options());
  Tensor dk = new_output(k.sizes(), k.options());
  Tensor dv = new_output(v.sizes(), v.options());
  if (q.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  Tensor delta = softmax_bwd_delta(grad_out, out);
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
  PVM_CUDA_CHECK(cuda::retrieval_bwd(p, dtype_code(q), c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

MergeParams merge_params_cuda(const Tensor& e2, const Tensor& gate_f, const Tensor* keep_c,
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

std::tuple<Tensor, Tensor> merge_fwd_cuda(const Tensor& expanded, const Tensor& gate,
                                          const c10::optional<Tensor>& keep,
                                          const c10::optional<Tensor>& ffn_output, double eps) {
  check_merge_args(expanded, gate, keep, ffn_output);
  TORCH_CHECK(expanded.is_cuda(), "the cuda backend needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(expanded.device());
  const Tensor e2 = as_rows(expanded);
  const Tensor gate_f = gate.to(at::kFloat).contiguous();
  Tensor keep_c, ffn2;
  if (keep.has_value()) keep_c = keep->contiguous();
  if (ffn_output.has_value()) ffn2 = as_rows(*ffn_output);
  Tensor out = new_output(expanded.sizes(), expanded.options());
  Tensor rstd = new_output({e2.size(0)}, expanded.options().dtype(at::kFloat));
  MergeParams p = merge_params_cuda(e2, gate_f, keep.has_value() ? &keep_c : nullptr,
                                    ffn_output.has_value() ? &ffn2 : nullptr, eps);
  p.out = out.data_ptr();
  p.out_row = e2.size(1);
  p.rstd = rstd.data_ptr<float>();
  PVM_CUDA_CHECK(cuda::merge_fwd(p, dtype_code(expanded), c10::cuda::getCurrentCUDAStream()));
  return {out, rstd};
}

std::tuple<Tensor, Tensor> merge_bwd_cuda(const Tensor& grad_out, const Tensor& expanded,
                                          const Tensor& gate, const c10::optional<Tensor>& keep,
                                          const Tensor& rstd) {
  check_merge_args(expanded, gate, keep, c10::nullopt);
  TORCH_CHECK(expanded.is_cuda(), "the cuda backend needs CUDA tensors");
  TORCH_CHECK(grad_out.sizes() == expanded.sizes(), "grad_out must match expanded");
  const c10::cuda::CUDAGuard guard(expanded.device());
  const Tensor e2 = as_rows(expanded), g2 = as_rows(grad_out);
  const Tensor gate_f = gate.to(at::kFloat).contiguous();
  const Tensor rstd_c = rstd.to(at::kFloat).contiguous();
  Tensor keep_c;
  if (keep.has_value()) keep_c = keep->contiguous();
  Tensor de = new_output(expanded.sizes(), expanded.options());
  Tensor dgate_row = new_output({e2.size(0)}, expanded.options().dtype(at::kFloat));
  MergeParams p = merge_params_cuda(e2, gate_f, keep.has_value() ? &keep_c : nullptr, nullptr, 0.0);
  p.grad = g2.data_ptr();
  p.grad_row = g2.stride(0);
  p.rstd = rstd_c.data_ptr<float>();
  p.de = de.data_ptr();
  p.de_row = e2.size(1);
  p.dgate_row = dgate_row.data_ptr<float>();
  PVM_CUDA_CHECK(cuda::merge_bwd(p, dtype_code(expanded), c10::cuda::getCurrentCUDAStream()));
  return {de, dgate_row.sum().reshape(gate.sizes()).to(gate.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pvm_kernels, CUDA, m) {
  m.impl("native_retrieval_fwd", &retrieval_fwd_cuda);
  m.impl("native_retrieval_bwd", &retrieval_bwd_cuda);
  m.impl("native_merge_fwd", &merge_fwd_cuda);
  m.impl("native_merge_bwd", &merge_bwd_cuda);
}

}  // namespace pvm
