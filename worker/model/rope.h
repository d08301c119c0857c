// Rotary tables (spec §3.6): every layer builds its own. Compressed layers (ratio > 0) use
// compress_rope_theta with YaRN frequency blending; ratio-0 layers use rope_theta without YaRN.
// Angles are fp32(position) * fp32(freq), as the reference's precomputed table.
#pragma once

#include <cstdint>
#include <vector>

#include "worker/model/config.h"

namespace flashmem::model {

class RotaryTable {
 public:
  RotaryTable() = default;
  RotaryTable(int64_t rope_dims, double base, int64_t original_seq_len, double factor,
              double beta_fast, double beta_slow);
  // The table a layer of `ratio` uses.
  static RotaryTable ForLayer(const ModelArgs& args, int ratio);

  // cos/sin of the rope_dims/2 angles at `position`.
  void Angles(int64_t position, float* cos, float* sin) const;
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  int64_t half() const { return static_cast<int64_t>(inv_freq_.size()); }

 private:
  std::vector<float> inv_freq_;
};

}  // namespace flashmem::model
