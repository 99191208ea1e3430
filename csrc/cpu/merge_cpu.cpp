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
// Independent partial sums per row: one running sum is a serial dependency the compiler
// may not reorder (IEEE), so the loop stayed scalar and the forward ran at 0.47x the
// reference's vectorised torch ops at T 128, D 4096 (pvm-kernels bench, 2-core machine).
constexpr int kLanes = 16;

// sum_d a[d] * b[d] in acc_t, over kLanes interleaved partial sums (fixed order: the same
// bits on every run).
template <typename acc_t, typename scalar_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += acc_t(a[d + j]) * acc_t(b[d + j]);
  acc_t sum = 0;
  for (; d < n; ++d) sum += acc_t(a[d]) * acc_t(b[d]);
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  return sum;
}

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
      const acc_t ss = dot<acc_t>(er, er, p.D);
      const acc_t rstd = acc_t(1) / std::sqrt(ss / acc_t(p.D) + acc_t(p.eps));
      const bool keep = p.keep == nullptr || p.keep[r];
      const acc_t mul = gate * rstd;
      scalar_t* o = out + r * p.out_row;
      const scalar_t* fr = ffn ? ffn + r * p.ffn_row : nullptr;
      // Branch-free inner loops (one per case) so each vectorises.
      if (!keep) {  // exactly ffn (or 0) when silenced, even for NaN in e
        for (int64_t d = 0; d < p.D; ++d) o[d] = fr ? fr[d] : scalar_t(0);
      } else if (fr) {
        for (int64_t d = 0; d < p.D; ++d)
          o[d] = static_cast<scalar_t>(acc_t(er[d]) * mul + acc_t(fr[d]));
      } else {
        for (int64_t d = 0; d < p.D; ++d) o[d] = static_cast<scalar_t>(acc_t(er[d]) * mul);
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
      const acc_t gn = dot<acc_t>(gr, er, p.D) * rstd;
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
