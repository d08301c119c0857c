// Deterministic pseudo-random prompts for tests and benchmarks (no gtest: benches use it too).
#pragma once

#include <cstdint>
#include <vector>

namespace flashmem::testing {

// n ids below vocab from a 64-bit LCG seeded with `seed`: the same ids on every platform.
inline std::vector<int32_t> Prompt(int64_t n, int64_t vocab, uint32_t seed) {
  std::vector<int32_t> p;
  uint64_t x = seed;
  for (int64_t i = 0; i < n; ++i) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    p.push_back(static_cast<int32_t>((x >> 33) % vocab));
  }
  return p;
}

}  // namespace flashmem::testing
