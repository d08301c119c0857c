// Number formats of DeepSeek-V4 checkpoints and of the reference's rounding points.
// Every function is exact and branch-light so both backends (and tests) share one definition.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace flashmem::num {

// ---- bfloat16 -------------------------------------------------------------------------------
inline uint16_t FloatToBf16Bits(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}
inline float Bf16BitsToFloat(uint16_t b) { return std::bit_cast<float>(static_cast<uint32_t>(b) << 16); }
// The value x takes when the reference stores it in a bf16 tensor.
inline float RoundBf16(float x) { return Bf16BitsToFloat(FloatToBf16Bits(x)); }
// n little-endian bf16 values at `bytes` (any alignment: checkpoint tensors, state blobs and KV
// pages are byte buffers) as floats.
inline void Bf16BytesToFloats(const uint8_t* bytes, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i)
    out[i] = Bf16BitsToFloat(static_cast<uint16_t>(bytes[2 * i] | (static_cast<uint16_t>(bytes[2 * i + 1]) << 8)));
}

// The inverse: n floats as little-endian bf16 bytes (rounded to nearest even).
inline void FloatsToBf16Bytes(const float* v, size_t n, uint8_t* bytes) {
  for (size_t i = 0; i < n; ++i) {
    const uint16_t b = FloatToBf16Bits(v[i]);
    bytes[2 * i] = static_cast<uint8_t>(b & 0xff);
    bytes[2 * i + 1] = static_cast<uint8_t>(b >> 8);
  }
}

// exp through double, rounded once to float. Both backends use it where the reference calls exp
// on fp32 tensors, so the CPU and CUDA ops agree bit for bit (float expf differs by an ulp
// between libm and the CUDA math library).
inline float ExpF(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }

// ---- float16 (read only: some checkpoints carry F16 tensors) --------------------------------
inline float F16BitsToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

// ---- E8M0 (UE8M0 power-of-two scales): byte b means 2^(b-127), 255 is NaN ------------------
inline bool E8m0IsNan(uint8_t b) { return b == 0xff; }
inline float E8m0ToFloat(uint8_t b) {
  if (b == 0xff) return std::nanf("");
  if (b == 0) return std::ldexp(1.0f, -127);  // subnormal in fp32, still exact
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 23);
}
// Byte of a power of two p = 2^e (e in [-127, 127]).
inline uint8_t Pow2ToE8m0(float p) {
  int e;
  std::frexp(p, &e);  // p = 0.5 * 2^e
  return static_cast<uint8_t>(e - 1 + 127);
}

// Smallest power of two >= x for x > 0, computed with the exponent-bit trick of the reference's
// kernels (fast_log2_ceil + fast_pow2): exponent + (mantissa != 0).
inline float Pow2Ceil(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const int exp = static_cast<int>((bits >> 23) & 0xff);
  const int e = exp - 127 + ((bits & 0x7fffffu) != 0 ? 1 : 0);
  return std::bit_cast<float>(static_cast<uint32_t>(e + 127) << 23);
}

// ---- FP8 e4m3fn: bias 7, max 448, no inf, 0x7f/0xff NaN --------------------------------------
constexpr float kE4m3Max = 448.0f;
inline float E4m3ToFloat(uint8_t c) {
  const float sign = (c & 0x80) ? -1.0f : 1.0f;
  const int exp = (c >> 3) & 0xf;
  const int man = c & 0x7;
  if (exp == 0xf && man == 0x7) return std::nanf("");
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -9);
  return sign * std::ldexp(1.0f + man / 8.0f, exp - 7);
}
// Nearest e4m3 value (ties to even) of x, |x| <= 448 (callers clamp first, as the kernels do).
inline float RoundE4m3(float x) {
  const float a = std::fabs(x);
  if (!(a > 0.0f)) return x;  // zero (keeps its sign) or NaN
  int e;
  std::frexp(a, &e);
  const int exp = e - 1 < -6 ? -6 : e - 1;  // below 2^-6 the grid is the subnormal step 2^-9
  const float step = std::ldexp(1.0f, exp - 3);
  float r = std::nearbyint(a / step) * step;  // default rounding mode: ties to even
  if (r > kE4m3Max) r = kE4m3Max;
  return std::copysign(r, x);
}
// Every e4m3 code's value (decoding by lookup).
inline const std::array<float, 256>& E4m3Table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = E4m3ToFloat(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}
// Code of a value that already lies on the e4m3 grid.
inline uint8_t EncodeE4m3(float v) {
  uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const float a = std::fabs(v);
  if (a == 0.0f) return sign;
  int e;
  std::frexp(a, &e);
  const int exp = e - 1;
  if (exp < -6) return sign | static_cast<uint8_t>(std::lround(a * 512.0f));  // subnormal: m * 2^-9
  const int man = static_cast<int>(std::lround((a / std::ldexp(1.0f, exp) - 1.0f) * 8.0f));
  return sign | static_cast<uint8_t>(((exp + 7) << 3) | man);
}

// ---- FP4 e2m1: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 is the sign --------------------
constexpr float kE2m1Max = 6.0f;
inline float E2m1ToFloat(uint8_t nibble) {
  static constexpr float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = kMag[nibble & 7];
  return (nibble & 8) ? -m : m;
}
// Nearest e2m1 value (ties to even code) of x, |x| <= 6.
inline float RoundE2m1(float x) {
  const float a = std::fabs(x);
  if (!(a > 0.0f)) return x;
  int e;
  std::frexp(a, &e);
  const int exp = e - 1 < 0 ? 0 : e - 1;
  const float step = std::ldexp(1.0f, exp - 1);
  float r = std::nearbyint(a / step) * step;
  if (r > kE2m1Max) r = kE2m1Max;
  return std::copysign(r, x);
}
inline uint8_t EncodeE2m1(float v) {
  static constexpr float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float a = std::fabs(v);
  uint8_t code = 0;
  for (uint8_t i = 0; i < 8; ++i)
    if (kMag[i] == a) code = i;
  return static_cast<uint8_t>((std::signbit(v) && a != 0.0f ? 8 : 0) | code);
}

// ---- block scales of the reference's quantizers ---------------------------------------------
// act_quant: scale = 2^ceil(log2(max(amax, 1e-4) * fp32(1/448))).
inline float Fp8BlockScale(float amax) {
  const float a = amax < 1e-4f ? 1e-4f : amax;
  return Pow2Ceil(a * (1.0f / kE4m3Max));
}
// fp4_act_quant: scale = 2^ceil(log2(max(amax, 6*2^-126) * fp32(1/6))).
inline float Fp4BlockScale(float amax) {
  const float floor = 6.0f * std::ldexp(1.0f, -126);
  const float a = amax < floor ? floor : amax;
  return Pow2Ceil(a * (1.0f / kE2m1Max));
}

// ---- the FP8 KV record (spec §4.1; worker/kv/page_codec.h lays records out in pages) -------
// An entry's `dim` values: `data` holds dim - rope_dims e4m3 codes, each run of 64 scaled by its
// UE8M0 byte in `scales`, then rope_dims little-endian bf16 values. Exact (every product is an
// fp32 value). The caller has checked the scale bytes (0xff would give NaN).
inline void DecodeFp8Record(const uint8_t* data, const uint8_t* scales, int64_t dim, int64_t rope_dims, float* out) {
  const std::array<float, 256>& e4m3 = E4m3Table();
  const int64_t nope = dim - rope_dims;
  for (int64_t lo = 0; lo < nope; lo += 64) {
    const float s = E8m0ToFloat(scales[lo / 64]);
    const int64_t hi = std::min<int64_t>(nope, lo + 64);
    for (int64_t j = lo; j < hi; ++j) out[j] = e4m3[data[j]] * s;
  }
  Bf16BytesToFloats(data + nope, static_cast<size_t>(rope_dims), out + nope);
}

}  // namespace flashmem::num
