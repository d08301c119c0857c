#include "worker/model/moe.h"

#include <algorithm>
#include <numeric>
#include <optional>

#include "common/status.h"

namespace flashmem::model {

Gate::Gate(const ModelArgs& args, const GateWeights& w, bool hash, const kernels::Backend& be)
    : args_(args), w_(w), hash_(hash), be_(be) {}

kernels::MoeRouter Gate::Router(std::span<const int32_t> tokens, std::span<const kernels::ExpertMatrices> experts,
                                int64_t first_expert, std::vector<int32_t>* hash_ids) const {
  kernels::MoeRouter r;
  r.gate = &w_.weight;  // fp32 logits
  r.score = args_.score_func == ScoreFunc::kSqrtSoftplus ? kernels::RouterScore::kSqrtSoftplus
            : args_.score_func == ScoreFunc::kSigmoid    ? kernels::RouterScore::kSigmoid
                                                          : kernels::RouterScore::kSoftmax;
  r.k = args_.n_activated_experts;
  r.route_scale = args_.route_scale;
  r.first_expert = first_expert;
  r.experts = experts;
  if (hash_) {
    hash_ids->resize(tokens.size() * r.k);
    for (size_t i = 0; i < tokens.size(); ++i)
      std::copy_n(w_.tid2eid.data() + static_cast<int64_t>(tokens[i]) * r.k, r.k, hash_ids->data() + i * r.k);
    r.hash_ids = *hash_ids;
  } else {
    r.bias = w_.bias;  // the bias shifts selection only
  }
  return r;
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
  for (const ExpertWeights& e : w.experts) {
    experts_.emplace_back(args, e, be);
    routed_.push_back({&e.w1, &e.w3, &e.w2});
  }
}

void MoE::Forward(const float* x, std::span<const int32_t> tokens,
                  std::span<ForwardTrace* const> trace_rows, float* out) const {
  const int64_t n = static_cast<int64_t>(tokens.size()), d = args_.dim;
  const int64_t k = args_.n_activated_experts;
  std::vector<int32_t> hash_ids;
  const kernels::MoeRouter router = gate_.Router(tokens, routed_, w_.first_local_expert, &hash_ids);
  // The routing comes back only for traced rows (a device backend otherwise keeps it).
  const bool traced = std::any_of(trace_rows.begin(), trace_rows.end(), [](ForwardTrace* t) { return t != nullptr; });
  std::vector<int32_t> ids(traced ? n * k : 0);
  std::vector<float> weights(traced ? n * k : 0);
  Scratch y(n * d, 0.0f);  // fp32 accumulator of the routed sum
  // Tensor parallel: each rank summed its own experts; the routed sum is all-reduced (fp32) before
  // the shared expert, which every rank holds, is added: y + bf16(shared), one fp32 addition, as
  // the reference's routed + shared. On one rank only ops touch y: a device keeps it.
  const bool tensor_parallel = comm_ && comm_->size() > 1;
  std::optional<kernels::DeviceHold<Scratch>> hold_y;
  if (!tensor_parallel) hold_y.emplace(be_, y);
  be_.RoutedMoE(router, x, n, d, args_.swiglu_limit, y.data(), traced ? ids.data() : nullptr,
                traced ? weights.data() : nullptr);
  for (int64_t i = 0; i < n; ++i)
    if (trace_rows[i]) {
      trace_rows[i]->moe_experts[layer_].assign(ids.begin() + i * k, ids.begin() + (i + 1) * k);
      trace_rows[i]->moe_weights[layer_].assign(weights.begin() + i * k, weights.begin() + (i + 1) * k);
    }
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
