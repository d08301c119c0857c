// The warpgroup-MMA (sm_90a) sparse attention kernel of PagedSparseAttentionFp8Fast; the host
// function in sparse_attention_tc.cu picks the kernel, splits the slots and merges the splits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashmem::kernels::cuda {

// grid (batch, splits, heads / 64), 256 threads. splits == 1: writes `out` itself; otherwise each
// split writes its unnormalised rows and (max, sum) to part_o / part_m / part_l for the combine.
cudaError_t LaunchPagedAttnWgmma(dim3 grid, cudaStream_t stream, const float* q, int64_t heads, const uint8_t* pages,
                                 int64_t page_entries, const int32_t* idx, int64_t n, int splits, const float* sink,
                                 float scale, float* out, float* part_o, float* part_m, float* part_l);

}  // namespace flashmem::kernels::cuda
