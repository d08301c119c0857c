// Decode-sized GEMMs (a few tokens against FP8 block-128 or FP4 group-32 weights): memory-bound,
// so each weight byte is read once per step with 16-byte loads and dequantised in registers.
// Sums are reordered for speed: results match the CPU reference within fp32 rounding (the
// bit-exact path is cuda::Linear).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kWarps = 8;  // rows per block, one warp each

__device__ __forceinline__ void DecodeFp8x16(const uint4& raw, float* w) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[q] >> (16 * h));
      const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
      w[q * 4 + h * 2] = f.x;
      w[q * 4 + h * 2 + 1] = f.y;
    }
  }
}

// One warp computes output row o for tokens t0 .. t0 + T - 1 (fewer at the end).
template <int T, bool kFp8>
__device__ __forceinline__ void GemvRow(const uint8_t* w, const float* ws, int64_t scale_cols, int64_t rows, int64_t k,
                                        const float* xq, const float* xs, int64_t n, float* y, bool round, int64_t o,
                                        int64_t t0) {
  const int lane = threadIdx.x & 31;
  const int nt = static_cast<int>(n - t0 < T ? n - t0 : T);  // tokens of this tile
  const int64_t nb = k / 128;
  constexpr int kPer = kFp8 ? 16 : 32;  // weight elements per 16-byte load
  const uint8_t* wr = w + (kFp8 ? o * k : o * k / 2);
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
  // kUnroll 16-byte loads in flight per lane before any arithmetic: the loop is bound by memory
  // latency otherwise.
  constexpr int kUnroll = 4;
  for (int64_t i0 = static_cast<int64_t>(lane) * kPer; i0 < k; i0 += 32 * kPer * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * 32 * kPer;
      raw[u] = i < k ? __ldg(reinterpret_cast<const uint4*>(wr + (kFp8 ? i : i / 2))) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * 32 * kPer;
      if (i >= k) break;
      float wf[kPer];
      if constexpr (kFp8) {
        DecodeFp8x16(raw[u], wf);
      } else {
        const uint32_t words[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
#pragma unroll
        for (int j = 0; j < 32; ++j) wf[j] = E2m1ToFloat((words[j / 8] >> (4 * (j % 8))) & 15u);
      }
      const float s_w = kFp8 ? ws[(o / 128) * scale_cols + i / 128] : ws[o * scale_cols + i / 32];
#pragma unroll
      for (int t = 0; t < T; ++t) {
        if (t >= nt) break;
        const float4* xv = reinterpret_cast<const float4*>(xq + (t0 + t) * k + i);
        float p = 0.0f;
#pragma unroll
        for (int j = 0; j < kPer / 4; ++j) {
          const float4 v = __ldg(xv + j);
          p += wf[4 * j] * v.x + wf[4 * j + 1] * v.y + wf[4 * j + 2] * v.z + wf[4 * j + 3] * v.w;
        }
        acc[t] += p * (xs[(t0 + t) * nb + i / 128] * s_w);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float s = WarpSum(acc[t]);
    if (lane == 0 && t < nt) y[(t0 + t) * rows + o] = round ? RoundBf16(s) : s;
  }
}

// ---- FP4 (e2m1, group-32 scales) rows with the activations staged in shared memory ------------
// The weights are 1/8 of the activations' bytes, so a warp re-reading activations from L1 per row
// (the generic path above) is bound by those reads and the nibble decode, not by HBM. Here a block
// stages its tokens' activations once (scaled by their 128-block scale and 2^63), 32 rows share
// them, and a nibble becomes a float with two shifts and two logic ops: e2m1 bits s.ee.m placed at
// float bits 31 and 24..22 read as value × 2^-126 for every code (0.5 lands on the subnormal
// 2^-127), so the row's group scale carries 2^63 · 2^63 · 2^-126 back out. Products stay normal.
constexpr int kFp4Rows = 32;  // rows per block (4 per warp)

__device__ __forceinline__ float E2m1Scaled(uint32_t word, int m) {  // nibble m of word, × 2^-126
  const int s_sign = 28 - 4 * m, s_mag = 22 - 4 * m;  // folded to constants when m is
  const uint32_t sign = s_sign >= 0 ? word << s_sign : word >> -s_sign;
  const uint32_t mag = s_mag >= 0 ? word << s_mag : word >> -s_mag;
  return __uint_as_float((sign & 0x80000000u) | (mag & 0x01C00000u));
}

// Staged activations: chunk c (32 columns) at [c * 32, +32), its float4 word q at (q ^ (c & 7)) so
// that the 8 lanes of a quarter-warp, reading word q of chunks c..c+7, hit different banks.
template <int T>
__device__ __forceinline__ void Fp4Rows(const uint8_t* w, const float* ws, int64_t scale_cols, int64_t rows,
                                        int64_t k, const float* xq, const float* xs, int64_t n, float* y, bool round,
                                        int64_t row0, int64_t t0, float* xsm) {
  const int nt = static_cast<int>(n - t0 < T ? n - t0 : T);
  const int64_t quads = k / 4;
  for (int64_t i = threadIdx.x; i < nt * quads; i += blockDim.x) {
    const int64_t t = i / quads, c = (i - t * quads) * 4;
    float4 v = __ldg(reinterpret_cast<const float4*>(xq + (t0 + t) * k + c));
    const float sc = xs[(t0 + t) * (k / 128) + c / 128] * 0x1p63f;
    v.x *= sc;
    v.y *= sc;
    v.z *= sc;
    v.w *= sc;
    const int64_t chunk = c >> 5;
    const int word = static_cast<int>((c & 31) >> 2);
    *reinterpret_cast<float4*>(xsm + t * k + chunk * 32 + ((word ^ static_cast<int>(chunk & 7)) << 2)) = v;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunks = k / 32;
  constexpr int kUnroll = 4;
  for (int r = warp; r < kFp4Rows; r += kWarps) {
    const int64_t o = row0 + r;
    if (o >= rows) break;
    const uint8_t* wr = w + o * (k / 2);
    const float* wsr = ws + o * scale_cols;
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.0f;
    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
      uint4 raw[kUnroll];
      float sw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * 32;
        raw[u] = c < chunks ? __ldg(reinterpret_cast<const uint4*>(wr + c * 16)) : make_uint4(0, 0, 0, 0);
        sw[u] = c < chunks ? __ldg(wsr + c) * 0x1p63f : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t c = c0 + u * 32;
        if (c >= chunks) break;
        const uint32_t words[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
        const float* xc = xsm + c * 32;
        const int sw8 = static_cast<int>(c & 7);
        float part[T];
#pragma unroll
        for (int t = 0; t < T; ++t) part[t] = 0.0f;
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const uint32_t word = words[q >> 1];
          const float w0 = E2m1Scaled(word, (q & 1) * 4), w1 = E2m1Scaled(word, (q & 1) * 4 + 1),
                      w2 = E2m1Scaled(word, (q & 1) * 4 + 2), w3 = E2m1Scaled(word, (q & 1) * 4 + 3);
#pragma unroll
          for (int t = 0; t < T; ++t) {
            if (t >= nt) break;
            const float4 xv = *reinterpret_cast<const float4*>(xc + t * k + ((q ^ sw8) << 2));
            part[t] += w0 * xv.x + w1 * xv.y + w2 * xv.z + w3 * xv.w;
          }
        }
#pragma unroll
        for (int t = 0; t < T; ++t) acc[t] += part[t] * sw[u];
      }
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const float sum = WarpSum(acc[t]);
      if (lane == 0 && t < nt) y[(t0 + t) * rows + o] = round ? RoundBf16(sum) : sum;
    }
  }
}

template <int T>
__global__ void __launch_bounds__(kWarps * 32) DecodeFp4Kernel(const uint8_t* w, const float* ws, int64_t scale_cols,
                                                               int64_t rows, int64_t k, const float* xq, const float* xs,
                                                               int64_t n, float* y, bool round) {
  extern __shared__ __align__(16) float xsm[];
  Fp4Rows<T>(w, ws, scale_cols, rows, k, xq, xs, n, y, round, static_cast<int64_t>(blockIdx.x) * kFp4Rows,
             static_cast<int64_t>(blockIdx.y) * T, xsm);
}

template <int T>
__global__ void __launch_bounds__(kWarps * 32) GroupedFp4Kernel(const GemvGroup* groups, bool round) {
  extern __shared__ __align__(16) float xsm[];
  const GemvGroup g = groups[blockIdx.z];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFp4Rows, t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (row0 >= g.rows || t0 >= g.n) return;  // the whole block: before any barrier
  Fp4Rows<T>(g.w, g.ws, g.scale_cols, g.rows, g.k, g.xq, g.xs, g.n, g.y, round, row0, t0, xsm);
}

// Shared memory for T tokens of k activations; 0 when it does not fit (the generic path runs).
template <int T>
size_t Fp4Smem(int64_t k) {
  const size_t bytes = static_cast<size_t>(T) * static_cast<size_t>(k) * sizeof(float);
  return bytes <= 200u * 1024u ? bytes : 0;
}

template <typename K>
cudaError_t AllowSmem(K kernel, size_t bytes) {
  if (bytes <= 48u * 1024u) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <int T, bool kFp8>
__global__ void DecodeGemvKernel(const uint8_t* w, const float* ws, int64_t scale_cols, int64_t rows, int64_t k,
                                 const float* xq, const float* xs, int64_t n, float* y, bool round) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (o >= rows) return;
  GemvRow<T, kFp8>(w, ws, scale_cols, rows, k, xq, xs, n, y, round, o, t0);
}

// Many weight matrices in one launch (blockIdx.z picks the group): the experts of an MoE layer,
// every weight byte read once, enough blocks in flight to keep HBM busy.
template <int T, bool kFp8>
__global__ void GroupedGemvKernel(const GemvGroup* groups, bool round) {
  const GemvGroup g = groups[blockIdx.z];
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (o >= g.rows || t0 >= g.n) return;
  GemvRow<T, kFp8>(g.w, g.ws, g.scale_cols, g.rows, g.k, g.xq, g.xs, g.n, g.y, round, o, t0);
}

template <int T>
cudaError_t LaunchGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, int64_t max_k, bool fp8,
                          bool round, cudaStream_t stream) {
  if (const size_t smem = fp8 ? 0 : Fp4Smem<T>(max_k); smem > 0) {
    if (cudaError_t e = AllowSmem(GroupedFp4Kernel<T>, smem); e != cudaSuccess) return e;
    const dim3 grid(static_cast<unsigned>((max_rows + kFp4Rows - 1) / kFp4Rows), static_cast<unsigned>((max_n + T - 1) / T),
                    static_cast<unsigned>(count));
    GroupedFp4Kernel<T><<<grid, kWarps * 32, smem, stream>>>(groups, round);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>((max_rows + kWarps - 1) / kWarps), static_cast<unsigned>((max_n + T - 1) / T),
                  static_cast<unsigned>(count));
  if (fp8) GroupedGemvKernel<T, true><<<grid, kWarps * 32, 0, stream>>>(groups, round);
  else GroupedGemvKernel<T, false><<<grid, kWarps * 32, 0, stream>>>(groups, round);
  return cudaGetLastError();
}

template <int T>
cudaError_t Launch(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y, bool round,
                   cudaStream_t stream) {
  if (const size_t smem = w.format == WeightFormat::kFp4Group32 ? Fp4Smem<T>(w.cols) : 0; smem > 0) {
    if (cudaError_t e = AllowSmem(DecodeFp4Kernel<T>, smem); e != cudaSuccess) return e;
    const dim3 grid(static_cast<unsigned>((w.rows + kFp4Rows - 1) / kFp4Rows), static_cast<unsigned>((n + T - 1) / T));
    DecodeFp4Kernel<T><<<grid, kWarps * 32, smem, stream>>>(static_cast<const uint8_t*>(w.values), w.scales, w.scale_cols,
                                                              w.rows, w.cols, xq, xs, n, y, round);
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>((w.rows + kWarps - 1) / kWarps), static_cast<unsigned>((n + T - 1) / T));
  if (w.format == WeightFormat::kFp8Block128)
    DecodeGemvKernel<T, true><<<grid, kWarps * 32, 0, stream>>>(static_cast<const uint8_t*>(w.values), w.scales,
                                                                 w.scale_cols, w.rows, w.cols, xq, xs, n, y, round);
  else
    DecodeGemvKernel<T, false><<<grid, kWarps * 32, 0, stream>>>(static_cast<const uint8_t*>(w.values), w.scales,
                                                                  w.scale_cols, w.rows, w.cols, xq, xs, n, y, round);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LinearDecodeGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, int64_t max_k,
                                bool fp8, Rounding out, cudaStream_t stream) {
  if (count == 0 || max_rows == 0 || max_n == 0) return cudaSuccess;
  if (count > 65535) return cudaErrorInvalidValue;
  const bool round = out == Rounding::kBf16;
  if (max_n == 1) return LaunchGrouped<1>(groups, count, max_rows, max_n, max_k, fp8, round, stream);
  if (max_n == 2) return LaunchGrouped<2>(groups, count, max_rows, max_n, max_k, fp8, round, stream);
  if (max_n <= 4) return LaunchGrouped<4>(groups, count, max_rows, max_n, max_k, fp8, round, stream);
  return LaunchGrouped<8>(groups, count, max_rows, max_n, max_k, fp8, round, stream);
}

cudaError_t LinearDecode(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y, Rounding out,
                         cudaStream_t stream) {
  if (w.format == WeightFormat::kDense || w.cols % 128 != 0) return cudaErrorInvalidValue;
  if (n == 0 || w.rows == 0) return cudaSuccess;
  const bool round = out == Rounding::kBf16;
  if (n == 1) return Launch<1>(w, xq, xs, n, y, round, stream);
  if (n == 2) return Launch<2>(w, xq, xs, n, y, round, stream);
  if (n <= 4) return Launch<4>(w, xq, xs, n, y, round, stream);
  return Launch<8>(w, xq, xs, n, y, round, stream);
}

}  // namespace flashmem::kernels::cuda
