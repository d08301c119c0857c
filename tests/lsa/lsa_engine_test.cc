// LSA in the engine on the tiny model with an indexer built by `indexer init`: every page
// resident gives exactly dense decode (bit-identical logits); a small KMAX restricts Level 2 to
// the selected pages; the schedule survives a snapshot/restore on another scheduler with the
// same tokens; the fallback switches to dense; mismatches are rejected clearly.
#include <filesystem>
#include <future>

#include "gtest/gtest.h"
#include "tests/lsa/lsa_test_models.h"
#include "worker/lsa/lsa_session.h"
#include "worker/server/scheduler.h"

namespace flashmem::lsa {
namespace {

using model::BatchItem;

class LsaEngine : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    m_ = testing::LoadModelWithIndexer(testing::SmallVocabTiny(), "lsa_engine").release();
    ASSERT_NE(m_->loaded->model, nullptr);
    ASSERT_TRUE(m_->indexer.has_value());
    loaded_ = m_->loaded.get();
    indexer_ = &*m_->indexer;
  }
  static void TearDownTestSuite() { delete m_; }
  static const model::Transformer& tf() { return *loaded_->model; }

  struct Run {
    std::vector<int32_t> tokens;
    std::vector<std::vector<float>> logits;  // of every decode step
    LsaStats stats;
    model::Residency residency;
  };
  // Greedy decode of n tokens after the prompt (in chunks of 256), LSA when `options` is set.
  static Run Decode(const std::vector<int32_t>& prompt, int n, const LsaOptions* options) {
    auto s = tf().NewSession();
    std::unique_ptr<LsaSession> lsa;
    if (options) {
      lsa = std::make_unique<LsaSession>(*indexer_, tf().args(), *options, LsaMode::kAuto, 0);
      s->residency.measure_agreement = true;
    }
    Run r;
    std::vector<float> logits;
    auto step = [&](std::span<const int32_t> toks, bool decode) {
      BatchItem it{s.get(), toks, &logits, nullptr};
      if (lsa) lsa->BeforeStep(*s, decode);
      ASSERT_TRUE(tf().Forward(std::span<BatchItem>(&it, 1)).ok());
      if (lsa) lsa->AfterStep(*s, decode);
    };
    for (size_t at = 0; at < prompt.size(); at += 256)
      step(std::span<const int32_t>(prompt.data() + at, std::min<size_t>(256, prompt.size() - at)), false);
    for (int i = 0; i < n; ++i) {
      const int32_t t = model::SampleToken(logits, {}, i);
      r.tokens.push_back(t);
      step(std::span<const int32_t>(&r.tokens.back(), 1), true);
      r.logits.push_back(logits);
    }
    if (lsa) r.stats = lsa->stats();
    r.residency = s->residency;
    EXPECT_EQ(s->residency.missing_rows, 0);
    return r;
  }

  static testing::ModelWithIndexer* m_;
  static testing::LoadedModel* loaded_;
  static MemoryIndexer* indexer_;
};
testing::LoadedModel* LsaEngine::loaded_ = nullptr;
testing::ModelWithIndexer* LsaEngine::m_ = nullptr;
MemoryIndexer* LsaEngine::indexer_ = nullptr;

constexpr int64_t kPromptTokens = 1100;  // 275 chunks = 5 pages per CSA layer

TEST_F(LsaEngine, EveryPageResidentIsExactlyDense) {
  const auto prompt = testing::Prompt(kPromptTokens, tf().args().vocab_size, 11);
  LsaOptions o;
  o.interval = 8;
  o.kmax = 1000;
  o.tail_chunks = 16;
  const Run dense = Decode(prompt, 30, nullptr);
  const Run lsa = Decode(prompt, 30, &o);
  EXPECT_GE(lsa.stats.sets_applied, 2u);
  EXPECT_FALSE(lsa.residency.dense()) << "the sparse path must have run";
  EXPECT_EQ(lsa.stats.selected_pages, lsa.stats.covered_pages);
  EXPECT_EQ(lsa.tokens, dense.tokens);
  ASSERT_EQ(lsa.logits.size(), dense.logits.size());
  for (size_t i = 0; i < dense.logits.size(); ++i)
    ASSERT_EQ(lsa.logits[i], dense.logits[i]) << "decode step " << i << " is not bit-identical";
  EXPECT_EQ(lsa.residency.agreement_sum, static_cast<double>(lsa.residency.agreement_count));
}

TEST_F(LsaEngine, SmallKmaxRestrictsLevelTwo) {
  const auto prompt = testing::Prompt(kPromptTokens, tf().args().vocab_size, 11);
  LsaOptions o;
  o.interval = 8;
  o.kmax = 2;
  o.tail_chunks = 16;
  const Run lsa = Decode(prompt, 30, &o);
  EXPECT_GE(lsa.stats.refreshes, 4u);
  EXPECT_GE(lsa.stats.sets_applied, 3u);
  EXPECT_EQ(lsa.stats.selected_pages, 2);
  EXPECT_EQ(lsa.stats.covered_pages, 5);
  int64_t visible = 0;
  for (int64_t p = 0; p < 5; ++p) visible += lsa.residency.PageVisible(p);
  EXPECT_EQ(visible, 2);
  ASSERT_GT(lsa.residency.agreement_count, 0);
  const double agree = lsa.residency.agreement_sum / lsa.residency.agreement_count;
  EXPECT_GT(agree, 0.0);
  EXPECT_LT(agree, 1.0) << "two of five pages cannot hold the full top-k every time";
}

TEST_F(LsaEngine, FallbackSwitchesToDense) {
  const auto prompt = testing::Prompt(kPromptTokens, tf().args().vocab_size, 11);
  LsaOptions o;
  o.interval = 8;
  o.kmax = 2;
  o.tail_chunks = 16;
  o.fallback_limit = 1e-6;  // any above-threshold chunk triggers it
  const Run lsa = Decode(prompt, 20, &o);
  EXPECT_TRUE(lsa.stats.fallback);
  EXPECT_TRUE(lsa.residency.dense());
  const Run dense = Decode(prompt, 20, nullptr);
  EXPECT_EQ(lsa.tokens, dense.tokens);
}

TEST_F(LsaEngine, ScheduleSurvivesSnapshotAndRestoreWithTheSameTokens) {
  server::SchedulerOptions so;
  so.indexer = indexer_;
  so.lsa.interval = 8;
  so.lsa.kmax = 2;
  so.lsa.tail_chunks = 16;
  const auto prompt = testing::Prompt(kPromptTokens, tf().args().vocab_size, 5);
  auto generate = [](server::Scheduler& sch, uint64_t id, int n) {
    std::promise<std::vector<int32_t>> done;
    std::vector<int32_t> toks;
    server::GenerateParams p;
    p.max_tokens = n;
    EXPECT_TRUE(sch.Generate(id, p, [&](int32_t t, bool last, const std::string& why) {
      if (t >= 0) toks.push_back(t);
      if (last) { EXPECT_TRUE(t >= 0) << why; done.set_value(toks); }
    }).ok());
    return done.get_future().get();
  };
  std::vector<int32_t> straight;
  {
    server::Scheduler sch(tf(), so);
    auto id = sch.CreateSession();
    ASSERT_TRUE(id.ok());
    ASSERT_TRUE(sch.Append(*id, prompt).ok());
    straight = generate(sch, *id, 40);
    auto st = sch.LsaStats(*id);
    ASSERT_TRUE(st.ok());
    EXPECT_TRUE(st->enabled);
    EXPECT_GE(st->lsa.sets_applied, 3u);
  }
  std::string snap;
  std::vector<int32_t> resumed;
  {
    server::Scheduler a(tf(), so);
    auto id = a.CreateSession();
    ASSERT_TRUE(id.ok());
    ASSERT_TRUE(a.Append(*id, prompt).ok());
    resumed = generate(a, *id, 19);  // stops mid-interval, a set pending
    auto s = a.Snapshot(*id);
    ASSERT_TRUE(s.ok()) << s.status();
    snap = *s;
  }
  server::Scheduler b(tf(), so);
  auto id = b.Restore(snap);
  ASSERT_TRUE(id.ok()) << id.status();
  auto more = generate(b, *id, 21);
  resumed.insert(resumed.end(), more.begin(), more.end());
  EXPECT_EQ(resumed, straight);
  // A worker without an indexer refuses the session clearly.
  server::Scheduler plain(tf(), {});
  auto bad = plain.Restore(snap);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(LsaEngine, MismatchesAreRejected) {
  server::SchedulerOptions so;
  so.indexer = indexer_;
  server::Scheduler sch(tf(), so);
  server::SessionOptions bad;
  bad.lsa_overrides = "kmax=0";
  EXPECT_EQ(sch.CreateSession(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad.lsa_overrides = "target_layers=7";
  EXPECT_EQ(sch.CreateSession(bad).status().code(), absl::StatusCode::kInvalidArgument);
  // An indexer for a model with more CSA layers than this one.
  LsaOptions o;
  auto args = tf().args();
  args.dim = 2 * args.dim;
  EXPECT_EQ(LsaSession::CheckCompatible(*indexer_, args, o).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace flashmem::lsa
