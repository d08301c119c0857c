// Top-k selection with the tie rule every backend shares: descending score, equal scores in
// ascending index order (bf16 index scores tie often; the order decides the attention slots).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

namespace flashmem::kernels {

inline std::vector<int32_t> TopKIndices(std::span<const float> scores, int64_t k) {
  std::vector<int32_t> idx(scores.size());
  std::iota(idx.begin(), idx.end(), 0);
  k = std::clamp<int64_t>(k, 0, static_cast<int64_t>(idx.size()));
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
  idx.resize(k);
  return idx;
}

// Greedy decoding's pick: the first index of the largest value, NaN skipped (0 when every value is
// NaN or there are none). Backend::LinearArgmax gives this on every backend.
inline int32_t ArgmaxIndex(std::span<const float> v) {
  int32_t best = 0;
  bool found = false;
  for (size_t i = 0; i < v.size(); ++i)
    if (!(v[i] != v[i]) && (!found || v[i] > v[best])) {
      best = static_cast<int32_t>(i);
      found = true;
    }
  return best;
}

}  // namespace flashmem::kernels
