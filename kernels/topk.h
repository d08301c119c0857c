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

}  // namespace flashmem::kernels
