// Block (hc_pre / sub-layer / hc_post), ParallelHead (hc_head, norm, logits) and Transformer:
// batched forward over many sessions, each with its own position and state.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/ops.h"
#include "worker/model/attention.h"
#include "worker/model/config.h"
#include "worker/model/moe.h"
#include "worker/model/state.h"
#include "worker/model/weights.h"

namespace flashmem::model {

class Block {
 public:
  Block(const ModelArgs& args, const BlockWeights& w, int64_t layer, const kernels::Backend& be,
        const parallel::Communicator* comm = nullptr);
  // X: [n, hc, dim] residual streams (bf16 values), updated in place.
  void Forward(Scratch& X, std::span<const TokenRow> rows,
               std::span<const int32_t> tokens, std::span<ForwardTrace* const> trace_rows) const;
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  const ModelArgs& args_;
  const BlockWeights& w_;
  const kernels::Backend& be_;
  const bool tensor_parallel_;  // sublayers all-reduce their output on the host
  Attention attn_;
  MoE ffn_;
};

class ParallelHead {
 public:
  ParallelHead(const ModelArgs& args, const WeightMatrix& head, const std::vector<float>& norm,
               const HcHeadWeights& hc, const kernels::Backend& be)
      : args_(args), head_(head), norm_(norm), hc_(hc), be_(be) {}
  // X: [n, hc, dim] of n positions -> logits [n, local vocab] (fp32), one call per op for all of
  // them; head_input receives the [n, dim] normed vectors multiplied by the head (when non-null).
  void Forward(const float* X, int64_t n, float* logits, std::vector<float>* head_input) const;
  // The same rows' greedy picks (Backend::LinearArgmax): index[i] = ArgmaxIndex of row i's logits.
  void Argmax(const float* X, int64_t n, int32_t* index) const;
  absl::Status Prepare() const { return be_.Prepare(head_); }

 private:
  // hc_head and the final norm: X [n, hc, dim] -> the head's input [n, dim].
  std::vector<float> Normed(const float* X, int64_t n) const;

  const ModelArgs& args_;
  const WeightMatrix& head_;
  const std::vector<float>& norm_;
  const HcHeadWeights& hc_;
  const kernels::Backend& be_;
};

// One session's tokens in a batched forward.
struct BatchItem {
  SessionState* state = nullptr;
  std::span<const int32_t> tokens;      // consumed at positions state->position, ...
  std::vector<float>* logits = nullptr;  // logits of the last token (null: not needed)
  ForwardTrace* trace = nullptr;         // components of the last token (null: not needed)
  // The last token's greedy pick, kernels::ArgmaxIndex of its logits (null: not needed). Asked
  // for without logits or a trace, on one rank, only the pick comes back from the backend.
  int32_t* greedy = nullptr;
};

class Transformer {
 public:
  // Loads config.json + safetensors from `model_dir` (validated before any compute).
  // With a tensor-parallel group (`comm`, spec §7), `shard` must be {comm->rank(), comm->size()}:
  // each rank holds its shard and every forward runs the group's collectives, so all ranks must
  // call Forward with the same batch. comm outlives the Transformer.
  static absl::StatusOr<std::unique_ptr<Transformer>> Load(const std::string& model_dir,
                                                           const kernels::Backend& be,
                                                           ShardSpec shard = {},
                                                           const LoadProgress& progress = nullptr,
                                                           const parallel::Communicator* comm = nullptr);
  Transformer(ModelArgs args, ModelWeights weights, const kernels::Backend& be,
              const parallel::Communicator* comm = nullptr);
  Transformer(const Transformer&) = delete;
  Transformer& operator=(const Transformer&) = delete;

  const ModelArgs& args() const { return args_; }
  const ModelWeights& weights() const { return w_; }
  std::unique_ptr<SessionState> NewSession() const { return std::make_unique<SessionState>(args_); }

  // Runs every item's tokens through the model in one pass (rows of all items share the
  // GEMMs; attention runs per session). Advances each state's position.
  absl::Status Forward(std::span<BatchItem> batch) const;

  // Every weight the forward multiplies by, moved to the backend's device (Load calls it): a GPU
  // worker uploads at load, so a memory budget too small for one weight fails there, and the
  // first request pays no uploads. A no-op on the CPU.
  absl::Status PrepareWeights() const;

 private:
  ModelArgs args_;
  ModelWeights w_;
  const kernels::Backend& be_;
  const parallel::Communicator* comm_;
  std::vector<std::unique_ptr<Block>> layers_;
  std::unique_ptr<ParallelHead> head_;
};

}  // namespace flashmem::model
