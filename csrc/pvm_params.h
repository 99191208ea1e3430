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

  // Split launches of the CUDA kernels (see retrieval_split_plan below), set by the host op,
  // which also allocates the fp32 workspaces. kv_splits <= 1 / row_splits <= 1: unsplit,
  // the partial pointers unused (null).
  // Forward: split s of every (row tile, sample, KV head) takes keys
  // [s * split_keys, (s + 1) * split_keys) and writes its normalised output and lse to
  // o_part [kv_splits, B * H * T, hd] and lse_part [kv_splits, B * H * T] (row index
  // (b * H + h) * T + t, like lse); a combine kernel merges them into out and lse.
  float* o_part = nullptr;
  float* lse_part = nullptr;
  int64_t kv_splits = 1, split_keys = 0;
  // dK/dV: split s of every (key tile, sample, KV head) takes packed query rows
  // [s * split_rows, (s + 1) * split_rows) and writes fp32 partials of dk (scaled) and dv to
  // dk_part / dv_part [row_splits, B, Nv, Hkv, hd] (contiguous), summed in split order.
  float* dk_part = nullptr;
  float* dv_part = nullptr;
  int64_t row_splits = 1, split_rows = 0;

  // The launch may run on the tensor cores (retrieval_fwd_tensor_cores for a forward's
  // parameters, retrieval_bwd_tensor_cores for a backward's, below). The host op sets it to
  // its own decision (the rule on the tensors' pointers, and not PVM_CUDA_TENSOR_CORES=0),
  // which the launcher then obeys.
  bool tensor_cores = true;

  // Varlen (packed) layout, flash-attention's flash_attn_varlen_func convention: set when
  // cu_seqlens_q is non-null (cu_seqlens_k then too; key_mask and kv_len are null). q, out,
  // grad_out and dq are then [total_q, H, hd] and k, v, dk, dv [total_k, Hkv, hd], stored
  // in the 4-entry stride arrays as {0, row, head, dim} (entry 0 unused); B is the number of
  // sequences, T = max_seqlen_q and Nv = max_seqlen_k bound the launch grids, and sequence
  // b owns query rows [q_begin, q_begin + q_len) and keys [k_begin, k_begin + k_len) (the
  // clamped accessors below). lse / delta are [H, total_q] float32 (flash-attention's
  // varlen lse); the split partials are indexed like them (o_part [kv_splits, H * total_q,
  // hd]) and dk_part / dv_part are [row_splits, total_k, Hkv, hd]. Use the accessors
  // (seq_*, row_base, key_base, stat_row, key_row) in every kernel, never b * stride[0],
  // so one kernel body serves both layouts.
  const int32_t* cu_seqlens_q = nullptr;  // [B + 1] int32, nullable
  const int32_t* cu_seqlens_k = nullptr;  // [B + 1] int32, nullable
  int64_t total_q = 0, total_k = 0;       // rows of the packed q and k (varlen only)
};

// Host and device under nvcc; plain inline in the CPU build and the CUDA emulator (host code).
#if defined(__CUDACC__)
#define PVM_HD __host__ __device__ __forceinline__
#else
#define PVM_HD inline
#endif

// ---- where a sequence lives: one set of accessors for the padded and the varlen layout ----
// Every varlen bound is clamped, as kv_len is: whatever cu_seqlens holds (unsorted, negative,
// past the end, longer than max_seqlen), no kernel reads or writes outside the packed
// tensors. q_begin(b) = clamp(cu[b], 0, total); q_len(b) = clamp(cu[b + 1], q_begin, total)
// - q_begin, at most T (max_seqlen_q). Inputs the op layer validates (CPU) are exact.
PVM_HD bool is_varlen(const RetrievalParams& p) { return p.cu_seqlens_q != nullptr; }

PVM_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

PVM_HD int64_t seq_q_begin(const RetrievalParams& p, int64_t b) {
  return is_varlen(p) ? clamp64(p.cu_seqlens_q[b], 0, p.total_q) : 0;
}
// Query tokens of sequence b (padded: T).
PVM_HD int64_t seq_q_len(const RetrievalParams& p, int64_t b) {
  if (!is_varlen(p)) return p.T;
  const int64_t begin = seq_q_begin(p, b);
  return clamp64(clamp64(p.cu_seqlens_q[b + 1], begin, p.total_q) - begin, 0, p.T);
}
PVM_HD int64_t seq_k_begin(const RetrievalParams& p, int64_t b) {
  return is_varlen(p) ? clamp64(p.cu_seqlens_k[b], 0, p.total_k) : 0;
}
// One past the last key of sequence b: varlen, its key count (at most Nv = max_seqlen_k);
// padded, kv_len[b] clamped to [0, Nv] (above Nv means every key, 0 or below none), or Nv.
PVM_HD int64_t seq_k_len(const RetrievalParams& p, int64_t b) {
  if (is_varlen(p)) {
    const int64_t begin = seq_k_begin(p, b);
    return clamp64(clamp64(p.cu_seqlens_k[b + 1], begin, p.total_k) - begin, 0, p.Nv);
  }
  return p.kv_len ? clamp64(p.kv_len[b], 0, p.Nv) : p.Nv;
}
// Element offset of token t = 0 of sequence b in a q-like tensor with strides s (q, out,
// grad_out, dq): add t * s[1] + head * s[2] + d * s[3].
PVM_HD int64_t row_base(const RetrievalParams& p, const int64_t* s, int64_t b) {
  return is_varlen(p) ? seq_q_begin(p, b) * s[1] : b * s[0];
}
// Element offset of key n = 0 of sequence b in a k-like tensor with strides s (k, v, dk, dv).
PVM_HD int64_t key_base(const RetrievalParams& p, const int64_t* s, int64_t b) {
  return is_varlen(p) ? seq_k_begin(p, b) * s[1] : b * s[0];
}
// Index of (sequence b, query head h, token t) in lse / delta / the forward's partials:
// padded (b * H + h) * T + t ([B, H, T]); varlen h * total_q + q_begin(b) + t ([H, total_q]).
PVM_HD int64_t stat_row(const RetrievalParams& p, int64_t b, int64_t h, int64_t t) {
  return is_varlen(p) ? h * p.total_q + seq_q_begin(p, b) + t : (b * p.H + h) * p.T + t;
}
// Rows of lse / delta (and of one forward partial): B * H * T, or H * total_q.
PVM_HD int64_t stat_rows(const RetrievalParams& p) {
  return is_varlen(p) ? p.H * p.total_q : p.B * p.H * p.T;
}
// Index of key n of sequence b among the key rows of dk_part / dv_part ([.., B * Nv, ..] or
// [.., total_k, ..]); times Hkv * hd for the element offset of KV head 0.
PVM_HD int64_t key_row(const RetrievalParams& p, int64_t b, int64_t n) {
  return is_varlen(p) ? seq_k_begin(p, b) + n : b * p.Nv + n;
}
// Key rows of one dK/dV partial: B * Nv, or total_k.
PVM_HD int64_t key_rows(const RetrievalParams& p) { return is_varlen(p) ? p.total_k : p.B * p.Nv; }

// Tiles of the CUDA retrieval kernels, which the split plan counts in.
constexpr int64_t kRetrievalKeyTile = 32;      // keys staged per step: one per lane
constexpr int64_t kRetrievalRowTile = 16;      // forward / dQ: packed query rows per block
constexpr int64_t kRetrievalRowsPerIter = 8;   // dK/dV: packed query rows per step
// A loop is split until its launch has this many blocks per SM (or each split is one
// tile): 2 per SM keeps every SM busy while one block of the pair waits on memory.
constexpr int64_t kRetrievalBlocksPerSm = 2;
// Most splits of one loop: bounds the fp32 workspaces (64 x B*H*T x hd x 4 bytes for the
// forward, 64 x B*Nv*Hkv*hd x 8 for dK/dV).
constexpr int64_t kRetrievalMaxSplits = 64;
// The SM count the CUDA emulator plans for: an H100's, so its tests take the split paths
// a GPU takes (as the Triton launchers count 132 SMs for CPU tensors).
constexpr int64_t kEmulatedSmCount = 132;

// The tensor-core forward (csrc/cuda/retrieval_tc_fwd.cu): 64 packed query rows per block
// (4 warps x one m16 tile), keys staged 64 at a time. The tensor-core backward
// (retrieval_tc_bwd.cu) has the same tiles: a dQ block owns 64 rows and walks the keys 64
// at a time; a dK/dV block owns 64 keys and walks its rows 64 at a time.
constexpr int64_t kRetrievalTcRowTile = 64;
constexpr int64_t kRetrievalTcKeyTile = 64;
constexpr int64_t kRetrievalTcMaxHeadDim = 128;

// Whether the CUDA retrieval forward of p runs on the tensor cores (retrieval_tc_fwd.cu)
// rather than the CUDA-core kernel: bf16 or fp16; hd a multiple of 16 up to 128 (the
// mma's k-step; above 128 the fp32 output and Q fragments no longer fit the registers);
// q, k, v and out read / written as 16-byte rows: unit stride along hd, every other stride
// a multiple of 8 elements and 16-byte aligned bases (the host op's contiguous tensors and
// a VisualMemory's K / V are; a strided view is not). fp32 stays on the CUDA cores (the
// mma would round it to tf32 or bf16: a change of results, not of speed). The host op's
// split plan and the launcher both ask this, so the plan is made in the tiles of the
// kernel that runs. Host code only (reads pointers' bits).
inline bool retrieval_fwd_tensor_cores(const RetrievalParams& p, DType dtype) {
  if (!p.tensor_cores || (dtype != DType::kBFloat16 && dtype != DType::kFloat16)) return false;
  if (p.hd < 16 || p.hd > kRetrievalTcMaxHeadDim || p.hd % 16 != 0) return false;
  const auto rows16 = [](const void* ptr, const int64_t* s) {
    return ptr != nullptr && (reinterpret_cast<uintptr_t>(ptr) & 15) == 0 && s[3] == 1 && s[0] % 8 == 0 &&
           s[1] % 8 == 0 && s[2] % 8 == 0;
  };
  return rows16(p.q, p.q_stride) && rows16(p.k, p.k_stride) && rows16(p.v, p.v_stride) &&
         rows16(p.out, p.o_stride);
}

// Whether the CUDA retrieval backward of p runs on the tensor cores (retrieval_tc_bwd.cu:
// dQ and dK/dV) rather than the CUDA-core kernels: the forward's rule (bf16 / fp16, hd a
// multiple of 16 up to 128; above 128 a warp's dK and dV accumulators alone would take 256
// registers a lane) with q, grad_out, k, v, dq, dk and dv in 16-byte rows, and fewer than
// 2^31 packed rows per KV head (the kernels' row arithmetic is 32-bit). Decided by the host
// op as the forward's is (plan_retrieval_splits, native_common.h). Host code only.
inline bool retrieval_bwd_tensor_cores(const RetrievalParams& p, DType dtype) {
  if (!p.tensor_cores || (dtype != DType::kBFloat16 && dtype != DType::kFloat16)) return false;
  if (p.hd < 16 || p.hd > kRetrievalTcMaxHeadDim || p.hd % 16 != 0 || p.Hkv <= 0) return false;
  if (p.T * (p.H / p.Hkv) >= (int64_t{1} << 31)) return false;
  const auto rows16 = [](const void* ptr, const int64_t* s) {
    return ptr != nullptr && (reinterpret_cast<uintptr_t>(ptr) & 15) == 0 && s[3] == 1 && s[0] % 8 == 0 &&
           s[1] % 8 == 0 && s[2] % 8 == 0;
  };
  return rows16(p.q, p.q_stride) && rows16(p.grad_out, p.o_stride) && rows16(p.k, p.k_stride) &&
         rows16(p.v, p.v_stride) && rows16(p.dq, p.dq_stride) && rows16(p.dk, p.dkv_stride) &&
         rows16(p.dv, p.dkv_stride);
}

// The tiles the split plan counts in, of the kernels that will run p in `dtype`.
struct RetrievalTiles {
  int64_t fwd_rows, fwd_keys;      // forward: packed query rows per block, keys per step
  int64_t dkdv_keys, dkdv_rows;    // dK/dV: keys per block, packed query rows per step
};
inline RetrievalTiles retrieval_tiles(const RetrievalParams& p, DType dtype) {
  RetrievalTiles t{kRetrievalRowTile, kRetrievalKeyTile, kRetrievalKeyTile, kRetrievalRowsPerIter};
  if (retrieval_fwd_tensor_cores(p, dtype)) t.fwd_rows = kRetrievalTcRowTile, t.fwd_keys = kRetrievalTcKeyTile;
  if (retrieval_bwd_tensor_cores(p, dtype)) t.dkdv_keys = kRetrievalTcKeyTile, t.dkdv_rows = kRetrievalTcRowTile;
  return t;
}

struct SplitLoop {
  int64_t splits = 1, per_split = 0;  // per_split: a multiple of the tile
};

// Triton's split_loop (triton_ops/retrieval.py) for the CUDA kernels: (splits, items per
// split) for a loop over n_items in tiles of `tile`, run by `blocks` blocks on `sm_count`
// SMs: split until the launch has kRetrievalBlocksPerSm blocks per SM, never into pieces
// smaller than one tile, at most kRetrievalMaxSplits. `force` > 0 asks for that many splits
// instead of the SM rule (tests; still at most one per tile and kRetrievalMaxSplits).
// Depends on the shapes and the SM count only: the same split, so the same bits, on every
// run.
inline SplitLoop split_loop(int64_t n_items, int64_t tile, int64_t blocks, int64_t sm_count,
                            int64_t force = 0) {
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t items = n_items > 1 ? n_items : 1;
  const int64_t tiles = cdiv(items, tile);
  int64_t want = force > 0 ? force : cdiv(kRetrievalBlocksPerSm * (sm_count > 1 ? sm_count : 1),
                                          blocks > 1 ? blocks : 1);
  if (want > tiles) want = tiles;
  if (want > kRetrievalMaxSplits) want = kRetrievalMaxSplits;
  if (want < 1) want = 1;
  SplitLoop s;
  s.per_split = cdiv(tiles, want) * tile;
  s.splits = cdiv(items, s.per_split);
  return s;
}

// Fills the split fields of a retrieval launch's parameters (the workspace pointers stay
// the caller's job): the forward splits the keys of each (row tile, sample, KV head) block,
// the dK/dV backward the packed query rows of each (key tile, sample, KV head) block.
inline void retrieval_split_plan(RetrievalParams& p, int64_t sm_count, int64_t force = 0,
                                 DType dtype = DType::kFloat32) {
  const RetrievalTiles tl = retrieval_tiles(p, dtype);
  const int64_t G = p.Hkv > 0 ? p.H / p.Hkv : 1, rows = p.T * G, bh = p.B * p.Hkv;
  const int64_t row_tiles = (rows + tl.fwd_rows - 1) / tl.fwd_rows;
  const int64_t key_tiles = (p.Nv + tl.dkdv_keys - 1) / tl.dkdv_keys;
  const SplitLoop kv = split_loop(p.Nv, tl.fwd_keys, row_tiles * bh, sm_count, force);
  const SplitLoop rw = split_loop(rows, tl.dkdv_rows, key_tiles * bh, sm_count, force);
  p.kv_splits = kv.splits;
  p.split_keys = kv.per_split;
  p.row_splits = rw.splits;
  p.split_rows = rw.per_split;
}

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
