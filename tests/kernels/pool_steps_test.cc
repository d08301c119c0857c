// Backend::PoolSteps on the CPU (kernels/pooling.cc): the compressors' gated pooling against a
// naive double-precision softmax pooling, the ring's rows and block moves, version renewal, a
// batch of sessions equal to the same steps one by one, and bad input named in the error.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float std) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = num::RoundBf16(d(g));
  return v;
}

// A session's ring as worker/model's CompressorState holds it.
struct Ring {
  std::vector<float> kv, score;
  uint64_t version;
  explicit Ring(const PoolShape& sh)
      : kv(sh.slots() * sh.width(), 0.0f),
        score(sh.slots() * sh.width(), -std::numeric_limits<float>::infinity()),
        version(NewKvPageVersion()) {}
  PoolRing ring() { return {kv.data(), score.data(), &version}; }
};

// One session fed `tokens` tokens: every pooled row against the softmax pooling in double over the
// block's candidates (overlap: the previous block's first halves, -inf scores before the first
// block, and the block's second halves), within one bf16 step; the ring after each block holds it
// as the previous one.
void CheckAgainstNaive(const PoolShape& sh, int tokens) {
  const int64_t W = sh.width(), d = sh.head_dim, r = sh.ratio;
  Ring ring(sh);
  std::vector<std::vector<float>> kv_in, score_in;  // every token's projections
  std::vector<float> pooled(d);
  int blocks = 0;
  for (int pos = 0; pos < tokens; ++pos) {
    kv_in.push_back(Random(W, 10 + pos, 1.0f));
    score_in.push_back(Random(W, 1000 + pos, 2.0f));
    const uint64_t before = ring.version;
    std::fill(pooled.begin(), pooled.end(), std::numeric_limits<float>::quiet_NaN());
    const bool completes = (pos + 1) % r == 0;
    const PoolStep step{ring.ring(), kv_in.back().data(), score_in.back().data(), pos, completes ? pooled.data() : nullptr};
    CpuBackend().PoolSteps(std::span<const PoolStep>(&step, 1), sh);
    ASSERT_TRUE(CpuBackend().Health().ok()) << CpuBackend().Health();
    EXPECT_NE(ring.version, before) << "a step renews the ring's version";
    if (!completes) continue;
    ++blocks;
    const int64_t first = pos + 1 - r;  // the block's first token
    for (int64_t e = 0; e < d; ++e) {
      // Candidates: (overlap) the previous block's tokens' first halves, then this block's.
      std::vector<std::pair<double, double>> cand;  // (score, kv)
      if (sh.overlap)
        for (int64_t j = first - r; j < first; ++j)
          cand.push_back(j < 0 ? std::make_pair(-std::numeric_limits<double>::infinity(), 0.0)
                               : std::make_pair(static_cast<double>(score_in[j][e] + sh.ape[(j % r) * W + e]),
                                                static_cast<double>(kv_in[j][e])));
      const int64_t half = sh.overlap ? d : 0;
      for (int64_t j = first; j <= pos; ++j)
        cand.push_back({static_cast<double>(score_in[j][half + e] + sh.ape[(j % r) * W + half + e]),
                        static_cast<double>(kv_in[j][half + e])});
      double mx = -std::numeric_limits<double>::infinity(), sum = 0, acc = 0;
      for (const auto& [s, v] : cand) mx = std::max(mx, s);
      for (const auto& [s, v] : cand) sum += std::exp(s - mx);
      for (const auto& [s, v] : cand) acc += v * std::exp(s - mx) / sum;
      ASSERT_NEAR(pooled[e], acc, std::abs(acc) * (1.0 / 256) + 1e-6) << "block " << blocks << " dim " << e;
    }
    if (sh.overlap) {  // the block's rows became the previous block's
      for (int64_t j = 0; j < r; ++j) {
        const int64_t tok = first + j;
        EXPECT_EQ(std::memcmp(ring.kv.data() + j * W, kv_in[tok].data(), W * 4), 0) << "row " << j;
        for (int64_t c = 0; c < W; ++c)
          ASSERT_EQ(ring.score[j * W + c], score_in[tok][c] + sh.ape[j * W + c]) << "row " << j << " col " << c;
      }
    }
  }
  EXPECT_EQ(blocks, tokens / r);
}

TEST(PoolSteps, OverlappingBlocksPoolBySoftmaxOverEachDim) {
  const std::vector<float> ape = Random(4 * 2 * 64, 7, 0.5f);
  CheckAgainstNaive(PoolShape{4, 64, true, ape.data()}, 13);
}

TEST(PoolSteps, PlainBlocksPoolBySoftmaxOverEachDim) {
  const std::vector<float> ape = Random(16 * 96, 8, 0.5f);
  CheckAgainstNaive(PoolShape{16, 96, false, ape.data()}, 50);
}

// A decode step's rows: one call for many sessions (over the host's cores once several blocks
// complete) gives each session's rows and rings as the same steps one call each.
TEST(PoolSteps, ABatchOfSessionsEqualsTheirStepsOneByOne) {
  const std::vector<float> ape = Random(4 * 2 * 128, 9, 0.5f);
  const PoolShape sh{4, 128, true, ape.data()};
  const int m = 12;
  const int64_t W = sh.width(), d = sh.head_dim;
  std::vector<Ring> batched, single;
  for (int s = 0; s < m; ++s) batched.emplace_back(sh), single.emplace_back(sh);
  for (int t = 0; t < 9; ++t) {
    const std::vector<float> kv = Random(m * W, 300 + t, 1.0f), score = Random(m * W, 600 + t, 2.0f);
    std::vector<float> pooled_a(m * d, -1.0f), pooled_b(m * d, -2.0f);
    std::vector<PoolStep> steps;
    for (int s = 0; s < m; ++s) {
      const int64_t pos = t + (s % 4);  // a third of the sessions complete a block at each step
      steps.push_back({batched[s].ring(), kv.data() + s * W, score.data() + s * W, pos, pooled_a.data() + s * d});
      const PoolStep one{single[s].ring(), kv.data() + s * W, score.data() + s * W, pos, pooled_b.data() + s * d};
      CpuBackend().PoolSteps(std::span<const PoolStep>(&one, 1), sh);
    }
    CpuBackend().PoolSteps(steps, sh);
    for (int s = 0; s < m; ++s) {
      if ((t + (s % 4) + 1) % 4 == 0)
        ASSERT_EQ(std::memcmp(pooled_a.data() + s * d, pooled_b.data() + s * d, d * 4), 0) << "session " << s;
      ASSERT_EQ(batched[s].kv, single[s].kv);
      ASSERT_EQ(std::memcmp(batched[s].score.data(), single[s].score.data(), W * sh.slots() * 4), 0);
    }
  }
}

TEST(PoolSteps, BadInputIsNamedInTheError) {
  const std::vector<float> ape = Random(4 * 2 * 8, 1, 0.5f), kv(16, 1.0f), score(16, 0.0f);
  const PoolShape good{4, 8, true, ape.data()};
  struct Bad {
    PoolShape shape;
    bool null_pooled, null_version;
    int64_t pos;
    const char* field;
  } cases[] = {
      {PoolShape{0, 8, true, ape.data()}, false, false, 3, "shape.ratio"},
      {PoolShape{4, 0, true, ape.data()}, false, false, 3, "shape.head_dim"},
      {PoolShape{4, 8, true, nullptr}, false, false, 3, "shape.ape"},
      {good, true, false, 3, "pooled"},
      {good, false, true, 3, "ring"},
      {good, false, false, -1, "pos"},
  };
  for (const Bad& b : cases) {
    const std::unique_ptr<Backend> be = NewCpuBackend();
    Ring ring(good);
    std::vector<float> pooled(8);
    PoolStep step{ring.ring(), kv.data(), score.data(), b.pos, b.null_pooled ? nullptr : pooled.data()};
    if (b.null_version) step.ring.version = nullptr;
    const std::vector<float> kv_before = ring.kv;
    be->PoolSteps(std::span<const PoolStep>(&step, 1), b.shape);
    const absl::Status st = be->Health();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(st.message().find(b.field), absl::string_view::npos) << st;
    EXPECT_EQ(ring.kv, kv_before) << "nothing written on bad input: " << b.field;
  }
}

}  // namespace
}  // namespace flashmem::kernels
