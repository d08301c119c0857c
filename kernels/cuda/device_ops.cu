// Kernels of the CUDA backend: GEMM/GEMV, norms, RoPE, quant round trips, Hadamard, hyper-connections.
// Attention and indexer kernels are in attention_ops.cu.
#include <bit>
#include <cmath>
#include <cstring>

#include <cuda_fp16.h>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/numerics.h"

namespace flashmem::kernels::cuda {

int64_t DeviceWeight::bytes() const {
  int64_t v = rows * cols;
  if (format == WeightFormat::kDense) v *= dense_bf16 ? 2 : 4;
  if (format == WeightFormat::kFp4Group32) v /= 2;
  int64_t s = 0;
  if (format == WeightFormat::kFp8Block128) s = ((rows + 127) / 128) * scale_cols * 4;
  if (format == WeightFormat::kFp4Group32) s = rows * scale_cols * (scale_exps ? 1 : 4);
  return v + s;
}

std::vector<uint8_t> ScaleExponents(const WeightMatrix& w) {
  if (w.format != WeightFormat::kFp4Group32 || w.cols % 256 != 0) return {};
  if (!GroupedFp4OnTensorCores(8, w.cols, true)) return {};  // the only reader of the bytes
  std::vector<uint8_t> exps(w.scales.size());
  for (size_t i = 0; i < w.scales.size(); ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(w.scales[i]);
    const uint32_t b = bits >> 23;  // sign 0 and a zero mantissa: 2^(b - 127)
    if ((bits & 0x7fffffu) != 0 || b == 0 || b >= 255) return {};
    exps[i] = static_cast<uint8_t>(b);
  }
  return exps;
}

const SmLimits& DeviceSmLimits() {
  static const SmLimits sm = [] {
    SmLimits m;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&m.count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&m.bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&m.reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&m.per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      m.count = 0;
    return m;
  }();
  return sm;
}

EncodedWeight EncodeWeight(const WeightMatrix& w) {
  EncodedWeight enc;
  const int64_t count = w.rows * w.cols;
  switch (w.format) {
    case WeightFormat::kDense: {
      enc.dense_bf16 = true;
      for (float v : w.values)
        if (std::bit_cast<uint32_t>(v) & 0xffffu) { enc.dense_bf16 = false; break; }
      if (enc.dense_bf16) {
        enc.values.resize(count * 2);
        auto* out = reinterpret_cast<uint16_t*>(enc.values.data());
        for (int64_t i = 0; i < count; ++i) out[i] = static_cast<uint16_t>(std::bit_cast<uint32_t>(w.values[i]) >> 16);
      } else {
        enc.values.resize(count * 4);
        std::memcpy(enc.values.data(), w.values.data(), count * 4);
      }
      break;
    }
    case WeightFormat::kFp8Block128:
      enc.values.resize(count);
      for (int64_t i = 0; i < count; ++i) enc.values[i] = E4m3CodeOfGridValue(w.values[i]);
      break;
    case WeightFormat::kFp4Group32:
      enc.values.assign((count + 1) / 2, 0);
      for (int64_t i = 0; i < count; ++i)
        enc.values[i / 2] |= static_cast<uint8_t>(num::EncodeE2m1(w.values[i]) << ((i & 1) * 4));
      break;
  }
  return enc;
}

namespace {

unsigned Blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

// One warp per 128-element block: amax, pow2 scale, e4m3 grid values — as fp32 (float out), or as
// f16 bits in the FP4 decode GEMV's MMA order (uint16_t out: columns 1 and 2, and 5 and 6, of every
// 8 swapped; exact, |v| <= 448).
template <typename Out>
__global__ void QuantizeActKernel(const float* x, int64_t blocks, Out* xq, float* xs) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= blocks) return;
  const int lane = threadIdx.x & 31;
  const float* xb = x + b * 128;
  float v[4];
  for (int j = 0; j < 4; ++j) v[j] = xb[lane + 32 * j];
  const float scale = QuantizeWarpBlock128(v);
  for (int j = 0; j < 4; ++j) {
    const int c = lane + 32 * j;
    if constexpr (sizeof(Out) == 4)
      xq[b * 128 + c] = v[j];
    else
      xq[b * 128 + ((c & ~3) | ((c & 1) << 1) | ((c >> 1) & 1))] = __half_as_ushort(__float2half_rn(v[j]));
  }
  if (lane == 0) xs[b] = scale;
}

constexpr int kTokTile = 8;        // tokens per block: each weight row is read from HBM once per 8 tokens
constexpr int kRowsPerBlock = 8;   // one half-warp per output row, 4 warps per block

struct DenseBf16Row {
  const uint16_t* p;
  __device__ float operator()(int64_t i) const { return Bf16BitsToFloat(p[i]); }
};
struct Fp8Row {
  const uint8_t* p;
  __device__ float operator()(int64_t i) const { return E4m3ToFloat(p[i]); }
};
struct Fp4Row {
  const uint8_t* base;
  int64_t start;  // element index of i = 0
  __device__ float operator()(int64_t i) const {
    const int64_t e = start + i;
    const uint8_t byte = base[e >> 1];
    return E2m1ToFloat((e & 1) ? (byte >> 4) : (byte & 15));
  }
};

// One half-warp per output row, tokens of a tile in turn. Every dot product runs in the CPU
// reference's order (HalfWarpDot) and quantized formats add the K blocks in sequence with the
// reference's acc += partial * s_x * s_w, so the result is bit-identical to the CPU backend.
template <WeightFormat F, bool kBf16Dense>
__global__ void LinearKernel(const void* wv, const float* ws, int64_t scale_cols, int64_t rows, int64_t k,
                             const float* xq, const float* xs, int64_t n, float* y, bool round) {
  int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 16;
  const bool live = o < rows;
  if (!live) o = rows - 1;  // idle half-warps still join the shuffles
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTokTile;
  const int nt = static_cast<int>(n - t0 < kTokTile ? n - t0 : kTokTile);
  const int64_t nb = k / 128;
  for (int t = 0; t < nt; ++t) {
    const float* xr = xq + (t0 + t) * k;
    float acc = 0.0f;
    if constexpr (F == WeightFormat::kDense) {
      if constexpr (kBf16Dense) acc = HalfWarpDot(xr, DenseBf16Row{static_cast<const uint16_t*>(wv) + o * k}, k);
      else acc = HalfWarpDot(xr, Plain{static_cast<const float*>(wv) + o * k}, k);
    } else {
      constexpr int64_t kblock = F == WeightFormat::kFp8Block128 ? 128 : 32;
      for (int64_t kb = 0; kb < k / kblock; ++kb) {
        float partial;
        if constexpr (F == WeightFormat::kFp8Block128)
          partial = HalfWarpDot(xr + kb * kblock, Fp8Row{static_cast<const uint8_t*>(wv) + o * k + kb * kblock}, kblock);
        else
          partial = HalfWarpDot(xr + kb * kblock, Fp4Row{static_cast<const uint8_t*>(wv), o * k + kb * kblock}, kblock);
        const float s_x = xs[(t0 + t) * nb + (kb * kblock) / 128];
        const float s_w = F == WeightFormat::kFp8Block128 ? ws[(o / 128) * scale_cols + kb] : ws[o * scale_cols + kb];
        acc += partial * s_x * s_w;
      }
    }
    if (live && (threadIdx.x & 15) == 0) y[(t0 + t) * rows + o] = round ? RoundBf16(acc) : acc;
  }
}

__global__ void RmsNormKernel(const float* x, const float* w, int64_t dim, float eps, float* y) {
  const float* xr = x + blockIdx.x * dim;
  __shared__ float ss;
  if (threadIdx.x < 32) {
    const float d = HalfWarpDot(xr, Plain{xr}, dim);
    if (threadIdx.x == 0) ss = d;
  }
  __syncthreads();
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) y[blockIdx.x * dim + i] = RoundBf16(w[i] * (xr[i] * inv));
}

// The reference's bf16 mean of squares is a sequential fp32 sum on the CPU: one thread adds.
__global__ void HeadRmsNormKernel(float* q, int64_t dim, float eps) {
  float* qh = q + blockIdx.x * dim;
  __shared__ float r_sh;
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum += RoundBf16(qh[i] * qh[i]);
    const float mean = RoundBf16(sum / static_cast<float>(dim));
    r_sh = RoundBf16(1.0f / sqrtf(RoundBf16(mean + eps)));
  }
  __syncthreads();
  const float r = r_sh;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) qh[i] = RoundBf16(qh[i] * r);
}

__global__ void RopeKernel(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t half,
                           const float* cos, const float* sin, int64_t rows_per_angle, bool inverse) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= rows * half) return;
  const int64_t r = id / half, i = id % half, a_at = r / rows_per_angle * half + i;
  float* p = x + r * stride + offset;
  const float a = p[2 * i], b = p[2 * i + 1];
  const float c = cos[a_at], s = inverse ? -sin[a_at] : sin[a_at];
  p[2 * i] = RoundBf16(a * c - b * s);
  p[2 * i + 1] = RoundBf16(a * s + b * c);
}

// Block b of the first blocks_per_row * block values of each row of `stride`.
__global__ void RoundTripKernel(float* x, int64_t block, int64_t stride, int64_t blocks_per_row, bool fp8) {
  float* xb = x + (blockIdx.x / blocks_per_row) * stride + (blockIdx.x % blocks_per_row) * block;
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) m = fmaxf(m, fabsf(xb[i]));
  __shared__ float amax[32];
  m = WarpMax(m);
  if ((threadIdx.x & 31) == 0) amax[threadIdx.x / 32] = m;
  __syncthreads();
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) m = fmaxf(m, amax[i]);
  const float qmax = fp8 ? 448.0f : 6.0f;
  const float scale = fp8 ? Fp8BlockScale(m) : Fp4BlockScale(m);
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) {
    const float v = fminf(fmaxf(xb[i] / scale, -qmax), qmax);
    xb[i] = RoundBf16((fp8 ? RoundGrid(v, -6, 3, 448.0f) : RoundGrid(v, 0, 1, 6.0f)) * scale);
  }
}

// Sylvester-ordered butterflies in shared memory: every element sees the CPU's operations in
// the CPU's order, so the result is bit-identical.
__global__ void HadamardKernel(float* x, int64_t dim, float scale) {
  extern __shared__ float v[];
  float* row = x + blockIdx.x * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) v[i] = row[i];
  __syncthreads();
  for (int64_t len = 1; len < dim; len <<= 1) {
    for (int64_t p = threadIdx.x; p < dim / 2; p += blockDim.x) {
      const int64_t j = (p / len) * 2 * len + (p % len);
      const float a = v[j], b = v[j + len];
      v[j] = a + b;
      v[j + len] = a - b;
    }
    __syncthreads();
  }
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) row[i] = RoundBf16(v[i] * scale);
}

constexpr int kMaxHc = 8;

// 1 / sqrt(mean(x^2) + eps) with the CPU's dot order; every thread of the block gets it.
__device__ float InvRms(const float* x, int64_t k, float eps) {
  __shared__ float ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    const float d = HalfWarpDot(x, Plain{x}, k);
    if (threadIdx.x == 0) ss = d;
  }
  __syncthreads();
  return 1.0f / sqrtf(ss / static_cast<float>(k) + eps);
}

// The hyper-connection mixes read `count` rows of k = hc * dim weights against one token's x: a
// single block, so its loads must be many and wide or it waits on memory latency (one half-warp
// per row kept ~8 KB in flight: ~300 us for V4-Flash's 1.5 MB). The block stages x and tiles of
// the rows in shared memory with every thread loading; the sums are the CPU's (HalfWarpDot's)
// to the bit: lane l adds elements l, l + 16, ... in order, then HalfWarpCombine and the tail.
constexpr int kHcThreads = 1024, kHcRowsPerHalf = ((2 + kMaxHc) * kMaxHc + 63) / 64;  // 64 half-warps

// Shared memory: x (k floats, rounded up to 16 bytes), then the tile of the rows.
__host__ __device__ inline int64_t HcRound4(int64_t k) { return (k + 3) / 4 * 4; }

// Columns of the rows staged per round for `count` rows (a multiple of 16; 0: does not fit).
__host__ __device__ inline int64_t HcTile(int64_t k, int count) {
  constexpr int64_t kBudget = 200 * 1024 / 4;  // floats of shared memory
  int64_t t = (kBudget - HcRound4(k)) / (count > 0 ? count : 1) / 16 * 16;
  return t > 512 ? 512 : t < 16 ? 0 : t;
}

// dst (shared) = src[0..n), the whole block loading with several loads in flight per thread.
__device__ void StageToShared(const float* src, int64_t n, float* dst) {
  constexpr int kBatch = 8;
  for (int64_t base = 0; base < n; base += kBatch * blockDim.x) {
    float v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = base + u * blockDim.x + threadIdx.x;
      v[u] = i < n ? __ldg(src + i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t i = base + u * blockDim.x + threadIdx.x;
      if (i < n) dst[i] = v[u];
    }
  }
}

// xs (shared) = x; returns 1 / rms(x) and out[m] = (rows[m] . x) * (1 / rms) for m < count.
__device__ float StagedMixes(const float* x, const float* rows, int64_t k, int count, float eps, float* xs,
                             float* tile, float* out) {
  StageToShared(x, k, xs);
  const float rs = InvRms(xs, k, eps);  // synchronizes first
  const int64_t tile_cols = HcTile(k, count), full = k / 16 * 16;
  const int half = threadIdx.x / 16, halves = blockDim.x / 16, l16 = threadIdx.x & 15;
  float s[kHcRowsPerHalf];
#pragma unroll
  for (int j = 0; j < kHcRowsPerHalf; ++j) s[j] = 0.0f;
  for (int64_t t0 = 0; t0 < full; t0 += tile_cols) {
    const int64_t tn = full - t0 < tile_cols ? full - t0 : tile_cols;
    __syncthreads();
    // Several 16-byte loads in flight per thread before any store (a store waits for its load):
    // one block must keep ~64 KB in flight to stream the rows at more than latency speed.
    constexpr int kBatch = 4;
    const int64_t quads = tn / 4, total = count * quads;  // tn is a multiple of 16
    const bool vec = k % 4 == 0;
    for (int64_t base = 0; base < total; base += kBatch * blockDim.x) {
      float4 v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t idx = base + u * blockDim.x + threadIdx.x, r = idx / quads, c = (idx - r * quads) * 4;
        const float* src = rows + r * k + t0 + c;
        if (idx >= total) v[u] = make_float4(0, 0, 0, 0);
        else if (vec) v[u] = __ldg(reinterpret_cast<const float4*>(src));
        else v[u] = make_float4(__ldg(src), __ldg(src + 1), __ldg(src + 2), __ldg(src + 3));
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t idx = base + u * blockDim.x + threadIdx.x, r = idx / quads, c = (idx - r * quads) * 4;
        if (idx < total) *reinterpret_cast<float4*>(tile + r * tile_cols + c) = v[u];
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kHcRowsPerHalf; ++j) {
      const int m = half + halves * j;
      if (m < count) {
        const float* tr = tile + m * tile_cols;
        const float* xr = xs + t0;
#pragma unroll 8
        for (int i = l16; i < static_cast<int>(tn); i += 16) s[j] += tr[i] * xr[i];  // in order: no reassociation
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kHcRowsPerHalf; ++j) {  // whole warps shuffle (dead rows too)
    const int m = half + halves * j;
    float v = HalfWarpCombine(s[j]);
    if (m < count) {
      for (int64_t i = full; i < k; ++i) v += rows[m * k + i] * xs[i];
      if (l16 == 0) out[m] = v * rs;
    }
  }
  return rs;
}

// pre, post and comb from a token's mixes, by the first warp: the Sinkhorn is a chain of dependent
// divisions, so thread i owns row i (and column i) of the hc x hc matrix, with each row's and
// column's arithmetic exactly the CPU's, on a shared copy (comb) the caller writes out. Every
// thread of the block calls it; the caller synchronizes after.
__device__ void HcWeights(const float* mixes, const float* base, const float* scale, int hc, int iters, float hc_eps,
                          float* pre, float* post_out, float* comb) {
  if (threadIdx.x < 32) {
    const int i = threadIdx.x;
    const bool mine = i < hc;
    if (mine) {
      pre[i] = Sigmoid(mixes[i] * scale[0] + base[i]) + hc_eps;
      post_out[i] = 2.0f * Sigmoid(mixes[hc + i] * scale[1] + base[hc + i]);  // the token's
      float* row = comb + i * hc;
      float mx = -INFINITY;
      for (int j = 0; j < hc; ++j) {
        row[j] = mixes[2 * hc + i * hc + j] * scale[2] + base[2 * hc + i * hc + j];
        mx = fmaxf(mx, row[j]);
      }
      float sum = 0.0f;
      for (int j = 0; j < hc; ++j) sum += (row[j] = ExpF(row[j] - mx));
      for (int j = 0; j < hc; ++j) row[j] = row[j] / sum + hc_eps;
    }
    __syncwarp();
    for (int it = 0; it < max(iters, 1); ++it) {  // the first column pass always runs
      if (it > 0) {
        if (mine) {
          float r = 0.0f;
          for (int j = 0; j < hc; ++j) r += comb[i * hc + j];
          for (int j = 0; j < hc; ++j) comb[i * hc + j] /= (r + hc_eps);
        }
        __syncwarp();
      }
      if (mine) {
        float c = 0.0f;
        for (int r = 0; r < hc; ++r) c += comb[r * hc + i];
        for (int r = 0; r < hc; ++r) comb[r * hc + i] /= (c + hc_eps);
      }
      __syncwarp();
    }
  }
}

// A token's comb out and y = bf16(sum_i pre[i] * x_i), after HcWeights (xt: the token's hc rows of
// dim, staged or in global memory).
__device__ void HcOutputs(const float* xt, const float* pre, const float* comb, int hc, int64_t dim, float* y,
                          float* comb_out) {
  if (threadIdx.x < hc * hc) comb_out[threadIdx.x] = comb[threadIdx.x];
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < hc; ++i) acc += pre[i] * xt[i * dim + d];
    y[d] = RoundBf16(acc);
  }
}

// One block per token: mixes (StagedMixes), then the first warp runs the small Sinkhorn as the
// CPU does (HcWeights), then y.
__global__ void __launch_bounds__(kHcThreads) HcPreKernel(const float* x, const float* fn, const float* base,
                                                          const float* scale, int hc, int64_t dim, int iters,
                                                          float norm_eps, float hc_eps, float* y, float* post_out,
                                                          float* comb_out) {
  const int64_t k = hc * dim;
  const float* xt = x + blockIdx.x * k;
  extern __shared__ __align__(16) float hc_smem[];
  __shared__ float mixes[(2 + kMaxHc) * kMaxHc];
  __shared__ float pre[kMaxHc];
  StagedMixes(xt, fn, k, (2 + hc) * hc, norm_eps, hc_smem, hc_smem + HcRound4(k), mixes);
  __syncthreads();
  __shared__ float comb[kMaxHc * kMaxHc];
  HcWeights(mixes, base, scale, hc, iters, hc_eps, pre, post_out + blockIdx.x * hc, comb);
  __syncthreads();
  HcOutputs(hc_smem, pre, comb, hc, dim, y + blockIdx.x * dim, comb_out + blockIdx.x * hc * hc);  // the staged x
}

// Fast mode's HcPre (hc = 4, V4's): the mixes' sums split over blocks (each a slice of k for one
// token, every thread a column at a time against all 24 rows), the partial sums and sums of
// squares combined by a second kernel that runs the same weights and y as HcPreKernel. Another
// summation order than the CPU's (whose one block per token waits ~100 us on its loads).
constexpr int kHcFastThreads = 256, kHcFastHc = 4, kHcFastMixes = (2 + kHcFastHc) * kHcFastHc;

__global__ void __launch_bounds__(kHcFastThreads) HcMixesSplitKernel(const float* x, const float* fn, int64_t k,
                                                                     int64_t chunk, float* partial) {
  const int64_t t = blockIdx.y, begin = blockIdx.x * chunk, end = min(k, begin + chunk);
  const float* xt = x + t * k;
  float acc[kHcFastMixes + 1] = {};  // the mixes, then the sum of squares
  for (int64_t i = begin + threadIdx.x; i < end; i += kHcFastThreads) {
    const float xi = __ldg(xt + i);
    acc[kHcFastMixes] += xi * xi;
#pragma unroll
    for (int m = 0; m < kHcFastMixes; ++m) acc[m] += __ldg(fn + m * k + i) * xi;
  }
  __shared__ float sums[kHcFastThreads / 32][kHcFastMixes + 1];
#pragma unroll
  for (int m = 0; m <= kHcFastMixes; ++m) {
    float v = acc[m];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) sums[threadIdx.x / 32][m] = v;
  }
  __syncthreads();
  if (threadIdx.x <= kHcFastMixes) {
    float v = 0.0f;
    for (int w = 0; w < kHcFastThreads / 32; ++w) v += sums[w][threadIdx.x];
    partial[(t * gridDim.x + blockIdx.x) * (kHcFastMixes + 1) + threadIdx.x] = v;
  }
}

__global__ void __launch_bounds__(kHcFastThreads) HcFinishKernel(const float* x, const float* partial, int splits,
                                                                 const float* base, const float* scale, int64_t dim,
                                                                 int iters, float norm_eps, float hc_eps, float* y,
                                                                 float* post_out, float* comb_out) {
  constexpr int hc = kHcFastHc;
  const int64_t t = blockIdx.x, k = hc * dim;
  __shared__ float sums[kHcFastMixes + 1], mixes[kHcFastMixes], pre[hc], comb[hc * hc];
  if (threadIdx.x <= kHcFastMixes) {
    float v = 0.0f;
    for (int s = 0; s < splits; ++s) v += partial[(t * splits + s) * (kHcFastMixes + 1) + threadIdx.x];
    sums[threadIdx.x] = v;
  }
  __syncthreads();
  if (threadIdx.x < kHcFastMixes) {
    const float rs = 1.0f / sqrtf(sums[kHcFastMixes] / static_cast<float>(k) + norm_eps);
    mixes[threadIdx.x] = sums[threadIdx.x] * rs;
  }
  __syncthreads();
  HcWeights(mixes, base, scale, hc, iters, hc_eps, pre, post_out + t * hc, comb);
  __syncthreads();
  HcOutputs(x + t * k, pre, comb, hc, dim, y + t * dim, comb_out + t * hc * hc);
}

__global__ void HcPostKernel(const float* f, const float* residual, const float* post, const float* comb,
                             int64_t n, int hc, int64_t dim, float* out) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= n * hc * dim) return;
  const int64_t t = id / (hc * dim), j = (id / dim) % hc, d = id % dim;
  const float* c = comb + t * hc * hc;
  float s = post[t * hc + j] * f[t * dim + d];
  for (int i = 0; i < hc; ++i) s += c[i * hc + j] * residual[(t * hc + i) * dim + d];
  out[id] = RoundBf16(s);
}

// One block per token.
__global__ void __launch_bounds__(kHcThreads) HcHeadKernel(const float* x, const float* fn, const float* base,
                                                           float scale, int hc, int64_t dim, float norm_eps,
                                                           float hc_eps, float* y) {
  const int64_t k = hc * dim;
  x += blockIdx.x * k;
  y += blockIdx.x * dim;
  extern __shared__ __align__(16) float hc_smem[];
  __shared__ float pre[kMaxHc], mixes[kMaxHc];
  StagedMixes(x, fn, k, hc, norm_eps, hc_smem, hc_smem + HcRound4(k), mixes);
  __syncthreads();
  if (threadIdx.x < hc) pre[threadIdx.x] = Sigmoid(mixes[threadIdx.x] * scale + base[threadIdx.x]) + hc_eps;
  __syncthreads();
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < hc; ++i) acc += pre[i] * x[i * dim + d];
    y[d] = RoundBf16(acc);
  }
}

}  // namespace

cudaError_t QuantizeActivations(const float* x, int64_t n, int64_t k, float* xq, float* xs, cudaStream_t stream) {
  const int64_t blocks = n * (k / 128);
  if (blocks == 0) return cudaSuccess;
  QuantizeActKernel<<<Blocks(blocks, 8), 256, 0, stream>>>(x, blocks, xq, xs);
  return cudaGetLastError();
}

cudaError_t QuantizeActivationsMmaF16(const float* x, int64_t n, int64_t k, uint16_t* xh, float* xs,
                                      cudaStream_t stream) {
  const int64_t blocks = n * (k / 128);
  if (blocks == 0) return cudaSuccess;
  QuantizeActKernel<<<Blocks(blocks, 8), 256, 0, stream>>>(x, blocks, xh, xs);
  return cudaGetLastError();
}

cudaError_t Linear(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y, Rounding out,
                   cudaStream_t stream) {
  if (n == 0 || w.rows == 0) return cudaSuccess;
  const dim3 grid(Blocks(w.rows, kRowsPerBlock), Blocks(n, kTokTile));  // 128 threads: 8 half-warps
  const bool round = out == Rounding::kBf16;
  switch (w.format) {
    case WeightFormat::kDense:
      if (w.dense_bf16)
        LinearKernel<WeightFormat::kDense, true><<<grid, 128, 0, stream>>>(w.values, nullptr, 0, w.rows, w.cols, xq, xs, n, y, round);
      else
        LinearKernel<WeightFormat::kDense, false><<<grid, 128, 0, stream>>>(w.values, nullptr, 0, w.rows, w.cols, xq, xs, n, y, round);
      break;
    case WeightFormat::kFp8Block128:
      LinearKernel<WeightFormat::kFp8Block128, false><<<grid, 128, 0, stream>>>(w.values, w.scales, w.scale_cols, w.rows, w.cols, xq, xs, n, y, round);
      break;
    case WeightFormat::kFp4Group32:
      LinearKernel<WeightFormat::kFp4Group32, false><<<grid, 128, 0, stream>>>(w.values, w.scales, w.scale_cols, w.rows, w.cols, xq, xs, n, y, round);
      break;
  }
  return cudaGetLastError();
}

cudaError_t RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  RmsNormKernel<<<static_cast<unsigned>(n), 256, 0, stream>>>(x, weight, dim, eps, y);
  return cudaGetLastError();
}

cudaError_t HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps, cudaStream_t stream) {
  if (heads == 0) return cudaSuccess;
  HeadRmsNormKernel<<<static_cast<unsigned>(heads), 128, 0, stream>>>(q, dim, eps);
  return cudaGetLastError();
}

cudaError_t Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims, const float* cos,
                 const float* sin, int64_t rows_per_angle, bool inverse, cudaStream_t stream) {
  const int64_t total = rows * (rope_dims / 2);
  if (total == 0) return cudaSuccess;
  if (rows_per_angle <= 0) return cudaErrorInvalidValue;
  RopeKernel<<<Blocks(total, 256), 256, 0, stream>>>(x, rows, stride, offset, rope_dims / 2, cos, sin, rows_per_angle,
                                                     inverse);
  return cudaGetLastError();
}

cudaError_t RoundTrip(float* x, int64_t n, int64_t block, bool fp8, cudaStream_t stream) {
  return RoundTripRows(x, 1, n, n / block * block, block, fp8, stream);  // the whole blocks of one row
}

cudaError_t RoundTripRows(float* x, int64_t rows, int64_t stride, int64_t prefix, int64_t block, bool fp8,
                          cudaStream_t stream) {
  if (block <= 0 || prefix % block != 0 || prefix > stride) return cudaErrorInvalidValue;
  if (rows == 0 || prefix == 0) return cudaSuccess;
  RoundTripKernel<<<static_cast<unsigned>(rows * (prefix / block)), block >= 256 ? 256 : 32, 0, stream>>>(
      x, block, stride, prefix / block, fp8);
  return cudaGetLastError();
}

cudaError_t Hadamard(float* x, int64_t rows, int64_t dim, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (dim * 4 > 48 * 1024) return cudaErrorInvalidValue;
  HadamardKernel<<<static_cast<unsigned>(rows), 256, dim * sizeof(float), stream>>>(x, dim, 1.0f / std::sqrt(static_cast<float>(dim)));
  return cudaGetLastError();
}

cudaError_t HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                  int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb,
                  cudaStream_t stream) {
  if (hc > kMaxHc) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int count = (2 + hc) * hc;
  const int64_t tile = HcTile(hc * dim, count);
  if (tile == 0) return cudaErrorInvalidValue;  // hc * dim over ~50K values
  const size_t smem = static_cast<size_t>(HcRound4(hc * dim) + count * tile) * sizeof(float);
  if (cudaError_t e = cudaFuncSetAttribute(HcPreKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      e != cudaSuccess)
    return e;
  HcPreKernel<<<static_cast<unsigned>(n), kHcThreads, smem, stream>>>(x, fn, base, scale, hc, dim, iters, norm_eps,
                                                                      hc_eps, y, post, comb);
  return cudaGetLastError();
}

int64_t HcPreFastSplits(int64_t n, int hc, int64_t dim) {
  if (hc != kHcFastHc || n == 0) return 0;
  // ~2 blocks per SM of 132 over the tokens, each slice at least a pass of the block's threads.
  const int64_t k = hc * dim, by_sms = (264 + n - 1) / n, by_k = (k + kHcFastThreads - 1) / kHcFastThreads;
  return std::max<int64_t>(1, std::min<int64_t>({by_sms, by_k, 64}));
}

cudaError_t HcPreFast(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                      int64_t dim, int iters, float norm_eps, float hc_eps, float* partial, float* y, float* post,
                      float* comb, cudaStream_t stream) {
  const int64_t splits = HcPreFastSplits(n, hc, dim);
  if (splits == 0) return n == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const int64_t k = hc * dim, chunk = (k + splits - 1) / splits;
  HcMixesSplitKernel<<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(n)), kHcFastThreads, 0, stream>>>(
      x, fn, k, chunk, partial);
  HcFinishKernel<<<static_cast<unsigned>(n), kHcFastThreads, 0, stream>>>(x, partial, static_cast<int>(splits), base,
                                                                          scale, dim, iters, norm_eps, hc_eps, y,
                                                                          post, comb);
  return cudaGetLastError();
}

cudaError_t HcPost(const float* f, const float* residual, const float* post, const float* comb, int64_t n, int hc,
                   int64_t dim, float* out, cudaStream_t stream) {
  const int64_t total = n * hc * dim;
  if (total == 0) return cudaSuccess;
  HcPostKernel<<<Blocks(total, 256), 256, 0, stream>>>(f, residual, post, comb, n, hc, dim, out);
  return cudaGetLastError();
}

cudaError_t HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc, int64_t dim,
                   float norm_eps, float hc_eps, float* y, cudaStream_t stream) {
  if (hc > kMaxHc) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t tile = HcTile(hc * dim, hc);
  if (tile == 0) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(HcRound4(hc * dim) + hc * tile) * sizeof(float);
  if (cudaError_t e = cudaFuncSetAttribute(HcHeadKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      e != cudaSuccess)
    return e;
  HcHeadKernel<<<static_cast<unsigned>(n), kHcThreads, smem, stream>>>(x, fn, base, scale, hc, dim, norm_eps, hc_eps, y);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda

namespace flashmem::kernels::cuda {
namespace {

__global__ void GatherRowsKernel(const float* x, const int32_t* rows, int64_t m, int64_t dim, float* out) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= m * dim) return;
  const int64_t r = id / dim, c = id % dim;
  out[id] = x[static_cast<int64_t>(rows[r]) * dim + c];
}

// The CPU's SwiGluRows operation for operation (no FMA contraction in this file).
__global__ void SwiGluKernel(const float* gate, const float* up, int64_t m, int64_t inter, const float* weights,
                             float limit, float* h) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= m * inter) return;
  float g = gate[id], u = up[id];
  if (limit > 0) {
    u = fminf(fmaxf(u, -limit), limit);
    g = fminf(g, limit);
  }
  float v = (g / (1.0f + ExpF(-g))) * u;
  if (weights) v *= weights[id / inter];
  h[id] = RoundBf16(v);
}

__global__ void ScatterAddKernel(const float* out, const int32_t* rows, int64_t m, int64_t dim, float* y) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= m * dim) return;
  const int64_t r = id / dim, c = id % dim;
  y[static_cast<int64_t>(rows[r]) * dim + c] += out[id];
}

// Each output value sums its row's contributions in the listed order: the same fp32 additions as
// one ScatterAddKernel launch per expert.
__global__ void ScatterAddOrderedKernel(const float* out, const int32_t* offsets, const int32_t* order, int64_t n,
                                        int64_t dim, float* y) {
  const int64_t id = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= n * dim) return;
  const int64_t r = id / dim, c = id % dim;
  const int32_t end = offsets[r + 1];
  if (offsets[r] == end) return;
  float acc = y[id];
  for (int32_t j = offsets[r]; j < end; ++j) acc += out[static_cast<int64_t>(order[j]) * dim + c];
  y[id] = acc;
}

}  // namespace

cudaError_t ScatterAddOrdered(const float* out, const int32_t* offsets, const int32_t* order, int64_t n, int64_t dim,
                              float* y, cudaStream_t stream) {
  if (n * dim == 0) return cudaSuccess;
  ScatterAddOrderedKernel<<<Blocks(n * dim, 256), 256, 0, stream>>>(out, offsets, order, n, dim, y);
  return cudaGetLastError();
}

void OrderRowsByTarget(std::span<const int32_t> rows, int64_t n, std::vector<int32_t>* offsets,
                       std::vector<int32_t>* order) {
  offsets->assign(n + 1, 0);
  for (int32_t r : rows) ++(*offsets)[r + 1];
  for (int64_t r = 0; r < n; ++r) (*offsets)[r + 1] += (*offsets)[r];
  order->resize(rows.size());
  std::vector<int32_t> next(offsets->begin(), offsets->end() - 1);
  for (size_t i = 0; i < rows.size(); ++i) (*order)[next[rows[i]]++] = static_cast<int32_t>(i);
}

cudaError_t GatherRows(const float* x, const int32_t* rows, int64_t m, int64_t dim, float* out, cudaStream_t stream) {
  if (m * dim == 0) return cudaSuccess;
  GatherRowsKernel<<<Blocks(m * dim, 256), 256, 0, stream>>>(x, rows, m, dim, out);
  return cudaGetLastError();
}

cudaError_t SwiGlu(const float* gate, const float* up, int64_t m, int64_t inter, const float* weights, float limit,
                   float* h, cudaStream_t stream) {
  if (m * inter == 0) return cudaSuccess;
  SwiGluKernel<<<Blocks(m * inter, 256), 256, 0, stream>>>(gate, up, m, inter, weights, limit, h);
  return cudaGetLastError();
}

cudaError_t ScatterAddRows(const float* out, const int32_t* rows, int64_t m, int64_t dim, float* y,
                           cudaStream_t stream) {
  if (m * dim == 0) return cudaSuccess;
  ScatterAddKernel<<<Blocks(m * dim, 256), 256, 0, stream>>>(out, rows, m, dim, y);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
