// Top-k on the GPU: a radix select of the k-th largest score (8 bits a pass, four passes over
// the scores), then the k winners — every score above it, and the ties at it in ascending index
// order — sorted in one block. Never a sort of all n. Same result as kernels/topk.h, bit for bit.
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kItems = kTopKMaxK / kThreads;  // per thread in the final sort
static_assert(kItems * kThreads == kTopKMaxK);

// Order-preserving key: a larger score gives a larger key, and -0 and +0 one key (they compare
// equal in the host's rule, so their order is the index order).
__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Sorting these descending orders by score descending, then index ascending.
__device__ __forceinline__ uint64_t Winner(uint32_t key, int64_t index) {
  return (static_cast<uint64_t>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
}

// One block per row of n scores; out gets k indices per row (1 <= k <= min(n, kTopKMaxK)).
__global__ void __launch_bounds__(kThreads) TopKKernel(const float* scores, int64_t n, int k, int32_t* out) {
  using Sort = cub::BlockRadixSort<uint64_t, kThreads, kItems>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    struct {
      uint64_t winners[kTopKMaxK];
      typename Scan::TempStorage scan;
    } pick;
    typename Sort::TempStorage sort;
  } smem;
  __shared__ unsigned hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int s_remaining, s_above;
  const float* s = scores + static_cast<int64_t>(blockIdx.x) * n;
  int32_t* o = out + static_cast<int64_t>(blockIdx.x) * k;

  // 1. The k-th largest key T, one byte at a time from the top: keep the keys that match the
  // bytes found so far, histogram their next byte, walk down from 255 until k are covered.
  uint32_t prefix = 0, mask = 0;
  int remaining = k;  // winners still to find among the keys matching `prefix`
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const uint32_t key = OrderKey(s[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int digit = 255;
      unsigned r = static_cast<unsigned>(remaining);
      for (; digit > 0 && hist[digit] < r; --digit) r -= hist[digit];
      s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
      s_remaining = static_cast<int>(r);
      s_above = 0;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 255u << shift;
  }
  // Now prefix == T: k - remaining keys are above it, and `remaining` of the keys equal to it win.
  const uint32_t kth = prefix;
  const int above = k - remaining;

  // 2. Every key above T (in any order: they are sorted below).
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const uint32_t key = OrderKey(s[i]);
    if (key > kth) smem.pick.winners[atomicAdd(&s_above, 1)] = Winner(key, i);
  }
  // 3. The first `remaining` keys equal to T, in index order: a block scan per chunk of indices.
  int taken = 0;
  for (int64_t base = 0; base < n && taken < remaining; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int tie = i < n && OrderKey(s[i]) == kth;
    int pos = 0, total = 0;
    Scan(smem.pick.scan).ExclusiveSum(tie, pos, total);
    if (tie && taken + pos < remaining) smem.pick.winners[above + taken + pos] = Winner(kth, i);
    taken += total;
    __syncthreads();  // the scan's storage is reused by the next chunk
  }
  __syncthreads();

  // 4. Sort the k winners (padding with 0, below every real winner) and write their indices.
  uint64_t items[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int at = threadIdx.x * kItems + j;
    items[j] = at < k ? smem.pick.winners[at] : 0;
  }
  __syncthreads();  // the winners' storage becomes the sort's
  Sort(smem.sort).SortDescending(items);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int rank = threadIdx.x * kItems + j;
    if (rank < k) o[rank] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(items[j]));
  }
}

}  // namespace

cudaError_t TopK(const float* scores, int64_t rows, int64_t n, int64_t k, int32_t* out, cudaStream_t stream) {
  if (rows <= 0 || n <= 0 || k <= 0) return cudaSuccess;
  if (k > n || k > kTopKMaxK || n > (int64_t{1} << 31) - 1) return cudaErrorInvalidValue;
  TopKKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(scores, n, static_cast<int>(k), out);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
