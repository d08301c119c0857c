// Mixture of experts (spec §5.3): Gate (hash routing on the first layers, biased top-k
// elsewhere), Expert (SwiGLU with clamp) and MoE (routed sum + shared expert).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/ops.h"
#include "worker/parallel/communicator.h"
#include "worker/model/config.h"
#include "worker/model/scratch.h"
#include "worker/model/state.h"
#include "worker/model/weights.h"

namespace flashmem::model {

class Gate {
 public:
  Gate(const ModelArgs& args, const GateWeights& w, bool hash, const kernels::Backend& be);
  // The router of n rows for Backend::RoutedMoE (which computes the logits, the picks and their
  // weights: kernels/moe_routing.h); a hash layer's picks (tid2eid of each token) go in hash_ids,
  // which the router points into. `experts`: the routed experts this rank holds, from
  // first_expert on.
  kernels::MoeRouter Router(std::span<const int32_t> tokens, std::span<const kernels::ExpertMatrices> experts,
                            int64_t first_expert, std::vector<int32_t>* hash_ids) const;
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  const ModelArgs& args_;
  const GateWeights& w_;
  bool hash_;
  const kernels::Backend& be_;
};

class Expert {
 public:
  Expert(const ModelArgs& args, const ExpertWeights& w, const kernels::Backend& be)
      : args_(args), w_(w), be_(be) {}
  // y[n, dim] += w2(bf16(silu(min(w1 x, L)) * clamp(w3 x, ±L))), the MLP's bf16 output added in
  // fp32 (the shared expert: weight 1). One Backend::RoutedExperts call.
  void AddTo(const float* x, int64_t n, float* y) const;
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  const ModelArgs& args_;
  const ExpertWeights& w_;
  const kernels::Backend& be_;
};

class MoE {
 public:
  // comm: the tensor-parallel group (null: one rank); the routed sum over this rank's experts is
  // all-reduced before the shared expert is added.
  MoE(const ModelArgs& args, const MoEWeights& w, int64_t layer, const kernels::Backend& be,
      const parallel::Communicator* comm = nullptr);
  // x [n, dim] normed rows; tokens: their ids (hash routing); out [n, dim] bf16 values.
  // `trace_rows[i]`, when non-null, receives row i's routing for this layer.
  void Forward(const float* x, std::span<const int32_t> tokens,
               std::span<ForwardTrace* const> trace_rows, float* out) const;
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  const ModelArgs& args_;
  const MoEWeights& w_;
  int64_t layer_;
  const kernels::Backend& be_;
  const parallel::Communicator* comm_;
  Gate gate_;
  std::vector<Expert> experts_;
  std::vector<kernels::ExpertMatrices> routed_;  // experts_' matrices, for the router
  Expert shared_;
};

}  // namespace flashmem::model
