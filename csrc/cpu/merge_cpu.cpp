// Merge on CPU: out = ffn + keep * gate * rms(e), forward and backward, one pass per row.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../native_common.h"

namespace pvm {
namespace {

constexpr int64_t kRowGrain = 16;

template <typename scalar_t>
void merge_fwd_cpu_impl(const MergeParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* e = static_cast<const scalar_t*>(p.e);
  const auto* ffn = static_cast<const scalar_t*>(p.ffn);
  auto* out = static_cast<scalar_t*>(p.out);
  const acc_t gate = *p.gate;
  at::parallel_for(0, p.N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* er = e + r * p.e_row;
      acc_t ss = 0;
      for (int64_t d = 0; d < p.D; ++d) ss += acc_t(er[d]) * acc_t(er[d]);
      const acc_t rstd = acc_t(1) / std::sqrt(ss / acc_t(p.D) + acc_t(p.eps));
      const bool keep = p.keep == nullptr || p.keep[r];
      const acc_t mul = keep ? gate * rstd : acc_t(0);
      scalar_t* o = out + r * p.out_row;
      for (int64_t d = 0; d < p.D; ++d) {
        acc_t u = keep ? acc_t(er[d]) * mul : acc_t(0);  // exactly 0 when silenced, even for NaN
        if (ffn) u += acc_t(ffn[r * p.ffn_row + d]);
        o[d] = static_cast<scalar_t>(u);
      }
      p.rstd[r] = static_cast<float>(rstd);
    }
  });
}

template <typename scalar_t>
void merge_bwd_cpu_impl(const MergeParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* g = static_cast<const scalar_t*>(p.grad);
  const auto* e = static_cast<const scalar_t*>(p.e);
  auto* de = static_cast<scalar_t*>(p.de);
  const acc_t gate = *p.gate;
  at::parallel_for(0, p.N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gr = g + r * p.grad_row;
      const scalar_t* er = e + r * p.e_row;
      scalar_t* dr = de + r * p.de_row;
      if (p.keep != nullptr && !p.keep[r]) {
        for (int64_t d = 0; d < p.D; ++d) dr[d] = scalar_t(0);
        p.dgate_row[r] = 0.f;
        continue;
      }
      const acc_t rstd = p.rstd[r];
      acc_t gn = 0;
      for (int64_t d = 0; d < p.D; ++d) gn += acc_t(gr[d]) * acc_t(er[d]) * rstd;
      const acc_t mean_gn = gn / acc_t(p.D);
      for (int64_t d = 0; d < p.D; ++d)
        dr[d] = static_cast<scalar_t>(gate * rstd * (acc_t(gr[d]) - acc_t(er[d]) * rstd * mean_gn));
      p.dgate_row[r] = static_cast<float>(gn);
    }
  });
}

std::tuple<Tensor, Tensor> merge_fwd_cpu(const Tensor& expanded, const Tensor& gate,
                                         const c10::optional<Tensor>& keep,
                                         const c10::optional<Tensor>& ffn_output, double eps) {
  return merge_fwd_op(expanded, gate, keep, ffn_output, eps, [&](const MergeParams& p) {
    dispatch_float_types(expanded, [&](auto tag) { merge_fwd_cpu_impl<decltype(tag)>(p); });
  });
}

std::tuple<Tensor, Tensor> merge_bwd_cpu(const Tensor& grad_out, const Tensor& expanded,
                                         const Tensor& gate, const c10::optional<Tensor>& keep,
                                         const Tensor& rstd) {
  return merge_bwd_op(grad_out, expanded, gate, keep, rstd, [&](const MergeParams& p) {
    dispatch_float_types(expanded, [&](auto tag) { merge_bwd_cpu_impl<decltype(tag)>(p); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pvm_kernels, CPU, m) {
  m.impl("native_merge_fwd", &merge_fwd_cpu);
  m.impl("native_merge_bwd", &merge_bwd_cpu);
}

}  // namespace pvm
