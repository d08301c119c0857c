#include "worker/kv/page_codec.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/numerics.h"

namespace flashmem::kv {
namespace {

constexpr int64_t kFp8Block = PageFormat::kFp8ScaleBlock;
constexpr int64_t kFp4Block = PageFormat::kFp4ScaleBlock;

bool SameBits(float a, float b) { return std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b); }

// The smallest power of two s with amax <= max_code * s (1 for an all-zero block), as its UE8M0
// byte; false when amax is not finite or s leaves UE8M0's normal range. Any s at most the model's
// own block scale puts the block's values on the grid (a grid value times 2^k, k >= 0, stays on
// it below the maximum), and the smallest one is at most it.
bool BlockScale(const float* v, int64_t n, float max_code, float* scale, uint8_t* byte) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  if (!std::isfinite(amax)) return false;
  const float s = amax == 0.0f ? 1.0f : num::Pow2Ceil(amax / max_code);
  const uint32_t exp = (std::bit_cast<uint32_t>(s) >> 23) & 0xff;
  if (exp == 0 || exp == 0xff) return false;
  *scale = s;
  *byte = static_cast<uint8_t>(exp);
  return true;
}

// e4m3 code of v / s, when it is exact: straight from the float's bits (no libm; this runs for
// every value of every entry appended), checked by decoding it back.
bool E4m3Code(const std::array<float, 256>& table, float v, float inv_s, float s, uint8_t* code) {
  const uint32_t bits = std::bit_cast<uint32_t>(v * inv_s);  // exact: inv_s is a power of two
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const uint32_t mag = bits & 0x7fffffffu;
  const int exp = static_cast<int>(mag >> 23) - 127;
  uint32_t c;
  if (mag == 0) {
    c = 0;
  } else if (exp >= -6) {  // normal e4m3: 3 mantissa bits
    if (exp > 8) return false;
    c = (static_cast<uint32_t>(exp + 7) << 3) | ((mag >> 20) & 7);
  } else {  // subnormal e4m3: m * 2^-9, m in 1..7
    const float m = std::bit_cast<float>(mag) * 512.0f;
    c = static_cast<uint32_t>(m);
    if (c > 7) return false;
  }
  *code = static_cast<uint8_t>(sign | c);
  return SameBits(table[*code] * s, v);
}

// e2m1 code of v / s, when it is exact (the sign kept for zeros too, which num::EncodeE2m1
// drops), checked by decoding it back.
bool E2m1Code(float v, float s, uint8_t* code) {
  *code = static_cast<uint8_t>((std::signbit(v) ? 8 : 0) | num::EncodeE2m1(std::fabs(v) / s));
  return SameBits(num::E2m1ToFloat(*code) * s, v);
}

absl::Status OffGrid(int64_t entry, int64_t dim, float v, const char* grid) {
  return absl::InvalidArgumentError(
      absl::StrCat("KV page entry ", entry, " dim ", dim, ": value ", v, " is not on the ", grid, " grid of its block"));
}

}  // namespace

PageFormat PageFormat::MainKv(int64_t dim, int64_t rope_dims) {
  PageFormat f;
  f.kind = Kind::kFp8Record;
  f.dim = dim;
  f.rope_dims = rope_dims;
  return f;
}

PageFormat PageFormat::IndexKeys(int64_t dim) {
  PageFormat f;
  f.kind = Kind::kMxfp4;
  f.dim = dim;
  return f;
}

int64_t EncodeEntry(const PageFormat& f, const float* v, uint8_t* data, uint8_t* scales) {
  std::fill(data, data + f.data_bytes_per_entry(), 0);
  std::fill(scales, scales + f.scale_bytes_per_entry(), 0);
  if (f.kind == PageFormat::Kind::kFp8Record) {
    const int64_t nope = f.nope_dims();
    const std::array<float, 256>& table = num::E4m3Table();
    for (int64_t b = 0; b * kFp8Block < nope; ++b) {
      const int64_t lo = b * kFp8Block, n = std::min(kFp8Block, nope - lo);
      float s;
      if (!BlockScale(v + lo, n, num::kE4m3Max, &s, &scales[b])) return lo;
      const float inv = 1.0f / s;
      for (int64_t j = lo; j < lo + n; ++j)
        if (!E4m3Code(table, v[j], inv, s, &data[j])) return j;
    }
    for (int64_t j = nope; j < f.dim; ++j) {
      const uint16_t h = num::FloatToBf16Bits(v[j]);
      if (!SameBits(num::Bf16BitsToFloat(h), v[j])) return j;
      data[nope + 2 * (j - nope)] = static_cast<uint8_t>(h & 0xff);
      data[nope + 2 * (j - nope) + 1] = static_cast<uint8_t>(h >> 8);
    }
    return -1;
  }
  for (int64_t b = 0; b * kFp4Block < f.dim; ++b) {
    const int64_t lo = b * kFp4Block, n = std::min(kFp4Block, f.dim - lo);
    float s;
    if (!BlockScale(v + lo, n, num::kE2m1Max, &s, &scales[b])) return lo;
    for (int64_t j = lo; j < lo + n; ++j) {
      uint8_t c;
      if (!E2m1Code(v[j], s, &c)) return j;
      data[j / 2] |= static_cast<uint8_t>(j % 2 ? c << 4 : c);
    }
  }
  return -1;
}

bool ScalesValid(const PageFormat& f, const uint8_t* scales) {
  const bool fp8 = f.kind == PageFormat::Kind::kFp8Record;
  const int64_t block = fp8 ? kFp8Block : kFp4Block, scaled = fp8 ? f.nope_dims() : f.dim;
  for (int64_t b = 0; b * block < scaled; ++b)
    if (num::E8m0IsNan(scales[b])) return false;
  return true;
}

bool DecodeEntry(const PageFormat& f, const uint8_t* data, const uint8_t* scales, float* v) {
  const bool fp8 = f.kind == PageFormat::Kind::kFp8Record;
  const int64_t block = fp8 ? kFp8Block : kFp4Block, scaled = fp8 ? f.nope_dims() : f.dim;
  if (!ScalesValid(f, scales)) return false;
  if (fp8) {
    num::DecodeFp8Record(data, scales, f.dim, f.rope_dims, v);
  } else {
    for (int64_t lo = 0; lo < scaled; lo += block) {
      const float s = num::E8m0ToFloat(scales[lo / block]);
      const int64_t hi = std::min(scaled, lo + block);
      for (int64_t j = lo; j < hi; ++j)
        v[j] = num::E2m1ToFloat(static_cast<uint8_t>(j % 2 ? data[j / 2] >> 4 : data[j / 2] & 0xf)) * s;
    }
  }
  return true;
}

absl::Status EncodePage(const PageFormat& f, std::span<const float> values, std::vector<uint8_t>* out) {
  if (static_cast<int64_t>(values.size()) != f.page_floats())
    return absl::InvalidArgumentError(absl::StrCat("KV page has ", values.size(), " values, its format ", f.page_floats()));
  out->assign(f.page_bytes(), 0);
  for (int64_t e = 0; e < f.entries; ++e) {
    const float* v = values.data() + e * f.dim;
    const int64_t bad = EncodeEntry(f, v, out->data() + f.entry_data_offset(e), out->data() + f.entry_scales_offset(e));
    if (bad >= 0) {
      const bool rope = f.kind == PageFormat::Kind::kFp8Record && bad >= f.nope_dims();
      return OffGrid(e, bad, v[bad], rope ? "bf16" : f.kind == PageFormat::Kind::kFp8Record ? "e4m3" : "e2m1");
    }
  }
  return absl::OkStatus();
}

absl::Status DecodePage(const PageFormat& f, std::span<const uint8_t> bytes, std::vector<float>* out) {
  out->resize(f.page_floats());
  if (static_cast<int64_t>(bytes.size()) == f.bf16_page_bytes()) {  // the earlier form
    num::Bf16BytesToFloats(bytes.data(), out->size(), out->data());
    return absl::OkStatus();
  }
  if (static_cast<int64_t>(bytes.size()) != f.page_bytes())
    return absl::DataLossError(absl::StrCat("KV page of ", bytes.size(), " bytes: its format has ", f.page_bytes(),
                                            " (or ", f.bf16_page_bytes(), " as bf16)"));
  for (int64_t e = 0; e < f.entries; ++e)
    if (!DecodeEntry(f, bytes.data() + f.entry_data_offset(e), bytes.data() + f.entry_scales_offset(e), out->data() + e * f.dim))
      return absl::DataLossError(absl::StrCat("KV page entry ", e, ": NaN scale byte"));
  return absl::OkStatus();
}

}  // namespace flashmem::kv
