// Host launchers of the PVM CUDA kernels. No torch headers: the .cu files compile fast.
#pragma once
#include <cuda_runtime.h>

#include "pvm_params.h"

namespace pvm {
namespace cuda {

// Each returns the launch status (cudaGetLastError after the launches).
cudaError_t retrieval_fwd(const RetrievalParams& p, DType dtype, cudaStream_t stream);
cudaError_t retrieval_bwd(const RetrievalParams& p, DType dtype, cudaStream_t stream);
cudaError_t merge_fwd(const MergeParams& p, DType dtype, cudaStream_t stream);
cudaError_t merge_bwd(const MergeParams& p, DType dtype, cudaStream_t stream);

// Largest head_dim the retrieval kernels take (accumulators: 8 dims per lane).
constexpr int kMaxHeadDim = 256;

// Blocks of each retrieval launch for p (with its split plan, as the launchers above run
// it): forward (+ combine when the keys are split), dQ, dK/dV (+ the partials' sum when
// the rows are split). For tests and reports; the launchers use it themselves.
struct RetrievalGrid {
  int64_t fwd = 0, combine = 0, dq = 0, dkdv = 0, dkdv_sum = 0;
};
RetrievalGrid retrieval_grid(const RetrievalParams& p, DType dtype = DType::kFloat32);

// The tensor-core forward (retrieval_tc_fwd.cu), which retrieval_fwd runs for p exactly when
// retrieval_fwd_tensor_cores(p, dtype) (pvm_params.h) holds: its blocks (64-row tiles x
// splits x B x Hkv) and its launch alone (no combine; cudaErrorInvalidValue for a p the
// rule refuses). The split plan's tiles for (p, dtype): retrieval_tiles, pvm_params.h.
int64_t retrieval_tc_fwd_blocks(const RetrievalParams& p);
cudaError_t retrieval_tc_fwd(const RetrievalParams& p, DType dtype, cudaStream_t stream);

// The tensor-core backward (retrieval_tc_bwd.cu), which retrieval_bwd runs for p exactly when
// retrieval_bwd_tensor_cores(p, dtype) holds: the dQ and dK/dV launches of retrieval_grid(p,
// dtype) (dK/dV into dk_part / dv_part when p.row_splits > 1: retrieval_bwd then launches
// the partials' sum; cudaErrorInvalidValue for a p the rule refuses). p normalised
// (unsplit: row_splits 1, split_rows covering every row).
cudaError_t retrieval_bwd_tc(const RetrievalParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace pvm
