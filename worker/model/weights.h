// The checkpoint schema (every tensor name, dtype and shape a config implies) and the loaded,
// decoded weights, grouped like the reference's modules. Weights load per tensor-parallel
// shard as spec §7 partitions them.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/ops.h"
#include "worker/model/config.h"
#include "worker/model/safetensors.h"

namespace flashmem::model {

using kernels::WeightMatrix;

struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

// Every tensor of an HF DeepSeek-V4 checkpoint for `args`, MTP layers included.
std::vector<TensorSpec> ExpectedTensors(const ModelArgs& args);

// Checks names, dtypes and shapes before any compute: missing, extra, wrong dtype or shape each
// give an error naming the tensor.
absl::Status ValidateCheckpoint(const Checkpoint& ckpt, const ModelArgs& args);

// Tensor-parallel position of this process (spec §7); world_size 1 loads everything.
struct ShardSpec {
  int rank = 0;
  int world_size = 1;
};

struct CompressorWeights {
  WeightMatrix wkv, wgate;  // dense fp32 (bf16 in the checkpoint)
  std::vector<float> ape;   // [ratio, coff*head_dim]
  std::vector<float> norm;  // [head_dim]
};

struct IndexerWeights {
  WeightMatrix wq_b;          // FP8, local heads
  WeightMatrix weights_proj;  // dense bf16, local heads
  CompressorWeights compressor;
};

struct AttentionWeights {
  std::vector<float> attn_sink;  // local heads
  WeightMatrix wq_a, wq_b, wkv;  // FP8
  std::vector<float> q_norm, kv_norm;
  WeightMatrix wo_a;  // dequantized to bf16 values as the official converter does; local groups
  WeightMatrix wo_b;  // FP8, row-parallel (local input slice)
  std::optional<CompressorWeights> compressor;
  std::optional<IndexerWeights> indexer;
};

struct GateWeights {
  WeightMatrix weight;           // dense [E, dim]
  std::vector<float> bias;       // [E] (non-hash layers)
  std::vector<int32_t> tid2eid;  // [vocab, topk] (hash layers)
};

struct ExpertWeights {
  WeightMatrix w1, w2, w3;  // FP4 (routed) or FP8 (shared / fp8 checkpoints)
};

struct MoEWeights {
  GateWeights gate;
  int64_t first_local_expert = 0;
  std::vector<ExpertWeights> experts;  // the local experts
  ExpertWeights shared;
};

struct BlockWeights {
  AttentionWeights attn;
  MoEWeights ffn;
  std::vector<float> attn_norm, ffn_norm;
  std::vector<float> hc_attn_fn, hc_attn_base, hc_attn_scale;
  std::vector<float> hc_ffn_fn, hc_ffn_base, hc_ffn_scale;
};

struct HcHeadWeights {
  std::vector<float> fn, base, scale;
};

struct MTPWeights {
  BlockWeights block;
  WeightMatrix e_proj, h_proj;
  std::vector<float> enorm, hnorm, norm;
  HcHeadWeights hc_head;
};

struct ModelWeights {
  ShardSpec shard;
  WeightMatrix embed;  // dense [local vocab, dim]
  std::vector<BlockWeights> layers;
  std::vector<float> norm;
  WeightMatrix head;  // dense [local vocab, dim]
  HcHeadWeights hc_head;
  std::vector<MTPWeights> mtp;
};

// Called after each layer is decoded: (layers done, layers in all).
using LoadProgress = std::function<void(int64_t done, int64_t total)>;

// Validates then decodes every tensor (FP8/FP4 grids, E8M0 scales; NaN scales rejected).
absl::StatusOr<ModelWeights> LoadWeights(const Checkpoint& ckpt, const ModelArgs& args,
                                         ShardSpec shard = {}, const LoadProgress& progress = nullptr);

}  // namespace flashmem::model
