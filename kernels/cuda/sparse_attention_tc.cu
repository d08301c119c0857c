// Sparse MQA with the sink over paged 584-B FP8 records on the tensor cores (bf16 operands, fp32
// accumulation): the heads of a query token are the M dimension, so every record is read from
// memory once for all heads. Records are dequantised into shared memory (e4m3 x UE8M0 and the bf16
// rope are exact in bf16). The slots of a token are split over several blocks (flash-decoding);
// each block runs two passes over its chunks of 64 slots: the row maxima first, then
// P = exp((S - max) * scale) rounded to bf16 and O += P·V, so the accumulators never need
// rescaling. A combine kernel merges the splits and adds the sink. Sums are reordered against the
// CPU reference: results agree within bf16 rounding (the bit-exact path is PagedSparseAttentionFp8).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <mma.h>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

using namespace nvcuda;

constexpr int kHeads = 64;   // heads per block (a head group)
constexpr int kChunk = 64;   // slots per chunk
constexpr int kDim = kRecordDim;
constexpr int kThreads = 512;  // 16 warps
// Shared rows are padded by 8 bf16 (16 B) / 4 floats so the 16 rows of an MMA fragment fall in
// different banks (an unpadded 1 KiB stride puts them all in one).
constexpr int kLd = kDim + 8;      // Q and KV rows (bf16)
constexpr int kLdS = kChunk + 4;   // S rows (fp32)
constexpr int kLdP = kChunk + 8;   // P rows (bf16)
constexpr size_t kSmem = (kHeads * kLd + kChunk * kLd) * 2 + kHeads * kLdS * 4 + kHeads * kLdP * 2 + kChunk * 4;

// Rows of one chunk into shared memory as bf16 [kChunk][kLd]; masked slots become zeros.
__device__ void LoadChunk(const uint8_t* pages, int page_entries, const int32_t* slots, int64_t count,
                          __nv_bfloat16* kv, int* valid) {
  // 36 16-byte pieces per record: 28 of e4m3 nope, 8 of bf16 rope.
  for (int p = threadIdx.x; p < kChunk * 36; p += blockDim.x) {
    const int j = p / 36, piece = p % 36;
    const int32_t e = j < count ? slots[j] : -1;
    if (piece == 0) valid[j] = e >= 0;
    __nv_bfloat16* dst = kv + j * kLd + (piece < 28 ? piece * 16 : kRecordNope + (piece - 28) * 8);
    if (e < 0) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      if (piece < 28) *reinterpret_cast<uint4*>(dst + 8) = make_uint4(0, 0, 0, 0);
      continue;
    }
    const int page_no = e / page_entries, slot = e - page_no * page_entries;
    const uint8_t* page = pages + static_cast<int64_t>(page_no) * page_entries * kRecordBytes;
    const uint4 raw = *reinterpret_cast<const uint4*>(page + slot * kRecordData + piece * 16);
    if (piece < 28) {
      const float scale = E8m0ToFloat(page[page_entries * kRecordData + slot * kRecordScales + (piece * 16) / 64]);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
      uint32_t out[8];
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[q] >> (16 * h)), __NV_E4M3);
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
          const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
          out[q * 2 + h] = *reinterpret_cast<const uint32_t*>(&b);
        }
      reinterpret_cast<uint4*>(dst)[0] = make_uint4(out[0], out[1], out[2], out[3]);
      reinterpret_cast<uint4*>(dst)[1] = make_uint4(out[4], out[5], out[6], out[7]);
    } else {
      *reinterpret_cast<uint4*>(dst) = raw;  // already bf16, little-endian
    }
  }
}

// S[64 heads][64 slots] = Q · Kᵀ: warp w computes the 16x16 tile (w / 4, w % 4).
__device__ void ScoreTile(const __nv_bfloat16* q, const __nv_bfloat16* kv, float* s) {
  const int w = threadIdx.x / 32, mt = w / 4, nt = w % 4;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
  for (int k = 0; k < kDim; k += 16) {
    wmma::load_matrix_sync(a, q + mt * 16 * kLd + k, kLd);
    wmma::load_matrix_sync(b, kv + nt * 16 * kLd + k, kLd);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(s + mt * 16 * kLdS + nt * 16, acc, kLdS, wmma::mem_row_major);
}

// Chunk `slots` into shared memory and S = Q · Kᵀ for it; block-wide, synchronized on both sides.
__device__ void LoadAndScore(const uint8_t* pages, int page_entries, const int32_t* slots, int64_t count,
                             const __nv_bfloat16* q_s, __nv_bfloat16* kv_s, float* s_s, int* valid) {
  __syncthreads();
  LoadChunk(pages, page_entries, slots, count, kv_s, valid);
  __syncthreads();
  ScoreTile(q_s, kv_s, s_s);
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) PagedAttnTcKernel(
    const float* q, int64_t heads, const uint8_t* pages, int64_t page_entries, const int32_t* idx, int64_t n,
    int splits, float scale, float* part_o, float* part_m, float* part_l) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* kv_s = q_s + kHeads * kLd;
  float* s_s = reinterpret_cast<float*>(kv_s + kChunk * kLd);
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(s_s + kHeads * kLdS);
  int* valid = reinterpret_cast<int*>(p_s + kHeads * kLdP);
  __shared__ float m_s[kHeads];

  const int64_t b = blockIdx.x, split = blockIdx.y, hg = blockIdx.z;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t c0 = split * chunks / splits, c1 = (split + 1) * chunks / splits;
  const float* qb = q + (b * heads + hg * kHeads) * kDim;
  for (int i = threadIdx.x; i < kHeads * kDim; i += blockDim.x) q_s[(i / kDim) * kLd + i % kDim] = __float2bfloat16(qb[i]);
  if (threadIdx.x < kHeads) m_s[threadIdx.x] = -INFINITY;
  const int h = threadIdx.x / 8, part = threadIdx.x % 8;  // 8 threads per head for row work
  // Pass 1: row maxima.
  for (int64_t c = c0; c < c1; ++c) {
    LoadAndScore(pages, static_cast<int>(page_entries), idx + b * n + c * kChunk, n - c * kChunk, q_s, kv_s, s_s, valid);
    float mx = -INFINITY;
    for (int j = part; j < kChunk; j += 8)
      if (valid[j]) mx = fmaxf(mx, s_s[h * kLdS + j]);
    for (int o = 4; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (part == 0) m_s[h] = fmaxf(m_s[h], mx);
  }
  __syncthreads();
  // Pass 2: P and O. Warp w owns heads [16 (w / 4), +16) x dims [128 (w % 4), +128).
  const int w = threadIdx.x / 32, mt = w / 4, dq = w % 4;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_acc[8];
  for (auto& f : o_acc) wmma::fill_fragment(f, 0.0f);
  float l_part = 0.0f;
  const float mh = m_s[h];
  for (int64_t c = c0; c < c1; ++c) {
    LoadAndScore(pages, static_cast<int>(page_entries), idx + b * n + c * kChunk, n - c * kChunk, q_s, kv_s, s_s, valid);
    for (int j = part; j < kChunk; j += 8) {
      const float p = valid[j] ? ExpF((s_s[h * kLdS + j] - mh) * scale) : 0.0f;
      l_part += p;
      p_s[h * kLdP + j] = __float2bfloat16(p);  // P is cast to bf16 before P·V
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> bv;
    for (int k = 0; k < kChunk; k += 16) {
      wmma::load_matrix_sync(a, p_s + mt * 16 * kLdP + k, kLdP);
      for (int t = 0; t < 8; ++t) {
        wmma::load_matrix_sync(bv, kv_s + k * kLd + dq * 128 + t * 16, kLd);
        wmma::mma_sync(o_acc[t], a, bv, o_acc[t]);
      }
    }
  }
  for (int o = 4; o > 0; o >>= 1) l_part += __shfl_xor_sync(0xffffffffu, l_part, o);
  const int64_t row0 = ((b * splits + split) * heads + hg * kHeads);
  if (part == 0) {
    part_m[row0 + h] = m_s[h];
    part_l[row0 + h] = l_part;
  }
  for (int t = 0; t < 8; ++t)
    wmma::store_matrix_sync(part_o + (row0 + mt * 16) * kDim + dq * 128 + t * 16, o_acc[t], kDim, wmma::mem_row_major);
}

// out[b][h] = bf16(sum_s O_s e^{(m_s - m) scale} / (sum_s l_s e^{(m_s - m) scale} + e^{sink - m scale})).
__global__ void CombineKernel(const float* part_o, const float* part_m, const float* part_l, int64_t heads, int splits,
                              const float* sink, float scale, float* out) {
  const int64_t b = blockIdx.x / heads, h = blockIdx.x % heads;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_m[(b * splits + s) * heads + h]);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float ms = part_m[(b * splits + s) * heads + h];
    if (ms != -INFINITY) l += part_l[(b * splits + s) * heads + h] * ExpF((ms - m) * scale);
  }
  l += ExpF(sink[h] - m * scale);
  for (int d = threadIdx.x; d < kDim; d += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float ms = part_m[(b * splits + s) * heads + h];
      if (ms != -INFINITY) o += part_o[((b * splits + s) * heads + h) * kDim + d] * ExpF((ms - m) * scale);
    }
    out[(b * heads + h) * kDim + d] = RoundBf16(o / l);
  }
}

int Splits(int64_t batch, int64_t heads, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t blocks = batch * (heads / kHeads);
  int64_t s = (264 + blocks - 1) / blocks;  // about two blocks per SM
  if (s > chunks) s = chunks;
  return static_cast<int>(s < 1 ? 1 : s);
}

}  // namespace

int64_t PagedSparseAttentionFp8FastWorkspace(int64_t batch, int64_t heads, int64_t n) {
  const int64_t rows = batch * Splits(batch, heads, n) * heads;
  return rows * (kDim + 2) * static_cast<int64_t>(sizeof(float));
}

cudaError_t PagedSparseAttentionFp8Fast(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                        int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                        float softmax_scale, float* out, void* workspace, cudaStream_t stream) {
  if (heads % kHeads != 0 || page_entries <= 0 || n <= 0 || (page_entries * kRecordBytes) % 16 != 0)
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const int splits = Splits(batch, heads, n);
  const int64_t rows = batch * splits * heads;
  float* part_o = static_cast<float*>(workspace);
  float* part_m = part_o + rows * kDim;
  float* part_l = part_m + rows;
  static bool configured = false;  // one device per process is all this needs
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(PagedAttnTcKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (e != cudaSuccess) return e;
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits), static_cast<unsigned>(heads / kHeads));
  PagedAttnTcKernel<<<grid, kThreads, kSmem, stream>>>(q, heads, pages, page_entries, idx, n, splits, softmax_scale,
                                                      part_o, part_m, part_l);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  CombineKernel<<<static_cast<unsigned>(batch * heads), 128, 0, stream>>>(part_o, part_m, part_l, heads, splits, sink,
                                                                          softmax_scale, out);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
