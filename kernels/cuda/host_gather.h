// Host-side gathers of KV rows and keys into the pinned staging buffer. While KV lives in host
// memory, these copies are what a long-context step spends most of its time on (docs/benchmarks.md,
// "Model level"); large gathers are spread over the host's cores (OpenMP).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace flashmem::kernels::cuda {

// dst row slot[j] = rows[j] for every non-null row (slot == nullptr: slot[j] = j); null rows are
// skipped, or zeroed at slot j when zero_null.
void GatherRows(std::span<const float* const> rows, int64_t dim, const int32_t* slot, float* dst, bool zero_null);

// The FP8 records of a page being staged (device_ops.h's layout): entry e of a page of `entries`
// takes data[j] (576 bytes) at e * 576 and scales[j] (8 bytes) at entries * 576 + e * 8, for every
// j with entry[j] >= 0; spread over the host's cores past ~1 MB.
void GatherRecords(std::span<const uint8_t* const> data, std::span<const uint8_t* const> scales, const int32_t* entry,
                   int64_t entries, uint8_t* page);

// Copies between pageable and pinned memory (an op's inputs and outputs): spread over the host's
// cores past ~1 MB in all, a large copy in pieces (a batch-64 attention moves 8 MB of queries
// each way; one core copies ~5-10 GB/s).
struct HostCopy {
  void* dst;
  const void* src;
  size_t bytes;
};
void CopyAll(std::span<const HostCopy> copies);

// Whole pages end to end: pages[j] (page_bytes each) to dst + j * page_bytes; spread over the
// host's cores past ~1 MB.
void GatherPagesHost(std::span<const uint8_t* const> pages, int64_t page_bytes, uint8_t* dst);

}  // namespace flashmem::kernels::cuda
