#include "worker/model/rope.h"

#include <algorithm>
#include <cmath>

namespace flashmem::model {

RotaryTable::RotaryTable(int64_t dim, double base, int64_t original_seq_len, double factor,
                         double beta_fast, double beta_slow) {
  const int64_t half = dim / 2;
  inv_freq_.resize(half);
  for (int64_t i = 0; i < half; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(dim);
    const float p = static_cast<float>(std::pow(static_cast<double>(static_cast<float>(base)), static_cast<double>(e)));
    inv_freq_[i] = 1.0f / p;
  }
  if (original_seq_len > 0) {
    auto correction_dim = [&](double rotations) {
      return dim * std::log(original_seq_len / (rotations * 2 * M_PI)) / (2 * std::log(base));
    };
    const double low = std::max(std::floor(correction_dim(beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_dim(beta_slow)), static_cast<double>(dim - 1));
    if (low == high) high += 0.001;
    const float flow = static_cast<float>(low), fspan = static_cast<float>(high - low);
    const float ffactor = static_cast<float>(factor);
    for (int64_t i = 0; i < half; ++i) {
      const float ramp = std::clamp((static_cast<float>(i) - flow) / fspan, 0.0f, 1.0f);
      const float smooth = 1.0f - ramp;
      inv_freq_[i] = inv_freq_[i] / ffactor * (1.0f - smooth) + inv_freq_[i] * smooth;
    }
  }
}

RotaryTable RotaryTable::ForLayer(const ModelArgs& a, int ratio) {
  if (ratio > 0)
    return RotaryTable(a.rope_head_dim, a.compress_rope_theta, a.original_seq_len, a.rope_factor, a.beta_fast, a.beta_slow);
  return RotaryTable(a.rope_head_dim, a.rope_theta, 0, a.rope_factor, a.beta_fast, a.beta_slow);
}

void RotaryTable::Angles(int64_t position, float* cos, float* sin) const {
  const float p = static_cast<float>(position);
  for (size_t i = 0; i < inv_freq_.size(); ++i) {
    const float angle = p * inv_freq_[i];
    cos[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    sin[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

}  // namespace flashmem::model
