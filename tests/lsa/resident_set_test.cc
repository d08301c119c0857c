// ResidentSet rules on hand-made scores, LSA option parsing, and hostile indexer checkpoints.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include <gtest/gtest.h>

#include "kernels/ops.h"
#include "worker/lsa/memory_indexer.h"
#include "worker/lsa/resident_set.h"
#include "worker/model/safetensors.h"

namespace flashmem::lsa {
namespace {

TEST(ResidentSet, PagesByDensityTailAndCanonicalTies) {
  LsaOptions o;
  o.tail_chunks = 64;  // the last page
  o.kmax = 3;
  const int64_t n = 64 * 5 + 10;  // 6 pages, the last partial
  std::vector<float> ens(n, 0.1f);
  for (int j = 0; j < 5; ++j) ens[64 * 1 + j] = 0.9f;  // page 1: 5 hits
  for (int j = 0; j < 2; ++j) ens[64 * 3 + j] = 0.9f;  // page 3: 2 hits
  for (int j = 0; j < 2; ++j) ens[64 * 2 + j] = 0.9f;  // page 2: 2 hits (ties with 3; lower index wins)
  const PageSelection sel = SelectPages(ens.data(), n, o);
  ASSERT_EQ(sel.page_score.size(), 6u);
  EXPECT_EQ(sel.page_score[1], 5.0f);
  // tail: floor((n - 64) / 64) = page 4 onwards is forced.
  EXPECT_TRUE(std::isinf(sel.page_score[4]));
  EXPECT_TRUE(std::isinf(sel.page_score[5]));
  EXPECT_EQ(sel.k, 3);
  EXPECT_EQ(sel.pages, (std::vector<int64_t>{1, 4, 5}));
  o.kmax = 4;
  EXPECT_EQ(SelectPages(ens.data(), n, o).pages, (std::vector<int64_t>{1, 2, 4, 5}));
  // Exactly K pages even when fewer have hits; every page when KMAX covers them all.
  o.kmax = 100;
  EXPECT_EQ(SelectPages(ens.data(), n, o).pages.size(), 6u);
  const auto keep = ExpandPages(SelectPages(ens.data(), n, o), n);
  for (uint8_t b : keep) EXPECT_EQ(b, 1);
}

TEST(ResidentSet, ThresholdIsStrict) {
  LsaOptions o;
  o.tail_chunks = 0;
  std::vector<float> ens = {0.5f, 0.50001f, 0.2f};
  const auto keep = ChunkResidentSet(ens.data(), 3, o);
  EXPECT_EQ(keep, (std::vector<uint8_t>{0, 1, 0}));
  EXPECT_EQ(Sigmoid(1e-28f), 0.5f);  // a tiny positive logit is not selected
}

TEST(ResidentSet, KmaxRatioUsesTheReleaseRounding) {
  LsaOptions o;
  o.kmax_ratio = 0.15;
  o.target_context_tokens = 32768;  // 128 pages -> 19.2 -> 20
  EXPECT_EQ(ResolveKmax(o), 20);
  o.kmax_ratio = 0.5;  // 64.0 + 0.9999 -> 64, not 65
  EXPECT_EQ(ResolveKmax(o), 64);
}

TEST(LsaOptions, ParseAndReject) {
  auto o = ParseLsaOptions("kmax=8, tail_chunks=256,ensemble=mean,lsa.interval=32,target_layers=1:2");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->kmax, 8);
  EXPECT_EQ(o->tail_chunks, 256);
  EXPECT_EQ(o->ensemble, Ensemble::kMean);
  EXPECT_EQ(o->interval, 32);
  EXPECT_EQ(o->target_layers, (std::vector<int>{1, 2}));
  for (const char* bad : {"kmax=0", "kmax=x", "threshold=1.5", "ensemble=median", "bogus=1", "interval=-3"}) {
    auto r = ParseLsaOptions(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_NE(ParseLsaOptions("kmax=0").status().message().find("lsa.kmax"), std::string::npos);
}

// ---- hostile indexer checkpoints -------------------------------------------------------------

model::TensorToWrite F32(const std::string& name, std::vector<int64_t> shape, float fill = 0.01f) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> v(n, fill);
  model::TensorToWrite t{name, model::DType::kF32, std::move(shape), {}};
  t.bytes.resize(n * 4);
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

std::vector<model::TensorToWrite> GoodLayer(int id, int64_t hidden = 64, int64_t R = 32, int64_t H = 2) {
  const std::string p = "retrievers.l" + std::to_string(id) + ".";
  return {F32(p + "wq_a.weight", {R, hidden}), F32(p + "q_norm_weight", {R}),
          F32(p + "wq_b.weight", {H * 128, R}), F32(p + "weights_proj.weight", {H, hidden})};
}

absl::Status LoadTensors(std::vector<model::TensorToWrite> t, std::map<std::string, std::string> meta = {}) {
  const std::string path = (std::filesystem::temp_directory_path() / "fm_hostile_indexer.safetensors").string();
  if (auto st = model::WriteSafetensors(path, t, meta); !st.ok()) return st;
  auto r = MemoryIndexer::Load(path, kernels::CpuBackend());
  std::filesystem::remove(path);
  return r.status();
}

TEST(IndexerCheckpoint, GoodOneLoads) {
  auto t = GoodLayer(3);
  auto u = GoodLayer(5);
  t.insert(t.end(), u.begin(), u.end());
  EXPECT_TRUE(LoadTensors(t, {{"layers", "3,5"}}).ok());
}

TEST(IndexerCheckpoint, HostileOnesAreRejectedByName) {
  struct Case { std::vector<model::TensorToWrite> t; std::map<std::string, std::string> meta; const char* needle; };
  std::vector<Case> cases;
  {  // missing tensor
    auto t = GoodLayer(1);
    t.pop_back();
    cases.push_back({t, {}, "weights_proj"});
  }
  {  // wrong shape
    auto t = GoodLayer(1);
    t[1] = F32("retrievers.l1.q_norm_weight", {31});
    cases.push_back({t, {}, "q_norm_weight"});
  }
  {  // heads not a multiple of 128
    auto t = GoodLayer(1);
    t[2] = F32("retrievers.l1.wq_b.weight", {100, 32});
    cases.push_back({t, {}, "wq_b"});
  }
  {  // NaN weight
    auto t = GoodLayer(1);
    t[0] = F32("retrievers.l1.wq_a.weight", {32, 64}, std::numeric_limits<float>::quiet_NaN());
    cases.push_back({t, {}, "not finite"});
  }
  {  // unknown tensor
    auto t = GoodLayer(1);
    t.push_back(F32("retrievers.l1.freqs_cis", {4, 32}));
    cases.push_back({t, {}, "freqs_cis"});
  }
  {  // foreign key
    auto t = GoodLayer(1);
    t.push_back(F32("model.embed.weight", {4, 4}));
    cases.push_back({t, {}, "model.embed.weight"});
  }
  {  // layers disagree with shapes of another layer
    auto t = GoodLayer(1);
    auto u = GoodLayer(2, 64, 16);
    t.insert(t.end(), u.begin(), u.end());
    cases.push_back({t, {}, "retrievers.l2"});
  }
  cases.push_back({GoodLayer(1), {{"layers", "1,2"}}, "metadata layers"});
  cases.push_back({GoodLayer(1), {{"rope_theta", "-5"}}, "rope_theta"});
  cases.push_back({{}, {}, "no retrievers"});
  for (const Case& c : cases) {
    const absl::Status st = LoadTensors(c.t, c.meta);
    EXPECT_FALSE(st.ok()) << c.needle;
    EXPECT_NE(std::string(st.message()).find(c.needle), std::string::npos) << st.message();
  }
}

}  // namespace
}  // namespace flashmem::lsa
