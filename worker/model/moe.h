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
  // For n rows: expert ids [n, topk] and routing weights [n, topk].
  void Route(const float* x, std::span<const int32_t> tokens, std::vector<int32_t>* ids,
             std::vector<float>* weights) const;
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
  Expert shared_;
};

}  // namespace flashmem::model
