#include "worker/model/config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace flashmem::model {
namespace {

using nlohmann::json;

absl::Status KeyError(absl::string_view key, const json& v, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("config.json: key '", key, "' = ", v.dump(), ": ", why));
}

absl::Status GetInt(const json& j, const char* key, int64_t* out, bool required = true) {
  auto it = j.find(key);
  if (it == j.end()) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("config.json: missing key '", key, "'"));
  }
  if (!it->is_number_integer()) return KeyError(key, *it, "must be an integer");
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

template <typename T>
absl::Status GetNumber(const json& j, const char* key, T* out, bool required = true) {
  auto it = j.find(key);
  if (it == j.end()) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("config.json: missing key '", key, "'"));
  }
  if (!it->is_number()) return KeyError(key, *it, "must be a number");
  *out = it->get<T>();
  return absl::OkStatus();
}

absl::Status GetString(const json& j, const char* key, std::string* out, bool required = true) {
  auto it = j.find(key);
  if (it == j.end()) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat("config.json: missing key '", key, "'"));
  }
  if (!it->is_string()) return KeyError(key, *it, "must be a string");
  *out = it->get<std::string>();
  return absl::OkStatus();
}

absl::Status Positive(const char* key, int64_t v) {
  if (v <= 0) return KeyError(key, v, "must be positive");
  return absl::OkStatus();
}

absl::Status MultipleOf(const char* key, int64_t v, int64_t m, absl::string_view why) {
  if (v % m != 0) return KeyError(key, v, absl::StrCat("must be a multiple of ", m, " (", why, ")"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelArgs> ParseModelArgs(const std::string& json_text) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: not valid JSON: ", e.what()));
  }
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: top level must be an object");
  ModelArgs a;
  std::string model_type;
  FM_RETURN_IF_ERROR(GetString(j, "model_type", &model_type, false));
  if (!model_type.empty() && model_type != "deepseek_v4")
    return KeyError("model_type", model_type, "only 'deepseek_v4' is supported");
  FM_RETURN_IF_ERROR(GetInt(j, "vocab_size", &a.vocab_size));
  FM_RETURN_IF_ERROR(GetInt(j, "hidden_size", &a.dim));
  FM_RETURN_IF_ERROR(GetInt(j, "num_hidden_layers", &a.n_layers));
  FM_RETURN_IF_ERROR(GetInt(j, "num_nextn_predict_layers", &a.n_mtp_layers, false));
  FM_RETURN_IF_ERROR(GetInt(j, "num_attention_heads", &a.n_heads));
  int64_t kv_heads = 1;
  FM_RETURN_IF_ERROR(GetInt(j, "num_key_value_heads", &kv_heads, false));
  if (kv_heads != 1) return KeyError("num_key_value_heads", kv_heads, "DeepSeek-V4 has one latent KV head");
  FM_RETURN_IF_ERROR(GetInt(j, "head_dim", &a.head_dim));
  FM_RETURN_IF_ERROR(GetInt(j, "qk_rope_head_dim", &a.rope_head_dim));
  FM_RETURN_IF_ERROR(GetInt(j, "q_lora_rank", &a.q_lora_rank));
  FM_RETURN_IF_ERROR(GetInt(j, "o_groups", &a.o_groups));
  FM_RETURN_IF_ERROR(GetInt(j, "o_lora_rank", &a.o_lora_rank));
  FM_RETURN_IF_ERROR(GetInt(j, "sliding_window", &a.window_size));
  FM_RETURN_IF_ERROR(GetInt(j, "index_n_heads", &a.index_n_heads));
  FM_RETURN_IF_ERROR(GetInt(j, "index_head_dim", &a.index_head_dim));
  FM_RETURN_IF_ERROR(GetInt(j, "index_topk", &a.index_topk));
  FM_RETURN_IF_ERROR(GetInt(j, "n_routed_experts", &a.n_routed_experts));
  FM_RETURN_IF_ERROR(GetInt(j, "n_shared_experts", &a.n_shared_experts, false));
  FM_RETURN_IF_ERROR(GetInt(j, "num_experts_per_tok", &a.n_activated_experts));
  FM_RETURN_IF_ERROR(GetInt(j, "moe_intermediate_size", &a.moe_inter_dim));
  FM_RETURN_IF_ERROR(GetInt(j, "num_hash_layers", &a.n_hash_layers, false));
  std::string score_func = "sqrtsoftplus";
  FM_RETURN_IF_ERROR(GetString(j, "scoring_func", &score_func, false));
  if (score_func == "sqrtsoftplus") a.score_func = ScoreFunc::kSqrtSoftplus;
  else if (score_func == "sigmoid") a.score_func = ScoreFunc::kSigmoid;
  else if (score_func == "softmax") a.score_func = ScoreFunc::kSoftmax;
  else return KeyError("scoring_func", score_func, "known: sqrtsoftplus, sigmoid, softmax");
  FM_RETURN_IF_ERROR(GetString(j, "topk_method", &a.topk_method, false));
  if (a.topk_method != "noaux_tc")
    return KeyError("topk_method", a.topk_method, "known: noaux_tc (flat top-k, bias for selection only)");
  if (auto it = j.find("norm_topk_prob"); it != j.end()) {
    if (!it->is_boolean()) return KeyError("norm_topk_prob", *it, "must be a boolean");
    a.norm_topk_prob = it->get<bool>();
  }
  FM_RETURN_IF_ERROR(GetNumber(j, "routed_scaling_factor", &a.route_scale, false));
  FM_RETURN_IF_ERROR(GetNumber(j, "swiglu_limit", &a.swiglu_limit, false));
  int64_t hc = a.hc_mult, iters = a.hc_sinkhorn_iters;
  FM_RETURN_IF_ERROR(GetInt(j, "hc_mult", &hc, false));
  FM_RETURN_IF_ERROR(GetInt(j, "hc_sinkhorn_iters", &iters, false));
  a.hc_mult = static_cast<int>(hc);
  a.hc_sinkhorn_iters = static_cast<int>(iters);
  FM_RETURN_IF_ERROR(GetNumber(j, "hc_eps", &a.hc_eps, false));
  FM_RETURN_IF_ERROR(GetNumber(j, "rms_norm_eps", &a.norm_eps, false));
  FM_RETURN_IF_ERROR(GetNumber(j, "rope_theta", &a.rope_theta, false));
  FM_RETURN_IF_ERROR(GetNumber(j, "compress_rope_theta", &a.compress_rope_theta, false));
  FM_RETURN_IF_ERROR(GetInt(j, "max_position_embeddings", &a.max_position_embeddings, false));
  FM_RETURN_IF_ERROR(GetInt(j, "bos_token_id", &a.bos_token_id, false));
  FM_RETURN_IF_ERROR(GetInt(j, "eos_token_id", &a.eos_token_id, false));
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && it->is_boolean() && it->get<bool>())
    return KeyError("tie_word_embeddings", *it, "DeepSeek-V4 has an untied head");
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    const json& rs = *it;
    if (!rs.is_object()) return KeyError("rope_scaling", rs, "must be an object");
    std::string type;
    if (rs.contains("type")) FM_RETURN_IF_ERROR(GetString(rs, "type", &type));
    else FM_RETURN_IF_ERROR(GetString(rs, "rope_type", &type));
    if (type != "yarn") return KeyError("rope_scaling.type", type, "only 'yarn' is supported");
    FM_RETURN_IF_ERROR(GetNumber(rs, "factor", &a.rope_factor));
    FM_RETURN_IF_ERROR(GetInt(rs, "original_max_position_embeddings", &a.original_seq_len));
    FM_RETURN_IF_ERROR(GetNumber(rs, "beta_fast", &a.beta_fast, false));
    FM_RETURN_IF_ERROR(GetNumber(rs, "beta_slow", &a.beta_slow, false));
  }
  std::string expert_dtype;
  FM_RETURN_IF_ERROR(GetString(j, "expert_dtype", &expert_dtype, false));
  if (expert_dtype == "fp8") a.expert_dtype = ExpertDtype::kFp8;
  else if (expert_dtype.empty() || expert_dtype == "fp4") a.expert_dtype = ExpertDtype::kFp4;
  else return KeyError("expert_dtype", expert_dtype, "known: fp4, fp8");
  if (auto it = j.find("quantization_config"); it != j.end()) {
    const json& q = *it;
    if (!q.is_object()) return KeyError("quantization_config", q, "must be an object");
    std::string method, fmt, scale_fmt;
    FM_RETURN_IF_ERROR(GetString(q, "quant_method", &method, false));
    FM_RETURN_IF_ERROR(GetString(q, "fmt", &fmt, false));
    FM_RETURN_IF_ERROR(GetString(q, "scale_fmt", &scale_fmt, false));
    if (!method.empty() && method != "fp8") return KeyError("quantization_config.quant_method", method, "only 'fp8' is supported");
    if (!fmt.empty() && fmt != "e4m3") return KeyError("quantization_config.fmt", fmt, "only 'e4m3' is supported");
    if (!scale_fmt.empty() && scale_fmt != "ue8m0") return KeyError("quantization_config.scale_fmt", scale_fmt, "only 'ue8m0' is supported");
    if (auto bs = q.find("weight_block_size"); bs != q.end() && *bs != json::array({128, 128}))
      return KeyError("quantization_config.weight_block_size", *bs, "only [128, 128] is supported");
  }
  auto cr = j.find("compress_ratios");
  if (cr == j.end()) return absl::InvalidArgumentError("config.json: missing key 'compress_ratios'");
  if (!cr->is_array()) return KeyError("compress_ratios", *cr, "must be an array of integers");
  for (const json& r : *cr) {
    if (!r.is_number_integer()) return KeyError("compress_ratios", *cr, "must be an array of integers");
    a.compress_ratios.push_back(r.get<int>());
  }
  FM_RETURN_IF_ERROR(ValidateModelArgs(a));
  return a;
}

absl::Status ValidateModelArgs(const ModelArgs& a) {
  FM_RETURN_IF_ERROR(Positive("vocab_size", a.vocab_size));
  FM_RETURN_IF_ERROR(Positive("num_hidden_layers", a.n_layers));
  FM_RETURN_IF_ERROR(Positive("num_attention_heads", a.n_heads));
  FM_RETURN_IF_ERROR(Positive("sliding_window", a.window_size));
  FM_RETURN_IF_ERROR(Positive("n_routed_experts", a.n_routed_experts));
  FM_RETURN_IF_ERROR(Positive("num_experts_per_tok", a.n_activated_experts));
  FM_RETURN_IF_ERROR(Positive("index_topk", a.index_topk));
  FM_RETURN_IF_ERROR(Positive("index_n_heads", a.index_n_heads));
  FM_RETURN_IF_ERROR(Positive("hc_mult", a.hc_mult));
  FM_RETURN_IF_ERROR(Positive("hc_sinkhorn_iters", a.hc_sinkhorn_iters));
  if (a.n_mtp_layers < 0) return KeyError("num_nextn_predict_layers", a.n_mtp_layers, "must be >= 0");
  // Every GEMM's K dimension must be a multiple of 128 (act_quant works on 1x128 blocks).
  FM_RETURN_IF_ERROR(MultipleOf("hidden_size", a.dim, 128, "FP8 activation blocks of 128"));
  FM_RETURN_IF_ERROR(MultipleOf("q_lora_rank", a.q_lora_rank, 128, "FP8 activation blocks of 128"));
  FM_RETURN_IF_ERROR(MultipleOf("o_lora_rank", a.o_groups * a.o_lora_rank, 128, "o_groups*o_lora_rank is wo_b's K: FP8 activation blocks of 128"));
  FM_RETURN_IF_ERROR(MultipleOf("moe_intermediate_size", a.moe_inter_dim, 128, "FP8 activation blocks of 128"));
  FM_RETURN_IF_ERROR(MultipleOf("head_dim", a.head_dim, 128, "FP8 weight blocks of 128"));
  if (a.rope_head_dim <= 0 || a.rope_head_dim % 2 != 0 || a.rope_head_dim >= a.head_dim)
    return KeyError("qk_rope_head_dim", a.rope_head_dim, "must be even, positive and below head_dim");
  FM_RETURN_IF_ERROR(MultipleOf("head_dim", a.head_dim - a.rope_head_dim, 64, "head_dim - qk_rope_head_dim: FP8 KV blocks of 64"));
  if (a.o_groups <= 0 || a.n_heads % a.o_groups != 0)
    return KeyError("o_groups", a.o_groups, absl::StrCat("must divide num_attention_heads = ", a.n_heads));
  FM_RETURN_IF_ERROR(MultipleOf("num_attention_heads", a.n_heads * a.head_dim / a.o_groups, 128,
                                "num_attention_heads*head_dim/o_groups is wo_a's K"));
  if (a.index_head_dim <= 0 || (a.index_head_dim & (a.index_head_dim - 1)) != 0 || a.index_head_dim % 32 != 0 ||
      a.index_head_dim <= a.rope_head_dim)
    return KeyError("index_head_dim", a.index_head_dim, "must be a power of two, a multiple of 32 and above qk_rope_head_dim");
  if (a.n_activated_experts > a.n_routed_experts)
    return KeyError("num_experts_per_tok", a.n_activated_experts, absl::StrCat("exceeds n_routed_experts = ", a.n_routed_experts));
  if (a.n_shared_experts != 1) return KeyError("n_shared_experts", a.n_shared_experts, "exactly one shared expert is supported");
  if (a.n_hash_layers < 0 || a.n_hash_layers > a.n_layers)
    return KeyError("num_hash_layers", a.n_hash_layers, "must be in [0, num_hidden_layers]");
  if (static_cast<int64_t>(a.compress_ratios.size()) != a.n_layers + a.n_mtp_layers)
    return KeyError("compress_ratios", a.compress_ratios.size(),
                    absl::StrCat("length must be num_hidden_layers + num_nextn_predict_layers = ", a.n_layers + a.n_mtp_layers));
  for (size_t i = 0; i < a.compress_ratios.size(); ++i) {
    const int r = a.compress_ratios[i];
    if (r != 0 && (r < 2 || (r & (r - 1)) != 0))
      return KeyError(absl::StrCat("compress_ratios[", i, "]"), r, "must be 0 or a power of two >= 2");
    if (static_cast<int64_t>(i) >= a.n_layers && r != 0)
      return KeyError(absl::StrCat("compress_ratios[", i, "]"), r, "MTP layers are sliding-window only (ratio 0)");
  }
  if (a.original_seq_len < 0) return KeyError("rope_scaling.original_max_position_embeddings", a.original_seq_len, "must be >= 0");
  if (a.rope_factor <= 0) return KeyError("rope_scaling.factor", a.rope_factor, "must be positive");
  return absl::OkStatus();
}

absl::StatusOr<ModelArgs> LoadModelArgs(const std::string& model_dir) {
  FM_ASSIGN_OR_RETURN(std::string text, ReadFileToString(model_dir + "/config.json"));
  return ParseModelArgs(text);
}

std::string ModelArgsToJson(const ModelArgs& a) {
  json j;
  j["architectures"] = {"DeepseekV4ForCausalLM"};
  j["model_type"] = "deepseek_v4";
  j["vocab_size"] = a.vocab_size;
  j["hidden_size"] = a.dim;
  j["num_hidden_layers"] = a.n_layers;
  j["num_nextn_predict_layers"] = a.n_mtp_layers;
  j["compress_ratios"] = a.compress_ratios;
  j["num_attention_heads"] = a.n_heads;
  j["num_key_value_heads"] = 1;
  j["head_dim"] = a.head_dim;
  j["qk_rope_head_dim"] = a.rope_head_dim;
  j["q_lora_rank"] = a.q_lora_rank;
  j["o_groups"] = a.o_groups;
  j["o_lora_rank"] = a.o_lora_rank;
  j["sliding_window"] = a.window_size;
  j["index_n_heads"] = a.index_n_heads;
  j["index_head_dim"] = a.index_head_dim;
  j["index_topk"] = a.index_topk;
  j["n_routed_experts"] = a.n_routed_experts;
  j["n_shared_experts"] = a.n_shared_experts;
  j["num_experts_per_tok"] = a.n_activated_experts;
  j["moe_intermediate_size"] = a.moe_inter_dim;
  j["num_hash_layers"] = a.n_hash_layers;
  j["scoring_func"] = a.score_func == ScoreFunc::kSqrtSoftplus ? "sqrtsoftplus"
                      : a.score_func == ScoreFunc::kSigmoid    ? "sigmoid" : "softmax";
  j["topk_method"] = a.topk_method;
  j["norm_topk_prob"] = a.norm_topk_prob;
  j["routed_scaling_factor"] = a.route_scale;
  j["swiglu_limit"] = a.swiglu_limit;
  j["hc_mult"] = a.hc_mult;
  j["hc_sinkhorn_iters"] = a.hc_sinkhorn_iters;
  j["hc_eps"] = a.hc_eps;
  j["rms_norm_eps"] = a.norm_eps;
  j["rope_theta"] = a.rope_theta;
  j["compress_rope_theta"] = a.compress_rope_theta;
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", a.rope_factor},
                       {"original_max_position_embeddings", a.original_seq_len},
                       {"beta_fast", a.beta_fast}, {"beta_slow", a.beta_slow}};
  j["max_position_embeddings"] = a.max_position_embeddings;
  j["expert_dtype"] = a.expert_dtype == ExpertDtype::kFp4 ? "fp4" : "fp8";
  j["bos_token_id"] = a.bos_token_id;
  j["eos_token_id"] = a.eos_token_id;
  j["tie_word_embeddings"] = false;
  j["torch_dtype"] = "bfloat16";
  j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"scale_fmt", "ue8m0"},
                              {"weight_block_size", {128, 128}}, {"activation_scheme", "dynamic"}};
  return j.dump(2);
}

}  // namespace flashmem::model
