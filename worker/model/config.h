// ModelArgs: the HF config.json of a DeepSeek-V4 checkpoint, parsed and validated.
// Field names follow the reference's ModelArgs; comments give the HF key.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flashmem::model {

enum class ScoreFunc { kSqrtSoftplus, kSigmoid, kSoftmax };
enum class ExpertDtype { kFp4, kFp8 };

struct ModelArgs {
  int64_t vocab_size = 0;           // vocab_size
  int64_t dim = 0;                  // hidden_size
  int64_t n_layers = 0;             // num_hidden_layers
  int64_t n_mtp_layers = 0;         // num_nextn_predict_layers
  std::vector<int> compress_ratios;  // compress_ratios: n_layers + n_mtp_layers entries
  int64_t n_heads = 0;              // num_attention_heads
  int64_t head_dim = 0;             // head_dim (512 = 448 nope + 64 rope)
  int64_t rope_head_dim = 0;        // qk_rope_head_dim
  int64_t q_lora_rank = 0;          // q_lora_rank
  int64_t o_groups = 0;             // o_groups
  int64_t o_lora_rank = 0;          // o_lora_rank
  int64_t window_size = 0;          // sliding_window
  int64_t index_n_heads = 0;        // index_n_heads
  int64_t index_head_dim = 0;       // index_head_dim
  int64_t index_topk = 0;           // index_topk
  int64_t n_routed_experts = 0;     // n_routed_experts
  int64_t n_shared_experts = 1;     // n_shared_experts
  int64_t n_activated_experts = 0;  // num_experts_per_tok
  int64_t moe_inter_dim = 0;        // moe_intermediate_size
  int64_t n_hash_layers = 0;        // num_hash_layers
  ScoreFunc score_func = ScoreFunc::kSqrtSoftplus;  // scoring_func
  std::string topk_method = "noaux_tc";             // topk_method
  bool norm_topk_prob = true;       // norm_topk_prob
  float route_scale = 1.0f;         // routed_scaling_factor
  float swiglu_limit = 0.0f;        // swiglu_limit
  int hc_mult = 4;                  // hc_mult
  int hc_sinkhorn_iters = 20;       // hc_sinkhorn_iters
  float hc_eps = 1e-6f;             // hc_eps
  float norm_eps = 1e-6f;           // rms_norm_eps
  double rope_theta = 10000.0;      // rope_theta (ratio-0 layers, no YaRN)
  double compress_rope_theta = 160000.0;  // compress_rope_theta (ratio>0 layers, YaRN)
  double rope_factor = 1.0;         // rope_scaling.factor
  int64_t original_seq_len = 0;     // rope_scaling.original_max_position_embeddings
  double beta_fast = 32.0;          // rope_scaling.beta_fast
  double beta_slow = 1.0;           // rope_scaling.beta_slow
  int64_t max_position_embeddings = 0;  // max_position_embeddings
  ExpertDtype expert_dtype = ExpertDtype::kFp4;  // expert_dtype ("fp4" | "fp8")
  int64_t bos_token_id = 0;         // bos_token_id
  int64_t eos_token_id = 1;         // eos_token_id

  int64_t nope_head_dim() const { return head_dim - rope_head_dim; }
  int mix_hc() const { return (2 + hc_mult) * hc_mult; }
  int ratio(int64_t layer) const { return compress_ratios[layer]; }
  bool is_hash_layer(int64_t layer) const { return layer < n_hash_layers; }
};

// Parses config.json text. Every error names the key and the offending value.
absl::StatusOr<ModelArgs> ParseModelArgs(const std::string& json_text);
absl::StatusOr<ModelArgs> LoadModelArgs(const std::string& model_dir);
// Checks the invariants the decode path relies on (FP8 block multiples, group divisibility...).
absl::Status ValidateModelArgs(const ModelArgs& args);
// Serializes to an HF config.json (what `ckpt random` writes).
std::string ModelArgsToJson(const ModelArgs& args);

}  // namespace flashmem::model
