// The CPU reference ops against hand-computed values and naive formulas.
#include <bit>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"
#include "kernels/topk.h"

namespace flashmem::kernels {
namespace {

const Backend& be = CpuBackend();

std::vector<float> Random(size_t n, uint32_t seed, float std = 1.0f, bool bf16 = true) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = bf16 ? num::RoundBf16(d(g)) : d(g);
  return v;
}

// A device backend keys its copy of a weight on the values' address and this identity: every new
// or copied matrix has one never seen before, and a move hands it over with the values.
TEST(WeightIdentity, NewAndCopiedMatricesAreOthersAndMovedOnesKeepTheirs) {
  WeightMatrix a;
  a.values = {1.0f, 2.0f};
  const WeightMatrix b;
  EXPECT_NE(a.identity.id(), b.identity.id());
  const uint64_t id = a.identity.id();
  WeightMatrix copy = a;
  EXPECT_NE(copy.identity.id(), id);
  EXPECT_EQ(a.identity.id(), id);
  const float* values = a.values.data();
  WeightMatrix moved = std::move(a);
  EXPECT_EQ(moved.identity.id(), id);
  EXPECT_EQ(moved.values.data(), values);
  EXPECT_NE(a.identity.id(), id);  // the moved-from matrix is another one now
  WeightMatrix assigned;
  assigned = copy;
  EXPECT_NE(assigned.identity.id(), copy.identity.id());
  const uint64_t copy_id = copy.identity.id();
  assigned = std::move(copy);
  EXPECT_EQ(assigned.identity.id(), copy_id);
  EXPECT_NE(copy.identity.id(), copy_id);
}

TEST(Linear, Fp8BlockScaledMatchesHandComputation) {
  // 1 row x K=256 (two act blocks), W = 2 x 256 with per-128x128 scales 2 and 0.5.
  WeightMatrix w;
  w.format = WeightFormat::kFp8Block128;
  w.rows = 2;
  w.cols = 256;
  w.values.assign(512, 1.0f);
  w.scales = {2.0f, 0.5f};
  std::vector<float> x(256, 0.0f);
  x[0] = 448.0f;   // block 0: scale 1, exact
  x[128] = 3.0f;   // block 1: amax 3 -> scale 2^-7; 3/2^-7 = 384 exact
  float y[2];
  be.Linear(w, x.data(), 1, y, Rounding::kNone);
  EXPECT_EQ(y[0], 448.0f * 2.0f + 3.0f * 0.5f);
  EXPECT_EQ(y[1], y[0]);
  // Activation quantization rounds: 1.03 in a block with amax 1.03 -> e4m3 grid of that block.
  std::fill(x.begin(), x.end(), 0.0f);
  x[5] = 1.03f;
  be.Linear(w, x.data(), 1, y, Rounding::kBf16);
  const float scale = num::Fp8BlockScale(1.03f);
  EXPECT_EQ(y[0], num::RoundBf16(num::RoundE4m3(1.03f / scale) * scale * 2.0f));
}

TEST(Linear, Fp4GroupScalesPer32) {
  WeightMatrix w;
  w.format = WeightFormat::kFp4Group32;
  w.rows = 1;
  w.cols = 128;
  w.values.assign(128, 0.5f);
  w.scales = {1.0f, 2.0f, 4.0f, 8.0f};
  std::vector<float> x(128, 1.0f);  // act scale 2^-8, values 256 exactly
  float y;
  be.Linear(w, x.data(), 1, &y, Rounding::kNone);
  EXPECT_EQ(y, 32 * 0.5f * (1 + 2 + 4 + 8));
}

TEST(RmsNorm, MatchesFormula) {
  std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f}, w = {1.0f, 0.5f, 2.0f, 1.0f}, y(4);
  be.RmsNorm(x.data(), w.data(), 1, 4, 1e-6f, y.data());
  const float inv = 1.0f / std::sqrt(7.5f + 1e-6f);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(y[i], num::RoundBf16(w[i] * x[i] * inv));
}

TEST(Rope, InverseUndoesForwardWithinBf16) {
  std::vector<float> x = Random(128, 1), orig = x;
  std::vector<float> c(32), s(32);
  for (int i = 0; i < 32; ++i) { c[i] = std::cos(0.3f * i); s[i] = std::sin(0.3f * i); }
  be.Rope(x.data(), 1, 128, 64, 64, c.data(), s.data(), 1, false);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(x[i], orig[i]);  // nope dims untouched
  EXPECT_NE(x[67], orig[67]);  // pair 1 rotates by 0.3 (pair 0 by angle 0)
  be.Rope(x.data(), 1, 128, 64, 64, c.data(), s.data(), 1, true);
  for (int i = 64; i < 128; ++i) EXPECT_NEAR(x[i], orig[i], 0.02f * (1 + std::fabs(orig[i])));
  // Interleaved pairs: (x0, x1) rotated by angle 0.3 at pair 1.
  std::vector<float> p = {0, 0, 1.0f, 0.0f};
  std::vector<float> c2 = {1.0f, std::cos(0.3f)}, s2 = {0.0f, std::sin(0.3f)};
  be.Rope(p.data(), 1, 4, 0, 4, c2.data(), s2.data(), 1, false);
  EXPECT_EQ(p[2], num::RoundBf16(std::cos(0.3f)));
  EXPECT_EQ(p[3], num::RoundBf16(std::sin(0.3f)));
}

TEST(Rope, OneAngleSetPerGroupOfRowsEqualsCallsPerGroup) {
  const int64_t heads = 3, tokens = 4, stride = 16, rd = 8;
  std::vector<float> x = Random(tokens * heads * stride, 11), y = x;
  std::vector<float> c(tokens * rd / 2), s(tokens * rd / 2);
  for (size_t i = 0; i < c.size(); ++i) { c[i] = std::cos(0.1f * i + 0.2f); s[i] = std::sin(0.1f * i + 0.2f); }
  be.Rope(x.data(), tokens * heads, stride, stride - rd, rd, c.data(), s.data(), heads, false);
  for (int64_t t = 0; t < tokens; ++t)
    be.Rope(y.data() + t * heads * stride, heads, stride, stride - rd, rd, c.data() + t * rd / 2, s.data() + t * rd / 2,
            heads, false);
  EXPECT_EQ(x, y);
  EXPECT_NE(x, Random(tokens * heads * stride, 11));
}

// The window KV's row ops after wkv (LinearThen: kv_norm with its weight in place, RoPE, the FP8
// round trip of each row's nope dims) equal the separate calls, one row and several (the nope
// dims of several rows gathered into one call).
TEST(RowOps, RmsNormAndFp8PrefixRoundTripEqualTheSeparateCalls) {
  const int64_t D = 128, nope = 64, k = 256;
  WeightMatrix w;
  w.rows = D;
  w.cols = k;
  w.values = Random(D * k, 21, 0.05f);
  const std::vector<float> norm = Random(D, 22, 0.5f), c = Random(3 * 32, 23), s = Random(3 * 32, 24);
  for (int64_t rows : {int64_t{1}, int64_t{3}}) {
    const std::vector<float> x = Random(rows * k, 25);
    std::vector<float> raw(rows * D), want(rows * D), got(rows * D);
    be.Linear(w, x.data(), rows, raw.data(), Rounding::kBf16);
    be.RmsNorm(raw.data(), norm.data(), rows, D, 1e-6f, want.data());
    be.Rope(want.data(), rows, D, nope, 64, c.data(), s.data(), 1, false);
    for (int64_t i = 0; i < rows; ++i) be.Fp8RoundTrip(want.data() + i * D, nope, 64);
    const RowOp then[] = {RowOp::RmsNorm(D, norm.data(), 1e-6f), RowOp::Rope(D, nope, 64, c.data(), s.data(), 1, false),
                          RowOp::Fp8RoundTripPrefix(D, nope, 64)};
    be.LinearThen(w, x.data(), rows, got.data(), Rounding::kBf16, then);
    EXPECT_EQ(got, want) << rows << " rows";
    std::vector<float> unrounded = raw;  // the round trip changed something (the test can fail)
    be.RmsNorm(raw.data(), norm.data(), rows, D, 1e-6f, unrounded.data());
    be.Rope(unrounded.data(), rows, D, nope, 64, c.data(), s.data(), 1, false);
    EXPECT_NE(got, unrounded);
  }
}

// Projections of one input in one call: each job's output is its own LinearThen's, in place in a
// buffer no other job touches (the default every backend's fused form is tested against).
TEST(LinearMany, EveryJobEqualsItsOwnLinearThen) {
  const int64_t k = 128, rows = 3;
  WeightMatrix a, b;
  a.rows = 64;
  b.rows = 32;
  a.cols = b.cols = k;
  a.values = Random(64 * k, 31, 0.05f);
  b.values = Random(32 * k, 32, 0.05f);
  const std::vector<float> x = Random(rows * k, 33), norm = Random(64, 34, 0.5f);
  const RowOp then[] = {RowOp::RmsNorm(64, norm.data(), 1e-6f)};
  std::vector<float> want_a(rows * 64), want_b(rows * 32), got(rows * 96, -7.0f);
  be.LinearThen(a, x.data(), rows, want_a.data(), Rounding::kBf16, then);
  be.Linear(b, x.data(), rows, want_b.data(), Rounding::kNone);
  const LinearJob jobs[] = {{&a, got.data(), Rounding::kBf16, then}, {&b, got.data() + rows * 64, Rounding::kNone, {}}};
  be.LinearMany(jobs, x.data(), rows);
  EXPECT_EQ(std::vector<float>(got.begin(), got.begin() + rows * 64), want_a);
  EXPECT_EQ(std::vector<float>(got.begin() + rows * 64, got.end()), want_b);
}

// RowOp::ScaleBf16 (the indexer's head weights): every value becomes RoundBf16(v * scale), the
// product in fp32 — signed zeros, ties to even and NaN as RoundBf16 gives them.
TEST(RowOps, ScaleBf16RoundsEachScaledValue) {
  const float scale = static_cast<float>(1.0 / std::sqrt(128.0 * 64.0));
  std::vector<float> x = Random(257, 41, 3.0f);
  x[0] = -0.0f;
  x[1] = std::numeric_limits<float>::quiet_NaN();
  x[2] = num::RoundBf16(1.0f + 0x1p-8f) / scale;  // near a bf16 tie once scaled
  std::vector<float> got = x;
  const RowOp op = RowOp::ScaleBf16(scale);
  be.RowOps(got.data(), static_cast<int64_t>(got.size()), std::span<const RowOp>(&op, 1));
  for (size_t i = 0; i < x.size(); ++i) {
    const float want = num::RoundBf16(x[i] * scale);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got[i])) << i;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want)) << i;
    }
  }
  EXPECT_TRUE(std::signbit(got[0]));
  EXPECT_EQ(op.width, 1);
}

// hc_pre with the sublayer's norm as a row op equals hc_pre then RmsNorm; RowOps is ApplyRowOps.
TEST(RowOps, OnHcPreAndOnRowsEqualTheSeparateCalls) {
  const int hc = 4;
  const int64_t dim = 64, n = 2, mix = (2 + hc) * hc;
  const std::vector<float> x = Random(n * hc * dim, 41), fn = Random(mix * hc * dim, 42, 0.02f),
                           base = Random(mix, 43, 0.5f), scale = Random(3, 44, 0.5f), norm = Random(dim, 45, 0.1f);
  std::vector<float> u(n * dim), want(n * dim), post(n * hc), comb(n * hc * hc), got(n * dim), post2(n * hc),
      comb2(n * hc * hc);
  be.HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, u.data(), post.data(),
           comb.data());
  be.RmsNorm(u.data(), norm.data(), n, dim, 1e-6f, want.data());
  const RowOp normed[] = {RowOp::RmsNorm(dim, norm.data(), 1e-6f)};
  be.HcPreThen(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, got.data(), post2.data(),
               comb2.data(), normed);
  EXPECT_EQ(got, want);
  EXPECT_EQ(post2, post);
  EXPECT_EQ(comb2, comb);
  EXPECT_NE(got, u);  // the norm ran
  std::vector<float> rows = u, normed_rows(n * dim);
  be.RowOps(rows.data(), n * dim, normed);
  be.RmsNorm(u.data(), norm.data(), n, dim, 1e-6f, normed_rows.data());
  EXPECT_EQ(rows, normed_rows);
}

TEST(Hadamard, IsOrthonormalSylvester) {
  std::vector<float> e(8, 0.0f);
  e[1] = 1.0f;  // column 1 of H8 / sqrt(8): +,-,+,-,...
  be.Hadamard(e.data(), 1, 8);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(e[i], num::RoundBf16((i % 2 ? -1.0f : 1.0f) / std::sqrt(8.0f)));
  std::vector<float> x = Random(128, 2), y = x;
  be.Hadamard(y.data(), 1, 128);
  be.Hadamard(y.data(), 1, 128);  // H·H = I
  for (int i = 0; i < 128; ++i) EXPECT_NEAR(y[i], x[i], 0.02f * (1 + std::fabs(x[i])));
}

TEST(QuantRoundTrip, Fp8AndFp4Grids) {
  std::vector<float> z(64, 0.0f);
  be.Fp8RoundTrip(z.data(), 64, 64);  // zero block stays zero
  for (float v : z) EXPECT_EQ(v, 0.0f);
  std::vector<float> x = Random(64, 3);
  x[7] = 448.0f;  // max magnitude: scale 1, values on the plain e4m3 grid
  std::vector<float> y = x;
  be.Fp8RoundTrip(y.data(), 64, 64);
  EXPECT_EQ(y[7], 448.0f);
  for (int i = 0; i < 64; ++i) EXPECT_EQ(y[i], num::RoundE4m3(x[i]));
  std::vector<float> f = {6.0f, 5.0f, 0.25f, -0.75f};
  f.resize(32, 0.0f);
  be.Fp4RoundTrip(f.data(), 32, 32);
  EXPECT_EQ(f[0], 6.0f);
  EXPECT_EQ(f[1], 4.0f);
  EXPECT_EQ(f[2], 0.0f);
  EXPECT_EQ(f[3], -1.0f);
}

// Naive softmax with a sink: o = sum_j exp(z_j) k_j / (sum_j exp(z_j) + exp(sink)).
TEST(SparseAttention, MatchesNaiveSoftmaxWithSinkAndSkipsMaskedSlots) {
  const int H = 2, D = 64, N = 150;
  std::vector<float> q = Random(H * D, 4, 0.2f), kv = Random(N * D, 5);
  std::vector<const float*> rows;
  for (int j = 0; j < N; ++j) rows.push_back(j % 7 == 3 ? nullptr : kv.data() + j * D);
  const float sink[H] = {0.5f, 3.0f}, scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> out(H * D);
  be.SparseAttention(q.data(), H, D, rows, sink, scale, out.data());
  for (int h = 0; h < H; ++h) {
    std::vector<double> z;
    double mx = -1e30;
    for (int j = 0; j < N; ++j) {
      double d = 0;
      for (int k = 0; k < D; ++k) d += static_cast<double>(q[h * D + k]) * kv[j * D + k];
      z.push_back(d * scale);
      if (rows[j]) mx = std::max(mx, z.back());
    }
    double den = std::exp(sink[h] - mx);
    std::vector<double> o(D, 0.0);
    for (int j = 0; j < N; ++j) {
      if (!rows[j]) continue;
      const double p = std::exp(z[j] - mx);
      den += p;
      for (int k = 0; k < D; ++k) o[k] += p * kv[j * D + k];
    }
    for (int k = 0; k < D; ++k) EXPECT_NEAR(out[h * D + k], o[k] / den, 0.01 * (1 + std::fabs(o[k] / den)));
  }
}

TEST(IndexScores, WeightedReluSumInBf16) {
  const int H = 2, D = 4;
  std::vector<float> q = {1, 0, 0, 0, 0, 1, 0, 0};
  std::vector<float> k0 = {2, -3, 0, 0}, k1 = {-1, 1, 0, 0};
  std::vector<float> w = {0.5f, 2.0f};
  std::vector<const float*> keys = {k0.data(), k1.data()};
  float s[2];
  be.IndexScores(q.data(), w.data(), H, D, keys, s);
  EXPECT_EQ(s[0], 1.0f);  // relu(2)*0.5 + relu(-3)*2
  EXPECT_EQ(s[1], 2.0f);  // relu(-1)*0.5 + relu(1)*2
}

TEST(HyperConnections, SinkhornIsNearlyDoublyStochastic) {
  const int hc = 4, dim = 128, mix = (2 + hc) * hc;
  std::vector<float> x = Random(hc * dim, 6), fn = Random(mix * hc * dim, 7, 0.05f, false), base = Random(mix, 8, 0.25f, false);
  std::vector<float> scale = {1.0f, 1.0f, 1.0f}, y(dim), post(hc), comb(hc * hc);
  be.HcPre(x.data(), 1, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, y.data(), post.data(), comb.data());
  for (int i = 0; i < hc; ++i) {
    float row = 0, col = 0;
    for (int j = 0; j < hc; ++j) { row += comb[i * hc + j]; col += comb[j * hc + i]; }
    EXPECT_NEAR(row, 1.0f, 1e-3f);
    EXPECT_NEAR(col, 1.0f, 1e-5f);  // the last normalisation is over columns
    EXPECT_GT(post[i], 0.0f);
    EXPECT_LT(post[i], 2.0f);
  }
  // hc_post with post = 0 and comb = identity returns the residual.
  std::vector<float> ident(hc * hc, 0.0f), zero(hc, 0.0f), out(hc * dim);
  for (int i = 0; i < hc; ++i) ident[i * hc + i] = 1.0f;
  be.HcPost(y.data(), x.data(), zero.data(), ident.data(), 1, hc, dim, out.data());
  EXPECT_EQ(out, x);
  // Two tokens in one call = one call per token.
  std::vector<float> x2 = Random(2 * hc * dim, 9), y2(2 * dim), p2(2 * hc), c2(2 * hc * hc), f2 = Random(2 * dim, 10);
  be.HcPre(x2.data(), 2, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, y2.data(), p2.data(), c2.data());
  std::vector<float> o2(2 * hc * dim);
  be.HcPost(f2.data(), x2.data(), p2.data(), c2.data(), 2, hc, dim, o2.data());
  for (int t = 0; t < 2; ++t) {
    std::vector<float> y1(dim), p1(hc), c1(hc * hc), o1(hc * dim);
    be.HcPre(x2.data() + t * hc * dim, 1, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, y1.data(),
             p1.data(), c1.data());
    EXPECT_EQ(y1, std::vector<float>(y2.begin() + t * dim, y2.begin() + (t + 1) * dim));
    EXPECT_EQ(c1, std::vector<float>(c2.begin() + t * hc * hc, c2.begin() + (t + 1) * hc * hc));
    be.HcPost(f2.data() + t * dim, x2.data() + t * hc * dim, p1.data(), c1.data(), 1, hc, dim, o1.data());
    EXPECT_EQ(o1, std::vector<float>(o2.begin() + t * hc * dim, o2.begin() + (t + 1) * hc * dim));
  }
}

}  // namespace
}  // namespace flashmem::kernels

namespace flashmem::kernels {
namespace {

TEST(TopK, DescendingWithTiesInAscendingIndexOrder) {
  const std::vector<float> s = {1.0f, 3.0f, 2.0f, 3.0f, 2.0f, -1.0f, 3.0f};
  EXPECT_EQ(TopKIndices(s, 4), (std::vector<int32_t>{1, 3, 6, 2}));
  EXPECT_EQ(TopKIndices(s, 5), (std::vector<int32_t>{1, 3, 6, 2, 4}));
  EXPECT_EQ(TopKIndices(s, 100).size(), s.size());  // k larger than n: every index
  EXPECT_TRUE(TopKIndices(s, 0).empty());
  const std::vector<float> inf = {-INFINITY, 0.0f, -INFINITY};
  EXPECT_EQ(TopKIndices(inf, 3), (std::vector<int32_t>{1, 0, 2}));
  const std::vector<float> zeros = {0.0f, -0.0f, 1.0f, -0.0f};  // -0 == +0: index order
  EXPECT_EQ(TopKIndices(zeros, 4), (std::vector<int32_t>{2, 0, 1, 3}));
  EXPECT_EQ(CpuBackend().TopK(s, 4), TopKIndices(s, 4));  // the backend op is this rule
}

}  // namespace
}  // namespace flashmem::kernels
