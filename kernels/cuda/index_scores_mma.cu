// The lightning indexer's scores on the tensor cores (fast mode): for a run of keys of one query,
// S = Q · Kᵀ (heads × 128 by 128 × keys) with mma.sync m16n8k16 on bf16 operands and fp32 sums,
// then score = bf16(Σ_h bf16(relu(bf16(S[h])) · w[h])). The exact kernel (attention_ops.cu) takes
// a half-warp per key and every dot product in the CPU's order: 2% of HBM. Here the keys' bytes
// are the cost (512 a key, read once, streamed past L2) and a block's 64-key tile is 64 MMAs a warp.
//
// Numerics: q and the keys are rounded to bf16 (round to nearest even) before the products. The
// model's indexer queries and keys are FP4 values times power-of-two block scales (Fp4RoundTrip),
// which bf16 holds exactly, so there the scores differ from the CPU's only by summation order
// (the dot products' and the heads' sum).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/ptx.cuh"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kDim = kIndexScoresMmaDim;
constexpr int kTileKeys = 64;
// A key's 64 bf16 pairs and 4 words of padding: lane (g, t) of a B-fragment load reads word
// 68g + t + const, 32 distinct banks.
constexpr int kRowWords = kDim / 2 + 4;

// One head's part of a key's score, rounded as the CPU rounds it.
__device__ __forceinline__ float Term(float dot, float w) { return RoundBf16(fmaxf(RoundBf16(dot), 0.0f) * w); }

// Warp w owns heads [16w, 16w + 16) (the MMA's M; heads past `heads` are zero rows with weight
// 0, which add 0); a block walks runs [r0, r1) of one or more queries, its A fragments reloaded
// when the query changes, each run in tiles of 64 keys.
template <int kWarps>
__global__ void __launch_bounds__(kWarps * 32) IndexScoresRunsMmaKernel(
    const float* __restrict__ q, const float* __restrict__ w, int heads, const float* __restrict__ keys,
    const int32_t* __restrict__ first, const int32_t* __restrict__ query, const int32_t* __restrict__ start,
    const int32_t* __restrict__ count, int64_t runs, int runs_per_block, float* __restrict__ scores) {
  constexpr int kThreads = kWarps * 32;
  __shared__ __align__(16) uint32_t tile[kTileKeys * kRowWords];
  __shared__ float partial[kWarps][kTileKeys];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int h = warp * 16 + g;  // this lane's heads: h and h + 8
  uint32_t a[kDim / 16][4];
  float w_lo = 0.0f, w_hi = 0.0f;
  int current = -1;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * runs_per_block;
  const int64_t r1 = r0 + runs_per_block < runs ? r0 + runs_per_block : runs;
  for (int64_t r = r0; r < r1; ++r) {
    const int qi = query[r];
    if (qi != current) {  // the same for the whole block
      current = qi;
      const bool has_lo = h < heads, has_hi = h + 8 < heads;
      const float* lo = q + (static_cast<int64_t>(qi) * heads + h) * kDim;
      const float* hi = lo + 8 * kDim;
      const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
      for (int ks = 0; ks < kDim / 16; ++ks) {
        const int c = ks * 16 + 2 * t;
        const float2 x0 = has_lo ? *reinterpret_cast<const float2*>(lo + c) : zero;
        const float2 x1 = has_hi ? *reinterpret_cast<const float2*>(hi + c) : zero;
        const float2 x2 = has_lo ? *reinterpret_cast<const float2*>(lo + c + 8) : zero;
        const float2 x3 = has_hi ? *reinterpret_cast<const float2*>(hi + c + 8) : zero;
        a[ks][0] = PackBf16(x0.x, x0.y);
        a[ks][1] = PackBf16(x1.x, x1.y);
        a[ks][2] = PackBf16(x2.x, x2.y);
        a[ks][3] = PackBf16(x3.x, x3.y);
      }
      w_lo = has_lo ? w[static_cast<int64_t>(qi) * heads + h] : 0.0f;
      w_hi = has_hi ? w[static_cast<int64_t>(qi) * heads + h + 8] : 0.0f;
    }
    const int64_t key0 = first[r], out0 = start[r];
    const int n = count[r];
    for (int base = 0; base < n; base += kTileKeys) {
      const int nk = n - base < kTileKeys ? n - base : kTileKeys;
      __syncthreads();  // the last tile's fragments and partial sums are read
      // Keys in as bf16 pairs: a warp's 32 float4 loads are one key's 512 contiguous bytes.
      for (int i = threadIdx.x; i < kTileKeys * (kDim / 4); i += kThreads) {
        const int key = i / (kDim / 4), c4 = i % (kDim / 4);
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (key < nk) v = __ldcs(reinterpret_cast<const float4*>(keys + (key0 + base + key) * kDim) + c4);
        *reinterpret_cast<uint2*>(&tile[key * kRowWords + c4 * 2]) = make_uint2(PackBf16(v.x, v.y), PackBf16(v.z, v.w));
      }
      __syncthreads();
      float c[kTileKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kTileKeys / 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kDim / 16; ++ks)
#pragma unroll
        for (int nt = 0; nt < kTileKeys / 8; ++nt) {
          const uint32_t* p = &tile[(nt * 8 + g) * kRowWords + ks * 8 + t];
          const uint32_t b[2] = {p[0], p[4]};
          ptx::MmaBf16(c[nt], a[ks], b);
        }
      // c[nt]: keys nt·8 + 2t, +1 for heads h (c0, c1) and h + 8 (c2, c3); the warp's 16 heads
      // summed over g (lane bits 2..4), then the warps' sums in shared memory.
#pragma unroll
      for (int nt = 0; nt < kTileKeys / 8; ++nt) {
        float s0 = Term(c[nt][0], w_lo) + Term(c[nt][2], w_hi);
        float s1 = Term(c[nt][1], w_lo) + Term(c[nt][3], w_hi);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          s0 += __shfl_xor_sync(0xffffffffu, s0, off);
          s1 += __shfl_xor_sync(0xffffffffu, s1, off);
        }
        if (g == 0) {
          partial[warp][nt * 8 + 2 * t] = s0;
          partial[warp][nt * 8 + 2 * t + 1] = s1;
        }
      }
      __syncthreads();
      for (int j = threadIdx.x; j < nk; j += kThreads) {
        float s = 0.0f;
#pragma unroll
        for (int v = 0; v < kWarps; ++v) s += partial[v][j];
        scores[out0 + base + j] = RoundBf16(s);
      }
    }
  }
}

template <int kWarps>
cudaError_t LaunchRuns(const float* q, const float* w, int heads, const float* keys, const int32_t* first, const int32_t* query,
                       const int32_t* start, const int32_t* count, int64_t runs, float* scores, cudaStream_t stream) {
  // A few runs a block once there are many (fewer reloads of a query's 32 KB), while the grid
  // still gives every SM several blocks.
  const int per = static_cast<int>(std::clamp<int64_t>(runs / 2048, 1, 8));
  const int64_t blocks = (runs + per - 1) / per;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  IndexScoresRunsMmaKernel<kWarps><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      q, w, heads, keys, first, query, start, count, runs, per, scores);
  return cudaGetLastError();
}

}  // namespace

bool IndexScoresMmaSupports(int64_t heads, int64_t dim) { return dim == kDim && heads >= 1 && heads <= 128; }

cudaError_t IndexScoresRunsMma(const float* q, const float* w, int64_t heads, int64_t dim, const float* keys,
                               const int32_t* first, const int32_t* query, const int32_t* start,
                               const int32_t* count, int64_t runs, float* scores, cudaStream_t stream) {
  if (!IndexScoresMmaSupports(heads, dim)) return cudaErrorInvalidValue;
  if (runs == 0) return cudaSuccess;
  const int h = static_cast<int>(heads);  // in warps of 16 heads, rounded up to 1, 2, 4 or 8 warps
  if (heads <= 16) return LaunchRuns<1>(q, w, h, keys, first, query, start, count, runs, scores, stream);
  if (heads <= 32) return LaunchRuns<2>(q, w, h, keys, first, query, start, count, runs, scores, stream);
  if (heads <= 64) return LaunchRuns<4>(q, w, h, keys, first, query, start, count, runs, scores, stream);
  return LaunchRuns<8>(q, w, h, keys, first, query, start, count, runs, scores, stream);
}

}  // namespace flashmem::kernels::cuda
