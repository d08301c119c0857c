// A backend that computes nothing: every op writes zeros, and top-k lists are their first
// candidates. `model_bench --device null` runs decode steps on it to time the host's own work
// around the ops (state updates, compressor pooling, slot lists), which a device backend's step
// hides among its ops. Benchmarks only: its outputs mean nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "kernels/ops.h"

namespace flashmem::bench {

class NullBackend final : public kernels::Backend {
 public:
  using WeightMatrix = kernels::WeightMatrix;
  using Rounding = kernels::Rounding;

  const char* name() const override { return "null"; }
  void Linear(const WeightMatrix& w, const float*, int64_t n, float* y, Rounding) const override {
    std::fill_n(y, n * w.rows, 0.0f);
  }
  void LinearGroups(std::span<const WeightMatrix> w, const float*, int64_t n, float* y, Rounding) const override {
    std::fill_n(y, n * static_cast<int64_t>(w.size()) * w[0].rows, 0.0f);
  }
  void LinearThen(const WeightMatrix& w, const float*, int64_t n, float* y, Rounding,
                  std::span<const kernels::RowOp>) const override {
    std::fill_n(y, n * w.rows, 0.0f);
  }
  void LinearArgmax(const WeightMatrix&, const float*, int64_t n, int32_t* index) const override {
    std::fill_n(index, n, 0);
  }
  void RoundBf16(const float*, int64_t n, float* y) const override { std::fill_n(y, n, 0.0f); }
  void RmsNorm(const float*, const float*, int64_t n, int64_t dim, float, float* y) const override {
    std::fill_n(y, n * dim, 0.0f);
  }
  void HeadRmsNormBf16(float*, int64_t, int64_t, float) const override {}
  void Rope(float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, int64_t, bool) const override {}
  void Fp8RoundTrip(float*, int64_t, int64_t) const override {}
  void Fp4RoundTrip(float*, int64_t, int64_t) const override {}
  void Hadamard(float*, int64_t, int64_t) const override {}
  void SparseAttention(const float*, int64_t heads, int64_t dim, std::span<const float* const>, const float*, float,
                       float* out) const override {
    std::fill_n(out, heads * dim, 0.0f);
  }
  void SparseAttentionRecords(const float*, int64_t heads, int64_t dim, int64_t, std::span<const kernels::KvSlot>,
                              const float*, float, float* out) const override {
    std::fill_n(out, heads * dim, 0.0f);
  }
  void SparseAttentionRows(std::span<const kernels::AttentionRow> rows, int64_t heads, int64_t dim, int64_t,
                           const float*, float) const override {
    for (const kernels::AttentionRow& r : rows) std::fill_n(r.out, heads * dim, 0.0f);
  }
  void IndexScoresBatch(std::span<const kernels::IndexScoreRow>, int64_t, int64_t) const override {}
  std::vector<std::vector<int32_t>> TopKBatch(std::span<const std::span<const float>> scores,
                                              int64_t k) const override {
    std::vector<std::vector<int32_t>> picks;
    for (std::span<const float> s : scores) picks.push_back(First(k, static_cast<int64_t>(s.size())));
    return picks;
  }
  std::vector<std::vector<int32_t>> IndexTopKBatch(std::span<const kernels::IndexSelectRow> rows, int64_t, int64_t,
                                                   int64_t k) const override {
    std::vector<std::vector<int32_t>> picks;
    for (const kernels::IndexSelectRow& r : rows) picks.push_back(First(k, r.length));
    return picks;
  }
  void IndexScores(const float*, const float*, int64_t, int64_t, std::span<const float* const> keys,
                   float* scores) const override {
    std::fill_n(scores, keys.size(), 0.0f);
  }
  void IndexerLogits(const float*, const float*, int64_t, int64_t, std::span<const float* const> keys,
                     float* logits) const override {
    std::fill_n(logits, keys.size(), 0.0f);
  }
  void HcPre(const float*, int64_t n, const float*, const float*, const float*, int hc, int64_t dim, int, float, float,
             float* y, float* post, float* comb) const override {
    std::fill_n(y, n * dim, 0.0f);
    std::fill_n(post, n * hc, 0.0f);
    std::fill_n(comb, n * hc * hc, 0.0f);
  }
  void HcPost(const float*, const float*, const float*, const float*, int64_t n, int hc, int64_t dim,
              float* out) const override {
    std::fill_n(out, n * hc * dim, 0.0f);
  }
  void RoutedExperts(std::span<const kernels::ExpertWork>, const float*, int64_t, int64_t, float,
                     float*) const override {}
  void HcHead(const float*, int64_t n, const float*, const float*, float, int, int64_t dim, float, float,
              float* y) const override {
    std::fill_n(y, n * dim, 0.0f);
  }

 private:
  // Candidates 0 .. min(k, length) - 1.
  static std::vector<int32_t> First(int64_t k, int64_t length) {
    std::vector<int32_t> v(static_cast<size_t>(std::max<int64_t>(0, std::min(k, length))));
    std::iota(v.begin(), v.end(), 0);
    return v;
  }
};

}  // namespace flashmem::bench
