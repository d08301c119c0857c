// The pieces of PagedSparseAttentionFp8Fast (device_ops.h) that its two kernels share: the
// warpgroup-MMA kernel for whole groups of 64 heads (sparse_attention_wgmma.cu) and the mma.sync
// kernel for a tensor-parallel shard's few heads (sparse_attention_few_heads.cu). Both write
// per-split partial rows in one layout: row (b * splits + split) * heads + head of part_o
// [rows][512], part_m [rows] (the raw row maximum) and part_l [rows] (the row sum at that maximum).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashmem::kernels::cuda::detail {

// The partial rows in a kernel's workspace: `rows` rows of part_o, then part_m, then part_l.
struct SplitRows {
  float* o;
  float* m;
  float* l;
};
inline SplitRows SplitRowsIn(void* workspace, int64_t rows, int64_t dim) {
  float* o = static_cast<float*>(workspace);
  return {o, o + rows * dim, o + rows * dim + rows};
}
inline int64_t SplitRowsBytes(int64_t rows, int64_t dim) {
  return rows * (dim + 2) * static_cast<int64_t>(sizeof(float));
}

// The warpgroup-MMA kernel: heads % 64 == 0.
int64_t PagedSparseAttentionFp8WideWorkspace(int64_t batch, int64_t heads, int64_t n);
cudaError_t PagedSparseAttentionFp8Wide(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                        int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                        float softmax_scale, float* out, void* workspace, cudaStream_t stream);

// out[b][h] = bf16(sum_s O_s e^{(m_s - m) scale} / (sum_s l_s e^{(m_s - m) scale} + e^{sink - m scale}))
// over `splits` partial rows a (token, head); launched as a programmatic dependent of the kernel
// before it in `stream` (which may call AllowDependents once its rows are written).
cudaError_t CombineAttentionSplits(const float* part_o, const float* part_m, const float* part_l, int64_t batch,
                                   int64_t heads, int splits, const float* sink, float softmax_scale, float* out,
                                   cudaStream_t stream);

}  // namespace flashmem::kernels::cuda::detail
