// Engine properties on random checkpoints: prefill vs one-at-a-time, batched sessions vs
// separate runs (and their attention in one call), chunked prefill, determinism, stable activations, the SwiGLU clamp.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <sstream>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "kernels/profiling_backend.h"
#include "tests/model/golden_util.h"
#include "tests/model/test_models.h"
#include "worker/model/moe.h"
#include "worker/model/state_codec.h"
#include "worker/model/transformer.h"

namespace flashmem::testing {
namespace {

using model::BatchItem;
using model::Transformer;


class Engine : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    loaded_ = LoadRandomModel(SmallVocabTiny(), "engine").release();
    tf_ = loaded_->model.get();
    ASSERT_NE(tf_, nullptr);
  }
  static void TearDownTestSuite() { delete loaded_; }
  // Logits after feeding `chunks` of `tokens` (sizes in `chunks`) to a fresh session.
  static std::vector<float> Feed(const std::vector<int32_t>& tokens, const std::vector<int64_t>& chunks) {
    auto s = tf_->NewSession();
    std::vector<float> logits;
    int64_t at = 0;
    for (int64_t c : chunks) {
      BatchItem it{s.get(), std::span<const int32_t>(tokens.data() + at, c), &logits, nullptr};
      EXPECT_TRUE(tf_->Forward(std::span<BatchItem>(&it, 1)).ok());
      at += c;
    }
    EXPECT_EQ(s->position, static_cast<int64_t>(tokens.size()));
    return logits;
  }
  static LoadedModel* loaded_;
  static Transformer* tf_;
};
LoadedModel* Engine::loaded_ = nullptr;
Transformer* Engine::tf_ = nullptr;

// The hand-off band of the golden manifest (own prefill vs own decode, max |d logit|).
constexpr double kHandOffBand = 0.17;

TEST_F(Engine, PrefillEqualsOneTokenAtATime) {
  const auto p = Prompt(300, tf_->args().vocab_size, 1);  // crosses the window, CSA and HCA blocks
  const auto prefill = Feed(p, {300});
  const auto one_by_one = Feed(p, std::vector<int64_t>(300, 1));
  const auto split = Feed(p, {131, 1, 1, 167});  // prefill then chunks at arbitrary positions
  const double d1 = MaxAbsDiff(prefill.data(), one_by_one.data(), static_cast<int64_t>(prefill.size()));
  const double d2 = MaxAbsDiff(prefill.data(), split.data(), static_cast<int64_t>(prefill.size()));
  std::printf("prefill vs one-at-a-time: max|d| %.3g; vs split prefill: %.3g\n", d1, d2);
  EXPECT_LE(d1, kHandOffBand);
  EXPECT_LE(d2, kHandOffBand);
  for (float v : prefill) ASSERT_TRUE(std::isfinite(v));
}

TEST_F(Engine, BatchedSessionsEqualSeparateRuns) {
  const int64_t V = tf_->args().vocab_size;
  const auto a = Prompt(150, V, 2), b = Prompt(40, V, 3), c = Prompt(1, V, 4);
  // Separate runs.
  const auto la = Feed(a, {150, }), lb = Feed(b, {40}), lc = Feed(c, {1});
  // The same prompts in one forward pass, then a batched decode step of all three.
  auto sa = tf_->NewSession(), sb = tf_->NewSession(), sc = tf_->NewSession();
  std::vector<float> oa, ob, oc;
  std::vector<BatchItem> batch = {{sa.get(), a, &oa, nullptr}, {sb.get(), b, &ob, nullptr}, {sc.get(), c, &oc, nullptr}};
  ASSERT_TRUE(tf_->Forward(batch).ok());
  EXPECT_EQ(oa, la);
  EXPECT_EQ(ob, lb);
  EXPECT_EQ(oc, lc);
  const int32_t na = 5, nb = 6, nc = 7;
  std::vector<BatchItem> step = {{sa.get(), std::span<const int32_t>(&na, 1), &oa, nullptr},
                                 {sb.get(), std::span<const int32_t>(&nb, 1), &ob, nullptr},
                                 {sc.get(), std::span<const int32_t>(&nc, 1), &oc, nullptr}};
  ASSERT_TRUE(tf_->Forward(step).ok());
  auto a2 = a; a2.push_back(na);
  auto b2 = b; b2.push_back(nb);
  EXPECT_EQ(oa, Feed(a2, {150, 1}));
  EXPECT_EQ(ob, Feed(b2, {40, 1}));
  EXPECT_EQ(sa->position, 151);
  EXPECT_EQ(sc->position, 2);
}

// A decode step's rows of different sessions are attended in one backend call per layer (a
// device runs them in one launch); rows of one session (a prompt) each get their own, made
// before the next row writes KV the pending row attends.
TEST_F(Engine, DecodeRowsOfDifferentSessionsAttendTogether) {
  kernels::ProfilingBackend prof(TestBackend());
  auto tf = Transformer::Load(loaded_->dir, prof);
  ASSERT_TRUE(tf.ok()) << tf.status();
  const int64_t V = (*tf)->args().vocab_size, L = (*tf)->args().n_layers;
  const auto a = Prompt(20, V, 5), b = Prompt(9, V, 6);
  auto sa = (*tf)->NewSession(), sb = (*tf)->NewSession();
  std::vector<float> oa, ob;
  std::vector<BatchItem> prompts = {{sa.get(), a, &oa, nullptr}, {sb.get(), b, &ob, nullptr}};
  ASSERT_TRUE((*tf)->Forward(prompts).ok());
  // Per layer: a's rows one call each, but a's last row and b's first share one; then b's.
  EXPECT_EQ(prof.Stats(kernels::OpKind::kSparseAttention).calls, static_cast<uint64_t>(L * (20 + 9 - 1)));
  prof.Reset();
  const int32_t na = 3, nb = 4;
  std::vector<BatchItem> step = {{sa.get(), std::span<const int32_t>(&na, 1), &oa, nullptr},
                                 {sb.get(), std::span<const int32_t>(&nb, 1), &ob, nullptr}};
  ASSERT_TRUE((*tf)->Forward(step).ok());
  EXPECT_EQ(prof.Stats(kernels::OpKind::kSparseAttention).calls, static_cast<uint64_t>(L));
  EXPECT_EQ(prof.Stats(kernels::OpKind::kHcHead).calls, 1u);  // both rows through the head at once
  EXPECT_EQ(prof.Stats(kernels::OpKind::kHcHead).items, 2u);
  auto a2 = a;
  a2.push_back(na);
  EXPECT_EQ(oa, Feed(a2, {20, 1}));  // the same logits as the session alone
}

// An item may ask for the greedy pick of its last token instead of (or with) its logits. Asked for
// alone, it goes through the head on its own (Backend::LinearArgmax: a device sends back the
// pick, not the vocabulary); the pick is ArgmaxIndex of the logits the same session would get.
TEST_F(Engine, GreedyPicksEqualTheArgmaxOfTheLogits) {
  kernels::ProfilingBackend prof(TestBackend());
  auto tf = Transformer::Load(loaded_->dir, prof);
  ASSERT_TRUE(tf.ok()) << tf.status();
  const int64_t V = (*tf)->args().vocab_size;
  const auto a = Prompt(7, V, 31), b = Prompt(5, V, 32), c = Prompt(6, V, 33);
  auto sa = (*tf)->NewSession(), sb = (*tf)->NewSession(), sc = (*tf)->NewSession(), twin = (*tf)->NewSession();
  std::vector<float> oa, ob, oc, otwin;
  std::vector<BatchItem> prompts = {{sa.get(), a, &oa, nullptr}, {sb.get(), b, &ob, nullptr},
                                    {sc.get(), c, &oc, nullptr}, {twin.get(), b, &otwin, nullptr}};
  ASSERT_TRUE((*tf)->Forward(prompts).ok());
  prof.Reset();
  const int32_t na = 3, nb = 4, nc = 5;
  int32_t pick_a = -1, pick_b = -1;
  oa.clear();
  std::vector<BatchItem> step = {{sa.get(), std::span<const int32_t>(&na, 1), &oa, nullptr, &pick_a},
                                 {sb.get(), std::span<const int32_t>(&nb, 1), nullptr, nullptr, &pick_b},
                                 {sc.get(), std::span<const int32_t>(&nc, 1), &oc, nullptr}};
  ASSERT_TRUE((*tf)->Forward(step).ok());
  EXPECT_EQ(prof.Stats(kernels::OpKind::kHcHead).calls, 2u);  // the items with logits, then the pick alone
  EXPECT_EQ(prof.Stats(kernels::OpKind::kHcHead).items, 3u);
  ASSERT_EQ(static_cast<int64_t>(oa.size()), V);
  EXPECT_EQ(pick_a, kernels::ArgmaxIndex(oa));
  BatchItem alone{twin.get(), std::span<const int32_t>(&nb, 1), &otwin, nullptr};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&alone, 1)).ok());
  EXPECT_EQ(pick_b, kernels::ArgmaxIndex(otwin));
  EXPECT_EQ(sb->position, twin->position);
  // A step of greedy picks only (the head reads every row in place): each the argmax of the
  // logits a third session with the same history gets.
  auto third = (*tf)->NewSession();
  std::vector<float> othird;
  BatchItem third_prompt{third.get(), b, &othird, nullptr};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&third_prompt, 1)).ok());
  BatchItem third_step{third.get(), std::span<const int32_t>(&nb, 1), &othird, nullptr};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&third_step, 1)).ok());
  const int32_t t2 = 9, t3 = 11;  // the twin takes another token: rows told apart
  int32_t next_twin = -1, next_b = -1;
  std::vector<BatchItem> picks_only = {{twin.get(), std::span<const int32_t>(&t3, 1), nullptr, nullptr, &next_twin},
                                       {sb.get(), std::span<const int32_t>(&t2, 1), nullptr, nullptr, &next_b}};
  ASSERT_TRUE((*tf)->Forward(picks_only).ok());
  BatchItem third_next{third.get(), std::span<const int32_t>(&t2, 1), &othird, nullptr};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&third_next, 1)).ok());
  EXPECT_EQ(next_b, kernels::ArgmaxIndex(othird));
  EXPECT_GE(next_twin, 0);
  EXPECT_LT(next_twin, V);
  // The shared rule: first of equal maxima, NaN skipped.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(kernels::ArgmaxIndex(std::vector<float>{nan, 1.0f, 3.0f, 3.0f}), 2);
  EXPECT_EQ(kernels::ArgmaxIndex(std::vector<float>{nan, nan}), 0);
  EXPECT_EQ(kernels::ArgmaxIndex(std::vector<float>{-5.0f, -1.0f, nan, -1.0f}), 1);
}

// Blocks that rows of different sessions complete in one step are finished together (one call
// per op for the step, not one per session), and every session gets what it gets alone.
TEST_F(Engine, BlocksCompletedInOneStepAreFinishedTogether) {
  kernels::ProfilingBackend prof(TestBackend());
  auto tf = Transformer::Load(loaded_->dir, prof);
  ASSERT_TRUE(tf.ok()) << tf.status();
  const auto& args = (*tf)->args();
  int64_t csa = 0;
  for (int64_t l = 0; l < args.n_layers; ++l) csa += args.ratio(l) == 4;
  ASSERT_GT(csa, 0) << "the test model needs a CSA layer";
  // Decoding at positions 23 and 19: both rows complete a block of 4 (and so a key of the indexer).
  const auto a = Prompt(23, args.vocab_size, 7), b = Prompt(19, args.vocab_size, 8);
  auto sa = (*tf)->NewSession(), sb = (*tf)->NewSession();
  std::vector<float> oa, ob;
  std::vector<BatchItem> prompts = {{sa.get(), a, &oa, nullptr}, {sb.get(), b, &ob, nullptr}};
  ASSERT_TRUE((*tf)->Forward(prompts).ok());
  prof.Reset();
  const int32_t na = 11, nb = 12;
  std::vector<BatchItem> step = {{sa.get(), std::span<const int32_t>(&na, 1), &oa, nullptr},
                                 {sb.get(), std::span<const int32_t>(&nb, 1), &ob, nullptr}};
  ASSERT_TRUE((*tf)->Forward(step).ok());
  // Per CSA layer the two new keys are finished in one call (Backend::RowOps: norm, RoPE, Hadamard,
  // FP4), not one per row, and so are the two new compressed entries where their nope dims are
  // whole FP8 blocks; no Hadamard runs on its own (the indexer's queries take theirs inside their
  // projection, Backend::LinearMany).
  const int64_t chains = csa * (1 + ((args.head_dim - args.rope_head_dim) % 64 == 0 ? 1 : 0));
  EXPECT_EQ(prof.Stats(kernels::OpKind::kRowOps).calls, static_cast<uint64_t>(chains));
  EXPECT_EQ(prof.Stats(kernels::OpKind::kRowOps).items, static_cast<uint64_t>(2 * chains));
  EXPECT_EQ(prof.Stats(kernels::OpKind::kHadamard).calls, 0u);
  auto a2 = a, b2 = b;
  a2.push_back(na);
  b2.push_back(nb);
  EXPECT_EQ(oa, Feed(a2, {23, 1}));
  EXPECT_EQ(ob, Feed(b2, {19, 1}));
  for (int64_t l = 0; l < args.n_layers; ++l)
    if (args.ratio(l) == 4) {  // the new keys were appended: 24 / 4 and 20 / 4 complete blocks
      EXPECT_EQ(sa->layers[l].index_keys.size(), 6) << "layer " << l;
      EXPECT_EQ(sb->layers[l].index_keys.size(), 5) << "layer " << l;
    }
}

// LSA Level 2: index scoring hides exactly the chunks the session's Residency hides (-inf) and
// scores the rest — a page selected or not, the covered boundary inside a page or at its start.
TEST_F(Engine, IndexScoresHideExactlyWhatResidencyHides) {
  const auto& args = tf_->args();
  int64_t l = 0;
  while (l < args.n_layers && args.ratio(l) != 4) ++l;
  ASSERT_LT(l, args.n_layers) << "the test model needs a CSA layer";
  auto s = tf_->NewSession();
  std::vector<float> logits;
  const auto p = Prompt(300, args.vocab_size, 9);  // 75 index keys: a full page and 11 more
  std::vector<BatchItem> prompt = {{s.get(), p, &logits, nullptr}};
  ASSERT_TRUE(tf_->Forward(prompt).ok());
  const kv::EntryPages& keys = s->layers[l].index_keys;
  ASSERT_EQ(keys.size(), 75);
  const model::RotaryTable rope = model::RotaryTable::ForLayer(args, 4);
  const model::Indexer indexer(args, *tf_->weights().layers[l].attn.indexer, rope, kernels::CpuBackend());
  const int64_t h = indexer.n_local_heads(), hd = args.index_head_dim;
  std::mt19937 g(10);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> q(h * hd), w(h);
  for (float& v : q) v = d(g);
  for (float& v : w) v = d(g);
  struct Case {
    int64_t covered;
    std::vector<uint8_t> selected;
  };
  for (const Case& c : {Case{-1, {}}, Case{70, {1, 0}}, Case{70, {0, 1}}, Case{20, {0}}, Case{64, {0}}, Case{75, {0, 0}}}) {
    model::Residency res;
    res.covered_chunks = c.covered;
    res.page_selected = c.selected;
    std::vector<float> scores;
    indexer.Scores(q.data(), w.data(), keys, res, &scores);
    ASSERT_EQ(scores.size(), 75u);
    for (int64_t t = 0; t < 75; ++t)
      EXPECT_EQ(std::isinf(scores[t]) && scores[t] < 0, !res.Visible(t))
          << "covered " << c.covered << ", chunk " << t << ": " << scores[t];
  }
}

TEST_F(Engine, BadBatchesAreRejected) {
  auto s = tf_->NewSession();
  const int32_t bad = static_cast<int32_t>(tf_->args().vocab_size);
  std::vector<BatchItem> b1 = {{s.get(), std::span<const int32_t>(&bad, 1), nullptr, nullptr}};
  auto st = tf_->Forward(b1);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(st.message()).find("tokens[0]"), std::string::npos) << st;
  const int32_t ok = 1;
  std::vector<BatchItem> b2 = {{s.get(), std::span<const int32_t>(&ok, 1), nullptr, nullptr},
                               {s.get(), std::span<const int32_t>(&ok, 1), nullptr, nullptr}};
  EXPECT_FALSE(tf_->Forward(b2).ok());
  std::vector<BatchItem> b3 = {{s.get(), {}, nullptr, nullptr}};
  EXPECT_FALSE(tf_->Forward(b3).ok());
  EXPECT_EQ(s->position, 0);  // rejected batches leave the session untouched
}

TEST_F(Engine, TopKSelectionIsRealAndTiesKeepLowerIds) {
  // 300 tokens -> 75 CSA entries, index_topk 16: the indexer selects a strict subset,
  // ordered by descending score with equal scores in ascending entry id.
  const auto p = Prompt(300, tf_->args().vocab_size, 5);
  auto s = tf_->NewSession();
  model::ForwardTrace trace;
  BatchItem it{s.get(), p, nullptr, &trace};
  ASSERT_TRUE(tf_->Forward(std::span<BatchItem>(&it, 1)).ok());
  for (size_t c = 0; c < trace.indexer_topk.size(); ++c) {
    const auto& sel = trace.indexer_topk[c];
    const auto& sc = trace.indexer_scores[c];
    ASSERT_EQ(sc.size(), 75u);
    ASSERT_EQ(sel.size(), static_cast<size_t>(tf_->args().index_topk));
    for (size_t j = 1; j < sel.size(); ++j) {
      ASSERT_GE(sc[sel[j - 1]], sc[sel[j]]);
      if (sc[sel[j - 1]] == sc[sel[j]]) EXPECT_LT(sel[j - 1], sel[j]);
    }
    float kth = sc[sel.back()];
    for (size_t t = 0; t < sc.size(); ++t)
      if (std::find(sel.begin(), sel.end(), static_cast<int32_t>(t)) == sel.end()) EXPECT_LE(sc[t], kth);
  }
}

// A session snapshot restored into a fresh state continues exactly where the original would:
// failover needs no re-prefill and changes no token.
TEST_F(Engine, SnapshotRestoreContinuesBitIdentically) {
  const auto& a = tf_->args();
  const auto p = Prompt(277, a.vocab_size, 6);  // pending compressor blocks in every layer type
  auto original = tf_->NewSession();
  std::vector<float> lo, lr;
  BatchItem it{original.get(), p, &lo, nullptr};
  ASSERT_TRUE(tf_->Forward(std::span<BatchItem>(&it, 1)).ok());
  const std::string blob = model::SerializeSessionState(*original, a);
  auto restored = model::DeserializeSessionState(blob, a);
  ASSERT_TRUE(restored.ok()) << restored.status();
  EXPECT_EQ((*restored)->position, 277);
  int32_t next_o = 3, next_r = 3;
  for (int step = 0; step < 60; ++step) {  // crosses CSA and HCA block boundaries after the restore
    BatchItem io{original.get(), std::span<const int32_t>(&next_o, 1), &lo, nullptr};
    BatchItem ir{restored->get(), std::span<const int32_t>(&next_r, 1), &lr, nullptr};
    ASSERT_TRUE(tf_->Forward(std::span<BatchItem>(&io, 1)).ok());
    ASSERT_TRUE(tf_->Forward(std::span<BatchItem>(&ir, 1)).ok());
    ASSERT_EQ(lo, lr) << "step " << step;
    next_o = next_r = static_cast<int32_t>(std::max_element(lo.begin(), lo.end()) - lo.begin());
  }
  std::printf("snapshot at 277 tokens: %zu bytes\n", blob.size());
}

TEST_F(Engine, HostileSnapshotsAreRejected) {
  const auto& a = tf_->args();
  auto s = tf_->NewSession();
  const auto p = Prompt(40, a.vocab_size, 7);
  BatchItem it{s.get(), p, nullptr, nullptr};
  ASSERT_TRUE(tf_->Forward(std::span<BatchItem>(&it, 1)).ok());
  const std::string blob = model::SerializeSessionState(*s, a);
  auto code = [&](const std::string& b) { return model::DeserializeSessionState(b, a).status(); };
  EXPECT_EQ(code("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code("XXXX" + blob.substr(4)).code(), absl::StatusCode::kInvalidArgument);
  std::string flipped = blob;
  flipped[blob.size() / 2] ^= 1;
  EXPECT_EQ(code(flipped).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(code(blob.substr(0, blob.size() - 20)).ok());  // truncated (checksum no longer matches)
  model::ModelArgs other = a;
  other.n_layers = a.n_layers - 1;
  other.compress_ratios.erase(other.compress_ratios.begin());
  auto wrong = model::DeserializeSessionState(blob, other);
  EXPECT_FALSE(wrong.ok());
  EXPECT_NE(std::string(wrong.status().message()).find("layers"), std::string::npos) << wrong.status();
}

// The CPU reference that also records what was prepared and what Linear multiplies by.
class RecordingBackend final : public kernels::Backend {
 public:
  const char* name() const override { return "recording-cpu"; }
  absl::Status Prepare(const kernels::WeightMatrix& w) const override {
    prepared_.insert(w.values.data());
    return absl::OkStatus();
  }
  void Linear(const kernels::WeightMatrix& w, const float* x, int64_t n, float* y, kernels::Rounding out) const override {
    ++linears_;
    if (!prepared_.contains(w.values.data())) ++unprepared_;
    cpu_.Linear(w, x, n, y, out);
  }
  void RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y) const override { cpu_.RmsNorm(x, w, n, d, eps, y); }
  void HeadRmsNormBf16(float* q, int64_t h, int64_t d, float eps) const override { cpu_.HeadRmsNormBf16(q, h, d, eps); }
  void Rope(float* x, int64_t r, int64_t st, int64_t off, int64_t rd, const float* c, const float* s, int64_t rpa,
            bool inv) const override {
    cpu_.Rope(x, r, st, off, rd, c, s, rpa, inv);
  }
  void Fp8RoundTrip(float* x, int64_t n, int64_t b) const override { cpu_.Fp8RoundTrip(x, n, b); }
  void Fp4RoundTrip(float* x, int64_t n, int64_t b) const override { cpu_.Fp4RoundTrip(x, n, b); }
  void Hadamard(float* x, int64_t r, int64_t d) const override { cpu_.Hadamard(x, r, d); }
  void SparseAttention(const float* q, int64_t h, int64_t d, std::span<const float* const> kv, const float* sink,
                       float scale, float* out) const override {
    cpu_.SparseAttention(q, h, d, kv, sink, scale, out);
  }
  void IndexScores(const float* q, const float* w, int64_t h, int64_t d, std::span<const float* const> k,
                   float* s) const override {
    cpu_.IndexScores(q, w, h, d, k, s);
  }
  void IndexerLogits(const float* q, const float* w, int64_t h, int64_t d, std::span<const float* const> k,
                     float* l) const override {
    cpu_.IndexerLogits(q, w, h, d, k, l);
  }
  void HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc, int64_t d,
             int it, float ne, float he, float* y, float* post, float* comb) const override {
    cpu_.HcPre(x, n, fn, base, scale, hc, d, it, ne, he, y, post, comb);
  }
  void HcPost(const float* f, const float* r, const float* post, const float* comb, int64_t n, int hc, int64_t d,
              float* out) const override {
    cpu_.HcPost(f, r, post, comb, n, hc, d, out);
  }
  void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc, int64_t d, float ne,
              float he, float* y) const override {
    cpu_.HcHead(x, n, fn, base, scale, hc, d, ne, he, y);
  }
  size_t prepared() const { return prepared_.size(); }
  int64_t linears() const { return linears_; }
  int64_t unprepared() const { return unprepared_; }

 private:
  const kernels::Backend& cpu_ = kernels::CpuBackend();
  mutable std::set<const float*> prepared_;
  mutable int64_t linears_ = 0, unprepared_ = 0;
};

// A device backend uploads at load: every weight a forward multiplies by was prepared by Load.
TEST(PrepareWeights, EveryWeightTheForwardUsesIsPreparedAtLoad) {
  RecordingBackend be;
  const std::string dir = WriteModel(SmallVocabTiny(), "prepare");
  auto tf = Transformer::Load(dir, be);
  ASSERT_TRUE(tf.ok()) << tf.status();
  EXPECT_GT(be.prepared(), 20u);
  auto s = (*tf)->NewSession();
  std::vector<float> logits;
  const std::vector<int32_t> prompt = Prompt(40, 512, 9);
  BatchItem it{s.get(), prompt, &logits, nullptr};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&it, 1)).ok());
  const int32_t next = 3;
  BatchItem step{s.get(), std::span<const int32_t>(&next, 1), &logits, nullptr};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&step, 1)).ok());
  EXPECT_GT(be.linears(), 0);
  EXPECT_EQ(be.unprepared(), 0) << "of " << be.linears() << " Linear calls";
  std::filesystem::remove_all(dir);
}

TEST(RandomCheckpoint, DeterministicPerSeed) {
  const auto a = SmallVocabTiny(2);
  const std::string d1 = WriteModel(a, "det1", 11), d2 = WriteModel(a, "det2", 11), d3 = WriteModel(a, "det3", 12);
  auto bytes = [](const std::string& p) { std::ifstream in(p, std::ios::binary); std::stringstream s; s << in.rdbuf(); return s.str(); };
  EXPECT_EQ(bytes(d1 + "/model.safetensors"), bytes(d2 + "/model.safetensors"));
  EXPECT_NE(bytes(d1 + "/model.safetensors"), bytes(d3 + "/model.safetensors"));
  for (const auto& d : {d1, d2, d3}) std::filesystem::remove_all(d);
}

TEST(RandomCheckpoint, ActivationsStayFiniteAndOrderOneOverManyLayers) {
  const auto a = SmallVocabTiny(24);
  const std::string dir = WriteModel(a, "deep", 3);
  auto tf = Transformer::Load(dir, TestBackend());
  ASSERT_TRUE(tf.ok()) << tf.status();
  auto s = (*tf)->NewSession();
  const auto p = Prompt(200, a.vocab_size, 9);
  model::ForwardTrace trace;
  std::vector<float> logits;
  BatchItem it{s.get(), p, &logits, &trace};
  ASSERT_TRUE((*tf)->Forward(std::span<BatchItem>(&it, 1)).ok());
  double ss = 0;
  for (float v : trace.hidden_hc) { ASSERT_TRUE(std::isfinite(v)); ss += v * v; }
  const double rms = std::sqrt(ss / trace.hidden_hc.size());
  double ls = 0;
  for (float v : logits) { ASSERT_TRUE(std::isfinite(v)); ls += v * v; }
  const double lrms = std::sqrt(ls / logits.size());
  std::printf("24 layers: residual RMS %.3f, logits RMS %.3f\n", rms, lrms);
  EXPECT_GT(rms, 0.1);
  EXPECT_LT(rms, 10.0);
  EXPECT_GT(lrms, 0.1);
  EXPECT_LT(lrms, 20.0);
  std::filesystem::remove_all(dir);
}

// The SwiGLU clamp, tested directly: gate is capped at +limit, up clamped to [-limit, limit].
TEST(Expert, SwigluClampAtLimit) {
  model::ModelArgs a = SmallVocabTiny(1);
  a.dim = 128;
  a.swiglu_limit = 10.0f;
  model::ExpertWeights w;
  auto dense = [](int64_t rows, int64_t cols, float v) {
    kernels::WeightMatrix m;
    m.format = kernels::WeightFormat::kFp8Block128;
    m.rows = rows;
    m.cols = cols;
    m.values.assign(rows * cols, v);
    m.scales.assign(((rows + 127) / 128) * ((cols + 127) / 128), 1.0f);
    return m;
  };
  // x = e0 * 1.0: w1 row = 16 -> gate 16 (clamped to 10); w3 row = -32 -> up -32 (clamped to -10).
  w.w1 = dense(128, 128, 0.0f);
  w.w3 = dense(128, 128, 0.0f);
  w.w2 = dense(128, 128, 0.0f);
  w.w1.values[0] = 16.0f;
  w.w3.values[0] = -32.0f;
  w.w2.values[0] = 1.0f;  // out[0] = h[0]
  std::vector<float> x(128, 0.0f), out(128, 0.0f);
  x[0] = 1.0f;
  model::Expert e(a, w, TestBackend());
  e.AddTo(x.data(), 1, out.data());  // onto zeros: the MLP's output
  // out[0] = w2 · h with h = bf16(silu(g) * u) re-quantized to FP8 per 128 (one nonzero: exact).
  auto expected = [](float g, float u) {
    const float h = num::RoundBf16(g / (1.0f + std::exp(-g)) * u);
    const float s = num::Fp8BlockScale(std::fabs(h));
    return num::RoundBf16(num::RoundE4m3(h / s) * s);
  };
  EXPECT_EQ(out[0], expected(10.0f, -10.0f));  // -96: both clamps fired
  a.swiglu_limit = 0.0f;  // no clamp
  model::Expert e2(a, w, TestBackend());
  out.assign(128, 0.5f);
  e2.AddTo(x.data(), 1, out.data());  // added to what is there
  EXPECT_EQ(out[0], 0.5f + expected(16.0f, -32.0f));
  EXPECT_EQ(out[1], 0.5f);
  EXPECT_LT(out[0], -400.0f);
}

}  // namespace
}  // namespace flashmem::testing
