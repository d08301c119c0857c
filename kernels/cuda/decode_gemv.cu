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
cudaError_t LaunchGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, bool fp8, bool round,
                          cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((max_rows + kWarps - 1) / kWarps), static_cast<unsigned>((max_n + T - 1) / T),
                  static_cast<unsigned>(count));
  if (fp8) GroupedGemvKernel<T, true><<<grid, kWarps * 32, 0, stream>>>(groups, round);
  else GroupedGemvKernel<T, false><<<grid, kWarps * 32, 0, stream>>>(groups, round);
  return cudaGetLastError();
}

template <int T>
cudaError_t Launch(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y, bool round,
                   cudaStream_t stream) {
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

cudaError_t LinearDecodeGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, bool fp8,
                                Rounding out, cudaStream_t stream) {
  if (count == 0 || max_rows == 0 || max_n == 0) return cudaSuccess;
  if (count > 65535) return cudaErrorInvalidValue;
  const bool round = out == Rounding::kBf16;
  if (max_n == 1) return LaunchGrouped<1>(groups, count, max_rows, max_n, fp8, round, stream);
  if (max_n == 2) return LaunchGrouped<2>(groups, count, max_rows, max_n, fp8, round, stream);
  if (max_n <= 4) return LaunchGrouped<4>(groups, count, max_rows, max_n, fp8, round, stream);
  return LaunchGrouped<8>(groups, count, max_rows, max_n, fp8, round, stream);
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
