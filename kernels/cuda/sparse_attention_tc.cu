// Sparse MQA with the sink over paged 584-B FP8 records on the tensor cores (bf16 operands, fp32
// accumulation). The 64 heads of a query token are the M dimension, so every record is read from
// memory once for all heads, and the slots of a token are split over blocks (flash-decoding) so
// that every SM has one block.
//
// A block (8 warps) walks its slots in chunks of 64 with a single-pass online softmax:
//   - the raw records of chunk c+1 are gathered by index with cp.async while chunk c is computed;
//   - chunk c is dequantised into shared memory (e4m3 x UE8M0 and the bf16 rope are exact in bf16);
//   - S = Q·Kᵀ: warp (mi, half) computes 16 heads x 32 slots (mma.sync m16n8k16, ldmatrix operands);
//     the two slot halves exchange their row maxima through shared memory;
//   - P = exp((S - m) * scale) goes to shared memory as bf16 (as the CPU reference casts it);
//   - O += P·V: warp w owns all 64 heads x 64 output dims (128 fp32 accumulators per thread), so a
//     warp reads 16 KB of shared operands per chunk for 128 MMAs; O is rescaled by each head's
//     exp((m_old - m_new) * scale) first.
// One split writes the output itself; several write partial (O, m, l) that a combine kernel merges
// with the sink. Sums are reordered against the CPU reference: results agree within bf16 rounding
// (the bit-exact path is PagedSparseAttentionFp8).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdlib>
#include <string_view>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda/sparse_attention_wgmma.h"

namespace flashmem::kernels::cuda {
namespace {

using namespace ptx;

constexpr int kHeads = 64;     // heads per block (a head group)
constexpr int kChunk = 64;     // slots per chunk
constexpr int kDim = kRecordDim;
constexpr int kThreads = 256;  // 8 warps
constexpr int kMaxSplits = 64;
// Shared rows are padded by 16 B so the eight 16-B rows an ldmatrix reads fall in distinct banks.
constexpr int kLd = kDim + 8;     // Q and KV rows (bf16)
constexpr int kLdP = kChunk + 8;  // P rows (bf16)
constexpr int kRawBytes = kChunk * kRecordBytes;  // one chunk's records as gathered: data, then scales
constexpr size_t kQBytes = size_t{kHeads} * kLd * 2, kKvBytes = size_t{kChunk} * kLd * 2;
constexpr size_t kPBytes = size_t{kHeads} * kLdP * 2;
constexpr size_t kSmem = kQBytes + kKvBytes + 2 * kRawBytes + kPBytes + (2 * kHeads + kHeads + 2 * kHeads + kHeads) * 4 +
                         2 * kChunk * 4;
static_assert(kSmem <= 232448, "shared memory of one block on sm_90");

// Entry of slot j of chunk c, or -1 (masked or past the end).
__device__ __forceinline__ int32_t SlotEntry(const int32_t* idx, int64_t n, int64_t c, int j) {
  const int64_t s = c * kChunk + j;
  return s < n ? idx[s] : -1;
}

// Four threads gather one slot's record (36 data pieces of 16 B and the 8 scale bytes) into `raw`
// with cp.async; `e` is the slot's entry, loaded one chunk ahead so no thread waits for it here.
__device__ __forceinline__ void GatherSlot(const uint8_t* pages, int page_entries, int32_t e, int j, int sub,
                                           uint8_t* raw) {
  if (e < 0) return;
  const int page_no = e / page_entries, slot = e - page_no * page_entries;
  const uint8_t* page = pages + static_cast<int64_t>(page_no) * page_entries * kRecordBytes;
  for (int piece = sub; piece < kRecordData / 16; piece += 4)
    CopyAsync16(raw + j * kRecordData + piece * 16, page + slot * kRecordData + piece * 16);
  if (sub == 3) CopyAsync8(raw + kChunk * kRecordData + j * kRecordScales, page + page_entries * kRecordData + slot * kRecordScales);
}

// Gathered records -> bf16 rows [kChunk][kLd]; masked slots become zeros (P is 0 there, and 0 x
// stale shared memory could be NaN). A thread makes one 16-byte piece of a row (8 e4m3 bytes
// scaled, or 8 rope values), so a warp stores 512 contiguous bytes: no bank conflicts.
__device__ void DequantChunk(const uint8_t* raw, const int32_t* entries, __nv_bfloat16* kv) {
  constexpr int kPieces = kDim / 8;  // 56 of e4m3, 8 of rope
  for (int p = threadIdx.x; p < kChunk * kPieces; p += kThreads) {
    const int j = p / kPieces, piece = p % kPieces;
    uint4* dst = reinterpret_cast<uint4*>(kv + j * kLd + piece * 8);
    if (entries[j] < 0) {
      *dst = make_uint4(0, 0, 0, 0);
    } else if (piece >= kRecordNope / 8) {  // already bf16, little-endian
      *dst = *reinterpret_cast<const uint4*>(raw + j * kRecordData + kRecordNope + (piece - kRecordNope / 8) * 16);
    } else {
      const float scale = E8m0ToFloat(raw[kChunk * kRecordData + j * kRecordScales + piece / 8]);
      const uint2 bytes = *reinterpret_cast<const uint2*>(raw + j * kRecordData + piece * 8);
      const uint32_t words[2] = {bytes.x, bytes.y};
      uint32_t out[4];
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[q] >> (16 * h)), __NV_E4M3);
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
          const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
          out[q * 2 + h] = *reinterpret_cast<const uint32_t*>(&b);
        }
      *dst = make_uint4(out[0], out[1], out[2], out[3]);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) PagedAttnTcKernel(
    const float* q, int64_t heads, const uint8_t* pages, int64_t page_entries, const int32_t* idx, int64_t n,
    int splits, const float* sink, float scale, float* out, float* part_o, float* part_m, float* part_l) {
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* kv_s = reinterpret_cast<__nv_bfloat16*>(smem + kQBytes);
  uint8_t* raw_s = smem + kQBytes + kKvBytes;  // two stages
  __nv_bfloat16* p_s = reinterpret_cast<__nv_bfloat16*>(raw_s + 2 * kRawBytes);
  float* row_max = reinterpret_cast<float*>(smem + kQBytes + kKvBytes + 2 * kRawBytes + kPBytes);  // [2][kHeads]
  float* alpha_s = row_max + 2 * kHeads;                                                            // [kHeads]
  float* row_sum = alpha_s + kHeads;                                                                // [2][kHeads]
  float* max_s = row_sum + 2 * kHeads;                                                              // [kHeads]
  int32_t* ent_s = reinterpret_cast<int32_t*>(max_s + kHeads);                                      // [2][kChunk]

  const int64_t b = blockIdx.x, split = blockIdx.y, hg = blockIdx.z;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t c0 = split * chunks / splits, c1 = (split + 1) * chunks / splits;
  const int32_t* tok_idx = idx + b * n;
  const int pe = static_cast<int>(page_entries);
  const int gj = threadIdx.x / 4, gsub = threadIdx.x % 4;  // the slot this thread gathers, and its quarter
  int32_t e_next = c0 < c1 ? SlotEntry(tok_idx, n, c0, gj) : -1;
  if (c0 < c1) {
    GatherSlot(pages, pe, e_next, gj, gsub, raw_s);
    if (gsub == 0) ent_s[gj] = e_next;
    e_next = c0 + 1 < c1 ? SlotEntry(tok_idx, n, c0 + 1, gj) : -1;
  }
  CommitAsync();

  // Q as bf16 (exact: the values are bf16), eight 16-byte loads in flight per thread.
  const float4* qb = reinterpret_cast<const float4*>(q + (b * heads + hg * kHeads) * kDim);
  for (int i0 = threadIdx.x; i0 < kHeads * kDim / 4; i0 += 8 * kThreads) {
    float4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = qb[i0 + u * kThreads];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int i = i0 + u * kThreads, row = (i * 4) / kDim, col = (i * 4) % kDim;
      __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(q_s + row * kLd + col);
      dst[0] = __floats2bfloat162_rn(v[u].x, v[u].y);
      dst[1] = __floats2bfloat162_rn(v[u].z, v[u].w);
    }
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t2 = (lane % 4) * 2;  // accumulator row and column pair of this lane
  // Scores: warp (mi, half) = heads [16 mi, +16) x slots [32 half, +32) of the chunk.
  const int mi = warp % 4, half = warp / 4;
  const int h0 = mi * 16 + g, h1 = h0 + 8;  // the two head rows this lane's score accumulators hold
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  // Output: warp w = all 64 heads x dims [64 w, +64): o[m-tile][n-tile][4].
  float o[4][8][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int t = 0; t < 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[a][t][e] = 0.0f;

  for (int64_t c = c0; c < c1; ++c) {
    const int stage = static_cast<int>((c - c0) & 1);
    if (c + 1 < c1) {
      GatherSlot(pages, pe, e_next, gj, gsub, raw_s + (stage ^ 1) * kRawBytes);
      if (gsub == 0) ent_s[(stage ^ 1) * kChunk + gj] = e_next;
      e_next = c + 2 < c1 ? SlotEntry(tok_idx, n, c + 2, gj) : -1;  // used next iteration
    }
    CommitAsync();
    WaitAsync<1>();   // chunk c has landed (this thread's copies) ...
    __syncthreads();  // ... and everyone's; the previous chunk's P·V is done with kv_s and p_s
    const int32_t* entries = ent_s + stage * kChunk;
    DequantChunk(raw_s + stage * kRawBytes, entries, kv_s);
    __syncthreads();

    float s[4][4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[t][e] = 0.0f;
    const int sel = lane / 8;  // which of the four 8x8 matrices this lane addresses
#pragma unroll 4
    for (int k = 0; k < kDim; k += 16) {
      uint32_t a[4];
      LoadMatrices(a, q_s + (mi * 16 + lane % 16) * kLd + k + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t bk[4];
        LoadMatrices(bk, kv_s + (half * 32 + np * 16 + (sel / 2) * 8 + lane % 8) * kLd + k + (sel % 2) * 8);
        MmaBf16(s[2 * np], a, bk);
        MmaBf16(s[2 * np + 1], a, bk + 2);
      }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = entries[half * 32 + t * 8 + t2 + e] >= 0;
        if (!ok) s[t][e] = s[t][2 + e] = -INFINITY;
        mx0 = fmaxf(mx0, s[t][e]);
        mx1 = fmaxf(mx1, s[t][2 + e]);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    if (lane % 4 == 0) {
      row_max[half * kHeads + h0] = mx0;
      row_max[half * kHeads + h1] = mx1;
    }
    __syncthreads();
    const float n0 = fmaxf(m0, fmaxf(row_max[h0], row_max[kHeads + h0]));
    const float n1 = fmaxf(m1, fmaxf(row_max[h1], row_max[kHeads + h1]));
    const float a0 = n0 == -INFINITY ? 1.0f : __expf((m0 - n0) * scale);
    const float a1 = n1 == -INFINITY ? 1.0f : __expf((m1 - n1) * scale);
    l0 *= a0;
    l1 *= a1;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p[e] = s[t][e] == -INFINITY ? 0.0f : __expf((s[t][e] - n0) * scale);
        p[2 + e] = s[t][2 + e] == -INFINITY ? 0.0f : __expf((s[t][2 + e] - n1) * scale);
      }
      l0 += p[0] + p[1];
      l1 += p[2] + p[3];
      const int col = half * 32 + t * 8 + t2;
      *reinterpret_cast<__nv_bfloat162*>(p_s + h0 * kLdP + col) = __floats2bfloat162_rn(p[0], p[1]);
      *reinterpret_cast<__nv_bfloat162*>(p_s + h1 * kLdP + col) = __floats2bfloat162_rn(p[2], p[3]);
    }
    if (half == 0 && lane % 4 == 0) {
      alpha_s[h0] = a0;
      alpha_s[h1] = a1;
    }
    m0 = n0;
    m1 = n1;
    __syncthreads();

    // O = O · alpha + P · V over this warp's 64 dims.
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const float r0 = alpha_s[a * 16 + g], r1 = alpha_s[a * 16 + g + 8];
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        o[a][t][0] *= r0;
        o[a][t][1] *= r0;
        o[a][t][2] *= r1;
        o[a][t][3] *= r1;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += 16) {
      uint32_t pa[4][4];
#pragma unroll
      for (int a = 0; a < 4; ++a) LoadMatrices(pa[a], p_s + (a * 16 + lane % 16) * kLdP + kk + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bv[4];
        LoadMatricesTransposed(bv, kv_s + (kk + (sel % 2) * 8 + lane % 8) * kLd + warp * 64 + np * 16 + (sel / 2) * 8);
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          MmaBf16(o[a][2 * np], pa[a], bv);
          MmaBf16(o[a][2 * np + 1], pa[a], bv + 2);
        }
      }
    }
  }
  WaitAsync<0>();

  // Row sums of both slot halves, and the final maxima, for every warp's 64 heads.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  if (lane % 4 == 0) {
    row_sum[half * kHeads + h0] = l0;
    row_sum[half * kHeads + h1] = l1;
    if (half == 0) {
      max_s[h0] = m0;
      max_s[h1] = m1;
    }
  }
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int h = a * 16 + g + r * 8;
      const float l = row_sum[h] + row_sum[kHeads + h], m = max_s[h];
      const int64_t head = hg * kHeads + h;
      if (splits == 1) {
        const float denom = l + __expf(sink[head] - m * scale);
        float* dst = out + (b * heads + head) * kDim + warp * 64 + t2;
#pragma unroll
        for (int t = 0; t < 8; ++t)
          *reinterpret_cast<float2*>(dst + t * 8) =
              make_float2(RoundBf16(o[a][t][2 * r] / denom), RoundBf16(o[a][t][2 * r + 1] / denom));
      } else {
        const int64_t row = (b * splits + split) * heads + head;
        float* dst = part_o + row * kDim + warp * 64 + t2;
#pragma unroll
        for (int t = 0; t < 8; ++t) *reinterpret_cast<float2*>(dst + t * 8) = make_float2(o[a][t][2 * r], o[a][t][2 * r + 1]);
        if (warp == 0 && lane % 4 == 0) {
          part_m[row] = m;
          part_l[row] = l;
        }
      }
    }
}

// out[b][h] = bf16(sum_s O_s e^{(m_s - m) scale} / (sum_s l_s e^{(m_s - m) scale} + e^{sink - m scale})).
// One warp per (token, head): lane s holds split s's weight (splits <= 64: two per lane), and each
// lane merges 16 of the 512 dims, every load of a split independent of the others.
constexpr int kCombineWarps = 4;
__global__ void __launch_bounds__(32 * kCombineWarps) CombineKernel(const float* part_o, const float* part_m,
                                                                    const float* part_l, int64_t rows, int64_t heads,
                                                                    int splits, const float* sink, float scale, float* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = r / heads, h = r % heads;
  auto at = [&](int s) { return (b * splits + s) * heads + h; };
  float ms[2], ls[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int s = lane + 32 * k;
    ms[k] = s < splits ? part_m[at(s)] : -INFINITY;
    ls[k] = s < splits ? part_l[at(s)] : 0.0f;
  }
  float m = fmaxf(ms[0], ms[1]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float w[2], l = 0.0f;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    w[k] = ms[k] == -INFINITY ? 0.0f : __expf((ms[k] - m) * scale);
    l += ls[k] * w[k];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
  const float denom = l + __expf(sink[h] - m * scale);
  float4 acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = make_float4(0, 0, 0, 0);
  for (int s = 0; s < splits; ++s) {
    const float ws = __shfl_sync(0xffffffffu, w[s / 32], s % 32);
    if (ws == 0.0f) continue;
    const float4* src = reinterpret_cast<const float4*>(part_o + at(s) * kDim);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 v = src[lane + 32 * i];
      acc[i].x += v.x * ws;
      acc[i].y += v.y * ws;
      acc[i].z += v.z * ws;
      acc[i].w += v.w * ws;
    }
  }
  float4* dst = reinterpret_cast<float4*>(out + r * kDim);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    dst[lane + 32 * i] = make_float4(RoundBf16(acc[i].x / denom), RoundBf16(acc[i].y / denom), RoundBf16(acc[i].z / denom),
                                     RoundBf16(acc[i].w / denom));
}

int SmCount() {
  static const int count = [] {
    int dev = 0, sms = 132;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      sms = 132;
    return sms;
  }();
  return count;
}

// Splits per token: as many as keep every SM busy with one block, at most one per chunk.
int Splits(int64_t batch, int64_t heads, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t blocks = batch * (heads / kHeads);
  int64_t s = blocks > 0 ? SmCount() / blocks : 1;
  if (s > chunks) s = chunks;
  if (s > kMaxSplits) s = kMaxSplits;
  return static_cast<int>(s < 1 ? 1 : s);
}

// The warpgroup-MMA kernel unless FLASHMEM_SPARSE_ATTENTION=mma asks for the mma.sync one (A/B runs).
bool UseWgmma() {
  static const bool wgmma = [] {
    const char* v = std::getenv("FLASHMEM_SPARSE_ATTENTION");
    return v == nullptr || std::string_view(v) != "mma";
  }();
  return wgmma;
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
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits), static_cast<unsigned>(heads / kHeads));
  cudaError_t e = cudaSuccess;
  if (UseWgmma()) {
    e = LaunchPagedAttnWgmma(grid, stream, q, heads, pages, page_entries, idx, n, splits, sink, softmax_scale, out, part_o,
                             part_m, part_l);
  } else {
    static bool configured = false;  // one device per process is all this needs
    if (!configured) {
      e = cudaFuncSetAttribute(PagedAttnTcKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
      if (e != cudaSuccess) return e;
      configured = true;
    }
    PagedAttnTcKernel<<<grid, kThreads, kSmem, stream>>>(q, heads, pages, page_entries, idx, n, splits, sink, softmax_scale,
                                                        out, part_o, part_m, part_l);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess || splits == 1) return e;
  const int64_t rows_out = batch * heads;
  CombineKernel<<<static_cast<unsigned>((rows_out + kCombineWarps - 1) / kCombineWarps), 32 * kCombineWarps, 0, stream>>>(
      part_o, part_m, part_l, rows_out, heads, splits, sink, softmax_scale, out);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
