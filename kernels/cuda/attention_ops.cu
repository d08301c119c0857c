// Sparse MQA with the attention sink (fp32 rows and paged 584-B FP8 records) and the two indexer
// scorers of the CUDA backend.
#include <algorithm>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kAttnThreads = 256;
constexpr int kSlotBlock = 64;     // the reference's online-softmax block
constexpr int kMaxAttnDim = 1024;  // acc: 4 values per thread

// fp32 rows [rows, dim].
struct PlainRows {
  const float* kv;
  int64_t dim;
  __device__ float operator()(int32_t e, int64_t d) const { return kv[static_cast<int64_t>(e) * dim + d]; }
};

// Paged 584-B records: data (448 e4m3 + 64 bf16) of slot s at page + s*576, its scales at
// page + B*576 + s*8.
struct PagedFp8Rows {
  const uint8_t* pages;
  int64_t page_entries;
  __device__ float operator()(int32_t e, int64_t d) const {
    const uint8_t* page = pages + (static_cast<int64_t>(e) / page_entries) * page_entries * kRecordBytes;
    const int64_t slot = e % page_entries;
    const uint8_t* data = page + slot * kRecordData;
    if (d < kRecordNope) return E4m3ToFloat(data[d]) * E8m0ToFloat(page[page_entries * kRecordData + slot * kRecordScales + d / 64]);
    const int64_t r = d - kRecordNope;
    return Bf16BitsToFloat(static_cast<uint16_t>(data[kRecordNope + 2 * r] | (data[kRecordNope + 2 * r + 1] << 8)));
  }
};

// A row reader that yields 0 for a masked slot (e < 0) without touching memory.
template <typename Rows>
struct Masked {
  Rows rows;
  int32_t e;
  __device__ float operator()(int64_t d) const { return e >= 0 ? rows(e, d) : 0.0f; }
};

// One block per (query token, head). Slots are visited in blocks of 64 exactly as the CPU
// reference does (online softmax, P rounded to bf16, sink added last); each thread owns output
// dims, so P·V accumulates in the CPU's order and only q·k sums differ in order.
template <typename Rows>
__global__ void SparseAttnKernel(const float* q, int64_t heads, int64_t dim, Rows rows, const int32_t* idx,
                                 int64_t n, const float* sink, float scale, float* out) {
  const int64_t bh = blockIdx.x, b = bh / heads, h = bh % heads;
  const int32_t* slots = idx + b * n;
  __shared__ float qs[kMaxAttnDim];
  __shared__ float z[kSlotBlock], p[kSlotBlock];
  __shared__ float m_sh, alpha_sh, l_sh;
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) qs[d] = q[bh * dim + d];
  if (threadIdx.x == 0) {
    m_sh = -INFINITY;
    l_sh = 0.0f;
  }
  float acc[kMaxAttnDim / kAttnThreads] = {};
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  for (int64_t b0 = 0; b0 < n; b0 += kSlotBlock) {
    const int cnt = static_cast<int>(n - b0 < kSlotBlock ? n - b0 : kSlotBlock);
    // One half-warp per slot, q·k in the CPU's dot order; whole warps iterate together.
    for (int base = warp * 2; base < cnt; base += warps * 2) {
      const int j = base + ((threadIdx.x / 16) & 1);
      const int32_t e = j < cnt ? slots[b0 + j] : -1;
      const float s = HalfWarpDot(qs, Masked<Rows>{rows, e}, dim);
      if (j < cnt && (threadIdx.x & 15) == 0) z[j] = e >= 0 ? s : -INFINITY;
    }
    __syncthreads();
    if (warp == 0) {
      float mx = m_sh;
      for (int j = lane; j < cnt; j += 32) mx = fmaxf(mx, z[j]);
      mx = WarpMax(mx);
      for (int j = lane; j < cnt; j += 32) p[j] = z[j] == -INFINITY ? 0.0f : ExpF((z[j] - mx) * scale);
      __syncwarp();
      if (lane == 0) {
        if (mx == -INFINITY) {
          alpha_sh = NAN;  // fully masked block: skipped
        } else {
          const float alpha = ExpF((m_sh - mx) * scale);
          float l = l_sh * alpha;
          for (int j = 0; j < cnt; ++j)
            if (z[j] != -INFINITY) l += p[j];
          l_sh = l;
          alpha_sh = alpha;
          m_sh = mx;
        }
      }
    }
    __syncthreads();
    const float alpha = alpha_sh;
    if (!isnan(alpha)) {
      for (int r = 0; r < kMaxAttnDim / kAttnThreads; ++r) {
        const int64_t d = threadIdx.x + r * kAttnThreads;
        if (d >= dim) break;
        float a = acc[r] * alpha;
        for (int j = 0; j < cnt; ++j) {
          const int32_t e = slots[b0 + j];
          if (e >= 0) a += RoundBf16(p[j]) * rows(e, d);
        }
        acc[r] = a;
      }
    }
    __syncthreads();
  }
  const float l = l_sh + ExpF(sink[h] - m_sh * scale);
  for (int r = 0; r < kMaxAttnDim / kAttnThreads; ++r) {
    const int64_t d = threadIdx.x + r * kAttnThreads;
    if (d >= dim) break;
    out[bh * dim + d] = RoundBf16(acc[r] / l);
  }
}

// One half-warp per key (CPU dot order); idle half-warps compute a dummy key and write nothing.
// Key t is row t of `keys`, or row key_rows[t] when key_rows is given (keys in the KV reserve),
// scored by query 0, or query query_of[t] when given (several rows' keys in one launch).
__global__ void IndexScoresKernel(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                                  const float* keys, const int32_t* key_rows, const int32_t* query_of, int64_t n,
                                  float* scores) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 16) + threadIdx.x / 16;
  const int64_t row = t < n ? t : n - 1;
  const float* k = keys + (key_rows ? static_cast<int64_t>(key_rows[row]) : row) * dim;
  if (query_of) {
    q += static_cast<int64_t>(query_of[row]) * heads * dim;
    w += static_cast<int64_t>(query_of[row]) * w_stride;
  }
  float sum = 0.0f;
  for (int64_t h = 0; h < heads; ++h) {
    const float d = RoundBf16(HalfWarpDot(q + h * dim, Plain{k}, dim));
    sum += RoundBf16(fmaxf(d, 0.0f) * w[h]);
  }
  if (t < n && (threadIdx.x & 15) == 0) scores[t] = RoundBf16(sum);
}

__global__ void IndexerLogitsKernel(const float* q, const float* w, int64_t heads, int64_t dim, const float* keys,
                                    const uint8_t* valid, int64_t n, float* logits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 16) + threadIdx.x / 16;
  const float* k = keys + (t < n ? t : n - 1) * dim;
  float sum = 0.0f;
  for (int64_t h = 0; h < heads; ++h) sum += w[h] * fmaxf(HalfWarpDot(q + h * dim, Plain{k}, dim), 0.0f);
  if (t < n && (threadIdx.x & 15) == 0) logits[t] = valid[t] ? sum : 0.0f;
}

unsigned Blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

cudaError_t SparseAttention(const float* q, int64_t batch, int64_t heads, int64_t dim, const float* kv,
                            const int32_t* idx, int64_t n, const float* sink, float softmax_scale, float* out, cudaStream_t stream) {
  if (dim > kMaxAttnDim) return cudaErrorInvalidValue;
  if (batch * heads == 0) return cudaSuccess;
  SparseAttnKernel<<<static_cast<unsigned>(batch * heads), kAttnThreads, 0, stream>>>(
      q, heads, dim, PlainRows{kv, dim}, idx, n, sink, softmax_scale, out);
  return cudaGetLastError();
}

cudaError_t PagedSparseAttentionFp8(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                    int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                    float softmax_scale, float* out, cudaStream_t stream) {
  if (page_entries <= 0) return cudaErrorInvalidValue;
  if (batch * heads == 0) return cudaSuccess;
  SparseAttnKernel<<<static_cast<unsigned>(batch * heads), kAttnThreads, 0, stream>>>(
      q, heads, kRecordDim, PagedFp8Rows{pages, page_entries}, idx, n, sink, softmax_scale, out);
  return cudaGetLastError();
}

cudaError_t IndexScores(const float* q, const float* w, int64_t heads, int64_t dim, const float* keys, int64_t n,
                        float* scores, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  IndexScoresKernel<<<Blocks(n, 16), 256, 0, stream>>>(q, w, heads, heads, dim, keys, nullptr, nullptr, n, scores);
  return cudaGetLastError();
}

cudaError_t IndexScoresRows(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                            const float* keys, const int32_t* key_rows, const int32_t* query_of, int64_t n,
                            float* scores, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (w_stride < heads) return cudaErrorInvalidValue;
  IndexScoresKernel<<<Blocks(n, 16), 256, 0, stream>>>(q, w, w_stride, heads, dim, keys, key_rows, query_of, n, scores);
  return cudaGetLastError();
}

namespace {
__global__ void ExpandKeyRunsKernel(const int32_t* first, const int32_t* query, const int32_t* start,
                                    const int32_t* count, int32_t* key_rows, int32_t* query_of) {
  const int64_t r = blockIdx.x;
  for (int32_t j = threadIdx.x; j < count[r]; j += blockDim.x) {
    key_rows[start[r] + j] = first[r] + j;
    query_of[start[r] + j] = query[r];
  }
}
}  // namespace

namespace {
__global__ void FillFloatsKernel(float* p, int64_t n, float value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = value;
}
__global__ void RoundBf16Kernel(const float* x, int64_t n, float scale, float* y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    // A NaN passes unmultiplied: the device's product would be the canonical NaN, where the host's
    // keeps the operand's payload (RoundBf16 then quiets it the same way on both).
    y[i] = RoundBf16(x[i] != x[i] ? x[i] : x[i] * scale);
}

}  // namespace

cudaError_t RoundBf16(const float* x, int64_t n, float* y, cudaStream_t stream) {
  return ScaleRoundBf16(x, n, 1.0f, y, stream);
}

cudaError_t ScaleRoundBf16(const float* x, int64_t n, float scale, float* y, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  RoundBf16Kernel<<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(x, n, scale, y);
  return cudaGetLastError();
}

cudaError_t FillFloats(float* p, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillFloatsKernel<<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(p, n, value);
  return cudaGetLastError();
}

cudaError_t ExpandKeyRuns(const int32_t* first, const int32_t* query, const int32_t* start, const int32_t* count,
                          int64_t runs, int32_t* key_rows, int32_t* query_of, cudaStream_t stream) {
  if (runs == 0) return cudaSuccess;
  if (runs > INT32_MAX) return cudaErrorInvalidValue;
  ExpandKeyRunsKernel<<<static_cast<unsigned>(runs), 64, 0, stream>>>(first, query, start, count, key_rows, query_of);
  return cudaGetLastError();
}

cudaError_t IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim, const float* keys,
                          const uint8_t* valid, int64_t n, float* logits, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  IndexerLogitsKernel<<<Blocks(n, 16), 256, 0, stream>>>(q, w, heads, dim, keys, valid, n, logits);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda

namespace flashmem::kernels::cuda {
namespace {

// One block per page, 16-byte loads over PCIe from mapped host memory.
__global__ void GatherPagesKernel(const uint8_t* const* src, int64_t page_bytes, uint8_t* dst) {
  const uint4* s = reinterpret_cast<const uint4*>(src[blockIdx.x]);
  uint4* d = reinterpret_cast<uint4*>(dst + static_cast<int64_t>(blockIdx.x) * page_bytes);
  for (int64_t i = threadIdx.x; i < page_bytes / 16; i += blockDim.x) d[i] = s[i];
}

__global__ void ScatterPagesKernel(const uint8_t* src, int64_t page_bytes, const int32_t* slot, uint8_t* dst) {
  const uint4* s = reinterpret_cast<const uint4*>(src + static_cast<int64_t>(blockIdx.x) * page_bytes);
  uint4* d = reinterpret_cast<uint4*>(dst + static_cast<int64_t>(slot[blockIdx.x]) * page_bytes);
  for (int64_t i = threadIdx.x; i < page_bytes / 16; i += blockDim.x) d[i] = s[i];
}

// One block per piece, 4-byte words (an entry's data and scale bytes: 576 and 8).
__global__ void ScatterPiecesKernel(const uint8_t* src, const int64_t* from, const int64_t* to, const int32_t* bytes,
                                    uint8_t* dst) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src + from[blockIdx.x]);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst + to[blockIdx.x]);
  for (int i = threadIdx.x; i < bytes[blockIdx.x] / 4; i += blockDim.x) d[i] = s[i];
}

}  // namespace

cudaError_t ScatterPieces(const uint8_t* src, int64_t count, const int64_t* from, const int64_t* to,
                          const int32_t* bytes, uint8_t* dst, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (count > INT32_MAX) return cudaErrorInvalidValue;
  ScatterPiecesKernel<<<static_cast<unsigned>(count), 128, 0, stream>>>(src, from, to, bytes, dst);
  return cudaGetLastError();
}

cudaError_t ScatterPages(const uint8_t* src, int64_t count, int64_t page_bytes, const int32_t* slot, uint8_t* dst,
                         cudaStream_t stream) {
  if (page_bytes % 16 != 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  ScatterPagesKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(src, page_bytes, slot, dst);
  return cudaGetLastError();
}

cudaError_t GatherPages(const uint8_t* const* src, int64_t count, int64_t page_bytes, uint8_t* dst,
                        cudaStream_t stream) {
  if (page_bytes % 16 != 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  GatherPagesKernel<<<static_cast<unsigned>(count), 256, 0, stream>>>(src, page_bytes, dst);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
