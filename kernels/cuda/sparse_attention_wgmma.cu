// Sparse MQA with the sink over paged 584-B FP8 records on Hopper's warpgroup MMA (wgmma,
// sm_90a): PagedSparseAttentionFp8Fast. The 64 heads of a query token are the M dimension, so
// every record is read from memory once for all heads; a block takes one token over a split of
// its slots (flash-decoding: splits fill the SMs, one block each; a combine kernel merges them),
// in chunks of 64 with a single-pass online softmax, the next chunk's records gathered by index
// (cp.async) while the current one is computed. (It replaced an mma.sync kernel whose warps each
// re-read their Q and K fragments from shared memory: 63.9 -> 52.9 us at b = 64.)
//
// Two warpgroups. Q (64 heads x 512) and the chunk's dequantised rows (64 slots x 512) sit in
// shared memory in the 128-byte swizzle layout, as 8 column blocks of 64.
//   - S = Q·Kᵀ: warpgroup w scores slots [32 w, +32) over all 512 dims (32 wgmma m64n32k16);
//     the two exchange their row maxima through shared memory, so both rescale by the same factor.
//   - P = exp((S - m) * scale) stays in registers: the accumulator layout is the A-operand layout,
//     so P as bf16 pairs is the A operand of O += P·V; each warpgroup takes the other's half of P
//     through shared memory (8 words a thread).
//   - O += P·V: warpgroup w owns output dims [256 w, +256) (4 wgmma m64n256k16, V read MN-major
//     from the same shared rows), 128 fp32 accumulators a thread. O is rescaled only in chunks
//     where a row maximum moved.
// Where the time goes (b = 64, 640 slots, two splits a token; kernel alone 42 us): the gather's
// latency ~4 us a chunk when nothing hides it, the dequantisation ~2.5 us a chunk, the softmax
// and exchanges ~2 us, the MMAs ~1 us; Q in and the partial rows out ~10 us.
// Sums are reordered against the CPU reference: results agree within bf16 rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace flashmem::kernels::cuda {
namespace {

using namespace ptx;
using wgmma::Swizzled128B;

constexpr int kHeads = 64;   // heads per block (M of every MMA)
constexpr int kChunk = 64;   // slots per chunk
constexpr int kDim = kRecordDim;
constexpr int kThreads = 256;                             // two warpgroups
constexpr int kMaxSplits = 64;                            // splits of one token's slots
constexpr int kColumnBlock = kChunk * 128;                // one 64-column block of a 64-row tile
constexpr int kTileBytes = kDim / 64 * kColumnBlock;      // 64 rows x 512 bf16 = 64 KB
constexpr int kRawBytes = kChunk * kRecordBytes;          // one chunk's records as gathered
constexpr int kExchangeBytes = (2 * 2 + 2 * 8) * 128 * 4;  // row maxima and P of each warpgroup
static_assert(kExchangeBytes <= kRawBytes, "the exchanges reuse the consumed chunk's raw records");
constexpr size_t kSmem = 1024 /* alignment slack */ + 2 * size_t{kTileBytes} + 2 * size_t{kRawBytes} + 2 * kChunk * 4 +
                         2 * 2 * 128 * 4 /* row sums of the two warpgroups */;
static_assert(kSmem <= 232448, "shared memory of one block on sm_90");

__device__ __forceinline__ int32_t SlotEntry(const int32_t* idx, int64_t n, int64_t c, int j) {
  const int64_t s = c * kChunk + j;
  return s < n ? idx[s] : -1;
}

// Four threads gather one slot's record (36 data pieces of 16 B and the 8 scale bytes).
__device__ __forceinline__ void GatherSlot(const uint8_t* pages, int page_entries, int32_t e, int j, int sub,
                                           uint8_t* raw) {
  if (e < 0) return;
  const int page_no = e / page_entries, slot = e - page_no * page_entries;
  const uint8_t* page = pages + static_cast<int64_t>(page_no) * page_entries * kRecordBytes;
  for (int piece = sub; piece < kRecordData / 16; piece += 4)
    CopyAsync16(raw + j * kRecordData + piece * 16, page + slot * kRecordData + piece * 16);
  if (sub == 3) CopyAsync8(raw + kChunk * kRecordData + j * kRecordScales, page + page_entries * kRecordData + slot * kRecordScales);
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&b);
}

// Gathered records -> bf16 rows in the swizzled tile; masked slots become zeros (their raw bytes
// are stale: never multiplied, replaced). A thread makes 16-byte pieces of rows (8 e4m3 bytes
// scaled, or 8 rope values); the pieces a thread makes are independent, loaded seven at a time
// before any is converted so that their latencies overlap (8 warps a block hide little).
__device__ void DequantChunk(const uint8_t* raw, const int32_t* entries, uint8_t* kv) {
  constexpr int kNopePieces = kRecordNope / 8;                  // 56 a row
  constexpr int kPerThread = kChunk * kNopePieces / kThreads;   // 14
  constexpr int kBatch = 7;
  static_assert(kPerThread % kBatch == 0, "whole batches");
#pragma unroll 1
  for (int i0 = 0; i0 < kPerThread; i0 += kBatch) {
    uint2 bytes[kBatch];
    float scale[kBatch];
    bool masked[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int p = (i0 + u) * kThreads + static_cast<int>(threadIdx.x), j = p / kNopePieces, piece = p % kNopePieces;
      bytes[u] = *reinterpret_cast<const uint2*>(raw + j * kRecordData + piece * 8);
      scale[u] = E8m0ToFloat(raw[kChunk * kRecordData + j * kRecordScales + piece / 8]);
      masked[u] = entries[j] < 0;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int p = (i0 + u) * kThreads + static_cast<int>(threadIdx.x), j = p / kNopePieces, piece = p % kNopePieces;
      const uint32_t words[2] = {bytes[u].x, bytes[u].y};
      uint32_t out[4];
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[q] >> (16 * h)), __NV_E4M3);
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
          out[q * 2 + h] = masked[u] ? 0u : PackBf16(f.x * scale[u], f.y * scale[u]);
        }
      *reinterpret_cast<uint4*>(kv + Swizzled128B(kChunk, j, piece * 8)) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  }
  // The rope dims are bf16 already (little-endian): two 16-byte pieces a thread.
  constexpr int kRopePieces = kRecordRope / 8;  // 8 a row
#pragma unroll
  for (int i = 0; i < kChunk * kRopePieces / kThreads; ++i) {
    const int p = i * kThreads + static_cast<int>(threadIdx.x), j = p / kRopePieces, piece = p % kRopePieces;
    const uint4 v = *reinterpret_cast<const uint4*>(raw + j * kRecordData + kRecordNope + piece * 16);
    *reinterpret_cast<uint4*>(kv + Swizzled128B(kChunk, j, kRecordNope + piece * 8)) = entries[j] < 0 ? make_uint4(0, 0, 0, 0) : v;
  }
}

__global__ void __launch_bounds__(kThreads, 1) PagedAttnWgmmaKernel(
    const float* q, int64_t heads, const uint8_t* pages, int64_t page_entries, const int32_t* idx, int64_t n,
    int splits, const float* sink, float scale, float* out, float* part_o, float* part_m, float* part_l) {
  extern __shared__ unsigned char smem_raw[];
  // The swizzle is applied to absolute shared addresses: tiles start on 1,024-byte boundaries.
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* q_s = smem;
  uint8_t* kv_s = smem + kTileBytes;
  uint8_t* raw_s = smem + 2 * kTileBytes;  // two stages
  int32_t* ent_s = reinterpret_cast<int32_t*>(raw_s + 2 * kRawBytes);  // [2][kChunk]

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

  // Q as bf16 (exact: the values are bf16) into the swizzled tile, 16 float4 loads in flight.
  const float4* qb = reinterpret_cast<const float4*>(q + (b * heads + hg * kHeads) * kDim);
  for (int p0 = threadIdx.x; p0 < kHeads * kDim / 8; p0 += 8 * kThreads) {
    float4 v[8][2];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      v[u][0] = qb[(p0 + u * kThreads) * 2];
      v[u][1] = qb[(p0 + u * kThreads) * 2 + 1];
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int p = p0 + u * kThreads, row = p / (kDim / 8), col = (p % (kDim / 8)) * 8;
      *reinterpret_cast<uint4*>(q_s + Swizzled128B(kHeads, row, col)) =
          make_uint4(PackBf16(v[u][0].x, v[u][0].y), PackBf16(v[u][0].z, v[u][0].w), PackBf16(v[u][1].x, v[u][1].y),
                     PackBf16(v[u][1].z, v[u][1].w));
    }
  }

  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;  // warpgroup, and thread within it
  const int lane = threadIdx.x % 32, quad = lane % 4;
  const int row0 = (t / 32) * 16 + lane / 4;  // this thread's two head rows: row0 and row0 + 8
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;

  for (int64_t c = c0; c < c1; ++c) {
    const int stage = static_cast<int>((c - c0) & 1);
    WaitAsync<0>();   // chunk c has landed (this thread's copies) ...
    __syncthreads();  // ... and everyone's; the previous chunk is done with kv_s and the exchange
    if (c + 1 < c1) {
      GatherSlot(pages, pe, e_next, gj, gsub, raw_s + (stage ^ 1) * kRawBytes);
      if (gsub == 0) ent_s[(stage ^ 1) * kChunk + gj] = e_next;
      e_next = c + 2 < c1 ? SlotEntry(tok_idx, n, c + 2, gj) : -1;  // used next iteration
    }
    CommitAsync();
    const int32_t* entries = ent_s + stage * kChunk;
    DequantChunk(raw_s + stage * kRawBytes, entries, kv_s);
    wgmma::FenceSharedWrites();
    __syncthreads();

    // S = Q·Kᵀ for this warpgroup's half of the slots, [32 wg, +32): 32 wgmma m64n32k16 over all
    // 512 dims (column block k / 4; the B tile starts 32 wg rows down each block).
    float s[16];
    wgmma::Fence();
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      const int offset = (k / 4) * kColumnBlock + (k % 4) * 32;
      wgmma::MmaM64N32K16(s, wgmma::Descriptor128B(q_s + offset, 16, 1024),
                          wgmma::Descriptor128B(kv_s + offset + 32 * wg * 128, 16, 1024), k > 0);
    }
    wgmma::Commit();
    wgmma::Wait<0>();
    wgmma::FenceRegisters(s);

    // Online softmax; register 4j + e: slot 32 wg + 8j + 2 quad + e % 2, row row0 + 8 (e / 2).
    // The row maxima of both halves are exchanged (through the consumed raw records), so both
    // warpgroups rescale by the same factors.
    float* xch = reinterpret_cast<float*>(raw_s + stage * kRawBytes);
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (entries[32 * wg + 8 * j + 2 * quad + e] < 0) s[4 * j + e] = s[4 * j + 2 + e] = -INFINITY;
        mx0 = fmaxf(mx0, s[4 * j + e]);
        mx1 = fmaxf(mx1, s[4 * j + 2 + e]);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    xch[wg * 256 + t] = mx0;
    xch[wg * 256 + 128 + t] = mx1;
    __syncthreads();
    mx0 = fmaxf(mx0, xch[(wg ^ 1) * 256 + t]);
    mx1 = fmaxf(mx1, xch[(wg ^ 1) * 256 + 128 + t]);
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float a0 = n0 == -INFINITY ? 1.0f : __expf((m0 - n0) * scale);
    const float a1 = n1 == -INFINITY ? 1.0f : __expf((m1 - n1) * scale);
    l0 *= a0;  // this warpgroup's share of the row sums; the halves are added at the end
    l1 *= a1;
    m0 = n0;
    m1 = n1;
    // P as the A operand of O += P·V: k-step kk covers slots [16 kk, +16); this warpgroup makes
    // k-steps 2 wg and 2 wg + 1 and takes the other two from its partner (same thread index, same
    // register layout) through shared memory.
    uint32_t own[2][4], other[2][4];  // k-steps [2 wg, +2) and the partner's
    uint32_t* pxch = reinterpret_cast<uint32_t*>(xch + 512);  // [warpgroup][8][128]
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p[e] = s[4 * j + e] == -INFINITY ? 0.0f : __expf((s[4 * j + e] - n0) * scale);
        p[2 + e] = s[4 * j + 2 + e] == -INFINITY ? 0.0f : __expf((s[4 * j + 2 + e] - n1) * scale);
      }
      l0 += p[0] + p[1];
      l1 += p[2] + p[3];
      own[j / 2][(j % 2) * 2] = PackBf16(p[0], p[1]);
      own[j / 2][(j % 2) * 2 + 1] = PackBf16(p[2], p[3]);
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) pxch[(wg * 8 + r) * 128 + t] = own[r / 4][r % 4];
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 8; ++r) other[r / 4][r % 4] = pxch[((wg ^ 1) * 8 + r) * 128 + t];
    uint32_t pa[4][4];  // static indices only: the wgmma's A registers must not be spilled
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) pa[kk][r] = (kk / 2 == wg) ? own[kk % 2][r] : other[kk % 2][r];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma::FenceRegisters(pa[kk]);  // made before the first wgmma reads them
    if (!__all_sync(0xffffffffu, a0 == 1.0f && a1 == 1.0f))  // once the maxima settle, most chunks skip it
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= (i / 2) % 2 ? a1 : a0;

    // O += P·V over this warpgroup's dims: V's rows are the chunk's slots (K), its 64-column
    // blocks 4 wg .. 4 wg + 3 the N dimension (MN-major: columns contiguous within a block).
    wgmma::Fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma::MmaM64N256K16RegA(o, pa[kk], wgmma::Descriptor128B(kv_s + 4 * wg * kColumnBlock + kk * 16 * 128, kColumnBlock, 1024));
    wgmma::Commit();
    wgmma::Wait<0>();
    wgmma::FenceRegisters(o);
  }
  WaitAsync<0>();

  // Row sums: over the quad, then the two warpgroups' halves added in the same order on both.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  float* lx = reinterpret_cast<float*>(ent_s + 2 * kChunk);  // [warpgroup][2][128]
  lx[wg * 256 + t] = l0;
  lx[wg * 256 + 128 + t] = l1;
  __syncthreads();
  l0 = lx[t] + lx[256 + t];
  l1 = lx[128 + t] + lx[256 + 128 + t];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int h = row0 + 8 * r;
    const float l = r ? l1 : l0, m = r ? m1 : m0;
    const int64_t head = hg * kHeads + h;
    if (splits == 1) {
      const float denom = l + __expf(sink[head] - m * scale);
      float* dst = out + (b * heads + head) * kDim + 256 * wg + 2 * quad;
#pragma unroll
      for (int j = 0; j < 32; ++j)
        *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(RoundBf16(o[4 * j + 2 * r] / denom), RoundBf16(o[4 * j + 2 * r + 1] / denom));
    } else {
      const int64_t row = (b * splits + split) * heads + head;
      float* dst = part_o + row * kDim + 256 * wg + 2 * quad;
#pragma unroll
      for (int j = 0; j < 32; ++j) *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * r], o[4 * j + 2 * r + 1]);
      if (wg == 0 && quad == 0) {
        part_m[row] = m;
        part_l[row] = l;
      }
    }
  }
  // The combine kernel (a programmatic dependent launch) may start launching now; it waits for
  // this grid's writes before reading them.
  AllowDependents();
}

// out[b][h] = bf16(sum_s O_s e^{(m_s - m) scale} / (sum_s l_s e^{(m_s - m) scale} + e^{sink - m scale})).
// One warp per (token, head): lane s holds split s's weight (splits <= 64: two per lane), and each
// lane merges 16 of the 512 dims, every load of a split independent of the others.
constexpr int kCombineWarps = 4;
__global__ void __launch_bounds__(32 * kCombineWarps) CombineKernel(const float* part_o, const float* part_m,
                                                                    const float* part_l, int64_t rows, int64_t heads,
                                                                    int splits, const float* sink, float scale, float* out) {
  WaitForPrerequisite();  // the attention grid's partial rows are complete
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
    const float ws = __shfl_sync(0xffffffffu, s < 32 ? w[0] : w[1], s % 32);
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

cudaError_t LaunchPagedAttnWgmma(dim3 grid, cudaStream_t stream, const float* q, int64_t heads, const uint8_t* pages,
                                 int64_t page_entries, const int32_t* idx, int64_t n, int splits, const float* sink,
                                 float scale, float* out, float* part_o, float* part_m, float* part_l) {
  static bool configured = false;  // one device per process is all this needs
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(PagedAttnWgmmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
    if (e != cudaSuccess) return e;
    configured = true;
  }
  PagedAttnWgmmaKernel<<<grid, kThreads, kSmem, stream>>>(q, heads, pages, page_entries, idx, n, splits, sink, scale, out,
                                                          part_o, part_m, part_l);
  return cudaGetLastError();
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
  cudaError_t e = LaunchPagedAttnWgmma(grid, stream, q, heads, pages, page_entries, idx, n, splits, sink, softmax_scale, out,
                                       part_o, part_m, part_l);
  if (e != cudaSuccess || splits == 1) return e;
  // Launched as a programmatic dependent of the attention grid: its launch overlaps that grid's
  // last blocks instead of following their completion.
  const int64_t rows_out = batch * heads;
  return LaunchAsDependent(CombineKernel, dim3(static_cast<unsigned>((rows_out + kCombineWarps - 1) / kCombineWarps)),
                           dim3(32 * kCombineWarps), 0, stream, part_o, part_m, part_l, rows_out, heads, splits, sink,
                           softmax_scale, out);
}

}  // namespace flashmem::kernels::cuda
