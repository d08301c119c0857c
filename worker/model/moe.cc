#include "worker/model/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>

#include "common/status.h"
#include "kernels/numerics.h"
#include "kernels/topk.h"

namespace flashmem::model {

using kernels::Rounding;

Gate::Gate(const ModelArgs& args, const GateWeights& w, bool hash, const kernels::Backend& be)
    : args_(args), w_(w), hash_(hash), be_(be) {}

void Gate::Route(const float* x, std::span<const int32_t> tokens, std::vector<int32_t>* ids,
                 std::vector<float>* weights) const {
  const int64_t n = static_cast<int64_t>(tokens.size()), E = args_.n_routed_experts;
  const int64_t k = args_.n_activated_experts;
  std::vector<float> logits(n * E);
  be_.Linear(w_.weight, x, n, logits.data(), Rounding::kNone);  // fp32 router
  ids->resize(n * k);
  weights->resize(n * k);
  std::vector<float> scores(E), biased(E);
  for (int64_t i = 0; i < n; ++i) {
    const float* lg = logits.data() + i * E;
    switch (args_.score_func) {
      case ScoreFunc::kSqrtSoftplus:
        for (int64_t e = 0; e < E; ++e) {
          const float sp = lg[e] > 20.0f ? lg[e] : std::log1p(std::exp(lg[e]));  // F.softplus
          scores[e] = std::sqrt(sp);
        }
        break;
      case ScoreFunc::kSigmoid:
        for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
        break;
      case ScoreFunc::kSoftmax: {
        const float mx = *std::max_element(lg, lg + E);
        float sum = 0.0f;
        for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(lg[e] - mx));
        for (int64_t e = 0; e < E; ++e) scores[e] /= sum;
        break;
      }
    }
    int32_t* id = ids->data() + i * k;
    if (hash_) {
      std::copy_n(w_.tid2eid.data() + static_cast<int64_t>(tokens[i]) * k, k, id);
    } else {
      // The bias shifts selection only; ties keep the lower expert id first.
      for (int64_t e = 0; e < E; ++e) biased[e] = scores[e] + (w_.bias.empty() ? 0.0f : w_.bias[e]);
      const std::vector<int32_t> top = kernels::TopKIndices(biased, k);
      std::copy_n(top.begin(), k, id);
    }
    float* wt = weights->data() + i * k;
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += (wt[j] = scores[id[j]]);
    for (int64_t j = 0; j < k; ++j) {
      if (args_.score_func != ScoreFunc::kSoftmax) wt[j] /= sum;
      wt[j] *= args_.route_scale;
    }
  }
}

void Expert::AddTo(const float* x, int64_t n, float* y) const {
  // One backend op for the whole MLP (a device keeps gate, up and the SwiGLU on the device): the
  // expert over every row, its bf16 output added into y.
  kernels::ExpertWork all;
  all.w1 = &w_.w1;
  all.w3 = &w_.w3;
  all.w2 = &w_.w2;
  all.rows.resize(n);
  std::iota(all.rows.begin(), all.rows.end(), 0);
  be_.RoutedExperts(std::span<const kernels::ExpertWork>(&all, 1), x, n, args_.dim, args_.swiglu_limit, y);
}

MoE::MoE(const ModelArgs& args, const MoEWeights& w, int64_t layer, const kernels::Backend& be,
         const parallel::Communicator* comm)
    : args_(args), w_(w), layer_(layer), be_(be), comm_(comm),
      gate_(args, w.gate, layer < args.n_layers && args.is_hash_layer(layer), be),
      shared_(args, w.shared, be) {
  for (const ExpertWeights& e : w.experts) experts_.emplace_back(args, e, be);
}

void MoE::Forward(const float* x, std::span<const int32_t> tokens,
                  std::span<ForwardTrace* const> trace_rows, float* out) const {
  const int64_t n = static_cast<int64_t>(tokens.size()), d = args_.dim;
  const int64_t k = args_.n_activated_experts;
  std::vector<int32_t> ids;
  std::vector<float> weights;
  gate_.Route(x, tokens, &ids, &weights);
  for (int64_t i = 0; i < n; ++i)
    if (trace_rows[i]) {
      trace_rows[i]->moe_experts[layer_].assign(ids.begin() + i * k, ids.begin() + (i + 1) * k);
      trace_rows[i]->moe_weights[layer_].assign(weights.begin() + i * k, weights.begin() + (i + 1) * k);
    }
  // This rank's experts with the rows routed to them, in expert order (the order of the fp32 sum),
  // each expert's rows in row order: one pass over the picks into per-expert lists (a scan of
  // every pick per expert was 256 x 64 x 6 comparisons a layer at V4-Flash's batch 64).
  const int64_t local = static_cast<int64_t>(experts_.size());
  std::vector<kernels::ExpertWork> by_expert(local);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t le = ids[i * k + j] - w_.first_local_expert;
      if (le < 0 || le >= local) continue;  // another rank's expert
      by_expert[le].rows.push_back(static_cast<int32_t>(i));
      by_expert[le].weights.push_back(weights[i * k + j]);
    }
  std::vector<kernels::ExpertWork> work;
  for (int64_t le = 0; le < local; ++le) {
    kernels::ExpertWork& wk = by_expert[le];
    if (wk.rows.empty()) continue;
    const ExpertWeights& ew = w_.experts[le];
    wk.w1 = &ew.w1;
    wk.w3 = &ew.w3;
    wk.w2 = &ew.w2;
    work.push_back(std::move(wk));
  }
  Scratch y(n * d, 0.0f);  // fp32 accumulator of the routed sum
  // Tensor parallel: each rank summed its own experts; the routed sum is all-reduced (fp32) before
  // the shared expert, which every rank holds, is added: y + bf16(shared), one fp32 addition, as
  // the reference's routed + shared. On one rank only ops touch y: a device keeps it.
  const bool tensor_parallel = comm_ && comm_->size() > 1;
  std::optional<kernels::DeviceHold<Scratch>> hold_y;
  if (!tensor_parallel) hold_y.emplace(be_, y);
  be_.RoutedExperts(work, x, n, d, args_.swiglu_limit, y.data());
  if (tensor_parallel) comm_->AllReduceSum(y.data(), n * d);
  shared_.AddTo(x, n, y.data());
  be_.RoundBf16(y.data(), n * d, out);
}

}  // namespace flashmem::model

namespace flashmem::model {

absl::Status Gate::Prepare() const { return be_.Prepare(w_.weight); }

absl::Status Expert::Prepare() const {
  for (const WeightMatrix* m : {&w_.w1, &w_.w2, &w_.w3}) FM_RETURN_IF_ERROR(be_.Prepare(*m));
  return absl::OkStatus();
}

absl::Status MoE::Prepare() const {
  FM_RETURN_IF_ERROR(gate_.Prepare());
  for (const Expert& e : experts_) FM_RETURN_IF_ERROR(e.Prepare());
  return shared_.Prepare();
}

}  // namespace flashmem::model
