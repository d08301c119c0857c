#include "kernels/moe_routing.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/ops.h"
#include "kernels/topk.h"

namespace flashmem::kernels {

absl::Status ValidateRouter(const MoeRouter& r, int64_t n, int64_t dim) {
  auto bad = [](auto&&... parts) { return absl::InvalidArgumentError(absl::StrCat("RoutedMoE: ", parts...)); };
  if (!r.gate) return bad("router.gate is missing");
  const int64_t E = r.gate->rows;
  if (r.gate->cols != dim) return bad("router.gate has ", r.gate->cols, " columns, x has ", dim);
  if (E < 1) return bad("router.gate has no experts");
  if (r.k < 1 || r.k > E) return bad("router.k is ", r.k, ", not within 1..", E);
  if (!r.bias.empty() && static_cast<int64_t>(r.bias.size()) != E)
    return bad("router.bias has ", r.bias.size(), " values, the gate ", E, " experts");
  if (!r.hash_ids.empty()) {
    if (static_cast<int64_t>(r.hash_ids.size()) != n * r.k)
      return bad("router.hash_ids has ", r.hash_ids.size(), " ids, ", n, " tokens x k ", r.k, " need ", n * r.k);
    for (size_t i = 0; i < r.hash_ids.size(); ++i)
      if (r.hash_ids[i] < 0 || r.hash_ids[i] >= E)
        return bad("router.hash_ids[", i, "] is ", r.hash_ids[i], ", not an expert of 0..", E - 1);
  }
  const int64_t local = static_cast<int64_t>(r.experts.size());
  if (r.first_expert < 0 || r.first_expert + local > E)
    return bad("router.experts (", local, " from ", r.first_expert, ") are not inside the layer's ", E);
  for (int64_t i = 0; i < local; ++i) {
    const ExpertMatrices& e = r.experts[i];
    if (!e.w1 || !e.w2 || !e.w3 || e.w1->cols != dim || e.w3->cols != dim || e.w3->rows != e.w1->rows ||
        e.w2->rows != dim || e.w2->cols != e.w1->rows)
      return bad("router.experts[", i, "] has inconsistent shapes");
  }
  return absl::OkStatus();
}

void RouteFromLogits(const MoeRouter& r, const float* logits, int64_t n, int32_t* ids, float* weights) {
  const int64_t E = r.gate->rows, k = r.k;
  std::vector<float> scores(E), biased(E);
  for (int64_t i = 0; i < n; ++i) {
    const float* lg = logits + i * E;
    switch (r.score) {
      case RouterScore::kSqrtSoftplus:
        for (int64_t e = 0; e < E; ++e) {
          const float sp = lg[e] > 20.0f ? lg[e] : std::log1p(std::exp(lg[e]));  // F.softplus
          scores[e] = std::sqrt(sp);
        }
        break;
      case RouterScore::kSigmoid:
        for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
        break;
      case RouterScore::kSoftmax: {
        const float mx = *std::max_element(lg, lg + E);
        float sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(lg[e] - mx));
        for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
        break;
      }
    }
    int32_t* id = ids + i * k;
    if (!r.hash_ids.empty()) {
      std::copy_n(r.hash_ids.data() + i * k, k, id);
    } else {
      // The bias shifts selection only; ties keep the lower expert id first.
      for (int64_t e = 0; e < E; ++e) biased[e] = scores[e] + (r.bias.empty() ? 0.0f : r.bias[e]);
      const std::vector<int32_t> top = TopKIndices(biased, k);
      std::copy_n(top.begin(), k, id);
    }
    float* wt = weights + i * k;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += (wt[j] = scores[id[j]]);
    for (int64_t j = 0; j < k; ++j) {
      if (r.score != RouterScore::kSoftmax) wt[j] /= sum;
      wt[j] *= r.route_scale;
    }
  }
}

std::vector<ExpertWork> GroupByExpert(const MoeRouter& r, const int32_t* ids, const float* weights, int64_t n) {
  // One pass over the picks into per-expert lists (a scan of every pick per expert was 256 x 64 x 6
  // comparisons a layer at V4-Flash's batch 64).
  const int64_t local = static_cast<int64_t>(r.experts.size());
  std::vector<ExpertWork> by_expert(local);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < r.k; ++j) {
      const int64_t le = ids[i * r.k + j] - r.first_expert;
      if (le < 0 || le >= local) continue;  // another rank's expert
      by_expert[le].rows.push_back(static_cast<int32_t>(i));
      by_expert[le].weights.push_back(weights[i * r.k + j]);
    }
  std::vector<ExpertWork> work;
  for (int64_t le = 0; le < local; ++le) {
    ExpertWork& wk = by_expert[le];
    if (wk.rows.empty()) continue;
    static_cast<ExpertMatrices&>(wk) = r.experts[le];
    work.push_back(std::move(wk));
  }
  return work;
}

}  // namespace flashmem::kernels
