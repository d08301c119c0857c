// Device-side number formats and reductions shared by the CUDA kernels. Each function rounds
// exactly like its host twin in kernels/numerics.h.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

namespace flashmem::kernels::cuda {

__device__ __forceinline__ float RoundBf16(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(((u >> 16) | 0x40u) << 16);  // quiet NaN, as the host
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t b) { return __uint_as_float(static_cast<unsigned>(b) << 16); }

// Two floats rounded to bf16 (nearest even) as one 32-bit MMA operand register: lo in the low
// half (the lower k index of an mma.sync fragment pair).
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// 2^ceil(log2(x)) by the exponent-bit trick, as the reference kernels.
__device__ __forceinline__ float Pow2Ceil(float x) {
  const unsigned bits = __float_as_uint(x);
  const int e = static_cast<int>((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffffu) != 0);
  return __uint_as_float(static_cast<unsigned>(e + 127) << 23);
}

// Nearest value of a float grid with `man_bits` mantissa bits and minimum exponent `min_exp`
// (ties to even), clamped to vmax: e4m3 = (-6, 3, 448), e2m1 = (0, 1, 6).
__device__ __forceinline__ float RoundGrid(float x, int min_exp, int man_bits, float vmax) {
  const float a = fabsf(x);
  if (!(a > 0.0f)) return x;
  int e;
  frexpf(a, &e);
  const int exp = max(e - 1, min_exp);
  const float step = ldexpf(1.0f, exp - man_bits);
  float r = rintf(a / step) * step;
  r = fminf(r, vmax);
  return copysignf(r, x);
}

__device__ __forceinline__ float Fp8BlockScale(float amax) { return Pow2Ceil(fmaxf(amax, 1e-4f) * (1.0f / 448.0f)); }
__device__ __forceinline__ float Fp4BlockScale(float amax) {
  return Pow2Ceil(fmaxf(amax, 6.0f * 1.17549435e-38f) * (1.0f / 6.0f));
}

// e4m3fn code -> value (0x7f / 0xff are NaN).
__device__ __forceinline__ float E4m3ToFloat(uint8_t c) {
  const unsigned sign = static_cast<unsigned>(c & 0x80) << 24;
  const unsigned e = (c >> 3) & 0xf, m = c & 7;
  if (e == 0xf && m == 7) return __uint_as_float(0x7fc00000u);
  if (e == 0) return __uint_as_float(sign | __float_as_uint(static_cast<float>(m) * (1.0f / 512.0f)));
  return __uint_as_float(sign | ((e + 120) << 23) | (m << 20));
}

// e2m1 nibble -> value by its float bits: e = 0 gives 0 or 0.5, else (1 + m/2) * 2^(e-1); bit 3
// is the sign (magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}).
__device__ __forceinline__ float E2m1ToFloat(unsigned nib) {
  const unsigned e = (nib >> 1) & 3, m = nib & 1;
  unsigned bits = e ? (((e + 126) << 23) | (m << 22)) : (m ? 0x3f000000u : 0u);
  bits |= (nib & 8) << 28;
  return __uint_as_float(bits);
}

// Code of a value that lies on the e4m3 grid, from its float bits (NaN gives 0x7f). Host and
// device: weight encoding at upload and activation quantization for cuBLASLt share it.
__host__ __device__ __forceinline__ uint8_t E4m3CodeOfGridValue(float v) {
#ifdef __CUDA_ARCH__
  const unsigned u = __float_as_uint(v);
#else
  unsigned u;
  memcpy(&u, &v, 4);
#endif
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  if ((u & 0x7fffffffu) == 0) return sign;
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7f;
  const int e = static_cast<int>((u >> 23) & 0xff) - 127;
  if (e < -6) return sign | static_cast<uint8_t>(fabsf(v) * 512.0f);  // subnormal m * 2^-9: exact
  return sign | static_cast<uint8_t>(((e + 7) << 3) | ((u >> 20) & 7));
}

// UE8M0 scale byte -> 2^(b-127).
__device__ __forceinline__ float E8m0ToFloat(uint8_t b) {
  if (b == 0xff) return __uint_as_float(0x7fc00000u);
  if (b == 0) return ldexpf(1.0f, -127);
  return __uint_as_float(static_cast<unsigned>(b) << 23);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// act_quant of one 128-element block held by a warp, v[j] = element lane + 32 j: returns the
// block's pow2 scale and turns v into its e4m3 grid values.
__device__ __forceinline__ float QuantizeWarpBlock128(float v[4]) {
  float m = 0.0f;
  for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(v[j]));
  const float scale = Fp8BlockScale(WarpMax(m));
  for (int j = 0; j < 4; ++j) v[j] = RoundGrid(fminf(fmaxf(v[j] / scale, -448.0f), 448.0f), -6, 3, 448.0f);
  return scale;
}

// exp through double, rounded once to float: the CPU reference computes the same (num::ExpF), so
// both backends agree bit for bit (a float expf differs between libraries in the last ulp).
__device__ __forceinline__ float ExpF(float x) { return static_cast<float>(exp(static_cast<double>(x))); }
__device__ __forceinline__ float Sigmoid(float x) { return 1.0f / (1.0f + ExpF(-x)); }

// The CPU reference's combination of a half-warp's 16 lane partials (its Dot's tree: lanes
// 8 apart, then 4, then 1, then 2), the result on every lane of the half-warp. Whole warps call it.
__device__ __forceinline__ float HalfWarpCombine(float s) {
  s += __shfl_down_sync(0xffffffffu, s, 8, 16);
  s += __shfl_down_sync(0xffffffffu, s, 4, 16);
  s += __shfl_down_sync(0xffffffffu, s, 1, 16);
  s += __shfl_down_sync(0xffffffffu, s, 2, 16);
  return __shfl_sync(0xffffffffu, s, 0, 16);
}

// A dot product in the CPU reference's order (kernels/cpu Dot): 16 strided partial sums (element i
// goes to partial i % 16), lanes j and j+8 added, then ((0+4)+(1+5)) + ((2+6)+(3+7)), then the
// n % 16 tail in sequence. Called by all 32 lanes of a warp; each half-warp computes its own dot
// (lane & 15 is its partial) and every lane of the half gets the result. b(i) reads element i.
template <typename B>
__device__ __forceinline__ float HalfWarpDot(const float* a, B b, int64_t n) {
  const int l16 = threadIdx.x & 15;
  const int64_t full = n / 16 * 16;
  float s = 0.0f;
  // Unrolled so the loads of later elements are in flight while the sums run (the sums stay in
  // order: unrolling does not reassociate).
#pragma unroll 8
  for (int64_t i = l16; i < full; i += 16) s += a[i] * b(i);
  s = HalfWarpCombine(s);
  for (int64_t i = full; i < n; ++i) s += a[i] * b(i);
  return s;
}
struct Plain {
  const float* p;
  __device__ float operator()(int64_t i) const { return p[i]; }
};

}  // namespace flashmem::kernels::cuda
