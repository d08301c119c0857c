// LSA Level 1: the memory indexer (spec/memory_indexer.md §1-§2). A query tower per target CSA
// layer turns that layer's attention input into H queries of 128 dims, scored against the
// layer's frozen index-K: logit_j = sum_h w_h * relu(<q_h, k_j>), selected when
// sigmoid(logit_j) > threshold. Two scorers compute that function: `ref` (fp32 q after the
// inference code's two bf16 roundings, fp32 keys; the golden math) and `fp8q` (q quantized to
// e4m3 per head, fp8 x fp8 products, key scale applied after the head sum; the deployed one).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/ops.h"
#include "worker/model/safetensors.h"

namespace flashmem::lsa {

inline constexpr int64_t kIndexHeadDim = 128;      // every memory-indexer head
inline constexpr int64_t kIndexKRecordBytes = 132; // 128 e4m3 + fp32 scale (spec §1.5)

enum class Scorer { kRef, kFp8q };

// The query tower's rotary table (spec §1.4). Defaults are the release's constants, which equal
// DeepSeek-V4's compress_rope_theta / YaRN settings; `flashmem indexer init` records a model's own
// values in the checkpoint metadata so queries rotate like that model's index keys.
struct IndexerRopeOptions {
  double base = 160000.0;
  int64_t original_seq_len = 65536;
  double factor = 16.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  int64_t max_position = 1 << 20;  // positions clamp to [0, max_position - 1]
};

// One target layer's weights (official key names retrievers.l{csa}.*; fp32).
struct MemoryIndexerLayer {
  int csa_index = 0;                 // index among the model's CSA layers (l10 = the 11th)
  kernels::WeightMatrix wq_a;        // [R, hidden]
  std::vector<float> q_norm;         // [R]
  kernels::WeightMatrix wq_b;        // [H*128, R]
  kernels::WeightMatrix weights_proj;  // [H, hidden]
};

// The scoring inputs of one (layer, token), with the tower's intermediates kept for tests.
struct IndexerQuery {
  std::vector<float> q_lora, q_norm, q_pre, q_rope;  // [R], [R], [H*128], [H*128]
  std::vector<float> q;          // [H*128] final query: FWHT(q_rope) / sqrt(128)
  std::vector<float> per_head_w; // [H] x . Wp^T
  std::vector<float> w;          // [H] per_head_w * 128^-0.5 * H^-0.5
  std::vector<uint8_t> q8;       // [H*128] e4m3 codes of q / q_scale (fp8q)
  std::vector<float> q_scale;    // [H] max(amax, 1e-4) * fp32(1/448)
  std::vector<float> w8;         // [H] w * q_scale (fp8q)
};

class MemoryIndexer {
 public:
  // Loads a safetensors file with the official key names, or a directory holding
  // fm_indexer.safetensors. H and R are inferred from the shapes as the release's loader does;
  // every inconsistency (missing key, shape, non-finite weight, layer set) is an error naming it.
  static absl::StatusOr<MemoryIndexer> Load(const std::string& path, const kernels::Backend& be);
  static absl::StatusOr<MemoryIndexer> FromFile(const model::SafetensorsFile& file,
                                                const kernels::Backend& be);

  int64_t hidden() const { return hidden_; }
  int64_t q_lora_rank() const { return q_lora_rank_; }
  int64_t n_heads() const { return n_heads_; }
  const std::vector<MemoryIndexerLayer>& layers() const { return layers_; }
  std::vector<int> csa_layers() const;
  const std::vector<float>& rope_inv_freq() const { return inv_freq_; }

  // The tower for layer slot `slot` (order of csa_layers()) on hidden state x [hidden] at `pos`.
  IndexerQuery Query(int slot, const float* x, int64_t pos) const;
  // logits[j] for n keys given as fp32 rows of 128 (ref) or 132-byte records (fp8q). A null row
  // is a chunk whose key is not available; its logit is -inf (never selected).
  void ScoreRef(const IndexerQuery& q, const float* const* keys, int64_t n, float* logits) const;
  void ScoreFp8q(const IndexerQuery& q, const uint8_t* const* records, int64_t n,
                 float* logits) const;

 private:
  MemoryIndexer(const kernels::Backend& be) : be_(&be) {}
  const kernels::Backend* be_;
  int64_t hidden_ = 0, q_lora_rank_ = 0, n_heads_ = 0;
  IndexerRopeOptions rope_;
  std::vector<float> inv_freq_;
  std::vector<MemoryIndexerLayer> layers_;
};

// 132-byte index-K records (spec §1.5): k[d] = e4m3(bytes[d]) * scale.
void DecodeIndexKRecord(const uint8_t* record, float* key);
// Quantizes a key of 128 fp32 values: scale = amax / 448 (1 when the key is zero), RNE codes.
void EncodeIndexKRecord(const float* key, uint8_t* record);

// sigmoid in fp32 as torch computes it: 1 / (1 + exp(-x)).
float Sigmoid(float x);

}  // namespace flashmem::lsa
