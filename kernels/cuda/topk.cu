// Top-k on the GPU: a radix select of the k-th largest score (8 bits a pass, four passes over
// the scores), then the k winners — every score above it, and the ties at it in ascending index
// order — gathered in index order and stably sorted by score in one block. Never a sort of all
// n. Same result as kernels/topk.h, bit for bit.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kThreads = 512;
static_assert(kThreads * 4 == kTopKMaxK, "four items a thread sort the most winners");

// Order-preserving key: a larger score gives a larger key, and -0 and +0 one key (they compare
// equal in the host's rule, so their order is the index order).
__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The keys of a row, four per thread per step: 16-byte loads when the row is 16-byte aligned,
// every thread of the block in every step (a key past n comes with valid = false), so f may use
// warp collectives. Thread t's keys in a step are 4t .. 4t + 3 of that step's chunk: index order
// is thread order.
template <typename F>
__device__ __forceinline__ void ForEachKeyQuad(const float* s, int64_t n, F&& f) {
  const bool vec = (reinterpret_cast<uintptr_t>(s) & 15) == 0;
  const int64_t n4 = vec ? n / 4 : 0;
  for (int64_t b = 0; b < n4; b += kThreads) {
    const int64_t j = b + threadIdx.x;
    const bool ok = j < n4;
    const float4 v = ok ? reinterpret_cast<const float4*>(s)[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const uint32_t k4[4] = {OrderKey(v.x), OrderKey(v.y), OrderKey(v.z), OrderKey(v.w)};
    const bool ok4[4] = {ok, ok, ok, ok};
    f(k4, ok4, 4 * j);
  }
  for (int64_t b = 4 * n4; b < n; b += 4 * kThreads) {
    const int64_t i0 = b + 4 * threadIdx.x;
    uint32_t k4[4];
    bool ok4[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      ok4[e] = i0 + e < n;
      k4[e] = ok4[e] ? OrderKey(s[i0 + e]) : 0u;
    }
    f(k4, ok4, i0);
  }
}

// One block per row of n scores; out gets k indices per row (1 <= k <= min(n, kThreads * kItems)).
template <int kItems>
__global__ void __launch_bounds__(kThreads) TopKKernel(const float* scores, int64_t n, int k, int32_t* out) {
  using Sort = cub::BlockRadixSort<uint32_t, kThreads, kItems, int32_t>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    struct {
      uint32_t keys[kThreads * kItems];
      int32_t index[kThreads * kItems];
      typename Scan::TempStorage scan;
    } pick;
    typename Sort::TempStorage sort;
  } smem;
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining;
  const float* s = scores + static_cast<int64_t>(blockIdx.x) * n;
  int32_t* o = out + static_cast<int64_t>(blockIdx.x) * k;
  const unsigned lane = threadIdx.x & 31u;

  // 1. The k-th largest key T, one byte at a time from the top: keep the keys that match the
  // bytes found so far, histogram their next byte, walk down from 255 until k are covered. Most
  // keys share their top bytes, so the lanes of a warp that hit one bin add once for all of them
  // (__match_any_sync) instead of queueing on the same shared-memory word.
  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // winners still to find among the keys matching `prefix`
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    ForEachKeyQuad(s, n, [&](const uint32_t (&key)[4], const bool (&ok)[4], int64_t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool want = ok[e] && (key[e] & mask) == prefix;
        const unsigned bin = want ? (key[e] >> shift) & 255u : 256u;
        const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
        if (want && lane == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&hist[bin], __popc(peers));
      }
    });
    __syncthreads();
    // The byte of the k-th key: thread t < 256 takes bin 255 - t, a block scan sums the bins from
    // the top, and the one thread whose running sum first reaches `remaining` owns it (a walk by
    // one thread cost ~3 us a pass).
    const int bin = 255 - static_cast<int>(threadIdx.x);
    const int count = threadIdx.x < 256 ? static_cast<int>(hist[bin]) : 0;
    int from_top = 0;
    Scan(smem.pick.scan).InclusiveSum(count, from_top);
    if (threadIdx.x < 256 && from_top >= remaining && from_top - count < remaining) {
      s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      s_remaining = remaining - (from_top - count);
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }
  // Now prefix == T: k - remaining keys are above it, and the first `remaining` keys equal to it
  // (in index order) win too.
  const uint32_t kth = prefix;
  const int above = k - remaining;

  // 2. The winners in index order: keys above T to [0, above), the first ties to [above, k). One
  // block scan per step counts both (above in the low 16 bits, ties in the high ones).
  int above_seen = 0, ties_seen = 0;
  ForEachKeyQuad(s, n, [&](const uint32_t (&key)[4], const bool (&ok)[4], int64_t i0) {
    int mine = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) mine += ok[e] ? (key[e] > kth) | ((key[e] == kth) << 16) : 0;
    int pos = 0, total = 0;
    Scan(smem.pick.scan).ExclusiveSum(mine, pos, total);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool is_above = ok[e] && key[e] > kth, is_tie = ok[e] && key[e] == kth;
      const int a = above_seen + (pos & 0xFFFF), t = ties_seen + (pos >> 16);
      if (is_above || (is_tie && t < remaining)) {
        const int at = is_above ? a : above + t;
        smem.pick.keys[at] = key[e];
        smem.pick.index[at] = static_cast<int32_t>(i0 + e);
      }
      pos += is_above | (is_tie << 16);
    }
    above_seen += total & 0xFFFF;
    ties_seen += total >> 16;
    __syncthreads();  // the scan's storage is reused by the next step
  });
  __syncthreads();

  // 3. A stable sort of the winners by key, descending: equal keys keep their index order. The
  // padding (key 0, below every real key) stays last.
  uint32_t keys[kItems];
  int32_t index[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int at = threadIdx.x * kItems + j;
    keys[j] = at < k ? smem.pick.keys[at] : 0u;
    index[j] = at < k ? smem.pick.index[at] : -1;
  }
  __syncthreads();  // the winners' storage becomes the sort's
  Sort(smem.sort).SortDescending(keys, index);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int rank = threadIdx.x * kItems + j;
    if (rank < k) o[rank] = index[j];
  }
}

// (value, index) pairs: a beats b when a has a value and b none, or a larger value, or the same
// value at a lower index. found == false is "no value yet" (NaN or nothing scanned).
struct Pick {
  float v;
  int32_t i;
  bool found;
};
__device__ __forceinline__ Pick Better(Pick a, Pick b) {
  if (!b.found) return a;
  if (!a.found) return b;
  return (a.v > b.v || (a.v == b.v && a.i < b.i)) ? a : b;
}

constexpr int kArgmaxThreads = 1024;

__global__ void __launch_bounds__(kArgmaxThreads) ArgmaxKernel(const float* values, int64_t n, int32_t* out) {
  const float* row = values + static_cast<int64_t>(blockIdx.x) * n;
  Pick p{0.0f, 0, false};
  for (int64_t j = threadIdx.x; j < n; j += kArgmaxThreads) {  // increasing j: a later equal never wins
    const float v = row[j];
    if (v == v && (!p.found || v > p.v)) p = {v, static_cast<int32_t>(j), true};
  }
  for (int off = 16; off > 0; off >>= 1) {
    const Pick o{__shfl_down_sync(0xffffffffu, p.v, off), __shfl_down_sync(0xffffffffu, p.i, off),
                 __shfl_down_sync(0xffffffffu, p.found, off) != 0};
    p = Better(p, o);
  }
  __shared__ Pick warp_best[kArgmaxThreads / 32];
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = p;
  __syncthreads();
  if (threadIdx.x < 32) {
    p = warp_best[threadIdx.x];
    for (int off = 16; off > 0; off >>= 1) {
      const Pick o{__shfl_down_sync(0xffffffffu, p.v, off), __shfl_down_sync(0xffffffffu, p.i, off),
                   __shfl_down_sync(0xffffffffu, p.found, off) != 0};
      p = Better(p, o);
    }
    if (threadIdx.x == 0) out[blockIdx.x] = p.found ? p.i : 0;
  }
}

}  // namespace

cudaError_t ArgmaxRows(const float* values, int64_t rows, int64_t n, int32_t* out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (n > INT32_MAX || rows > INT32_MAX) return cudaErrorInvalidValue;
  ArgmaxKernel<<<static_cast<unsigned>(rows), kArgmaxThreads, 0, stream>>>(values, n, out);
  return cudaGetLastError();
}

cudaError_t TopK(const float* scores, int64_t rows, int64_t n, int64_t k, int32_t* out, cudaStream_t stream) {
  if (rows <= 0 || n <= 0 || k <= 0) return cudaSuccess;
  if (k > n || k > kTopKMaxK || n > (int64_t{1} << 31) - 1) return cudaErrorInvalidValue;
  // One item per thread sorts up to 512 winners (the indexer's usual k) in a quarter of the
  // passes' shared-memory traffic; four per thread up to kTopKMaxK.
  if (k <= kThreads) TopKKernel<1><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores, n, static_cast<int>(k), out);
  else TopKKernel<4><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores, n, static_cast<int>(k), out);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
