// The worker's decode loop: many sessions batched per step with chunked prefill produce exactly
// the tokens of each session run alone; snapshots resume generation without re-prefill.
#include "worker/server/scheduler.h"

#include <filesystem>
#include <future>

#include "gtest/gtest.h"
#include "tests/model/test_models.h"

namespace flashmem::server {
namespace {

using model::BatchItem;
using model::Transformer;

using testing::Prompt;

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    loaded_ = testing::LoadRandomModel(testing::SmallVocabTiny(3), "sched").release();
    tf_ = loaded_->model.get();
    ASSERT_NE(tf_, nullptr);
  }
  static void TearDownTestSuite() { delete loaded_; }
  // The session alone: the prompt in chunks of `chunk`, then one token per forward.
  static std::vector<int32_t> Alone(const std::vector<int32_t>& prompt, int n, const model::SamplingOptions& o,
                                    int64_t chunk = 128) {
    auto s = tf_->NewSession();
    std::vector<float> logits;
    for (size_t at = 0; at < prompt.size(); at += chunk) {
      const size_t len = std::min<size_t>(chunk, prompt.size() - at);
      BatchItem it{s.get(), std::span<const int32_t>(prompt.data() + at, len), &logits, nullptr};
      EXPECT_TRUE(tf_->Forward(std::span<BatchItem>(&it, 1)).ok());
    }
    std::vector<int32_t> out;
    for (int i = 0; i < n; ++i) {
      const int32_t t = model::SampleToken(logits, o, i);
      out.push_back(t);
      BatchItem next{s.get(), std::span<const int32_t>(&out.back(), 1), &logits, nullptr};
      EXPECT_TRUE(tf_->Forward(std::span<BatchItem>(&next, 1)).ok());
    }
    return out;
  }
  // Starts a generation and returns a future of its tokens.
  static std::future<std::vector<int32_t>> Start(Scheduler& sch, uint64_t id, const GenerateParams& p) {
    auto promise = std::make_shared<std::promise<std::vector<int32_t>>>();
    auto tokens = std::make_shared<std::vector<int32_t>>();
    auto f = promise->get_future();
    EXPECT_TRUE(sch.Generate(id, p, [promise, tokens](int32_t t, bool done, const std::string&) {
      if (t >= 0) tokens->push_back(t);
      if (done) promise->set_value(*tokens);
    }).ok());
    return f;
  }
  static testing::LoadedModel* loaded_;
  static Transformer* tf_;
};
testing::LoadedModel* SchedulerTest::loaded_ = nullptr;
Transformer* SchedulerTest::tf_ = nullptr;

TEST_F(SchedulerTest, BatchedSessionsWithChunkedPrefillMatchEachSessionAlone) {
  const int64_t V = tf_->args().vocab_size;
  const std::vector<std::vector<int32_t>> prompts = {Prompt(300, V, 1), Prompt(50, V, 2), Prompt(520, V, 3), Prompt(1, V, 4)};
  const std::vector<model::SamplingOptions> sampling = {{}, {0.9f, 0.9f, 11}, {}, {1.2f, 1.0f, 5}};
  Scheduler sch(*tf_, SchedulerOptions{.max_sessions = 8, .prefill_chunk = 128, .step_token_budget = 200});
  std::vector<std::future<std::vector<int32_t>>> futures;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto id = sch.CreateSession();
    ASSERT_TRUE(id.ok());
    ASSERT_TRUE(sch.Append(*id, prompts[i]).ok());
    GenerateParams p;
    p.max_tokens = 12;
    p.sampling = sampling[i];
    futures.push_back(Start(sch, *id, p));
  }
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(futures[i].get(), Alone(prompts[i], 12, sampling[i])) << "session " << i;
  const SchedulerStats st = sch.stats();
  EXPECT_GT(st.max_batch_rows, 4u);  // several sessions shared forward passes
  EXPECT_EQ(st.prefill_tokens, 871u);
  EXPECT_GE(st.decode_tokens, 4u * 11u);  // the last sampled token is fed right after (KV holds it)
  EXPECT_LE(st.decode_tokens, 4u * 12u);
  std::printf("steps %llu, max rows per step %llu\n", (unsigned long long)st.steps, (unsigned long long)st.max_batch_rows);
}

TEST_F(SchedulerTest, SnapshotResumesGenerationWithoutPrefill) {
  const auto prompt = Prompt(200, tf_->args().vocab_size, 9);
  const model::SamplingOptions o{0.8f, 0.95f, 77};
  const auto want = Alone(prompt, 10, o, 256);
  GenerateParams p;
  p.max_tokens = 4;
  p.sampling = o;
  std::string snap;
  {
    Scheduler a(*tf_);  // the worker that dies
    auto id = a.CreateSession();
    ASSERT_TRUE(a.Append(*id, prompt).ok());
    EXPECT_EQ(Start(a, *id, p).get(), std::vector<int32_t>(want.begin(), want.begin() + 4));
    auto s = a.Snapshot(*id);
    ASSERT_TRUE(s.ok()) << s.status();
    snap = *s;
  }
  Scheduler b(*tf_);  // the worker that takes over
  auto id = b.Restore(snap);
  ASSERT_TRUE(id.ok()) << id.status();
  p.max_tokens = 6;
  EXPECT_EQ(Start(b, *id, p).get(), std::vector<int32_t>(want.begin() + 4, want.end()));
  EXPECT_EQ(b.stats().prefill_tokens, 0u);  // no re-prefill
  EXPECT_EQ(b.Restore("short").status().code(), absl::StatusCode::kInvalidArgument);
  std::string broken = snap;
  broken[snap.size() - 100] ^= 1;
  EXPECT_FALSE(b.Restore(broken).ok());
}

TEST_F(SchedulerTest, ErrorsAreClear) {
  Scheduler sch(*tf_, SchedulerOptions{.max_sessions = 2, .prefill_chunk = 64, .step_token_budget = 64, .max_context = 1000});
  EXPECT_EQ(sch.Append(99, {1}).code(), absl::StatusCode::kNotFound);
  auto id = sch.CreateSession();
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(sch.Generate(*id, GenerateParams{}, nullptr).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(sch.Append(*id, {-1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sch.Append(*id, std::vector<int32_t>(1001, 1)).code(), absl::StatusCode::kResourceExhausted);
  GenerateParams bad;
  bad.max_tokens = 0;
  ASSERT_TRUE(sch.Append(*id, {1, 2, 3}).ok());
  EXPECT_EQ(sch.Generate(*id, bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
  bad.max_tokens = 4;
  bad.sampling.top_p = 2.0f;
  EXPECT_EQ(sch.Generate(*id, bad, nullptr).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(sch.CreateSession().ok());
  EXPECT_EQ(sch.CreateSession().status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(sch.CloseSession(*id).ok());
  EXPECT_EQ(sch.CloseSession(*id).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace flashmem::server
