#include "kernels/cuda/host_gather.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {
// Below ~1 MB a single core's memcpy beats waking the team.
constexpr size_t kParallelBytes = size_t{1} << 20;
}  // namespace

void GatherRows(std::span<const float* const> rows, int64_t dim, const int32_t* slot, float* dst, bool zero_null) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const size_t bytes = static_cast<size_t>(dim) * sizeof(float);
#pragma omp parallel for schedule(static) if (static_cast<size_t>(n) * bytes > kParallelBytes)
  for (int64_t j = 0; j < n; ++j) {
    float* to = dst + static_cast<int64_t>(slot ? slot[j] : j) * dim;
    if (rows[j]) std::memcpy(to, rows[j], bytes);
    else if (zero_null) std::memset(dst + j * dim, 0, bytes);
  }
}

void GatherRecords(std::span<const uint8_t* const> data, std::span<const uint8_t* const> scales, const int32_t* entry,
                   int64_t entries, uint8_t* page) {
  constexpr size_t kData = kRecordData, kScales = kRecordScales;
  const int64_t n = static_cast<int64_t>(data.size());
#pragma omp parallel for schedule(static) if (static_cast<size_t>(n) * (kData + kScales) > kParallelBytes)
  for (int64_t j = 0; j < n; ++j) {
    if (entry[j] < 0) continue;
    std::memcpy(page + static_cast<size_t>(entry[j]) * kData, data[j], kData);
    std::memcpy(page + static_cast<size_t>(entries) * kData + static_cast<size_t>(entry[j]) * kScales, scales[j], kScales);
  }
}

void CopyAll(std::span<const HostCopy> copies) {
  size_t total = 0;
  for (const HostCopy& c : copies) total += c.bytes;
  if (total <= kParallelBytes) {
    for (const HostCopy& c : copies) std::memcpy(c.dst, c.src, c.bytes);
    return;
  }
  constexpr size_t kPiece = size_t{256} << 10;
  std::vector<HostCopy> pieces;
  pieces.reserve(total / kPiece + copies.size());
  for (const HostCopy& c : copies)
    for (size_t off = 0; off < c.bytes; off += kPiece)
      pieces.push_back({static_cast<char*>(c.dst) + off, static_cast<const char*>(c.src) + off, std::min(kPiece, c.bytes - off)});
  const int64_t n = static_cast<int64_t>(pieces.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) std::memcpy(pieces[i].dst, pieces[i].src, pieces[i].bytes);
}

void GatherPagesHost(std::span<const uint8_t* const> pages, int64_t page_bytes, uint8_t* dst) {
  std::vector<HostCopy> copies;
  copies.reserve(pages.size());
  for (size_t j = 0; j < pages.size(); ++j) copies.push_back({dst + j * page_bytes, pages[j], static_cast<size_t>(page_bytes)});
  CopyAll(copies);
}

}  // namespace flashmem::kernels::cuda
