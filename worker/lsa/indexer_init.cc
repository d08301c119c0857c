#include "worker/lsa/indexer_init.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "worker/lsa/memory_indexer.h"
#include "worker/model/safetensors.h"
#include "worker/model/weights.h"

namespace flashmem::lsa {
namespace {

// Dense fp32 values of a loaded weight (block scales applied).
std::vector<float> Dequantize(const kernels::WeightMatrix& w) {
  std::vector<float> out = w.values;
  if (w.format == kernels::WeightFormat::kDense) return out;
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) {
      const float s = w.format == kernels::WeightFormat::kFp8Block128
          ? w.scales[(r / 128) * w.scale_cols() + c / 128] : w.scales[r * w.scale_cols() + c / 32];
      out[r * w.cols + c] *= s;
    }
  return out;
}

model::TensorToWrite F32(const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
  model::TensorToWrite t{name, model::DType::kF32, std::move(shape), {}};
  t.bytes.resize(v.size() * 4);
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

}  // namespace

int64_t CountCsaLayers(const model::ModelArgs& a) {
  int64_t n = 0;
  for (int64_t l = 0; l < a.n_layers; ++l) n += a.ratio(l) == 4;
  return n;
}

std::vector<int> DefaultTargetLayers(int64_t n_csa) {
  std::vector<int> out;
  if (n_csa <= 0) return out;
  for (int id : {10, 12, 20}) {
    const int v = n_csa >= 21 ? id : static_cast<int>(std::lround(id * static_cast<double>(n_csa - 1) / 20.0));
    if (std::find(out.begin(), out.end(), v) == out.end()) out.push_back(v);
  }
  return out;
}

absl::Status InitIndexerFromModel(const std::string& model_dir, std::vector<int> layers,
                                  const std::string& out_dir) {
  FM_ASSIGN_OR_RETURN(model::ModelArgs args, model::LoadModelArgs(model_dir));
  if (args.index_head_dim != kIndexHeadDim)
    return absl::FailedPreconditionError(absl::StrCat("the model's index_head_dim is ", args.index_head_dim, "; a memory indexer needs 128-dim index keys"));
  if (args.rope_head_dim != 64)
    return absl::FailedPreconditionError(absl::StrCat("the model's qk_rope_head_dim is ", args.rope_head_dim, "; the memory indexer rotates 64 dims"));
  const int64_t n_csa = CountCsaLayers(args);
  if (n_csa == 0) return absl::FailedPreconditionError("the model has no CSA (compress ratio 4) layers");
  if (layers.empty()) layers = DefaultTargetLayers(n_csa);
  std::sort(layers.begin(), layers.end());
  for (size_t i = 0; i < layers.size(); ++i) {
    if (layers[i] < 0 || layers[i] >= n_csa)
      return absl::InvalidArgumentError(absl::StrCat("--layers: CSA id ", layers[i], " is outside [0, ", n_csa, ") for this model"));
    if (i > 0 && layers[i] == layers[i - 1]) return absl::InvalidArgumentError(absl::StrCat("--layers: CSA id ", layers[i], " given twice"));
  }
  FM_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(model_dir));
  FM_ASSIGN_OR_RETURN(model::ModelWeights w, model::LoadWeights(*ckpt, args));
  std::vector<int64_t> csa_layer;  // model layer of each CSA id
  for (int64_t l = 0; l < args.n_layers; ++l)
    if (args.ratio(l) == 4) csa_layer.push_back(l);
  std::vector<model::TensorToWrite> out;
  for (int id : layers) {
    const model::AttentionWeights& a = w.layers[csa_layer[id]].attn;
    const std::string p = absl::StrCat("retrievers.l", id, ".");
    out.push_back(F32(p + "wq_a.weight", {a.wq_a.rows, a.wq_a.cols}, Dequantize(a.wq_a)));
    out.push_back(F32(p + "q_norm_weight", {static_cast<int64_t>(a.q_norm.size())}, a.q_norm));
    out.push_back(F32(p + "wq_b.weight", {a.indexer->wq_b.rows, a.indexer->wq_b.cols}, Dequantize(a.indexer->wq_b)));
    out.push_back(F32(p + "weights_proj.weight", {a.indexer->weights_proj.rows, a.indexer->weights_proj.cols},
                      Dequantize(a.indexer->weights_proj)));
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  const bool yarn = args.original_seq_len > 0;
  return model::WriteSafetensors(
      (std::filesystem::path(out_dir) / "fm_indexer.safetensors").string(), out,
      {{"n_heads", std::to_string(args.index_n_heads)}, {"head_dim", "128"},
       {"q_lora_rank", std::to_string(args.q_lora_rank)}, {"layers", absl::StrJoin(layers, ",")},
       {"rope_theta", absl::StrCat(args.compress_rope_theta)},
       {"rope_factor", absl::StrCat(yarn ? args.rope_factor : 1.0)},
       {"original_seq_len", absl::StrCat(yarn ? args.original_seq_len : 65536)},
       {"beta_fast", absl::StrCat(args.beta_fast)}, {"beta_slow", absl::StrCat(args.beta_slow)},
       {"source", absl::StrCat("flashmem indexer init from the native lightning indexer of ", model_dir)}});
}

}  // namespace flashmem::lsa
