// Torch harness of the CUDA emulator: the ops pvm_kernels::cuda_emulated_* on CPU tensors,
// with the same host-side op bodies as the real CUDA backend (csrc/native_common.h:
// argument checks, output allocation, parameter blocks) and, in place of the CUDA launch,
// the emulated kernel library (csrc/emu/capi.cpp) loaded from $PVM_CUDA_EMU_LIB.
// The op schemas are defined from Python (pvm_kernels.ops.registration.SCHEMAS) before
// this library is loaded; see csrc/emu/emulator.py.
#include <dlfcn.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>

#include "native_common.h"

namespace pvm {
namespace {

// The device the emulator stands for: an H100's 132 SMs (its tests take the split paths a
// GPU takes), with tensor cores.
constexpr CudaDevice kEmulatedDevice{kEmulatedSmCount, true};

struct EmuLib {
  std::string path;
  void* handle = nullptr;
  int (*retrieval_fwd)(const RetrievalParams*, int) = nullptr;
  int (*retrieval_bwd)(const RetrievalParams*, int) = nullptr;
  int (*merge_fwd)(const MergeParams*, int) = nullptr;
  int (*merge_bwd)(const MergeParams*, int) = nullptr;
  int (*max_head_dim)() = nullptr;
  const char* (*error_string)(int) = nullptr;
  const char* (*last_message)() = nullptr;
};

template <typename F>
void bind(void* handle, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  TORCH_CHECK(fn != nullptr, "cuda_emulated: symbol ", name, " missing from the kernel library");
}

// The kernel library named by $PVM_CUDA_EMU_LIB (loaded again if the variable changes).
const EmuLib& lib() {
  static std::mutex mutex;
  static EmuLib current;
  const std::lock_guard<std::mutex> lock(mutex);
  const char* env = std::getenv("PVM_CUDA_EMU_LIB");
  TORCH_CHECK(env != nullptr && *env, "cuda_emulated: set PVM_CUDA_EMU_LIB to the emulated kernel library");
  if (current.handle == nullptr || current.path != env) {
    void* h = dlopen(env, RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(h != nullptr, "cuda_emulated: cannot load ", env, ": ", dlerror());
    EmuLib l;
    l.path = env;
    l.handle = h;
    bind(h, "pvm_emu_retrieval_fwd", l.retrieval_fwd);
    bind(h, "pvm_emu_retrieval_bwd", l.retrieval_bwd);
    bind(h, "pvm_emu_merge_fwd", l.merge_fwd);
    bind(h, "pvm_emu_merge_bwd", l.merge_bwd);
    bind(h, "pvm_emu_max_head_dim", l.max_head_dim);
    bind(h, "pvm_emu_error_string", l.error_string);
    bind(h, "pvm_emu_last_message", l.last_message);
    current = l;  // an older library stays loaded: nothing else references it
  }
  return current;
}

// As ops_cuda.cpp's PVM_CUDA_CHECK, with the emulator's account of what went wrong.
void check_status(const EmuLib& l, int err, const char* what) {
  if (err == 0) return;
  const std::string detail = l.last_message();
  TORCH_CHECK(false, "pvm_kernels CUDA kernel failed: ", l.error_string(err), " (", what, ")",
              detail.empty() ? "" : " [emulator: " + detail + "]");
}

void check_device(const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "the cuda_emulated backend runs on CPU tensors, got ", t.device());
}

std::tuple<Tensor, Tensor> retrieval_fwd_emu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const c10::optional<Tensor>& key_mask,
                                             const c10::optional<Tensor>& kv_len, double scale) {
  const EmuLib& l = lib();
  check_device(q);
  check_head_dim(q, l.max_head_dim(), "cuda");
  // Planned for an H100's 132 SMs, so the tests take the split paths a GPU takes.
  return retrieval_fwd_op(q, k, v, key_mask, kv_len, scale, kEmulatedDevice, [&](const RetrievalParams& p) {
    check_status(l, l.retrieval_fwd(&p, static_cast<int>(dtype_code(q))), "cuda::retrieval_fwd");
  });
}

std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_emu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale) {
  const EmuLib& l = lib();
  check_device(q);
  check_head_dim(q, l.max_head_dim(), "cuda");
  return retrieval_bwd_op(grad_out, q, k, v, out, lse, key_mask, kv_len, scale, kEmulatedDevice,
                          [&](const RetrievalParams& p) {
    check_status(l, l.retrieval_bwd(&p, static_cast<int>(dtype_code(q))), "cuda::retrieval_bwd");
  });
}

// Varlen q [total_q, H, hd]: the head-dim bound of check_head_dim (which wants 4-D q).
void check_varlen_head_dim(const Tensor& q, int64_t max_head_dim) {
  TORCH_CHECK(q.dim() == 3, "q must be 3-D [total_q, H, hd], got shape ", q.sizes());
  TORCH_CHECK(q.size(2) <= max_head_dim, "the cuda backend supports head_dim <= ", max_head_dim, ", got ",
              q.size(2));
}

std::tuple<Tensor, Tensor> retrieval_varlen_fwd_emu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale) {
  const EmuLib& l = lib();
  check_device(q);
  check_varlen_head_dim(q, l.max_head_dim());
  return retrieval_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                 kEmulatedDevice, [&](const RetrievalParams& p) {
    check_status(l, l.retrieval_fwd(&p, static_cast<int>(dtype_code(q))), "cuda::retrieval_fwd");
  });
}

std::tuple<Tensor, Tensor, Tensor> retrieval_varlen_bwd_emu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale) {
  const EmuLib& l = lib();
  check_device(q);
  check_varlen_head_dim(q, l.max_head_dim());
  return retrieval_varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, scale, kEmulatedDevice, [&](const RetrievalParams& p) {
    check_status(l, l.retrieval_bwd(&p, static_cast<int>(dtype_code(q))), "cuda::retrieval_bwd");
  });
}

std::tuple<Tensor, Tensor> merge_fwd_emu(const Tensor& expanded, const Tensor& gate,
                                         const c10::optional<Tensor>& keep,
                                         const c10::optional<Tensor>& ffn_output, double eps) {
  const EmuLib& l = lib();
  check_device(expanded);
  return merge_fwd_op(expanded, gate, keep, ffn_output, eps, [&](const MergeParams& p) {
    check_status(l, l.merge_fwd(&p, static_cast<int>(dtype_code(expanded))), "cuda::merge_fwd");
  });
}

std::tuple<Tensor, Tensor> merge_bwd_emu(const Tensor& grad_out, const Tensor& expanded,
                                         const Tensor& gate, const c10::optional<Tensor>& keep,
                                         const Tensor& rstd) {
  const EmuLib& l = lib();
  check_device(expanded);
  return merge_bwd_op(grad_out, expanded, gate, keep, rstd, [&](const MergeParams& p) {
    check_status(l, l.merge_bwd(&p, static_cast<int>(dtype_code(expanded))), "cuda::merge_bwd");
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pvm_kernels, CPU, m) {
  m.impl("cuda_emulated_retrieval_fwd", &retrieval_fwd_emu);
  m.impl("cuda_emulated_retrieval_bwd", &retrieval_bwd_emu);
  m.impl("cuda_emulated_retrieval_varlen_fwd", &retrieval_varlen_fwd_emu);
  m.impl("cuda_emulated_retrieval_varlen_bwd", &retrieval_varlen_bwd_emu);
  m.impl("cuda_emulated_merge_fwd", &merge_fwd_emu);
  m.impl("cuda_emulated_merge_bwd", &merge_bwd_emu);
}

}  // namespace pvm
