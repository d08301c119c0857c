// An MoE layer's routing (kernels/moe_routing.h) and Backend::RoutedMoE's default on the CPU: the
// reference Gate's picks and weights on hand-made logits, the router's checks, and the layer's
// sum against each token's experts run one by one.
#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/moe_routing.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kernels {
namespace {

WeightMatrix Dense(int64_t rows, int64_t cols, uint32_t seed, float scale) {
  WeightMatrix w;
  w.rows = rows;
  w.cols = cols;
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  for (int64_t i = 0; i < rows * cols; ++i) w.values.push_back(num::RoundBf16(d(g)));
  return w;
}

std::vector<float> Bf16Random(int64_t n, uint32_t seed, float scale) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = num::RoundBf16(d(g));
  return v;
}

// A router over `experts` experts of dim 8 with every expert's matrices (shapes only matter here).
struct Layer {
  WeightMatrix gate;
  std::vector<WeightMatrix> w;  // 3 an expert
  std::vector<ExpertMatrices> experts;
  MoeRouter router;
  Layer(int64_t E, int64_t dim, int64_t inter, int64_t k, RouterScore score) {
    gate = Dense(E, dim, 1, 0.5f);
    for (int64_t e = 0; e < E; ++e) {
      w.push_back(Dense(inter, dim, 10 + 3 * e, 0.2f));
      w.push_back(Dense(inter, dim, 11 + 3 * e, 0.2f));
      w.push_back(Dense(dim, inter, 12 + 3 * e, 0.2f));
    }
    for (int64_t e = 0; e < E; ++e) experts.push_back({&w[3 * e], &w[3 * e + 1], &w[3 * e + 2]});
    router.gate = &gate;
    router.score = score;
    router.k = k;
    router.experts = experts;
  }
};

TEST(MoeRouting, PicksTheLargestBiasedScoresAndWeighsByTheUnbiasedOnes) {
  Layer l(4, 8, 8, 2, RouterScore::kSigmoid);
  // Logits 0, 2, 1, 2: experts 1 and 3 tie, the lower id first; a bias on expert 0 lifts it above
  // both, but its weight is still its own sigmoid.
  const float logits[4] = {0.0f, 2.0f, 1.0f, 2.0f};
  int32_t ids[2];
  float wts[2];
  l.router.route_scale = 1.5f;
  RouteFromLogits(l.router, logits, 1, ids, wts);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 3);
  EXPECT_FLOAT_EQ(wts[0], 0.75f);  // equal scores: half each, times 1.5
  EXPECT_FLOAT_EQ(wts[1], 0.75f);
  const std::vector<float> bias = {1.0f, 0.0f, 0.0f, 0.0f};
  l.router.bias = bias;
  RouteFromLogits(l.router, logits, 1, ids, wts);
  EXPECT_EQ(ids[0], 0);  // 0.5 + 1 > sigmoid(2) = 0.88
  EXPECT_EQ(ids[1], 1);
  const float s0 = 0.5f, s1 = 1.0f / (1.0f + std::exp(-2.0f));
  EXPECT_FLOAT_EQ(wts[0], s0 / (s0 + s1) * 1.5f);
  EXPECT_FLOAT_EQ(wts[1], s1 / (s0 + s1) * 1.5f);
}

TEST(MoeRouting, SoftmaxWeightsAreNotRenormalizedAndHashLayersTakeTheirPicks) {
  Layer l(3, 8, 8, 2, RouterScore::kSoftmax);
  const float logits[3] = {1.0f, 0.0f, 3.0f};
  int32_t ids[2];
  float wts[2];
  RouteFromLogits(l.router, logits, 1, ids, wts);
  const float z = std::exp(1.0f - 3.0f) + std::exp(0.0f - 3.0f) + 1.0f;
  EXPECT_EQ(ids[0], 2);
  EXPECT_EQ(ids[1], 0);
  EXPECT_FLOAT_EQ(wts[0], 1.0f / z);  // the softmax's own values: they do not sum to 1
  EXPECT_FLOAT_EQ(wts[1], std::exp(-2.0f) / z);
  const std::vector<int32_t> hash = {1, 0};
  l.router.hash_ids = hash;
  RouteFromLogits(l.router, logits, 1, ids, wts);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 0);
  EXPECT_FLOAT_EQ(wts[0], std::exp(-3.0f) / z);
  const Layer sp(2, 8, 8, 1, RouterScore::kSqrtSoftplus);
  const float big[2] = {30.0f, -1.0f};  // softplus(x) = x past 20
  RouteFromLogits(sp.router, big, 1, ids, wts);
  EXPECT_EQ(ids[0], 0);
  EXPECT_FLOAT_EQ(wts[0], 1.0f);
}

TEST(MoeRouting, BadRoutersAreRefusedNamingTheField) {
  Layer l(4, 8, 8, 2, RouterScore::kSigmoid);
  auto refused = [&](const MoeRouter& r, const char* field) {
    const absl::Status st = ValidateRouter(r, 3, 8);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(st.message().find(field), std::string::npos) << st;
  };
  EXPECT_TRUE(ValidateRouter(l.router, 3, 8).ok());
  EXPECT_EQ(ValidateRouter(l.router, 3, 16).code(), absl::StatusCode::kInvalidArgument);  // x's dim
  MoeRouter r = l.router;
  r.gate = nullptr;
  refused(r, "router.gate");
  r = l.router;
  r.k = 5;
  refused(r, "router.k");
  r.k = 0;
  refused(r, "router.k");
  r = l.router;
  const std::vector<float> bias(3, 0.0f);
  r.bias = bias;
  refused(r, "router.bias");
  r = l.router;
  const std::vector<int32_t> short_ids(5, 0), bad_ids = {0, 1, 2, 3, 4, 1};
  r.hash_ids = short_ids;
  refused(r, "router.hash_ids");
  r.hash_ids = bad_ids;
  refused(r, "router.hash_ids[4]");
  r = l.router;
  r.first_expert = 1;  // experts 1..4 of 4
  refused(r, "router.experts");
  r = l.router;
  std::vector<ExpertMatrices> wrong = l.experts;
  const WeightMatrix narrow = Dense(8, 4, 99, 0.1f);
  wrong[2].w2 = &narrow;
  r.experts = wrong;
  refused(r, "router.experts[2]");
  // The op: a sticky error on its backend, y unchanged.
  std::vector<float> x(3 * 8, 0.5f), y(3 * 8, 1.0f);
  const std::vector<float> y0 = y;
  r = l.router;
  r.hash_ids = bad_ids;
  const std::unique_ptr<Backend> be = NewCpuBackend();
  be->RoutedMoE(r, x.data(), 3, 8, 7.0f, y.data());
  EXPECT_EQ(be->Health().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(be->Health().message().find("router.hash_ids[4]"), std::string::npos) << be->Health();
  EXPECT_EQ(y, y0);
  EXPECT_TRUE(CpuBackend().Health().ok());  // another instance's error is its own
}

// The default on the CPU: the sum equals each token's
// experts run one by one in expert order, for a scored layer, a hash layer and a tensor-parallel
// slice; a bad router leaves y as it was and fails Health.
TEST(MoeRouting, RoutedMoEEqualsEachTokensExpertsInExpertOrder) {
  const int64_t E = 6, dim = 64, inter = 32, n = 5, k = 3;
  for (int variant = 0; variant < 3; ++variant) {
    Layer l(E, dim, inter, k, variant == 1 ? RouterScore::kSoftmax : RouterScore::kSqrtSoftplus);
    const std::vector<float> bias = Bf16Random(E, 7, 0.1f);
    const std::vector<int32_t> hash = {5, 0, 2, 1, 2, 3, 0, 4, 5, 3, 1, 0, 2, 4, 1};
    if (variant == 0) l.router.bias = bias;
    if (variant == 1) l.router.hash_ids = hash;
    std::vector<ExpertMatrices> slice;
    if (variant == 2) {  // this rank holds experts 2..4
      slice.assign(l.experts.begin() + 2, l.experts.begin() + 5);
      l.router.first_expert = 2;
      l.router.experts = slice;
    }
    const std::vector<float> x = Bf16Random(n * dim, 3, 1.0f), y0 = Bf16Random(n * dim, 4, 0.5f);
    std::vector<float> y = y0;
    std::vector<int32_t> ids(n * k, -1);
    std::vector<float> wts(n * k, NAN);
    const Backend& be = CpuBackend();
    be.RoutedMoE(l.router, x.data(), n, dim, 7.0f, y.data(), ids.data(), wts.data());
    ASSERT_TRUE(be.Health().ok()) << be.Health();
    std::vector<float> logits(n * E);
    be.Linear(l.gate, x.data(), n, logits.data(), Rounding::kNone);
    std::vector<int32_t> want_ids(n * k);
    std::vector<float> want_wts(n * k);
    RouteFromLogits(l.router, logits.data(), n, want_ids.data(), want_wts.data());
    EXPECT_EQ(ids, want_ids) << "variant " << variant;
    EXPECT_EQ(wts, want_wts) << "variant " << variant;
    if (variant == 1) EXPECT_EQ(ids, hash);
    std::vector<float> want = y0, out(dim);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t e = 0; e < E; ++e)  // expert order: the order of the fp32 sum
        for (int64_t j = 0; j < k; ++j) {
          const int64_t le = want_ids[i * k + j] - l.router.first_expert;
          if (want_ids[i * k + j] != e || le < 0 || le >= static_cast<int64_t>(l.router.experts.size())) continue;
          const ExpertMatrices& m = l.router.experts[le];
          ExpertMlp(be, *m.w1, *m.w3, *m.w2, x.data() + i * dim, 1, &want_wts[i * k + j], 7.0f, out.data());
          for (int64_t c = 0; c < dim; ++c) want[i * dim + c] += out[c];
        }
    EXPECT_EQ(y, want) << "variant " << variant;
    if (variant == 2) EXPECT_NE(y, y0);  // the slice's experts took some rows
  }
}

}  // namespace
}  // namespace flashmem::kernels
