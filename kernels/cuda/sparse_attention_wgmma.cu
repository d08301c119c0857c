// Sparse MQA with the sink over paged 584-B FP8 records on Hopper's warpgroup MMA (wgmma,
// sm_90a): PagedSparseAttentionFp8Fast. The 64 heads of a query token are the M dimension, so
// every record is read from memory once for all heads; a block takes one token over a split of
// its slots (flash-decoding: splits fill the SMs, one block each; a combine kernel merges them),
// in chunks of 48 with a single-pass online softmax.
//
// Warp-specialised: a producer warpgroup gathers the records of chunk c + 2 by index (cp.async)
// and dequantises chunk c + 1 into one of two tiles while the two consumer warpgroups compute
// chunk c; named barriers hand the tiles over (full: producer -> consumers; empty: consumers ->
// producer) and the producer gives registers to the consumers. Q (64 heads x 512) and the tiles
// (48 slots x 512) sit in shared memory in the 128-byte swizzle layout, as 8 column blocks of 64.
//   - S = Q·Kᵀ: consumer w scores slots [24 w, +24) over all 512 dims (32 wgmma m64n24k16); the
//     two exchange their row maxima through shared memory, so both rescale by the same factor.
//   - P = exp((S - m) * scale) stays in registers: the accumulator layout is the A-operand layout,
//     so P as bf16 pairs is the A operand of O += P·V; each consumer takes the other's half of
//     P through shared memory (6 words a thread).
//   - O += P·V: consumer w owns output dims [256 w, +256) (3 k-steps of wgmma m64n256k16, V read
//     MN-major from the same rows), 128 fp32 accumulators a thread; O is rescaled only in chunks
//     where a row maximum moved.
// Where the time goes (Nsight Compute, b = 64, 640 slots, 2 splits; docs/benchmarks.md): as fast
// as the single-role kernel it replaced (47-54 us either way), with the dequantisation off the
// consumers' path: they spend ~20% of their time loading Q (128 KB of fp32 a block, all blocks at
// once), ~15% storing the partial rows (128 KB a block), the rest in the chunk loop, where the
// serial chain QK -> softmax (two barriers) -> PV of 2 warps a scheduler is the bound. Tried and
// not kept: f16 operands (e4m3 -> f16 times the scale as an f16 pair: a third of the dequantisation
// instructions; 52-56 us, no gain once the producer was off the critical path).
// Sums are reordered against the CPU reference: results agree within bf16 rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda/sparse_attention_parts.h"
#include "kernels/cuda/wgmma.cuh"

namespace flashmem::kernels::cuda {
namespace {

using namespace ptx;
using wgmma::Swizzled128B;

constexpr int kHeads = 64;   // heads per block (M of every MMA)
constexpr int kDim = kRecordDim;
constexpr int kMaxSplits = 64;  // splits of one token's slots
constexpr int kChunk = 48;      // slots per chunk
constexpr int kThreads = 384;   // consumers: warpgroups 0 and 1; producer: 2
constexpr int kConsumers = 256, kProducers = kThreads - kConsumers;
constexpr int kProducerRegisters = 120, kConsumerRegisters = 192;  // 120 + 2 x 192 = 3 x 168: no spills
constexpr int kGroups = kChunk / 16;                  // 8-slot column groups of S a consumer holds: 3
constexpr int kColumnBlock = kChunk * 128;            // one 64-column block of a tile
constexpr int kTileBytes = kDim / 64 * kColumnBlock;  // 48 KB
constexpr int kQColumnBlock = kHeads * 128;
constexpr int kQBytes = kDim / 64 * kQColumnBlock;  // 64 KB
constexpr int kRawBytes = kChunk * kRecordBytes;
enum Barrier : int { kFull = 1, kEmpty = 3, kConsumerSync = 5, kProducerSync = 6 };  // full / empty: + stage
constexpr size_t kSmem = 1024 + kQBytes + 2 * size_t{kTileBytes} + 2 * size_t{kRawBytes} +
                         2 * 2 * 128 * 4 /* row maxima */ + 2 * 2 * kGroups * 128 * 4 /* P */ +
                         2 * kChunk * 4 /* entries */ + 2 * 2 * 128 * 4 /* row sums */;
static_assert(kSmem <= 232448, "shared memory of one block on sm_90");
static_assert(kRawBytes % 16 == 0, "raw stages start on 16-byte boundaries");

__device__ __forceinline__ int32_t SlotEntry(const int32_t* idx, int64_t n, int64_t c, int j) {
  const int64_t s = c * kChunk + j;
  return s < n ? idx[s] : -1;
}

// Two producer threads gather one slot's record (18 data pieces of 16 B each, one the scales).
__device__ __forceinline__ void GatherHalf(const uint8_t* pages, int page_entries, int32_t e, int j, int half,
                                           uint8_t* raw) {
  if (e < 0) return;
  const int page_no = e / page_entries, slot = e - page_no * page_entries;
  const uint8_t* page = pages + static_cast<int64_t>(page_no) * page_entries * kRecordBytes;
#pragma unroll
  for (int piece = half; piece < kRecordData / 16; piece += 2)
    CopyAsync16(raw + j * kRecordData + piece * 16, page + slot * kRecordData + piece * 16);
  if (half) CopyAsync8(raw + kChunk * kRecordData + j * kRecordScales, page + page_entries * kRecordData + slot * kRecordScales);
}

// Gathered records -> rows of the swizzled tile by the producer's threads; masked slots become
// zeros (their raw bytes are stale: never multiplied, replaced). Threads 0..111 each own one
// 8-value piece of the nope dims (tid % 56) in every other row, so source addresses advance by
// constants (no division by 56 a piece); threads 112..127 copy the rope dims (bf16 already) the
// same way. Rows are loaded six at a
// time before any is converted so that their latencies overlap.
__device__ void DequantChunk(const uint8_t* raw, const int32_t* entries, uint8_t* kv, int tid) {
  constexpr int kNopePieces = kRecordNope / 8;  // 56 a row
  constexpr int kNopeThreads = 2 * kNopePieces;
  constexpr int kRows = kChunk / 2;  // rows a thread makes
  constexpr int kBatch = 6;
  static_assert(kRows % kBatch == 0 && kProducers - kNopeThreads == 16, "the split of the producer's threads");
  if (tid < kNopeThreads) {
    const int piece = tid % kNopePieces, r0 = tid / kNopePieces;
    const uint8_t* src = raw + r0 * kRecordData + piece * 8;
    const uint8_t* scales = raw + kChunk * kRecordData + r0 * kRecordScales + piece / 8;
#pragma unroll 1
    for (int i0 = 0; i0 < kRows; i0 += kBatch) {
      uint2 bytes[kBatch];
      float scale[kBatch];
      bool masked[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int i = i0 + u;
        bytes[u] = *reinterpret_cast<const uint2*>(src + i * 2 * kRecordData);
        scale[u] = E8m0ToFloat(scales[i * 2 * kRecordScales]);
        masked[u] = entries[r0 + 2 * i] < 0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int r = r0 + 2 * (i0 + u);
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
        *reinterpret_cast<uint4*>(kv + Swizzled128B(kChunk, r, piece * 8)) = make_uint4(out[0], out[1], out[2], out[3]);
      }
    }
  } else {
    const int u = tid - kNopeThreads, piece = u % 8, r0 = u / 8;
#pragma unroll 4
    for (int i = 0; i < kRows; ++i) {
      const int r = r0 + 2 * i;
      const uint4 v = *reinterpret_cast<const uint4*>(raw + r * kRecordData + kRecordNope + piece * 16);
      *reinterpret_cast<uint4*>(kv + Swizzled128B(kChunk, r, kRecordNope + piece * 8)) = entries[r] < 0 ? make_uint4(0, 0, 0, 0) : v;
    }
  }
}

// A block's result rows: with one split the output (normalised with the sink, rounded to bf16),
// else the split's partial rows, maxima and sums for the combine kernel. This thread holds rows
// row0 and row0 + 8 of the head group, output dims [256 wg, +256) as the accumulator layout.
__device__ __forceinline__ void StoreRows(const float (&o)[128], float l0, float l1, float m0, float m1, int row0,
                                          int wg, int quad, int64_t b, int64_t split, int splits, int64_t hg,
                                          int64_t heads, const float* sink, float scale, float* out, float* part_o,
                                          float* part_m, float* part_l) {
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
}

// Q (64 heads x 512, fp32 holding bf16 values) as bf16 (exact) into the swizzled tile by the
// consumers, 16 float4 loads in flight.
__device__ __forceinline__ void LoadQ(const float* q, uint8_t* q_s, int tid) {
  const float4* qb = reinterpret_cast<const float4*>(q);
  for (int p0 = tid; p0 < kHeads * kDim / 8; p0 += 8 * kConsumers) {
    float4 v[8][2];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      v[u][0] = qb[(p0 + u * kConsumers) * 2];
      v[u][1] = qb[(p0 + u * kConsumers) * 2 + 1];
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int p = p0 + u * kConsumers, row = p / (kDim / 8), col = (p % (kDim / 8)) * 8;
      *reinterpret_cast<uint4*>(q_s + Swizzled128B(kHeads, row, col)) =
          make_uint4(PackBf16(v[u][0].x, v[u][0].y), PackBf16(v[u][0].z, v[u][0].w), PackBf16(v[u][1].x, v[u][1].y),
                     PackBf16(v[u][1].z, v[u][1].w));
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) AttentionKernel(const float* q, int64_t heads, const uint8_t* pages,
                                                               int64_t page_entries, const int32_t* idx, int64_t n,
                                                               int splits, const float* sink, float scale, float* out,
                                                               float* part_o, float* part_m, float* part_l) {
  extern __shared__ unsigned char smem_raw[];
  // The swizzle is applied to absolute shared addresses: tiles start on 1,024-byte boundaries.
  // (An offset from smem_raw, so the compiler keeps shared-memory instructions for every access.)
  uint8_t* smem = smem_raw + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 1023)) & 1023);
  uint8_t* q_s = smem;
  uint8_t* kv_s = q_s + kQBytes;                                     // [2] tiles
  uint8_t* raw_s = kv_s + 2 * kTileBytes;                            // [2] raw stages
  float* max_s = reinterpret_cast<float*>(raw_s + 2 * kRawBytes);    // [consumer][2][128]
  uint32_t* p_s = reinterpret_cast<uint32_t*>(max_s + 2 * 2 * 128);  // [consumer][2 kGroups][128]
  int32_t* ent_s = reinterpret_cast<int32_t*>(p_s + 2 * 2 * kGroups * 128);  // [2][kChunk]: a tile's entries
  float* sum_s = reinterpret_cast<float*>(ent_s + 2 * kChunk);       // [consumer][2][128]

  const int64_t b = blockIdx.x, split = blockIdx.y, hg = blockIdx.z;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t c0 = split * chunks / splits, c1 = (split + 1) * chunks / splits;  // c0 < c1: splits <= chunks
  const int32_t* tok_idx = idx + b * n;

  if (threadIdx.x >= kConsumers) {
    // Producer: thread t gathers half of slot t / 2 (t < 96); all 128 dequantise.
    wgmma::ReleaseRegisters<kProducerRegisters>();
    const int t = static_cast<int>(threadIdx.x) - kConsumers, gj = t / 2, half = t % 2;
    const bool gathers = t < 2 * kChunk;
    const int pe = static_cast<int>(page_entries);
    int32_t e_cur = gathers ? SlotEntry(tok_idx, n, c0, gj) : -1;
    int32_t e_next = gathers && c0 + 1 < c1 ? SlotEntry(tok_idx, n, c0 + 1, gj) : -1;
    if (gathers) GatherHalf(pages, pe, e_cur, gj, half, raw_s);
    CommitAsync();
    if (gathers && c0 + 1 < c1) GatherHalf(pages, pe, e_next, gj, half, raw_s + kRawBytes);
    CommitAsync();
    for (int64_t c = c0; c < c1; ++c) {
      const int s = static_cast<int>((c - c0) & 1);
      const int32_t e_after = gathers && c + 2 < c1 ? SlotEntry(tok_idx, n, c + 2, gj) : -1;
      WaitAsync<1>();  // this thread's copies of chunk c have landed (chunk c + 1's may still fly)
      if (c - c0 >= 2) BarrierSync(kEmpty + s, kThreads);  // the consumers are done with tile s (chunk c - 2)
      if (gathers && half == 0) ent_s[s * kChunk + gj] = e_cur;
      BarrierSync(kProducerSync, kProducers);  // every producer thread's copies and entries are in
      DequantChunk(raw_s + s * kRawBytes, ent_s + s * kChunk, kv_s + s * kTileBytes, t);
      wgmma::FenceSharedWrites();
      BarrierArrive(kFull + s, kThreads);
      BarrierSync(kProducerSync, kProducers);  // raw stage s is consumed: refill it
      if (gathers && c + 2 < c1) GatherHalf(pages, pe, e_after, gj, half, raw_s + s * kRawBytes);
      CommitAsync();
      e_cur = e_next;
      e_next = e_after;
    }
    WaitAsync<0>();
    return;
  }

  wgmma::AcquireRegisters<kConsumerRegisters>();
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;  // consumer warpgroup, and thread within it
  const int lane = threadIdx.x % 32, quad = lane % 4;
  const int row0 = (t / 32) * 16 + lane / 4;  // this thread's two head rows: row0 and row0 + 8
  LoadQ(q + (b * heads + hg * kHeads) * kDim, q_s, static_cast<int>(threadIdx.x));
  wgmma::FenceSharedWrites();
  BarrierSync(kConsumerSync, kConsumers);

  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.0f;
  for (int64_t c = c0; c < c1; ++c) {
    const int s = static_cast<int>((c - c0) & 1);
    const uint8_t* tile = kv_s + s * kTileBytes;
    const int32_t* entries = ent_s + s * kChunk;
    BarrierSync(kFull + s, kThreads);  // chunk c is in tile s

    // S = Q·Kᵀ for this consumer's slots [24 wg, +24): 32 wgmma m64n24k16 over all 512 dims.
    float sc[4 * kGroups];
    wgmma::Fence();
#pragma unroll
    for (int k = 0; k < 32; ++k)
      wgmma::MmaM64N24K16(sc, wgmma::Descriptor128B(q_s + (k / 4) * kQColumnBlock + (k % 4) * 32, 16, 1024),
                          wgmma::Descriptor128B(tile + (k / 4) * kColumnBlock + (k % 4) * 32 + 24 * wg * 128, 16, 1024),
                          k > 0);
    wgmma::Commit();
    wgmma::Wait<0>();
    wgmma::FenceRegisters(sc);

    // Register 4j + e: slot 24 wg + 8j + 2 quad + e % 2, row row0 + 8 (e / 2).
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < kGroups; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (entries[24 * wg + 8 * j + 2 * quad + e] < 0) sc[4 * j + e] = sc[4 * j + 2 + e] = -INFINITY;
        mx0 = fmaxf(mx0, sc[4 * j + e]);
        mx1 = fmaxf(mx1, sc[4 * j + 2 + e]);
      }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    max_s[wg * 256 + t] = mx0;
    max_s[wg * 256 + 128 + t] = mx1;
    BarrierSync(kConsumerSync, kConsumers);
    mx0 = fmaxf(mx0, max_s[(wg ^ 1) * 256 + t]);
    mx1 = fmaxf(mx1, max_s[(wg ^ 1) * 256 + 128 + t]);
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float a0 = n0 == -INFINITY ? 1.0f : __expf((m0 - n0) * scale);
    const float a1 = n1 == -INFINITY ? 1.0f : __expf((m1 - n1) * scale);
    l0 *= a0;  // this consumer's share of the row sums; the halves are added at the end
    l1 *= a1;
    m0 = n0;
    m1 = n1;
    // P in 8-slot groups: group G of the chunk is consumer G / 3's group G % 3; the A operand of
    // k-step kk is groups 2 kk and 2 kk + 1 (rows row0 and row0 + 8 of each).
    uint32_t own[kGroups][2], other[kGroups][2];
#pragma unroll
    for (int j = 0; j < kGroups; ++j) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p[e] = sc[4 * j + e] == -INFINITY ? 0.0f : __expf((sc[4 * j + e] - n0) * scale);
        p[2 + e] = sc[4 * j + 2 + e] == -INFINITY ? 0.0f : __expf((sc[4 * j + 2 + e] - n1) * scale);
      }
      l0 += p[0] + p[1];
      l1 += p[2] + p[3];
      own[j][0] = PackBf16(p[0], p[1]);
      own[j][1] = PackBf16(p[2], p[3]);
      p_s[(wg * 2 * kGroups + 2 * j) * 128 + t] = own[j][0];
      p_s[(wg * 2 * kGroups + 2 * j + 1) * 128 + t] = own[j][1];
    }
    BarrierSync(kConsumerSync, kConsumers);
#pragma unroll
    for (int j = 0; j < kGroups; ++j) {
      other[j][0] = p_s[((wg ^ 1) * 2 * kGroups + 2 * j) * 128 + t];
      other[j][1] = p_s[((wg ^ 1) * 2 * kGroups + 2 * j + 1) * 128 + t];
    }
    uint32_t pa[kChunk / 16][4];  // static indices only: the wgmma's A registers must not be spilled
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int group = 2 * kk + i / 2, r = i % 2;
        pa[kk][i] = group / kGroups == wg ? own[group % kGroups][r] : other[group % kGroups][r];
      }
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) wgmma::FenceRegisters(pa[kk]);
    if (!__all_sync(0xffffffffu, a0 == 1.0f && a1 == 1.0f))  // once the maxima settle, most chunks skip it
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] *= (i / 2) % 2 ? a1 : a0;

    // O += P·V over this consumer's dims: V's rows are the chunk's slots (K), its 64-column blocks
    // 4 wg .. 4 wg + 3 the N dimension (MN-major: columns contiguous within a block).
    wgmma::Fence();
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk)
      wgmma::MmaM64N256K16RegA(o, pa[kk], wgmma::Descriptor128B(tile + 4 * wg * kColumnBlock + kk * 16 * 128, kColumnBlock, 1024));
    wgmma::Commit();
    wgmma::Wait<0>();
    wgmma::FenceRegisters(o);
    if (c + 2 < c1) BarrierArrive(kEmpty + s, kThreads);  // tile s may be refilled (chunk c + 2)
  }

  // Row sums: over the quad, then the two consumers' halves added in the same order on both.
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  sum_s[wg * 256 + t] = l0;
  sum_s[wg * 256 + 128 + t] = l1;
  BarrierSync(kConsumerSync, kConsumers);
  l0 = sum_s[t] + sum_s[256 + t];
  l1 = sum_s[128 + t] + sum_s[256 + 128 + t];
  StoreRows(o, l0, l1, m0, m1, row0, wg, quad, b, split, splits, hg, heads, sink, scale, out, part_o, part_m, part_l);
  // The combine kernel (a programmatic dependent launch) may start launching now; it waits for
  // this grid's writes before reading them.
  AllowDependents();
}

// out[b][h] = bf16(sum_s O_s e^{(m_s - m) scale} / (sum_s l_s e^{(m_s - m) scale} + e^{sink - m scale})).
// One warp per (token, head): lane s holds split s's weight (splits <= 64: two per lane), and each
// lane merges 16 of the 512 dims, every load of a split independent of the others. The weights
// and the sink's term through ExpF, the reference's exp (a few per row: the fast __expf would add
// its own error to splits that otherwise round P as the reference does).
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
    w[k] = ms[k] == -INFINITY ? 0.0f : ExpF((ms[k] - m) * scale);
    l += ls[k] * w[k];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffffu, l, off);
  const float denom = l + ExpF(sink[h] - m * scale);
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

int SmCount() { return DeviceSmLimits().count > 0 ? DeviceSmLimits().count : 132; }

// Splits per token: as many as keep every SM busy with one block, at most one per chunk.
int Splits(int64_t batch, int64_t heads, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t blocks = batch * (heads / kHeads);
  int64_t s = blocks > 0 ? SmCount() / blocks : 1;
  if (s > chunks) s = chunks;
  if (s > kMaxSplits) s = kMaxSplits;
  return static_cast<int>(s < 1 ? 1 : s);
}

}  // namespace

}  // namespace flashmem::kernels::cuda

namespace flashmem::kernels::cuda::detail {

int64_t PagedSparseAttentionFp8WideWorkspace(int64_t batch, int64_t heads, int64_t n) {
  const int64_t rows = batch * Splits(batch, heads, n) * heads;
  return SplitRowsBytes(rows, kDim);
}

cudaError_t CombineAttentionSplits(const float* part_o, const float* part_m, const float* part_l, int64_t batch,
                                   int64_t heads, int splits, const float* sink, float softmax_scale, float* out,
                                   cudaStream_t stream) {
  // Launched as a programmatic dependent of the attention grid: its launch overlaps that grid's
  // last blocks instead of following their completion.
  const int64_t rows_out = batch * heads;
  return ptx::LaunchAsDependent(CombineKernel,
                                dim3(static_cast<unsigned>((rows_out + kCombineWarps - 1) / kCombineWarps)),
                                dim3(32 * kCombineWarps), 0, stream, part_o, part_m, part_l, rows_out, heads, splits,
                                sink, softmax_scale, out);
}

cudaError_t PagedSparseAttentionFp8Wide(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                        int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                        float softmax_scale, float* out, void* workspace, cudaStream_t stream) {
  if (heads % kHeads != 0 || page_entries <= 0 || n <= 0 || (page_entries * kRecordBytes) % 16 != 0)
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  static const cudaError_t configured = cudaFuncSetAttribute(  // one device per process is all this needs
      AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
  if (configured != cudaSuccess) return configured;
  const int splits = Splits(batch, heads, n);
  const int64_t rows = batch * splits * heads;
  const SplitRows part = SplitRowsIn(workspace, rows, kDim);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits), static_cast<unsigned>(heads / kHeads));
  AttentionKernel<<<grid, kThreads, kSmem, stream>>>(q, heads, pages, page_entries, idx, n, splits, sink,
                                                     softmax_scale, out, part.o, part.m, part.l);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || splits == 1) return e;
  return CombineAttentionSplits(part.o, part.m, part.l, batch, heads, splits, sink, softmax_scale, out, stream);
}

}  // namespace flashmem::kernels::cuda::detail
