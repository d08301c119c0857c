// The compressors' gated pooling on the device (Backend::PoolSteps; CudaBackendImpl::PoolSteps in
// backend_pooling.cu): kernels/pooling.cc's arithmetic, one thread a dim, each operation rounded
// as the host rounds it (no contraction), exp through double as num::ExpF — the same bits.
#include <algorithm>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block a step; thread e owns dim e's columns (e and, overlapping, e + head_dim) of every row
// of the ring: it writes the step's row there, pools the dim and moves the block — no other
// thread touches them, so no barrier.
__global__ void __launch_bounds__(kThreads) PoolStepsKernel(const PoolStepsArgs a) {
  const int64_t k = blockIdx.x;
  const int64_t d = a.head_dim, r = a.ratio;
  const int64_t width = a.overlap ? 2 * d : d, slots = a.overlap ? 2 * r : r;
  float* ring_kv = a.rings[k];
  float* ring_score = ring_kv + slots * width;
  const int64_t pos = a.pos[k], phase = pos % r, slot = (a.overlap ? r : 0) + phase;
  const float* kv_in = a.kv + k * a.in_stride;
  const float* score_in = a.score + k * a.in_stride;
  const float* ape = a.ape + phase * width;
  float* written = a.written + k * 2 * width;
  const int32_t out_row = a.pooled_row[k];
  const int halves = a.overlap ? 2 : 1;
  const int64_t n_cand = a.overlap ? 2 * r : r;
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    for (int h = 0; h < halves; ++h) {
      const int64_t c = e + h * d;
      const float v = kv_in[c], s = __fadd_rn(score_in[c], ape[c]);
      ring_kv[slot * width + c] = v;
      ring_score[slot * width + c] = s;
      written[c] = v;
      written[width + c] = s;
    }
    if (out_row < 0) continue;
    // Candidate j's value of dim e: the previous block's rows give their first half, the block's
    // own (overlapping) their second.
    auto at = [&](int64_t j) { return j * width + (a.overlap && j >= r ? d : 0) + e; };
    float mx = ring_score[at(0)];
    for (int64_t j = 1; j < n_cand; ++j) {
      const float sj = ring_score[at(j)];
      mx = mx < sj ? sj : mx;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n_cand; ++j) sum = __fadd_rn(sum, ExpF(__fsub_rn(ring_score[at(j)], mx)));
    float acc = 0.0f;
    for (int64_t j = 0; j < n_cand; ++j) {
      const float p = ExpF(__fsub_rn(ring_score[at(j)], mx));  // the same value as the sum's
      acc = __fadd_rn(acc, __fmul_rn(ring_kv[at(j)], __fdiv_rn(p, sum)));
    }
    a.pooled[out_row * d + e] = RoundBf16(acc);
    if (a.overlap)
      for (int64_t j = 0; j < r; ++j)
        for (int h = 0; h < halves; ++h) {
          const int64_t c = e + h * d;
          ring_kv[j * width + c] = ring_kv[(r + j) * width + c];
          ring_score[j * width + c] = ring_score[(r + j) * width + c];
        }
  }
}

}  // namespace

cudaError_t PoolSteps(const PoolStepsArgs& a, cudaStream_t stream) {
  if (a.steps <= 0) return cudaSuccess;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (a.head_dim + 31) / 32 * 32));
  PoolStepsKernel<<<static_cast<unsigned>(a.steps), threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
