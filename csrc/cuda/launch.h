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

}  // namespace cuda
}  // namespace pvm
