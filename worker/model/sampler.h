// Token sampling: greedy (temperature 0), or temperature + top-p with a counter-based RNG, so a
// sampled sequence is a function of (seed, step) alone: a session resumed on another worker (its
// step count comes with the snapshot) draws exactly the tokens an uninterrupted run would.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/statusor.h"

namespace flashmem::model {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy (argmax, lowest id on ties)
  float top_p = 1.0f;        // nucleus: smallest set of tokens whose probability reaches top_p
  uint64_t seed = 0;
};

absl::Status ValidateSampling(const SamplingOptions& o);

// The token for decode step `step` of a session (step = tokens sampled so far).
int32_t SampleToken(std::span<const float> logits, const SamplingOptions& o, uint64_t step);

// Uniform double in [0, 1) from (seed, step): splitmix64 of their combination.
double UniformAt(uint64_t seed, uint64_t step);

}  // namespace flashmem::model
