// Random HF-format DeepSeek-V4 checkpoints (config.json + model.safetensors with FP8/FP4 exactly
// as released), deterministic per seed, with init scales that keep activations O(1).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "worker/model/config.h"

namespace flashmem::model {

// Presets: "tiny" (embedded default: every layer type, real 129,280 vocabulary), "small"
// (~100 MB), "flash-shape" (V4-Flash dimensions). layers <= 0 keeps the preset's count;
// experts <= 0 keeps the preset's routed-expert count.
absl::StatusOr<ModelArgs> PresetArgs(const std::string& preset, int64_t layers = 0, int64_t experts = 0);

struct RandomCheckpointStats {
  int64_t tensors = 0;
  int64_t bytes = 0;
};
absl::StatusOr<RandomCheckpointStats> WriteRandomCheckpoint(const ModelArgs& args, uint64_t seed,
                                                            const std::string& out_dir);

}  // namespace flashmem::model
