// The lightning indexer's scores on the tensor cores (fast mode): for a run of keys of one query,
// S = Q · Kᵀ (heads × 128 by 128 × keys) with mma.sync m16n8k16 on bf16 operands and fp32 sums,
// then score = bf16(Σ_h bf16(relu(bf16(S[h])) · w[h])). The exact kernel (attention_ops.cu) takes
// a half-warp per key and every dot product in the CPU's order: 2% of HBM. Here the keys' bytes
// are the cost (512 a key as fp32 rows, 68 as MXFP4 pages; read once, streamed past L2) and a
// block's 64-key tile is 64 MMAs a warp.
//
// Numerics: q and the keys are rounded to bf16 (round to nearest even) before the products. The
// model's indexer queries and keys are FP4 values times power-of-two block scales (Fp4RoundTrip),
// which bf16 holds exactly, so there the scores differ from the CPU's only by summation order
// (the dot products' and the heads' sum).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// One 32-dim block of an MXFP4 key (16 code bytes, lower dim in the low nibble; its UE8M0 scale
// byte s, 1..254 as the page codec writes them) as 16 bf16 pairs, the lower dim in the low half
// as PackBf16 puts it. Each value is exact in bf16: magnitude code m in 1..7 is 0.5, 1, 1.5, 2, 3,
// 4, 6 = (1 or 1.5) x 2^((m >> 1) - 1), so at scale 2^(s - 127) its bits are exponent field
// s + (m >> 1) - 1 and mantissa 0x40 for odd m > 1; only 0.5 at s = 1 is subnormal (0x0040). The
// eight magnitudes' bits are built once a block; byte permutes then look four codes up at once
// (a code's magnitude is a byte index, its sign goes to bit 15 of its half).
__device__ __forceinline__ void DecodeMxfp4Block(uint4 codes, uint32_t s, uint32_t out[16]) {
  uint32_t b[8];
  b[0] = 0;
  b[1] = s > 1 ? (s - 1) << 7 : 0x40u;
#pragma unroll
  for (uint32_t m = 2; m < 8; ++m) b[m] = ((s + (m >> 1) - 1) << 7) | (m & 1u ? 0x40u : 0u);
  const uint32_t lo_a = (b[0] & 0xffu) | (b[1] & 0xffu) << 8 | (b[2] & 0xffu) << 16 | (b[3] & 0xffu) << 24;
  const uint32_t lo_b = (b[4] & 0xffu) | (b[5] & 0xffu) << 8 | (b[6] & 0xffu) << 16 | (b[7] & 0xffu) << 24;
  const uint32_t hi_a = (b[0] >> 8) | (b[1] >> 8) << 8 | (b[2] >> 8) << 16 | (b[3] >> 8) << 24;
  const uint32_t hi_b = (b[4] >> 8) | (b[5] >> 8) << 8 | (b[6] >> 8) << 16 | (b[7] >> 8) << 24;
  const uint32_t w[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t x = w[i], sel0 = x & 0x7777u, sel1 = (x >> 16) & 0x7777u;
    const uint32_t l0 = __byte_perm(lo_a, lo_b, sel0), h0 = __byte_perm(hi_a, hi_b, sel0);
    const uint32_t l1 = __byte_perm(lo_a, lo_b, sel1), h1 = __byte_perm(hi_a, hi_b, sel1);
    out[4 * i + 0] = __byte_perm(l0, h0, 0x5140) | (x & 0x8u) << 12 | (x & 0x80u) << 24;
    out[4 * i + 1] = __byte_perm(l0, h0, 0x7362) | (x & 0x800u) << 4 | (x & 0x8000u) << 16;
    out[4 * i + 2] = __byte_perm(l1, h1, 0x5140) | (x & 0x80000u) >> 4 | (x & 0x800000u) << 8;
    out[4 * i + 3] = __byte_perm(l1, h1, 0x7362) | (x & 0x8000000u) >> 12 | (x & 0x80000000u);
  }
}

// One head's part of a key's score, rounded as the CPU rounds it.
__device__ __forceinline__ float Term(float dot, float w) { return RoundBf16(fmaxf(RoundBf16(dot), 0.0f) * w); }

// Warp w owns heads [16w, 16w + 16) (the MMA's M; heads past `heads` are zero rows with weight
// 0, which add 0); a block walks runs [r0, r1) of one or more queries, its A fragments reloaded
// when the query changes, each run in tiles of 64 keys.
// kPacked: the keys are MXFP4 pages of `page_entries` (keys_mx), not fp32 rows (keys).
template <int kWarps, bool kPacked>
__global__ void __launch_bounds__(kWarps * 32) IndexScoresRunsMmaKernel(
    const float* __restrict__ q, const float* __restrict__ w, int64_t w_stride, int heads, const float* __restrict__ keys,
    const uint8_t* __restrict__ keys_mx, int64_t page_entries, const int32_t* __restrict__ first, const int32_t* __restrict__ query, const int32_t* __restrict__ start,
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
      w_lo = has_lo ? w[static_cast<int64_t>(qi) * w_stride + h] : 0.0f;
      w_hi = has_hi ? w[static_cast<int64_t>(qi) * w_stride + h + 8] : 0.0f;
    }
    const int64_t key0 = first[r], out0 = start[r];
    const int n = count[r];
    for (int base = 0; base < n; base += kTileKeys) {
      const int nk = n - base < kTileKeys ? n - base : kTileKeys;
      __syncthreads();  // the last tile's fragments and partial sums are read
      if constexpr (kPacked) {
        // Keys in from their MXFP4 pages: a 32-dim block (16 code bytes and its scale) a thread.
        // A warp takes 8 keys' 512 contiguous code bytes; a quarter warp (one shared-memory
        // phase) one block of 8 keys, whose rows' 68-word stride puts them in distinct banks.
        constexpr int kBlocks = kDim / 32;
        static_assert(kBlocks == 4, "a warp: 8 keys x 4 blocks");
        for (int i = threadIdx.x; i < kTileKeys * kBlocks; i += kThreads) {
          const int key = i % 8 + 8 * (i / 32), blk = (i / 8) % 4;
          uint32_t out[16];
          if (key < nk) {
            const int64_t k = key0 + base + key, e = k % page_entries;
            const uint8_t* page = keys_mx + (k / page_entries) * page_entries * (kDim / 2 + kBlocks);
            const uint4 codes = __ldcs(reinterpret_cast<const uint4*>(page + e * (kDim / 2)) + blk);
            DecodeMxfp4Block(codes, page[page_entries * (kDim / 2) + e * kBlocks + blk], out);
          } else {
#pragma unroll
            for (int j = 0; j < 16; ++j) out[j] = 0;
          }
          uint4* to = reinterpret_cast<uint4*>(&tile[key * kRowWords + blk * 16]);
#pragma unroll
          for (int j = 0; j < 4; ++j) to[j] = make_uint4(out[4 * j], out[4 * j + 1], out[4 * j + 2], out[4 * j + 3]);
        }
      } else {
        // Keys in as bf16 pairs: a warp's 32 float4 loads are one key's 512 contiguous bytes.
        for (int i = threadIdx.x; i < kTileKeys * (kDim / 4); i += kThreads) {
          const int key = i / (kDim / 4), c4 = i % (kDim / 4);
          float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          if (key < nk) v = __ldcs(reinterpret_cast<const float4*>(keys + (key0 + base + key) * kDim) + c4);
          *reinterpret_cast<uint2*>(&tile[key * kRowWords + c4 * 2]) = make_uint2(PackBf16(v.x, v.y), PackBf16(v.z, v.w));
        }
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

template <int kWarps, bool kPacked>
cudaError_t LaunchRuns(const float* q, const float* w, int64_t w_stride, int heads, const float* keys, const uint8_t* keys_mx,
                       int64_t page_entries, const int32_t* first, const int32_t* query, const int32_t* start,
                       const int32_t* count, int64_t runs, float* scores, cudaStream_t stream) {
  // A few runs a block once there are many (fewer reloads of a query's 32 KB), while the grid
  // still gives every SM several blocks.
  const int per = static_cast<int>(std::clamp<int64_t>(runs / 2048, 1, 8));
  const int64_t blocks = (runs + per - 1) / per;
  if (blocks > INT32_MAX) return cudaErrorInvalidValue;
  IndexScoresRunsMmaKernel<kWarps, kPacked><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
      q, w, w_stride, heads, keys, keys_mx, page_entries, first, query, start, count, runs, per, scores);
  return cudaGetLastError();
}

template <bool kPacked>
cudaError_t LaunchForHeads(const float* q, const float* w, int64_t w_stride, int64_t heads, const float* keys, const uint8_t* keys_mx,
                           int64_t page_entries, const int32_t* first, const int32_t* query, const int32_t* start,
                           const int32_t* count, int64_t runs, float* scores, cudaStream_t stream) {
  const int h = static_cast<int>(heads);  // in warps of 16 heads, rounded up to 1, 2, 4 or 8 warps
  auto launch = [&](auto warps) {
    return LaunchRuns<decltype(warps)::value, kPacked>(q, w, w_stride, h, keys, keys_mx, page_entries, first, query, start, count,
                                                       runs, scores, stream);
  };
  if (heads <= 16) return launch(std::integral_constant<int, 1>{});
  if (heads <= 32) return launch(std::integral_constant<int, 2>{});
  if (heads <= 64) return launch(std::integral_constant<int, 4>{});
  return launch(std::integral_constant<int, 8>{});
}

}  // namespace

bool IndexScoresMmaSupports(int64_t heads, int64_t dim) { return dim == kDim && heads >= 1 && heads <= 128; }

cudaError_t IndexScoresRunsMma(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                               const float* keys, const int32_t* first, const int32_t* query, const int32_t* start,
                               const int32_t* count, int64_t runs, float* scores, cudaStream_t stream) {
  if (!IndexScoresMmaSupports(heads, dim) || w_stride < heads) return cudaErrorInvalidValue;
  if (runs == 0) return cudaSuccess;
  return LaunchForHeads<false>(q, w, w_stride, heads, keys, nullptr, 1, first, query, start, count, runs, scores, stream);
}

cudaError_t IndexScoresRunsMmaMxfp4(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                                    const uint8_t* pages,
                                    int64_t page_entries, const int32_t* first, const int32_t* query,
                                    const int32_t* start, const int32_t* count, int64_t runs, float* scores,
                                    cudaStream_t stream) {
  if (!IndexScoresMmaSupports(heads, dim) || w_stride < heads || page_entries < 1) return cudaErrorInvalidValue;
  if (runs == 0) return cudaSuccess;
  // Every page (entries x 68 bytes) starts 16-byte aligned only for a multiple of 4 entries.
  if (page_entries % 4 != 0 || reinterpret_cast<uintptr_t>(pages) % 16 != 0) return cudaErrorInvalidValue;
  return LaunchForHeads<true>(q, w, w_stride, heads, nullptr, pages, page_entries, first, query, start, count, runs, scores,
                              stream);
}

}  // namespace flashmem::kernels::cuda
