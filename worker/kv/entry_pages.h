// Append-only KV entries stored in fixed pages of 64 entries (DESIGN.md §2: a page is 64
// compressed entries = 256 tokens of a CSA layer). Pages are the unit moved between the worker,
// host RAM and memtier: a complete page may be evicted (its memory freed; it then lives only in
// memtier) and later restored. Entries never move once written, so row pointers of a resident
// page stay valid until that page is evicted.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace flashmem::kv {

inline constexpr int64_t kEntriesPerPage = 64;

class EntryPages {
 public:
  explicit EntryPages(int64_t dim = 0) : dim_(dim) {}

  int64_t dim() const { return dim_; }
  int64_t size() const { return size_; }
  int64_t num_pages() const { return static_cast<int64_t>(pages_.size()); }
  // Pages whose 64 entries are all written (only those can leave the worker).
  int64_t complete_pages() const { return size_ / kEntriesPerPage; }
  int64_t page_floats() const { return kEntriesPerPage * dim_; }

  void Append(const float* row) {
    if (size_ % kEntriesPerPage == 0) pages_.push_back(std::make_unique<float[]>(kEntriesPerPage * dim_));
    float* dst = pages_.back().get() + (size_ % kEntriesPerPage) * dim_;
    std::copy(row, row + dim_, dst);
    ++size_;
  }
  // The entry's row, or nullptr while its page is evicted.
  const float* Row(int64_t i) const {
    const float* p = pages_[i / kEntriesPerPage].get();
    return p ? p + (i % kEntriesPerPage) * dim_ : nullptr;
  }
  bool resident(int64_t page) const { return pages_[page] != nullptr; }
  int64_t resident_pages() const {
    return std::count_if(pages_.begin(), pages_.end(), [](const auto& p) { return p != nullptr; });
  }
  // The page's floats (64 * dim; the tail of the newest page is unwritten zeros).
  std::span<const float> Page(int64_t page) const {
    return pages_[page] ? std::span<const float>(pages_[page].get(), page_floats()) : std::span<const float>();
  }
  // Frees a complete page's memory.
  void Evict(int64_t page) { pages_[page].reset(); }
  // Puts a page's floats back (page_floats() values).
  void Restore(int64_t page, std::span<const float> values) {
    pages_[page] = std::make_unique<float[]>(page_floats());
    std::copy(values.begin(), values.begin() + std::min<int64_t>(page_floats(), values.size()), pages_[page].get());
  }
  // Appends an evicted complete page (restoring a snapshot whose page lives in memtier).
  void AppendEvictedPage() {
    pages_.emplace_back();
    size_ += kEntriesPerPage;
  }

 private:
  int64_t dim_;
  int64_t size_ = 0;
  std::vector<std::unique_ptr<float[]>> pages_;
};

}  // namespace flashmem::kv
