// Dense bf16 weights against a few tokens (fast mode, below cuBLASLt's 4-row minimum): the
// decode-sized product of wo_a's groups and the head, which cuBLASLt ran padded to 4 rows at a
// flat ~15 µs a matrix (8 groups a layer: ~120-140 µs at batch 1 for 64 MB). Memory-bound, so
// each weight byte is read once with 16-byte loads, several in flight per lane; x comes as bf16
// (the values cuBLASLt's path multiplies), products are exact in fp32 and summed in fp32, in
// another order than cuBLASLt's.
#include <algorithm>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // one warp a row
constexpr int kUnroll = 4;        // 16-byte loads in flight per lane before any arithmetic

// The 8 bf16 of a 16-byte word as floats (a shift or a mask each: bf16 is fp32's high half).
__device__ __forceinline__ void Bf16x8(const uint4& r, float* f) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    f[2 * q] = __uint_as_float(w[q] << 16);
    f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
  }
}

// Warp `o` of group g: y[t][g * rows + o] = sum_i x[t][g * k + i] * w_g[o][i] for the T tokens of
// the tile at t0 (fewer at the end).
template <int T>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    DenseGemvKernel(DenseGemvGroups groups, int64_t rows, int64_t k, const uint16_t* x, int64_t ldx, int64_t n,
                    float* y, int64_t ldy, bool round) {
  const int g = static_cast<int>(blockIdx.z), lane = static_cast<int>(threadIdx.x & 31);
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (o >= rows) return;
  const int nt = static_cast<int>(n - t0 < T ? n - t0 : T);
  const uint16_t* wr = groups.w[g] + o * k;
  const uint16_t* xg = x + t0 * ldx + g * k;
  float acc[T];
#pragma unroll
  for (int t = 0; t < T; ++t) acc[t] = 0.0f;
  for (int64_t i0 = static_cast<int64_t>(lane) * 8; i0 < k; i0 += 32 * 8 * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * 32 * 8;
      raw[u] = i < k ? __ldg(reinterpret_cast<const uint4*>(wr + i)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * 32 * 8;
      if (i >= k) break;
      float wf[8];
      Bf16x8(raw[u], wf);
#pragma unroll
      for (int t = 0; t < T; ++t) {
        if (t >= nt) break;
        float xf[8];
        Bf16x8(__ldg(reinterpret_cast<const uint4*>(xg + t * ldx + i)), xf);
        float p = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) p += wf[j] * xf[j];
        acc[t] += p;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < T; ++t) {
    const float s = WarpSum(acc[t]);
    if (lane == 0 && t < nt) y[(t0 + t) * ldy + g * rows + o] = round ? RoundBf16(s) : s;
  }
}

template <int T>
cudaError_t LaunchDense(const DenseGemvGroups& groups, int64_t rows, int64_t k, const uint16_t* x, int64_t ldx,
                        int64_t n, float* y, int64_t ldy, bool round, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>((n + T - 1) / T), static_cast<unsigned>(groups.count));
  DenseGemvKernel<T><<<grid, kRowsPerBlock * 32, 0, stream>>>(groups, rows, k, x, ldx, n, y, ldy, round);
  return cudaGetLastError();
}

}  // namespace

bool DenseGemvSupports(int64_t k, int64_t ldx) { return k > 0 && k % 8 == 0 && ldx % 8 == 0; }

cudaError_t DenseGemv(const DenseGemvGroups& groups, int64_t rows, int64_t k, const __nv_bfloat16* x, int64_t ldx,
                      int64_t n, float* y, int64_t ldy, Rounding out, cudaStream_t stream) {
  if (groups.count <= 0 || groups.count > DenseGemvGroups::kMax || !DenseGemvSupports(k, ldx) ||
      ldx < groups.count * k || ldy < groups.count * rows)
    return cudaErrorInvalidValue;
  if (n == 0 || rows == 0) return cudaSuccess;
  const auto* xb = reinterpret_cast<const uint16_t*>(x);
  const bool round = out == Rounding::kBf16;
  if (n == 1) return LaunchDense<1>(groups, rows, k, xb, ldx, n, y, ldy, round, stream);
  if (n == 2) return LaunchDense<2>(groups, rows, k, xb, ldx, n, y, ldy, round, stream);
  if (n <= 4) return LaunchDense<4>(groups, rows, k, xb, ldx, n, y, ldy, round, stream);
  return LaunchDense<8>(groups, rows, k, xb, ldx, n, y, ldy, round, stream);
}

}  // namespace flashmem::kernels::cuda
