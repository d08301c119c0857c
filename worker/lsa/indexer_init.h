// `flashmem indexer init`: a memory indexer built from a model's own weights, the way the
// release initialises one before training: for each target CSA layer, the query tower takes the
// main attention's wq_a and q_norm (the lightning indexer reads that same q_lora) and the layer's
// lightning-indexer wq_b and weights_proj. Every model thereby has a usable indexer whose score
// is the native index score (without its FP4/bf16 roundings).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/model/config.h"

namespace flashmem::lsa {

// The release's target layers (CSA ids 10, 12, 20 of DeepSeek-V4's 21) scaled to a model with
// `n_csa` CSA layers: round(id * (n_csa - 1) / 20), duplicates dropped.
std::vector<int> DefaultTargetLayers(int64_t n_csa);
int64_t CountCsaLayers(const model::ModelArgs& args);

// Writes <out_dir>/fm_indexer.safetensors (official key names retrievers.l<csa>.*, fp32, with
// metadata n_heads, head_dim, q_lora_rank, layers and the model's compressed-layer RoPE).
absl::Status InitIndexerFromModel(const std::string& model_dir, std::vector<int> layers,
                                  const std::string& out_dir);

}  // namespace flashmem::lsa
