// Number formats against hand-computed values (spec §6.2, §3.4).
#include "kernels/numerics.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace flashmem::num {
namespace {

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(RoundBf16(1.0f + std::ldexp(1.0f, -8)), 1.0f);  // tie -> even mantissa
  EXPECT_EQ(RoundBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_EQ(RoundBf16(-2.0f), -2.0f);
  EXPECT_TRUE(std::isnan(RoundBf16(std::nanf(""))));
  EXPECT_EQ(Bf16BitsToFloat(0x3f80), 1.0f);
  EXPECT_EQ(FloatToBf16Bits(1.0f), 0x3f80);
  // Little-endian bytes at an odd offset (state blobs and pages are byte buffers).
  const uint8_t bytes[] = {0xee, 0x80, 0x3f, 0x00, 0xc0, 0x80, 0xff};
  float out[3] = {7, 7, 7};
  Bf16BytesToFloats(bytes + 1, 3, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_TRUE(std::isinf(out[2]) && out[2] < 0);
  uint8_t back[6];
  FloatsToBf16Bytes(out, 3, back);  // the inverse, byte for byte
  EXPECT_EQ(std::vector<uint8_t>(back, back + 6), std::vector<uint8_t>(bytes + 1, bytes + 7));
}

TEST(F16, DecodesNormalsAndSubnormals) {
  EXPECT_EQ(F16BitsToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16BitsToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16BitsToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16BitsToFloat(0x7bff), 65504.0f);
}

TEST(E8m0, PowersOfTwoAndNan) {
  EXPECT_EQ(E8m0ToFloat(127), 1.0f);
  EXPECT_EQ(E8m0ToFloat(128), 2.0f);
  EXPECT_EQ(E8m0ToFloat(126), 0.5f);
  EXPECT_EQ(E8m0ToFloat(0), std::ldexp(1.0f, -127));
  EXPECT_TRUE(E8m0IsNan(255));
  EXPECT_TRUE(std::isnan(E8m0ToFloat(255)));
  EXPECT_EQ(Pow2ToE8m0(1.0f), 127);
  EXPECT_EQ(Pow2ToE8m0(std::ldexp(1.0f, -22)), 105);
}

TEST(Pow2Ceil, ExponentBitTrick) {
  EXPECT_EQ(Pow2Ceil(1.0f), 1.0f);
  EXPECT_EQ(Pow2Ceil(1.0000001f), 2.0f);
  EXPECT_EQ(Pow2Ceil(0.75f), 1.0f);
  EXPECT_EQ(Pow2Ceil(0.5f), 0.5f);
  EXPECT_EQ(Pow2Ceil(3.0f), 4.0f);
}

TEST(E4m3, DecodesEveryCodeAndRoundTrips) {
  EXPECT_EQ(E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(E4m3ToFloat(0xfe), -448.0f);
  EXPECT_EQ(E4m3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(E4m3ToFloat(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(E4m3ToFloat(0x38), 1.0f);
  EXPECT_TRUE(std::isnan(E4m3ToFloat(0x7f)));
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    const float v = E4m3ToFloat(static_cast<uint8_t>(c));
    EXPECT_EQ(RoundE4m3(v), v) << c;  // grid values are fixed points
    if (v != 0.0f) EXPECT_EQ(EncodeE4m3(v), c) << c;
  }
}

TEST(E4m3, RoundsToNearestEven) {
  EXPECT_EQ(RoundE4m3(std::ldexp(1.0f, -10)), 0.0f);  // half the subnormal step: tie -> 0
  EXPECT_EQ(RoundE4m3(3 * std::ldexp(1.0f, -10)), std::ldexp(1.0f, -8));
  EXPECT_EQ(RoundE4m3(17.0f), 16.0f);  // step 2 at [16, 32): 8.5 -> 8
  EXPECT_EQ(RoundE4m3(19.0f), 20.0f);  // 9.5 -> 10
  EXPECT_EQ(RoundE4m3(440.0f), 448.0f);
  EXPECT_EQ(RoundE4m3(-1.0625f), -1.0f);
}

TEST(E2m1, GridAndTies) {
  EXPECT_EQ(E2m1ToFloat(0x7), 6.0f);
  EXPECT_EQ(E2m1ToFloat(0xf), -6.0f);
  EXPECT_EQ(E2m1ToFloat(0x1), 0.5f);
  EXPECT_EQ(E2m1ToFloat(0x9), -0.5f);
  EXPECT_EQ(RoundE2m1(0.25f), 0.0f);   // tie -> code 0
  EXPECT_EQ(RoundE2m1(0.75f), 1.0f);   // tie between 0.5 (code 1) and 1 (code 2)
  EXPECT_EQ(RoundE2m1(1.25f), 1.0f);
  EXPECT_EQ(RoundE2m1(2.5f), 2.0f);
  EXPECT_EQ(RoundE2m1(3.5f), 4.0f);
  EXPECT_EQ(RoundE2m1(5.0f), 4.0f);
  EXPECT_EQ(RoundE2m1(5.5f), 6.0f);
  for (uint8_t c = 0; c < 16; ++c) {
    if (c == 8) continue;  // -0
    EXPECT_EQ(EncodeE2m1(E2m1ToFloat(c)), c);
  }
}

TEST(BlockScales, ZeroBlocksAndMaxMagnitude) {
  // act_quant floors amax at 1e-4: 1e-4/448 = 2.23e-7 -> 2^-22.
  EXPECT_EQ(Fp8BlockScale(0.0f), std::ldexp(1.0f, -22));
  EXPECT_EQ(Fp8BlockScale(448.0f), 1.0f);  // the largest magnitude maps to 448 exactly
  EXPECT_EQ(Fp8BlockScale(449.0f), 2.0f);
  EXPECT_EQ(Fp8BlockScale(1.0f), std::ldexp(1.0f, -8));  // 1/448 -> 2^-8
  EXPECT_EQ(Fp4BlockScale(6.0f), 1.0f);
  EXPECT_EQ(Fp4BlockScale(6.5f), 2.0f);
  EXPECT_EQ(Fp4BlockScale(0.0f), std::ldexp(1.0f, -126));
}

}  // namespace
}  // namespace flashmem::num
