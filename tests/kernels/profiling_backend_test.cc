// ProfilingBackend forwards every op unchanged and counts what it forwarded.
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "kernels/profiling_backend.h"

namespace flashmem::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = num::RoundBf16(d(g));
  return v;
}

TEST(ProfilingBackend, ForwardsResultsUnchangedAndCountsCallsAndItems) {
  ProfilingBackend prof(CpuBackend());
  WeightMatrix w;
  w.rows = 8;
  w.cols = 16;
  w.values = Random(w.rows * w.cols, 1);
  const auto x = Random(3 * 16, 2);
  std::vector<float> y_ref(3 * 8), y(3 * 8, -1.0f);
  CpuBackend().Linear(w, x.data(), 3, y_ref.data(), Rounding::kBf16);
  prof.Linear(w, x.data(), 3, y.data(), Rounding::kBf16);
  prof.Linear(w, x.data(), 1, y.data(), Rounding::kBf16);
  EXPECT_EQ(y[8], y_ref[8]);  // row 1 is untouched by the second call: it came from the first
  EXPECT_EQ(y[0], y_ref[0]);

  const auto q = Random(2 * 16, 3), row = Random(16, 4), sink = Random(2, 5);
  const float* rows[] = {row.data(), nullptr, row.data()};
  std::vector<float> out_ref(2 * 16), out(2 * 16);
  CpuBackend().SparseAttention(q.data(), 2, 16, rows, sink.data(), 0.25f, out_ref.data());
  prof.SparseAttention(q.data(), 2, 16, rows, sink.data(), 0.25f, out.data());
  EXPECT_EQ(out, out_ref);

  const OpStats lin = prof.Stats(OpKind::kLinear);
  EXPECT_EQ(lin.calls, 2u);
  EXPECT_EQ(lin.items, 4u);
  EXPECT_GE(lin.seconds, 0.0);
  EXPECT_EQ(prof.Stats(OpKind::kSparseAttention).items, 3u);
  EXPECT_EQ(prof.Stats(OpKind::kRmsNorm).calls, 0u);
  const std::string report = prof.Report();
  EXPECT_NE(report.find("Linear"), std::string::npos);
  EXPECT_NE(report.find("SparseAttention"), std::string::npos);
  EXPECT_EQ(report.find("RmsNorm"), std::string::npos) << "ops that never ran are left out";

  // Rows attended together: one call, their slots summed; each row's result as if alone.
  prof.Reset();
  const auto q2 = Random(2 * 16, 6);
  const KvSlot a[] = {{nullptr, nullptr, row.data()}, {}}, b[] = {{nullptr, nullptr, row.data()}};
  std::vector<float> o1(2 * 16), o2(2 * 16), r1(2 * 16), r2(2 * 16);
  const AttentionRow batch[] = {{q.data(), a, o1.data()}, {q2.data(), b, o2.data()}};
  prof.SparseAttentionRows(batch, 2, 16, 0, sink.data(), 0.25f);
  CpuBackend().SparseAttentionRecords(q.data(), 2, 16, 0, a, sink.data(), 0.25f, r1.data());
  CpuBackend().SparseAttentionRecords(q2.data(), 2, 16, 0, b, sink.data(), 0.25f, r2.data());
  EXPECT_EQ(o1, r1);
  EXPECT_EQ(o2, r2);
  EXPECT_EQ(prof.Stats(OpKind::kSparseAttention).calls, 1u);
  EXPECT_EQ(prof.Stats(OpKind::kSparseAttention).items, 3u);
  // Index scores and top-k of several rows: one call each, items summed; results as if alone.
  prof.Reset();
  const auto keys = Random(3 * 16, 7), hw = Random(2, 8);
  const KeyRun k1[] = {{keys.data(), 2}}, k2[] = {{keys.data() + 32, 1}};
  std::vector<float> s1(2), s2(1), t1(2), t2(1);
  const IndexScoreRow srows[] = {{q.data(), hw.data(), k1, s1.data()}, {q2.data(), hw.data(), k2, s2.data()}};
  prof.IndexScoresBatch(srows, 2, 16);
  const float* kr1[] = {keys.data(), keys.data() + 16};
  const float* kr2[] = {keys.data() + 32};
  CpuBackend().IndexScores(q.data(), hw.data(), 2, 16, kr1, t1.data());
  CpuBackend().IndexScores(q2.data(), hw.data(), 2, 16, kr2, t2.data());
  EXPECT_EQ(s1, t1);
  EXPECT_EQ(s2, t2);
  EXPECT_EQ(prof.Stats(OpKind::kIndexScores).calls, 1u);
  EXPECT_EQ(prof.Stats(OpKind::kIndexScores).items, 3u);
  const std::vector<float> sa = {0.5f, 2.0f, -1.0f}, sb = {3.0f, 3.0f};
  const std::span<const float> lists[] = {sa, sb};
  const auto top = prof.TopKBatch(lists, 2);
  ASSERT_EQ(top.size(), 2u);
  EXPECT_EQ(top[0], (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(top[1], (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(prof.Stats(OpKind::kTopK).calls, 1u);
  EXPECT_EQ(prof.Stats(OpKind::kTopK).items, 5u);
  // Scores placed in lists then top-k (the default IndexTopKBatch): row 1's run sits at 3 of a list
  // of 5, the other positions -inf; row 0 asks for its list.
  prof.Reset();
  const int64_t at1[] = {0}, at2[] = {3};
  std::vector<float> list1(2, -7.0f);
  const IndexSelectRow sel[] = {{q.data(), hw.data(), k1, at1, 2, list1.data()}, {q2.data(), hw.data(), k2, at2, 5, nullptr}};
  const auto picked = prof.IndexTopKBatch(sel, 2, 16, 2);
  EXPECT_EQ(list1, t1);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> full2 = {-inf, -inf, -inf, t2[0], -inf};
  ASSERT_EQ(picked.size(), 2u);
  EXPECT_EQ(picked[0], TopKIndices(t1, 2));
  EXPECT_EQ(picked[1], TopKIndices(full2, 2));
  EXPECT_EQ(picked[1][0], 3);
  EXPECT_EQ(prof.Stats(OpKind::kIndexTopK).calls, 1u);
  EXPECT_EQ(prof.Stats(OpKind::kIndexTopK).items, 3u);
  // A run past the end of its list is not written outside it (the CPU cannot fail; a device does).
  const int64_t past[] = {4};
  std::vector<float> list2(5, -7.0f);
  const IndexSelectRow outside[] = {{q.data(), hw.data(), k1, past, 5, list2.data()}};
  const auto kept = prof.IndexTopKBatch(outside, 2, 16, 2);
  ASSERT_EQ(kept.size(), 1u);
  EXPECT_EQ(list2, std::vector<float>(5, -inf));
  prof.Reset();
  EXPECT_EQ(prof.Stats(OpKind::kLinear).calls, 0u);
  EXPECT_STREQ(prof.name(), CpuBackend().name());
  EXPECT_EQ(prof.ReserveStats().records.slots, 0);  // the CPU holds no device copies
  EXPECT_EQ(prof.ReserveStats().keys.uploads, 0);
}

}  // namespace
}  // namespace flashmem::kernels
