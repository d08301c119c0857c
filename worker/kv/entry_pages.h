// Append-only KV entries stored in fixed pages of 64 entries (DESIGN.md §2: a page is 64
// compressed entries = 256 tokens of a CSA layer). Pages are the unit later issues move between
// the GPU, host RAM and memtier; entries never move once written, so row pointers stay valid.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace flashmem::kv {

inline constexpr int64_t kEntriesPerPage = 64;

class EntryPages {
 public:
  explicit EntryPages(int64_t dim = 0) : dim_(dim) {}

  int64_t dim() const { return dim_; }
  int64_t size() const { return size_; }
  int64_t num_pages() const { return static_cast<int64_t>(pages_.size()); }

  void Append(const float* row) {
    if (size_ % kEntriesPerPage == 0) pages_.push_back(std::make_unique<float[]>(kEntriesPerPage * dim_));
    float* dst = pages_.back().get() + (size_ % kEntriesPerPage) * dim_;
    for (int64_t i = 0; i < dim_; ++i) dst[i] = row[i];
    ++size_;
  }
  const float* Row(int64_t i) const {
    return pages_[i / kEntriesPerPage].get() + (i % kEntriesPerPage) * dim_;
  }

 private:
  int64_t dim_;
  int64_t size_ = 0;
  std::vector<std::unique_ptr<float[]>> pages_;
};

}  // namespace flashmem::kv
