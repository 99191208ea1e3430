// CUDA implementations of the native PVM ops: argument checks, allocation, launch, and a
// check of every launch. The kernels themselves live in the .cu files (no torch headers).
#ifdef PVM_PYTHON_MODULE
#include <Python.h>
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
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
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  check_head_dim(q, cuda::kMaxHeadDim, "cuda");
}

// Varlen q [total_q, H, hd] (check_head_dim wants 4-D q).
void check_cuda_retrieval_varlen(const Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  TORCH_CHECK(q.dim() == 3, "q must be 3-D [total_q, H, hd], got shape ", q.sizes());
  TORCH_CHECK(q.size(2) <= cuda::kMaxHeadDim, "the cuda backend supports head_dim <= ", cuda::kMaxHeadDim,
              ", got ", q.size(2));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// q's device as the retrieval's launch plan sees it (native_common.h): its SM count and
// whether it has the sm_80 tensor-core instructions. Asked of the driver once per device
// and process, then cached, so a decode step makes no driver call for it. (Not ATen's
// getDeviceProperties: its header needs cusparse.h.)
CudaDevice cuda_device(const Tensor& q) {
  constexpr int kCached = 64;
  static std::atomic<int> sms[kCached] = {}, major[kCached] = {};
  const int dev = q.device().index();
  const bool cached = dev >= 0 && dev < kCached;
  int n = cached ? sms[dev].load(std::memory_order_acquire) : 0;  // major is stored before
  int m = cached ? major[dev].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    PVM_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    PVM_CUDA_CHECK(cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev));
    if (cached) {
      major[dev].store(m, std::memory_order_relaxed);
      sms[dev].store(n, std::memory_order_release);
    }
  }
  return CudaDevice{n, m >= 8};
}

std::tuple<Tensor, Tensor> retrieval_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const c10::optional<Tensor>& key_mask,
                                              const c10::optional<Tensor>& kv_len, double scale) {
  check_cuda_retrieval(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return retrieval_fwd_op(q, k, v, key_mask, kv_len, scale, cuda_device(q), [&](const RetrievalParams& p) {
    PVM_CUDA_CHECK(cuda::retrieval_fwd(p, dtype_code(q), stream()));
  });
}

std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale) {
  check_cuda_retrieval(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return retrieval_bwd_op(grad_out, q, k, v, out, lse, key_mask, kv_len, scale, cuda_device(q),
                          [&](const RetrievalParams& p) {
    PVM_CUDA_CHECK(cuda::retrieval_bwd(p, dtype_code(q), stream()));
  });
}

// Varlen (packed, cu_seqlens): the same launchers; the kernels read the sequences' bounds
// from cu_seqlens_q / cu_seqlens_k on the device (pvm_params.h), so nothing syncs here.
std::tuple<Tensor, Tensor> retrieval_varlen_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                     int64_t max_seqlen_q, int64_t max_seqlen_k, double scale) {
  check_cuda_retrieval_varlen(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return retrieval_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                 cuda_device(q), [&](const RetrievalParams& p) {
    PVM_CUDA_CHECK(cuda::retrieval_fwd(p, dtype_code(q), stream()));
  });
}

std::tuple<Tensor, Tensor, Tensor> retrieval_varlen_bwd_cuda(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale) {
  check_cuda_retrieval_varlen(q);
  const c10::cuda::CUDAGuard guard(q.device());
  return retrieval_varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, scale, cuda_device(q), [&](const RetrievalParams& p) {
    PVM_CUDA_CHECK(cuda::retrieval_bwd(p, dtype_code(q), stream()));
  });
}

std::tuple<Tensor, Tensor> merge_fwd_cuda(const Tensor& expanded, const Tensor& gate,
                                          const c10::optional<Tensor>& keep,
                                          const c10::optional<Tensor>& ffn_output, double eps) {
  TORCH_CHECK(expanded.is_cuda(), "the cuda backend needs CUDA tensors, got expanded on ",
              expanded.device());
  const c10::cuda::CUDAGuard guard(expanded.device());
  return merge_fwd_op(expanded, gate, keep, ffn_output, eps, [&](const MergeParams& p) {
    PVM_CUDA_CHECK(cuda::merge_fwd(p, dtype_code(expanded), stream()));
  });
}

std::tuple<Tensor, Tensor> merge_bwd_cuda(const Tensor& grad_out, const Tensor& expanded,
                                          const Tensor& gate, const c10::optional<Tensor>& keep,
                                          const Tensor& rstd) {
  TORCH_CHECK(expanded.is_cuda(), "the cuda backend needs CUDA tensors, got expanded on ",
              expanded.device());
  const c10::cuda::CUDAGuard guard(expanded.device());
  return merge_bwd_op(grad_out, expanded, gate, keep, rstd, [&](const MergeParams& p) {
    PVM_CUDA_CHECK(cuda::merge_bwd(p, dtype_code(expanded), stream()));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pvm_kernels, CUDA, m) {
  m.impl("native_retrieval_fwd", &retrieval_fwd_cuda);
  m.impl("native_retrieval_bwd", &retrieval_bwd_cuda);
  m.impl("native_retrieval_varlen_fwd", &retrieval_varlen_fwd_cuda);
  m.impl("native_retrieval_varlen_bwd", &retrieval_varlen_bwd_cuda);
  m.impl("native_merge_fwd", &merge_fwd_cuda);
  m.impl("native_merge_bwd", &merge_bwd_cuda);
}

}  // namespace pvm
