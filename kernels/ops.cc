#include "kernels/ops.h"

#include <algorithm>

#include "kernels/numerics.h"

namespace flashmem::kernels {

void SwiGluRows(const float* gate, const float* up, int64_t m, int64_t inter, const float* weights, float limit,
                float* h) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < inter; ++j) {
      float g = gate[i * inter + j], u = up[i * inter + j];
      if (limit > 0) {
        u = std::clamp(u, -limit, limit);
        g = std::min(g, limit);
      }
      float v = (g / (1.0f + num::ExpF(-g))) * u;  // silu(gate) * up, fp32
      if (weights) v *= weights[i];
      h[i * inter + j] = num::RoundBf16(v);
    }
}

void Backend::RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                            float swiglu_limit, float* y) const {
  std::vector<float> xs, gate, up, h, out;
  for (const ExpertWork& e : experts) {
    const int64_t m = static_cast<int64_t>(e.rows.size()), inter = e.w1->rows;
    if (m == 0) continue;
    xs.resize(m * dim);
    for (int64_t r = 0; r < m; ++r) std::copy_n(x + static_cast<int64_t>(e.rows[r]) * dim, dim, xs.begin() + r * dim);
    gate.resize(m * inter);
    up.resize(m * inter);
    h.resize(m * inter);
    out.resize(m * dim);
    Linear(*e.w1, xs.data(), m, gate.data(), Rounding::kBf16);
    Linear(*e.w3, xs.data(), m, up.data(), Rounding::kBf16);
    SwiGluRows(gate.data(), up.data(), m, inter, e.weights.empty() ? nullptr : e.weights.data(), swiglu_limit, h.data());
    Linear(*e.w2, h.data(), m, out.data(), Rounding::kBf16);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < dim; ++c) y[static_cast<int64_t>(e.rows[r]) * dim + c] += out[r * dim + c];
  }
  (void)n;
}

}  // namespace flashmem::kernels
