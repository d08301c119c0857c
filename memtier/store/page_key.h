// Page identity and integrity (DESIGN.md §2): a page is (session, layer, page_no); every page
// carries an xxh3-64 checksum that is verified on every tier crossing.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"

namespace flashmem::memtier {

struct PageKey {
  uint64_t session = 0;
  uint32_t layer = 0;
  uint32_t page = 0;

  friend bool operator==(const PageKey&, const PageKey&) = default;
  friend auto operator<=>(const PageKey&, const PageKey&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const PageKey& k) {
    return H::combine(std::move(h), k.session, k.layer, k.page);
  }
};

inline constexpr size_t kPageKeyBytes = 16;

// Big-endian (session, layer, page): a session's pages are one contiguous key range, in order.
std::string EncodePageKey(const PageKey& k);
bool DecodePageKey(absl::string_view bytes, PageKey* out);
std::string EncodeSessionPrefix(uint64_t session);

// xxh3-64 of the page bytes.
uint64_t PageChecksum(std::span<const uint8_t> bytes);

std::string ToString(const PageKey& k);

}  // namespace flashmem::memtier
