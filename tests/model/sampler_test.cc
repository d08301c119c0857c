#include "worker/model/sampler.h"

#include <cmath>
#include <map>

#include "gtest/gtest.h"

namespace flashmem::model {
namespace {

TEST(Sampler, GreedyIsArgmaxWithLowestIdOnTies) {
  const std::vector<float> l = {0.5f, 2.0f, 2.0f, -1.0f};
  EXPECT_EQ(SampleToken(l, {}, 0), 1);
  SamplingOptions nucleus{1.0f, 1e-6f, 7};  // top_p tiny: only the most likely token remains
  EXPECT_EQ(SampleToken(l, nucleus, 3), 1);
}

TEST(Sampler, SeededSamplingIsAFunctionOfSeedAndStep) {
  std::vector<float> l(1000);
  for (size_t i = 0; i < l.size(); ++i) l[i] = std::sin(0.37f * i) * 3.0f;
  const SamplingOptions a{0.8f, 0.95f, 42}, b{0.8f, 0.95f, 43};
  std::vector<int32_t> sa, sa2, sb;
  for (uint64_t step = 0; step < 50; ++step) {
    sa.push_back(SampleToken(l, a, step));
    sa2.push_back(SampleToken(l, a, step));
    sb.push_back(SampleToken(l, b, step));
  }
  EXPECT_EQ(sa, sa2);
  EXPECT_NE(sa, sb);
}

TEST(Sampler, FrequenciesFollowTheDistribution) {
  // logits log(0.5), log(0.3), log(0.2): at temperature 1 the draws follow 50/30/20 %.
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  std::map<int32_t, int> count;
  const SamplingOptions o{1.0f, 1.0f, 1};
  for (uint64_t s = 0; s < 20000; ++s) count[SampleToken(l, o, s)]++;
  EXPECT_NEAR(count[0] / 20000.0, 0.5, 0.02);
  EXPECT_NEAR(count[1] / 20000.0, 0.3, 0.02);
  EXPECT_NEAR(count[2] / 20000.0, 0.2, 0.02);
  // top_p 0.75 keeps the first two tokens (0.5 + 0.3 >= 0.75), renormalised to 5/8 and 3/8.
  count.clear();
  const SamplingOptions p{1.0f, 0.75f, 2};
  for (uint64_t s = 0; s < 20000; ++s) count[SampleToken(l, p, s)]++;
  EXPECT_EQ(count[2], 0);
  EXPECT_NEAR(count[0] / 20000.0, 0.625, 0.02);
}

TEST(Sampler, InvalidOptionsNameTheField) {
  EXPECT_NE(std::string(ValidateSampling({-1.0f, 1.0f, 0}).message()).find("temperature"), std::string::npos);
  EXPECT_NE(std::string(ValidateSampling({1.0f, 0.0f, 0}).message()).find("top_p"), std::string::npos);
  EXPECT_NE(std::string(ValidateSampling({NAN, 1.0f, 0}).message()).find("temperature"), std::string::npos);
  EXPECT_TRUE(ValidateSampling({0.7f, 0.9f, 5}).ok());
}

}  // namespace
}  // namespace flashmem::model
