// Retrieval on CPU: online softmax over visual keys, forward and backward.
//
// Same decomposition as the GPU kernels: a task owns one (sample, KV head) and a block
// of packed rows r = t * G + g, so each key/value row is converted to float once per key
// block and reused by all G query heads that share it (4 at the 8B layout). Scores for a
// block of keys live in a [kRows x kKeys] buffer; nothing of size T x Nv is allocated.
// One body serves the padded [B, T, H, hd] layout and the varlen (packed, cu_seqlens) one:
// every offset goes through the accessors of pvm_params.h (row_base, key_base, stat_row,
// seq_q_len, seq_k_len), and a task past its sequence's own rows or keys does nothing.
// The products are float GEMMs on staged blocks: BLAS for prefill/training blocks, small
// inline kernels (microkernels.h) for decode blocks, where a BLAS call costs more.
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../native_common.h"
#include "cpu/microkernels.h"

namespace pvm {
namespace {

constexpr int64_t kRows = 128;  // packed query rows per task / per staged block
constexpr int64_t kKeys = 128;  // keys per staged block (decode), per dK/dV task
// Prefill blocks are longer along the loop a task walks (keys for the forward and dQ, rows
// for dK/dV): one 128 x 128 x 512 BLAS call packs its 128 x 128 operand once where four
// 128-key calls pack it four times (MKL, one core of the CI machine: 89 GFLOP/s at
// 128 x 1024 against 77 at 128 x 128). The score buffer stays 128 x 512 floats (256 KB).
constexpr int64_t kLongBlock = 512;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many multiply-adds a BLAS call costs more than the product (decode blocks:
// 4 rows x 128 keys x 128 dims = 65k): the inline kernels take those. Measured on the
// 2-core CI machine: MKL reaches ~95 GFLOP/s on prefill blocks, the inline kernels ~14.
constexpr int64_t kBlasMinWork = 1 << 17;

// Keys per forward / dQ block and rows per dK/dV block: long where a task's products go to
// BLAS (a decode step's 4 rows stay on the inline kernels' 128-key blocks).
inline int64_t loop_block(int64_t rows, int64_t hd) {
  return std::min(rows, kRows) * kKeys * hd >= kBlasMinWork ? kLongBlock : kKeys;
}

enum class Form { NN, NT, TN };  // C += A B,  C += A B^T (B stored [N][K]),  C += A^T B

// C[M][N] += op(A) op(B) on float row-major buffers with leading dimensions.
void block_gemm(Form form, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                int64_t ldc, int64_t M, int64_t K, int64_t N) {
  if (M * N * K >= kBlasMinWork) {
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    auto view = [&](const float* ptr, int64_t rows, int64_t cols, int64_t ld) {
      return at::from_blob(const_cast<float*>(ptr), {rows, cols}, {ld, 1}, opts);
    };
    const Tensor a = form == Form::TN ? view(A, K, M, lda).t() : view(A, M, K, lda);
    const Tensor b = form == Form::NT ? view(B, N, K, ldb).t() : view(B, K, N, ldb);
    view(C, M, N, ldc).addmm_(a, b);
    return;
  }
  switch (form) {
    case Form::NN: cpu::gemm_nn_acc(A, lda, B, ldb, C, ldc, M, K, N); break;
    case Form::NT: cpu::gemm_nt_acc(A, lda, B, ldb, C, ldc, M, K, N); break;
    case Form::TN: cpu::gemm_tn_acc(A, lda, B, ldb, C, ldc, M, K, N); break;
  }
}

struct Layout {
  const RetrievalParams& p;
  int64_t G, rows;  // rows: packed rows of the longest sample (T * G), the task grid's bound
  explicit Layout(const RetrievalParams& prm) : p(prm), G(prm.H / prm.Hkv), rows(prm.T * G) {}
  // Packed rows r = t * G + g of sample b: T * G padded, its own q_len * G in varlen.
  int64_t rows_of(int64_t b) const { return seq_q_len(p, b) * G; }
  // Keys whose dK / dV the tasks of sample b write: every key padded (past n_end, zeros), its
  // own keys in varlen (the others belong to other sequences, or to none and stay 0).
  int64_t keys_of(int64_t b) const { return is_varlen(p) ? seq_k_len(p, b) : p.Nv; }
  // element offset of packed row r (head in group kvh) in a q-like tensor
  int64_t row(const int64_t* s, int64_t b, int64_t kvh, int64_t r) const {
    return row_base(p, s, b) + (r / G) * s[1] + (kvh * G + r % G) * s[2];
  }
  int64_t key(const int64_t* s, int64_t b, int64_t kvh, int64_t n) const {
    return key_base(p, s, b) + n * s[1] + kvh * s[2];
  }
  int64_t stat(int64_t b, int64_t kvh, int64_t r) const {  // lse / delta: [B, H, T] or [H, total_q]
    return stat_row(p, b, kvh * G + r % G, r / G);
  }
  // First of the rows_of(b) dQ-partial rows of (b, kvh) in one partition: (b * Hkv + kvh) * T * G
  // padded, (kvh * total_q + q_begin(b)) * G varlen; a partition holds stat_rows(p) rows.
  int64_t dq_part_row(int64_t b, int64_t kvh) const {
    return (is_varlen(p) ? kvh * p.total_q + seq_q_begin(p, b) : (b * p.Hkv + kvh) * p.T) * G;
  }
  // One past the last key of sample b (seq_k_len: kv_len[b] clamped to [0, Nv], or the
  // varlen sequence's key count), so no kv_len / cu_seqlens can make a block read past the keys.
  int64_t n_end(int64_t b) const { return seq_k_len(p, b); }
  bool valid(int64_t b, int64_t n) const {
    return n < n_end(b) && (!p.key_mask || p.key_mask[b * p.mask_stride[0] + n * p.mask_stride[1]]);
  }
};

// Packed rows r0..r0+nr of (b, kvh) as float [nr][hd], times `mul`.
template <typename scalar_t>
void load_rows(const scalar_t* src, const int64_t* s, const Layout& L, int64_t b, int64_t kvh,
               int64_t r0, int64_t nr, float mul, float* dst) {
  const int64_t hd = L.p.hd;
  for (int64_t i = 0; i < nr; ++i) {
    const scalar_t* x = src + L.row(s, b, kvh, r0 + i);
    float* y = dst + i * hd;
    if (s[3] == 1) {  // contiguous head dim: a loop the compiler vectorises
      for (int64_t d = 0; d < hd; ++d) y[d] = static_cast<float>(x[d]) * mul;
    } else {
      for (int64_t d = 0; d < hd; ++d) y[d] = static_cast<float>(x[d * s[3]]) * mul;
    }
  }
}

// Keys n0..n0+nk of (b, kvh) as float [nk][hd], invalid keys zeroed: padding, NaN
// included, never reaches a result.
template <typename scalar_t>
void load_keys(const scalar_t* src, const int64_t* s, const Layout& L, int64_t b, int64_t kvh,
               int64_t n0, int64_t nk, const bool* valid, float* dst) {
  const int64_t hd = L.p.hd;
  for (int64_t j = 0; j < nk; ++j) {
    const scalar_t* x = src + L.key(s, b, kvh, n0 + j);
    float* y = dst + j * hd;
    if (!valid[j]) {
      std::fill(y, y + hd, 0.f);
    } else if (s[3] == 1) {  // contiguous head dim: a loop the compiler vectorises
      for (int64_t d = 0; d < hd; ++d) y[d] = static_cast<float>(x[d]);
    } else {
      for (int64_t d = 0; d < hd; ++d) y[d] = static_cast<float>(x[d * s[3]]);
    }
  }
}

// Validity, keys and values of the key block n0..n0+nk of (b, kvh), staged as float.
// bias[j] is 0 for a valid key and -inf for a masked one: added to the scores, so the row
// loops are plain float streams that vectorise (a bool select per key kept them scalar).
template <typename scalar_t>
void stage_key_block(const RetrievalParams& p, const Layout& L, int64_t b, int64_t kvh,
                     int64_t n0, int64_t nk, bool* valid, float* bias, float* kb, float* vb) {
  for (int64_t j = 0; j < nk; ++j) {
    valid[j] = L.valid(b, n0 + j);
    bias[j] = valid[j] ? 0.f : kNegInf;
  }
  load_keys(static_cast<const scalar_t*>(p.k), p.k_stride, L, b, kvh, n0, nk, valid, kb);
  load_keys(static_cast<const scalar_t*>(p.v), p.v_stride, L, b, kvh, n0, nk, valid, vb);
}

template <typename scalar_t>
void retrieval_fwd_cpu_impl(const RetrievalParams& p) {
  const Layout L(p);
  const int64_t hd = p.hd, row_blocks = (L.rows + kRows - 1) / kRows;
  const int64_t KB = loop_block(L.rows, hd);
  const auto* q = static_cast<const scalar_t*>(p.q);
  auto* out = static_cast<scalar_t*>(p.out);
  at::parallel_for(0, p.B * p.Hkv * row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qb(kRows * hd), acc(kRows * hd), kb(KB * hd), vb(KB * hd);
    std::vector<float> sc(kRows * KB), m(kRows), l(kRows), bias(KB);
    std::vector<char> valid_buf(KB);
    bool* valid = reinterpret_cast<bool*>(valid_buf.data());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hkv * row_blocks), kvh = (task / row_blocks) % p.Hkv;
      const int64_t r0 = (task % row_blocks) * kRows, rows_b = L.rows_of(b);
      if (r0 >= rows_b) continue;  // past a short (varlen) sequence's rows: nothing to do
      const int64_t nr = std::min(kRows, rows_b - r0);
      load_rows(q, p.q_stride, L, b, kvh, r0, nr, p.scale, qb.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t n_end = L.n_end(b);
      for (int64_t n0 = 0; n0 < n_end; n0 += KB) {
        const int64_t nk = std::min(KB, n_end - n0);
        stage_key_block<scalar_t>(p, L, b, kvh, n0, nk, valid, bias.data(), kb.data(), vb.data());
        std::fill(sc.begin(), sc.end(), 0.f);
        block_gemm(Form::NT, qb.data(), hd, kb.data(), hd, sc.data(), KB, nr, hd, nk);
        for (int64_t i = 0; i < nr; ++i) {
          float* s = &sc[i * KB];
          const float bmax = cpu::add_bias_max(s, bias.data(), nk);
          if (bmax == kNegInf) {  // no valid key in this block: nothing to add
            std::fill(s, s + nk, 0.f);
            continue;
          }
          const float m_new = std::max(m[i], bmax);
          const float alpha = std::exp(m[i] - m_new);  // exp(-inf) = 0 on the first block
          const float sum = cpu::exp_shifted_sum(s, m_new, nk);  // masked: exp(-inf) = 0
          for (int64_t d = 0; d < hd; ++d) acc[i * hd + d] *= alpha;
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
        }
        block_gemm(Form::NN, sc.data(), KB, vb.data(), hd, acc.data(), hd, nr, nk, hd);
      }
      for (int64_t i = 0; i < nr; ++i) {
        const bool has = l[i] != 0.f;  // NaN (bad inputs) propagates like the reference
        const float inv = has ? 1.f / l[i] : 0.f;
        scalar_t* o = out + L.row(p.o_stride, b, kvh, r0 + i);
        for (int64_t d = 0; d < hd; ++d) o[d * p.o_stride[3]] = static_cast<scalar_t>(acc[i * hd + d] * inv);
        p.lse[L.stat(b, kvh, r0 + i)] = has ? m[i] + std::log(l[i]) : kNegInf;
      }
    }
  });
}

// P and dS = P * (dP - delta) of staged rows (q, do: [nr][hd]) against staged keys
// (k, v: [nk][hd]), written to sc and dp ([nr][ld], ld >= nk).
void probs_and_dscores(const Layout& L, int64_t b, int64_t kvh, int64_t r0, int64_t nr,
                       int64_t nk, int64_t ld, const float* bias, float scale, const float* qb,
                       const float* dob, const float* kb, const float* vb, float* sc, float* dp) {
  const int64_t hd = L.p.hd;
  std::fill(sc, sc + nr * ld, 0.f);
  std::fill(dp, dp + nr * ld, 0.f);
  block_gemm(Form::NT, qb, hd, kb, hd, sc, ld, nr, hd, nk);
  block_gemm(Form::NT, dob, hd, vb, hd, dp, ld, nr, hd, nk);
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t st = L.stat(b, kvh, r0 + i);
    const float lse = L.p.lse[st], delta = L.p.delta[st];
    float* s = sc + i * ld;
    float* g = dp + i * ld;
    for (int64_t j = 0; j < nk; ++j) s[j] = s[j] * scale + bias[j];
    // A row with no valid key has lse -inf and only masked (-inf) scores: shifting by 0
    // keeps its probabilities exactly 0 where -inf - (-inf) would make them NaN.
    cpu::exp_shifted_sum(s, lse == kNegInf ? 0.f : lse, nk);
    for (int64_t j = 0; j < nk; ++j) g[j] = s[j] * (g[j] - delta);
  }
}

// Key partitions of the backward per (sample, KV head): each writes its own fp32 dQ
// partial, summed in partition order afterwards. Bounded so the partials of a call stay
// under kDqPartialFloats (256 MB), and never more than kMaxKeyParts: a count fixed by the
// shapes, not the thread count, so the bits do not depend on the machine's cores.
constexpr int64_t kMaxKeyParts = 4;
constexpr int64_t kDqPartialFloats = int64_t{1} << 26;

template <typename scalar_t>
void retrieval_bwd_cpu_impl(const RetrievalParams& p) {
  // One pass over (key block, row block) pairs computes P and dS once and feeds all three
  // gradients: dV += P^T dO, dK += dS^T Q, dQ += dS K. Five GEMMs per pair against seven
  // for a dQ pass and a dK/dV pass that both recompute P and dS (the reference's autograd
  // does four, from the saved T x Nv probabilities): prefill forward+backward at T 128,
  // Nv 1024 went from 1.02x to ~1.3x the reference on one core.
  const Layout L(p);
  const int64_t hd = p.hd;
  const int64_t key_blocks = (p.Nv + kKeys - 1) / kKeys;
  const int64_t RB = loop_block(L.rows, hd);  // rows per staged block
  const float scale = p.scale;
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* go = static_cast<const scalar_t*>(p.grad_out);
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);

  // dQ partials: [parts][stat_rows][hd], the rows of (b, kvh) at L.dq_part_row(b, kvh)
  // (B * H * T rows padded, H * total_q varlen: proportional to the packed rows).
  const int64_t dq_floats = stat_rows(p) * hd;
  const int64_t parts_cap = std::max<int64_t>(1, kDqPartialFloats / std::max<int64_t>(dq_floats, 1));
  const int64_t wanted = std::max<int64_t>(1, std::min({key_blocks, kMaxKeyParts, parts_cap}));
  const int64_t blocks_per_part = std::max<int64_t>(1, (key_blocks + wanted - 1) / wanted);
  const int64_t parts = std::max<int64_t>(1, (key_blocks + blocks_per_part - 1) / blocks_per_part);
  std::vector<float> dq_part(parts * dq_floats, 0.f);  // [parts][stat_rows][hd]

  at::parallel_for(0, p.B * p.Hkv * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kb(kKeys * hd), vb(kKeys * hd), dkb(kKeys * hd), dvb(kKeys * hd);
    std::vector<float> qb(RB * hd), dob(RB * hd), sc(RB * kKeys), dp(RB * kKeys);
    bool valid[kKeys];
    float bias[kKeys];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / parts, part = task % parts;
      const int64_t b = bh / p.Hkv, kvh = bh % p.Hkv;
      float* dqp = dq_part.data() + part * dq_floats + L.dq_part_row(b, kvh) * hd;
      const int64_t rows_b = L.rows_of(b), keys_b = L.keys_of(b);
      const int64_t kb_end = std::min(key_blocks, (part + 1) * blocks_per_part);
      for (int64_t kblk = part * blocks_per_part; kblk < kb_end; ++kblk) {
        const int64_t n0 = kblk * kKeys;
        if (n0 >= keys_b) break;  // past a short (varlen) sequence's keys: not its gradient
        const int64_t nk = std::min(kKeys, keys_b - n0);
        std::fill(dkb.begin(), dkb.end(), 0.f);
        std::fill(dvb.begin(), dvb.end(), 0.f);
        if (n0 < L.n_end(b)) {  // a block wholly past the last valid key has zero gradient
          stage_key_block<scalar_t>(p, L, b, kvh, n0, nk, valid, bias, kb.data(), vb.data());
          for (int64_t r0 = 0; r0 < rows_b; r0 += RB) {
            const int64_t nr = std::min(RB, rows_b - r0);
            load_rows(q, p.q_stride, L, b, kvh, r0, nr, 1.f, qb.data());
            load_rows(go, p.o_stride, L, b, kvh, r0, nr, 1.f, dob.data());
            probs_and_dscores(L, b, kvh, r0, nr, nk, kKeys, bias, scale, qb.data(), dob.data(),
                              kb.data(), vb.data(), sc.data(), dp.data());
            block_gemm(Form::TN, sc.data(), kKeys, dob.data(), hd, dvb.data(), hd, nk, nr, hd);
            block_gemm(Form::TN, dp.data(), kKeys, qb.data(), hd, dkb.data(), hd, nk, nr, hd);
            block_gemm(Form::NN, dp.data(), kKeys, kb.data(), hd, dqp + r0 * hd, hd, nr, nk, hd);
          }
        }
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t off = L.key(p.dkv_stride, b, kvh, n0 + j);
          for (int64_t d = 0; d < hd; ++d) {
            dk[off + d * p.dkv_stride[3]] = static_cast<scalar_t>(dkb[j * hd + d] * scale);
            dv[off + d * p.dkv_stride[3]] = static_cast<scalar_t>(dvb[j * hd + d]);
          }
        }
      }
    }
  });

  // dQ = scale * (sum of the partitions' partials, in partition order), per (sample, KV
  // head, block of kRows packed rows); a block past its sequence's rows writes nothing.
  const int64_t row_blocks = (L.rows + kRows - 1) / kRows;
  at::parallel_for(0, p.B * p.Hkv * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (p.Hkv * row_blocks), kvh = (task / row_blocks) % p.Hkv;
      const int64_t r0 = (task % row_blocks) * kRows, r_end = std::min(r0 + kRows, L.rows_of(b));
      const float* base = dq_part.data() + L.dq_part_row(b, kvh) * hd;
      for (int64_t r = r0; r < r_end; ++r) {
        const float* src = base + r * hd;
        scalar_t* o = dq + L.row(p.dq_stride, b, kvh, r);
        for (int64_t d = 0; d < hd; ++d) {
          float acc = src[d];
          for (int64_t s = 1; s < parts; ++s) acc += src[s * dq_floats + d];
          o[d * p.dq_stride[3]] = static_cast<scalar_t>(acc * scale);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> retrieval_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const c10::optional<Tensor>& key_mask,
                                             const c10::optional<Tensor>& kv_len, double scale) {
  return retrieval_fwd_op(q, k, v, key_mask, kv_len, scale, [&](const RetrievalParams& p) {
    dispatch_float_types(q, [&](auto tag) { retrieval_fwd_cpu_impl<decltype(tag)>(p); });
  });
}

std::tuple<Tensor, Tensor, Tensor> retrieval_bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const c10::optional<Tensor>& key_mask, const c10::optional<Tensor>& kv_len,
    double scale) {
  return retrieval_bwd_op(grad_out, q, k, v, out, lse, key_mask, kv_len, scale,
                          [&](const RetrievalParams& p) {
    dispatch_float_types(q, [&](auto tag) { retrieval_bwd_cpu_impl<decltype(tag)>(p); });
  });
}

// Varlen (packed, cu_seqlens): the same kernels, through the accessors (pvm_params.h).
std::tuple<Tensor, Tensor> retrieval_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale) {
  return retrieval_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                 CudaDevice{}, [&](const RetrievalParams& p) {
    dispatch_float_types(q, [&](auto tag) { retrieval_fwd_cpu_impl<decltype(tag)>(p); });
  });
}

std::tuple<Tensor, Tensor, Tensor> retrieval_varlen_bwd_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale) {
  return retrieval_varlen_bwd_op(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, scale, CudaDevice{}, [&](const RetrievalParams& p) {
    dispatch_float_types(q, [&](auto tag) { retrieval_bwd_cpu_impl<decltype(tag)>(p); });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pvm_kernels, CPU, m) {
  m.impl("native_retrieval_fwd", &retrieval_fwd_cpu);
  m.impl("native_retrieval_bwd", &retrieval_bwd_cpu);
  m.impl("native_retrieval_varlen_fwd", &retrieval_varlen_fwd_cpu);
  m.impl("native_retrieval_varlen_bwd", &retrieval_varlen_bwd_cpu);
}

}  // namespace pvm
