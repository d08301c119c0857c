// An MoE layer's routing on the device (Backend::RoutedMoE's CUDA form): the picks and weights
// from the router's logits, then the rows grouped by expert into the grouped decode GEMV's table,
// so that no host code sits between the router and the experts.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {

namespace {

constexpr int kThreads = static_cast<int>(kMaxRouteExperts);  // one expert a thread

// A score as RouteFromLogits computes it on the host. exp and log1p in double, rounded once: the
// float functions of the host's libm are correctly rounded nearly always, the device's are within
// 2 ulp; so the picks and weights match the host's but for ties that close.
__device__ __forceinline__ float RouterScoreOf(float lg, RouterScore score) {
  if (score == RouterScore::kSqrtSoftplus) {
    const float e = static_cast<float>(exp(static_cast<double>(lg)));
    return sqrtf(lg > 20.0f ? lg : static_cast<float>(log1p(static_cast<double>(e))));
  }
  if (score == RouterScore::kSigmoid) return 1.0f / (1.0f + static_cast<float>(exp(static_cast<double>(-lg))));
  return lg;  // softmax: normalized by the caller
}

struct MaxOf {
  __device__ float operator()(float a, float b) const { return a < b ? b : a; }
};

// (v, e, s) of the larger key, ties to the lower expert; e < 0: none.
__device__ __forceinline__ void Better(float& v, int& e, float& s, float ov, int oe, float os) {
  if (oe >= 0 && (e < 0 || ov > v || (ov == v && oe < e))) {
    v = ov;
    e = oe;
    s = os;
  }
}

// Phase 1, a block a token: its scores, one expert a thread (softmax's max and sum over the
// block), then on warp 0 k rounds of a warp argmax over score + bias (ties to the lower id:
// TopKIndices's order) or a hash layer's picks, and the weights on lane 0 in pick order (the
// host's fp32 sum). The last block to finish (a ticket on `done`, which it resets) runs phase 2
// for the layer: a counting sort of the n * k picks by expert (each expert's rows in row order,
// experts in id order: GroupByExpert's lists end to end), each token's rows in expert order for
// the scatter-add, and the grouped GEMV's table (the non-empty experts first, then groups of no
// tokens).
template <int kPerLane>  // a lane's experts in the top-k (lane, lane + 32, ...): 8 up to 256 experts
__global__ void __launch_bounds__(kThreads) RouteGroupKernel(const float* logits, int64_t n, int k, RouterScore score,
                                                             const float* bias, const int32_t* hash_ids,
                                                             float route_scale, ExpertGroupLayout l, int32_t* ids,
                                                             float* weights, int32_t* rows, float* row_weights,
                                                             int32_t* offsets, int32_t* order, GemvGroup* table,
                                                             unsigned* done) {
  using Scan = cub::BlockScan<int, kThreads>;
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  __shared__ float sc[kMaxRouteExperts];
  __shared__ int count[kMaxRouteExperts], start[kMaxRouteExperts], compact[kMaxRouteExperts];
  __shared__ float norm;
  __shared__ int used;
  __shared__ bool last;
  const int E = static_cast<int>(l.experts), tid = threadIdx.x, lane = tid & 31;
  const int64_t t = blockIdx.x;
  {
    const float* lg = logits + t * E;
    const float x = tid < E ? lg[tid] : -INFINITY;
    float s = tid < E ? RouterScoreOf(x, score) : 0.0f;
    if (score == RouterScore::kSoftmax) {  // exps of logit - max over their sum (summed as a tree)
      const float mx = Reduce(tmp.reduce).Reduce(x, MaxOf());
      if (tid == 0) norm = mx;
      __syncthreads();
      s = tid < E ? static_cast<float>(exp(static_cast<double>(x - norm))) : 0.0f;
      const float sum = Reduce(tmp.reduce).Sum(s);
      __syncthreads();
      if (tid == 0) norm = sum;
      __syncthreads();
      s /= norm;
    }
    if (tid < E) sc[tid] = s;
  }
  __syncthreads();
  if (tid < 32) {
    float key[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int e = lane + 32 * i;
      key[i] = e < E ? sc[e] + (bias ? bias[e] : 0.0f) : NAN;  // NaN: never picked
    }
    float wt[kMaxRouteK];
    int pick[kMaxRouteK];
    for (int j = 0; j < k; ++j) {
      float v = 0.0f, s = 0.0f;
      int at = -1;
      if (hash_ids) {  // the pick is given
        at = hash_ids[t * k + j];
        s = sc[at];
      } else {
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)  // ascending e: an equal later key never displaces
          if (key[i] == key[i]) Better(v, at, s, key[i], lane + 32 * i, sc[lane + 32 * i]);
        for (int off = 16; off > 0; off >>= 1)
          Better(v, at, s, __shfl_xor_sync(0xffffffffu, v, off), __shfl_xor_sync(0xffffffffu, at, off),
                 __shfl_xor_sync(0xffffffffu, s, off));
        at = at < 0 ? 0 : at;  // every key NaN: the host's order is undefined there too
        if (lane == at % 32) {
#pragma unroll
          for (int i = 0; i < kPerLane; ++i)
            if (i == at / 32) key[i] = NAN;
        }
      }
      if (lane == 0) {
        pick[j] = at;
        wt[j] = s;
      }
    }
    if (lane == 0) {
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) sum += wt[j];
      for (int j = 0; j < k; ++j) {
        if (score != RouterScore::kSoftmax) wt[j] /= sum;
        wt[j] *= route_scale;
        ids[t * k + j] = pick[j];
        weights[t * k + j] = wt[j];
      }
      __threadfence();  // the picks visible to the block that groups them
      last = atomicAdd(done, 1u) == static_cast<unsigned>(n - 1);
    }
  }
  __syncthreads();
  if (!last) return;

  if (tid == 0) *done = 0;  // for the next launch
  const int picks = static_cast<int>(n * k);
  extern __shared__ int route_smem[];  // [n * k] picks, then their weights, then their places in `rows`
  int* pk = route_smem;
  float* pw = reinterpret_cast<float*>(route_smem + picks);
  int* pos = route_smem + 2 * picks;
  for (int e = tid; e < E; e += kThreads) count[e] = 0;
  __syncthreads();
  for (int p = tid; p < picks; p += kThreads) {
    pk[p] = __ldcg(ids + p);  // from L2: other blocks wrote them
    pw[p] = __ldcg(weights + p);
    atomicAdd(&count[pk[p]], 1);
  }
  __syncthreads();
  {
    const int c = tid < E ? count[tid] : 0;
    int s = 0, nonempty = 0, total_nonempty = 0;
    Scan(tmp.scan).ExclusiveSum(c, s);
    __syncthreads();
    Scan(tmp.scan).ExclusiveSum(c > 0 ? 1 : 0, nonempty, total_nonempty);
    if (tid < E) {
      start[tid] = s;
      compact[tid] = nonempty;
    }
    if (tid == 0) used = total_nonempty;
  }
  __syncthreads();
  for (int p = tid; p < picks; p += kThreads) {
    const int e = pk[p];
    int rank = 0;
    for (int q = 0; q < p; ++q) rank += pk[q] == e;
    const int at = start[e] + rank;
    pos[p] = at;
    rows[at] = p / k;
    row_weights[at] = pw[p];
  }
  __syncthreads();
  for (int p = tid; p < picks; p += kThreads) {  // token i's rows by place (= expert order)
    const int i = p / k;
    int r = 0;
    for (int j = 0; j < k; ++j) r += pos[i * k + j] < pos[p];
    order[i * k + r] = pos[p];
  }
  for (int64_t i = tid; i <= n; i += kThreads) offsets[i] = static_cast<int32_t>(i * k);
  const int64_t G = l.groups, dim = l.dim, inter = l.inter;
  for (int e = tid; e < E; e += kThreads) {
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
  for (int64_t c = used + tid; c < G; c += kThreads) {  // groups past the experts picked: no tokens
    const GemvGroup none{};
    table[c] = table[G + c] = table[2 * G + c] = none;
  }
}

}  // namespace

cudaError_t RouteAndGroup(const float* logits, int64_t n, int64_t k, RouterScore score, const float* bias,
                          const int32_t* hash_ids, float route_scale, const ExpertGroupLayout& l, int32_t* ids,
                          float* weights, int32_t* rows, float* row_weights, int32_t* offsets, int32_t* order,
                          GemvGroup* table, unsigned* done, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (l.experts < 1 || l.experts > kMaxRouteExperts || k < 1 || k > kMaxRouteK || k > l.experts ||
      n * k > kMaxRoutePicks || l.dim % 128 != 0 || l.inter % 128 != 0 || l.groups < std::min(n * k, l.experts))
    return cudaErrorInvalidValue;
  const auto kernel = l.experts <= 256 ? RouteGroupKernel<8> : RouteGroupKernel<16>;
  kernel<<<static_cast<unsigned>(n), kThreads, 3 * n * k * sizeof(int), stream>>>(
      logits, n, static_cast<int>(k), score, bias, hash_ids, route_scale, l, ids, weights, rows, row_weights, offsets,
      order, table, done);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
