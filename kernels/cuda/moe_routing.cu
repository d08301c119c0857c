// An MoE layer's routing on the device (Backend::RoutedMoE's CUDA form): the picks and weights
// from the router's logits, then the rows grouped by expert into the grouped decode GEMV's table,
// so that no host code sits between the router and the experts.
#include <cub/block/block_scan.cuh>

#include <cmath>

#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {

namespace {

constexpr int kRouteThreads = 256;
constexpr int kGroupThreads = 1024;

// A score as RouteFromLogits computes it on the host. exp and log1p in double, rounded once: the
// float functions of the host's libm are correctly rounded nearly always, the device's are within
// 2 ulp; so the picks and weights match the host's but for ties that close.
__device__ float RouterScoreOf(float lg, RouterScore score) {
  switch (score) {
    case RouterScore::kSqrtSoftplus: {
      const float sp = lg > 20.0f ? lg : static_cast<float>(log1p(static_cast<double>(static_cast<float>(exp(static_cast<double>(lg))))));
      return sqrtf(sp);
    }
    case RouterScore::kSigmoid:
      return 1.0f / (1.0f + static_cast<float>(exp(static_cast<double>(-lg))));
    case RouterScore::kSoftmax:
      break;
  }
  return lg;  // softmax: the caller normalizes
}

// One block a token: scores in shared memory, then k rounds of a block argmax (the largest
// score + bias, ties to the lower id: TopKIndices's order), then the weights on one thread in
// pick order (the host's fp32 sum).
__global__ void __launch_bounds__(kRouteThreads) RouteTokensKernel(const float* logits, int experts, int k,
                                                                   RouterScore score, const float* bias,
                                                                   const int32_t* hash_ids, float route_scale,
                                                                   int32_t* ids, float* weights) {
  extern __shared__ float route_smem[];
  float* scores = route_smem;          // [experts]
  float* key = route_smem + experts;   // [experts]: score + bias; NaN once picked
  __shared__ float best_v[kRouteThreads / 32];
  __shared__ int best_i[kRouteThreads / 32];
  __shared__ int picks[kMaxRouteK];
  __shared__ float norm;
  const int64_t row = blockIdx.x;
  const float* lg = logits + row * experts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) scores[e] = RouterScoreOf(lg[e], score);
  __syncthreads();
  if (score == RouterScore::kSoftmax) {  // max, then exp and the sum in expert order (the host's)
    if (threadIdx.x == 0) {
      float mx = lg[0];
      for (int e = 1; e < experts; ++e) mx = lg[e] > mx ? lg[e] : mx;  // std::max_element's first largest
      norm = mx;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x)
      scores[e] = static_cast<float>(exp(static_cast<double>(lg[e] - norm)));
    __syncthreads();
    if (threadIdx.x == 0) {
      float sum = 0.0f;
      for (int e = 0; e < experts; ++e) sum += scores[e];
      norm = sum;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) scores[e] /= norm;
    __syncthreads();
  }
  if (hash_ids) {
    if (threadIdx.x < k) picks[threadIdx.x] = hash_ids[row * k + threadIdx.x];
  } else {
    for (int e = threadIdx.x; e < experts; e += blockDim.x) key[e] = scores[e] + (bias ? bias[e] : 0.0f);
    __syncthreads();
    for (int j = 0; j < k; ++j) {
      float v = -INFINITY;
      int at = -1;
      for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        const float x = key[e];
        if (x == x && (at < 0 || x > v)) {  // ascending e: an equal later key never displaces
          v = x;
          at = e;
        }
      }
      for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_down_sync(0xffffffffu, v, off);
        const int oi = __shfl_down_sync(0xffffffffu, at, off);
        if (oi >= 0 && (at < 0 || ov > v || (ov == v && oi < at))) {
          v = ov;
          at = oi;
        }
      }
      if (lane == 0) {
        best_v[warp] = v;
        best_i[warp] = at;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        float bv = best_v[0];
        int bi = best_i[0];
        for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w)
          if (best_i[w] >= 0 && (bi < 0 || best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi))) {
            bv = best_v[w];
            bi = best_i[w];
          }
        bi = bi < 0 ? 0 : bi;  // every key NaN: the host's order is undefined there too
        picks[j] = bi;
        key[bi] = NAN;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float* wt = weights + row * k;
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += (wt[j] = scores[picks[j]]);
    for (int j = 0; j < k; ++j) {
      if (score != RouterScore::kSoftmax) wt[j] /= sum;
      wt[j] *= route_scale;
      ids[row * k + j] = picks[j];
    }
  }
}

// One block for the layer: a counting sort of the n * k picks by expert (each expert's rows in
// row order, experts in id order: GroupByExpert's lists end to end), each token's rows in expert
// order for the scatter-add, and the grouped GEMV's table (the non-empty experts first, then
// groups of no tokens).
__global__ void __launch_bounds__(kGroupThreads) GroupRoutesKernel(const int32_t* ids, const float* weights, int64_t n,
                                                                   int k, ExpertGroupLayout l, int32_t* rows,
                                                                   float* row_weights, int32_t* offsets,
                                                                   int32_t* order, GemvGroup* table) {
  using Scan = cub::BlockScan<int, kGroupThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int count[kMaxRouteExperts], start[kMaxRouteExperts], compact[kMaxRouteExperts];
  __shared__ int used;
  extern __shared__ int pos[];  // [n * k]: each pick's place in `rows`
  const int E = static_cast<int>(l.experts), picks = static_cast<int>(n * k), tid = threadIdx.x;
  for (int e = tid; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int p = tid; p < picks; p += blockDim.x) atomicAdd(&count[ids[p]], 1);
  __syncthreads();
  {  // E <= kGroupThreads: one expert a thread
    const int c = tid < E ? count[tid] : 0;
    int s = 0, nonempty = 0, total_nonempty = 0;
    Scan(scan).ExclusiveSum(c, s);
    __syncthreads();
    Scan(scan).ExclusiveSum(c > 0 ? 1 : 0, nonempty, total_nonempty);
    if (tid < E) {
      start[tid] = s;
      compact[tid] = nonempty;
    }
    if (tid == 0) used = total_nonempty;
  }
  __syncthreads();
  for (int p = tid; p < picks; p += blockDim.x) {
    const int e = ids[p];
    int rank = 0;
    for (int q = 0; q < p; ++q) rank += ids[q] == e;
    const int at = start[e] + rank;
    pos[p] = at;
    rows[at] = p / k;
    row_weights[at] = weights[p];
  }
  __syncthreads();
  for (int p = tid; p < picks; p += blockDim.x) {  // token i's rows by place (= expert order)
    const int i = p / k;
    int r = 0;
    for (int j = 0; j < k; ++j) r += pos[i * k + j] < pos[p];
    order[i * k + r] = pos[p];
  }
  for (int64_t i = tid; i <= n; i += blockDim.x) offsets[i] = static_cast<int32_t>(i * k);
  const int64_t G = l.groups, dim = l.dim, inter = l.inter;
  for (int e = tid; e < E; e += blockDim.x) {
    const int m = count[e];
    if (m == 0) continue;
    const int64_t c = compact[e], s = start[e];
    GemvGroup g1 = l.templates[e], g3 = l.templates[E + e], g2 = l.templates[2 * E + e];
    g1.xq = g3.xq = l.qx + s * dim;
    g1.xs = g3.xs = l.qs + s * (dim / 128);
    g1.xh = g3.xh = reinterpret_cast<const uint16_t*>(l.qx) + s * dim;
    g1.n = g3.n = g2.n = m;
    g1.y = l.gate + s * inter;
    g3.y = l.up + s * inter;
    g2.xq = l.qh + s * inter;
    g2.xs = l.qhs + s * (inter / 128);
    g2.xh = reinterpret_cast<const uint16_t*>(l.qh) + s * inter;
    g2.y = l.out + s * dim;
    table[c] = g1;
    table[G + c] = g3;
    table[2 * G + c] = g2;
  }
  for (int64_t c = used + tid; c < G; c += blockDim.x) {  // groups past the experts picked: no tokens
    GemvGroup none{};
    table[c] = table[G + c] = table[2 * G + c] = none;
  }
}

}  // namespace

cudaError_t RouteTokens(const float* logits, int64_t n, int64_t experts, int64_t k, RouterScore score,
                        const float* bias, const int32_t* hash_ids, float route_scale, int32_t* ids, float* weights,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (experts < 1 || experts > kMaxRouteExperts || k < 1 || k > kMaxRouteK || k > experts) return cudaErrorInvalidValue;
  RouteTokensKernel<<<static_cast<unsigned>(n), kRouteThreads, 2 * experts * sizeof(float), stream>>>(
      logits, static_cast<int>(experts), static_cast<int>(k), score, bias, hash_ids, route_scale, ids, weights);
  return cudaGetLastError();
}

cudaError_t GroupRoutes(const int32_t* ids, const float* weights, int64_t n, int64_t k, const ExpertGroupLayout& l,
                        int32_t* rows, float* row_weights, int32_t* offsets, int32_t* order, GemvGroup* table,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (l.experts < 1 || l.experts > kMaxRouteExperts || k < 1 || k > kMaxRouteK || n * k > kMaxRoutePicks ||
      l.dim % 128 != 0 || l.inter % 128 != 0)
    return cudaErrorInvalidValue;
  GroupRoutesKernel<<<1, kGroupThreads, n * k * sizeof(int), stream>>>(ids, weights, n, static_cast<int>(k), l, rows,
                                                                      row_weights, offsets, order, table);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
