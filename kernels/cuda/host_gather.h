// Host-side gathers of KV rows and keys into the pinned staging buffer. While KV lives in host
// memory, these copies are what a long-context step spends most of its time on (docs/benchmarks.md,
// "Model level"); large gathers are spread over the host's cores (OpenMP).
#pragma once

#include <cstdint>
#include <span>

namespace flashmem::kernels::cuda {

// dst row slot[j] = rows[j] for every non-null row (slot == nullptr: slot[j] = j); null rows are
// skipped, or zeroed at slot j when zero_null.
void GatherRows(std::span<const float* const> rows, int64_t dim, const int32_t* slot, float* dst, bool zero_null);

}  // namespace flashmem::kernels::cuda
