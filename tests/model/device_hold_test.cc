// The model's use of Backend::HoldOnDevice, checked on the CPU: a backend that acts like a device
// with held buffers — between ops a held buffer's host memory is NaN, its values kept aside (the
// "device"), restored for the op and taken back after it — so a host read of a held buffer without
// SyncToHost (or after an op wrote it since) shows as NaN in the logits, and a hold left unreleased is counted. Every result must
// be the plain CPU backend's bits: prefill, decode steps, a batch, traces and greedy picks. The
// ops the CUDA backend runs whole (staging their inputs) are whole ops here too, so a Backend
// default that reads an input on the host does not count against the model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/ops.h"
#include "tests/model/test_models.h"
#include "tests/test_prompt.h"

namespace flashmem::testing {
namespace {

using model::BatchItem;
using model::ForwardTrace;

class HoldingCpuBackend final : public kernels::Backend {
 public:
  const char* name() const override { return "holding-cpu"; }

  void HoldOnDevice(float* p, int64_t count) const override {
    for (size_t i = held_.size(); i-- > 0;)
      if (p < held_[i].p + held_[i].values.size() && held_[i].p < p + count) held_.erase(held_.begin() + i);
    held_.push_back({p, std::vector<float>(p, p + count)});
    Poison(held_.back());
    ++holds_;
  }
  void SyncToHost(float* p) const override {
    for (Held& h : held_)
      if (h.p == p) {
        std::memcpy(h.p, h.values.data(), h.values.size() * 4);
        h.synced = true;
      }
  }
  void ReleaseFromDevice(float* p, bool keep) const override {
    for (size_t i = 0; i < held_.size(); ++i)
      if (held_[i].p == p) {
        if (keep) SyncToHost(p);
        held_.erase(held_.begin() + i);
        ++releases_;
        return;
      }
  }

  void Linear(const kernels::WeightMatrix& w, const float* x, int64_t n, float* y, kernels::Rounding out) const override {
    Op([&] { cpu_.Linear(w, x, n, y, out); });
  }
  // Ops a device backend runs whole (their inputs staged, not read on the host), as the CUDA one.
  void LinearGroups(std::span<const kernels::WeightMatrix> w, const float* x, int64_t n, float* y,
                    kernels::Rounding out) const override {
    Op([&] { cpu_.LinearGroups(w, x, n, y, out); });
  }
  void LinearThen(const kernels::WeightMatrix& w, const float* x, int64_t n, float* y, kernels::Rounding out,
                  std::span<const kernels::RowOp> then) const override {
    Op([&] { cpu_.LinearThen(w, x, n, y, out, then); });
  }
  void LinearArgmax(const kernels::WeightMatrix& w, const float* x, int64_t n, int32_t* index) const override {
    Op([&] { cpu_.LinearArgmax(w, x, n, index); });
  }
  void LinearMany(std::span<const kernels::LinearJob> jobs, const float* x, int64_t n) const override {
    Op([&] { cpu_.LinearMany(jobs, x, n); });
  }
  void WriteRecords(std::span<const kernels::RecordWrite> writes, int64_t dim, int64_t rope_dims) const override {
    Op([&] { cpu_.WriteRecords(writes, dim, rope_dims); });
  }
  void PoolSteps(std::span<const kernels::PoolStep> steps, const kernels::PoolShape& shape) const override {
    Op([&] { cpu_.PoolSteps(steps, shape); });
  }
  void RoutedExperts(std::span<const kernels::ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                     float limit, float* y) const override {
    Op([&] { cpu_.RoutedExperts(experts, x, n, dim, limit, y); });
  }
  void RmsNorm(const float* x, const float* w, int64_t n, int64_t d, float eps, float* y) const override {
    Op([&] { cpu_.RmsNorm(x, w, n, d, eps, y); });
  }
  void HeadRmsNormBf16(float* q, int64_t h, int64_t d, float eps) const override {
    Op([&] { cpu_.HeadRmsNormBf16(q, h, d, eps); });
  }
  void Rope(float* x, int64_t r, int64_t st, int64_t off, int64_t rd, const float* c, const float* s, int64_t rpa,
            bool inv) const override {
    Op([&] { cpu_.Rope(x, r, st, off, rd, c, s, rpa, inv); });
  }
  void Fp8RoundTrip(float* x, int64_t n, int64_t b) const override { Op([&] { cpu_.Fp8RoundTrip(x, n, b); }); }
  void Fp4RoundTrip(float* x, int64_t n, int64_t b) const override { Op([&] { cpu_.Fp4RoundTrip(x, n, b); }); }
  void Hadamard(float* x, int64_t r, int64_t d) const override { Op([&] { cpu_.Hadamard(x, r, d); }); }
  void SparseAttention(const float* q, int64_t h, int64_t d, std::span<const float* const> kv, const float* sink,
                       float scale, float* out) const override {
    Op([&] { cpu_.SparseAttention(q, h, d, kv, sink, scale, out); });
  }
  void IndexScores(const float* q, const float* w, int64_t h, int64_t d, std::span<const float* const> k,
                   float* s) const override {
    Op([&] { cpu_.IndexScores(q, w, h, d, k, s); });
  }
  void IndexerLogits(const float* q, const float* w, int64_t h, int64_t d, std::span<const float* const> k,
                     float* l) const override {
    Op([&] { cpu_.IndexerLogits(q, w, h, d, k, l); });
  }
  void HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc, int64_t d,
             int it, float ne, float he, float* y, float* post, float* comb) const override {
    Op([&] { cpu_.HcPre(x, n, fn, base, scale, hc, d, it, ne, he, y, post, comb); });
  }
  void HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc, int64_t d,
                 int it, float ne, float he, float* y, float* post, float* comb,
                 std::span<const kernels::RowOp> then) const override {
    Op([&] { cpu_.HcPreThen(x, n, fn, base, scale, hc, d, it, ne, he, y, post, comb, then); });
  }
  void RowOps(float* x, int64_t values, std::span<const kernels::RowOp> ops) const override {
    Op([&] { cpu_.RowOps(x, values, ops); });
  }
  void HcPost(const float* f, const float* r, const float* post, const float* comb, int64_t n, int hc, int64_t d,
              float* out) const override {
    Op([&] { cpu_.HcPost(f, r, post, comb, n, hc, d, out); });
  }
  void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc, int64_t d, float ne,
              float he, float* y) const override {
    Op([&] { cpu_.HcHead(x, n, fn, base, scale, hc, d, ne, he, y); });
  }
  void RoundBf16(const float* x, int64_t n, float* y) const override { Op([&] { cpu_.RoundBf16(x, n, y); }); }

  int64_t holds() const { return holds_; }
  int64_t releases() const { return releases_; }
  size_t held_now() const { return held_.size(); }

 private:
  struct Held {
    float* p;
    std::vector<float> values;  // the "device" copy
    bool synced = false;        // the host memory holds the values (SyncToHost) until an op writes them
  };
  static void Poison(Held& h) {
    std::fill(h.p, h.p + h.values.size(), std::numeric_limits<float>::quiet_NaN());
  }
  // An op sees every held buffer's values and leaves its writes in them; between ops the host
  // memory is NaN, except a synced buffer's until an op writes it (as on the CUDA backend).
  template <typename F>
  void Op(F&& run) const {
    for (const Held& h : held_) std::memcpy(h.p, h.values.data(), h.values.size() * 4);
    run();
    for (Held& h : held_) {
      if (h.synced && std::memcmp(h.values.data(), h.p, h.values.size() * 4) == 0) continue;
      h.synced = false;
      std::memcpy(h.values.data(), h.p, h.values.size() * 4);
      Poison(h);
    }
  }
  const kernels::Backend& cpu_ = kernels::CpuBackend();
  mutable std::vector<Held> held_;
  mutable int64_t holds_ = 0, releases_ = 0;
};

TEST(DeviceHold, TheModelReadsHeldActivationsOnlyThroughOpsOrAfterASync) {
  const std::string dir = WriteModel(SmallVocabTiny(), "device_hold");
  HoldingCpuBackend holding;
  auto plain = model::Transformer::Load(dir, kernels::CpuBackend());
  auto held = model::Transformer::Load(dir, holding);
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_TRUE(held.ok()) << held.status();
  const int64_t V = (*plain)->args().vocab_size;
  auto sa = (*plain)->NewSession(), sb = (*held)->NewSession(), ta = (*plain)->NewSession(),
       tb = (*held)->NewSession();
  const std::vector<int32_t> prompt = Prompt(70, V, 21), other = Prompt(9, V, 22);
  // Prefill two sessions in one batch, one with a trace.
  std::vector<float> la, lb, ma, mb;
  ForwardTrace tra, trb;
  {
    BatchItem a[2] = {{sa.get(), prompt, &la, &tra}, {ta.get(), other, &ma, nullptr}};
    BatchItem b[2] = {{sb.get(), prompt, &lb, &trb}, {tb.get(), other, &mb, nullptr}};
    ASSERT_TRUE((*plain)->Forward(a).ok());
    ASSERT_TRUE((*held)->Forward(b).ok());
  }
  EXPECT_EQ(la, lb);
  EXPECT_EQ(ma, mb);
  ASSERT_EQ(tra.block_out.size(), trb.block_out.size());
  for (size_t l = 0; l < tra.block_out.size(); ++l) EXPECT_EQ(tra.block_out[l], trb.block_out[l]) << "layer " << l;
  EXPECT_EQ(tra.head_input, trb.head_input);
  // Decode steps: greedy picks only (the head reads the residual stream through its op), then
  // one with logits.
  int32_t tok_a = 1, tok_b = 1, pick_a = -1, pick_b = -1, pick_c = -1, pick_d = -1;
  for (int step = 0; step < 3; ++step) {
    BatchItem a[2] = {{sa.get(), std::span<const int32_t>(&tok_a, 1), nullptr, nullptr, &pick_a},
                      {ta.get(), std::span<const int32_t>(&tok_a, 1), nullptr, nullptr, &pick_c}};
    BatchItem b[2] = {{sb.get(), std::span<const int32_t>(&tok_b, 1), nullptr, nullptr, &pick_b},
                      {tb.get(), std::span<const int32_t>(&tok_b, 1), nullptr, nullptr, &pick_d}};
    ASSERT_TRUE((*plain)->Forward(a).ok());
    ASSERT_TRUE((*held)->Forward(b).ok());
    EXPECT_EQ(pick_a, pick_b) << "step " << step;
    EXPECT_EQ(pick_c, pick_d) << "step " << step;
    tok_a = pick_a;
    tok_b = pick_b;
  }
  // A step that captures each CSA layer's attention input for the memory indexer (LSA arms it
  // every few steps): the attention reads xn on the host for it.
  int64_t csa = 0;
  for (int64_t l = 0; l < (*plain)->args().n_layers; ++l) csa += (*plain)->args().ratio(l) == 4;
  ASSERT_GT(csa, 0) << "the test model needs a CSA layer";
  for (model::SessionState* st : {sa.get(), sb.get()}) {
    st->capture.enabled = true;
    st->capture.x.assign(csa, std::vector<float>((*plain)->args().dim, 0.0f));
  }
  BatchItem a{sa.get(), std::span<const int32_t>(&tok_a, 1), &la, nullptr};
  BatchItem b{sb.get(), std::span<const int32_t>(&tok_b, 1), &lb, nullptr};
  ASSERT_TRUE((*plain)->Forward(std::span<BatchItem>(&a, 1)).ok());
  ASSERT_TRUE((*held)->Forward(std::span<BatchItem>(&b, 1)).ok());
  EXPECT_EQ(la, lb);
  for (float v : lb) ASSERT_FALSE(std::isnan(v));
  EXPECT_EQ(sa->capture.pos, sb->capture.pos);
  ASSERT_GE(sb->capture.pos, 0);
  for (int64_t c = 0; c < csa; ++c) {
    EXPECT_EQ(sa->capture.x[c], sb->capture.x[c]) << "CSA layer " << c;
    for (float v : sb->capture.x[c]) ASSERT_FALSE(std::isnan(v)) << "CSA layer " << c;
  }
  // The residual stream and its companions were held, and every hold was released.
  EXPECT_GT(holding.holds(), 0);
  EXPECT_EQ(holding.holds(), holding.releases());
  EXPECT_EQ(holding.held_now(), 0u);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::testing
