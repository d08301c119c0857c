#include "worker/model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/topk.h"

namespace flashmem::model {

absl::Status ValidateSampling(const SamplingOptions& o) {
  if (!(o.temperature >= 0.0f) || !std::isfinite(o.temperature) || o.temperature > 100.0f)
    return absl::InvalidArgumentError(absl::StrCat("temperature ", o.temperature, " must be in [0, 100]"));
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("top_p ", o.top_p, " must be in (0, 1]"));
  return absl::OkStatus();
}

double UniformAt(uint64_t seed, uint64_t step) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + step + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int32_t SampleToken(std::span<const float> logits, const SamplingOptions& o, uint64_t step) {
  const int32_t n = static_cast<int32_t>(logits.size());
  if (o.temperature <= 0.0f) return kernels::ArgmaxIndex(logits);  // the rule BatchItem::greedy follows
  // Softmax at temperature (double for a stable sum), highest first (ties: lower id first).
  const float mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(n);
  double sum = 0;
  for (int32_t i = 0; i < n; ++i) sum += (p[i] = std::exp((static_cast<double>(logits[i]) - mx) / o.temperature));
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  // Nucleus: keep tokens until their mass reaches top_p.
  double kept = 0;
  int32_t k = 0;
  while (k < n) {
    kept += p[order[k++]];
    if (kept >= o.top_p * sum) break;
  }
  const double u = UniformAt(o.seed, step) * kept;
  double acc = 0;
  for (int32_t i = 0; i < k; ++i) {
    acc += p[order[i]];
    if (u < acc) return order[i];
  }
  return order[k - 1];
}

}  // namespace flashmem::model
