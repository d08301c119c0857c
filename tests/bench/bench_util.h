// Small helpers shared by the benchmark programs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace flashmem::bench {

// "1,16,64" -> {1, 16, 64}; an item that is not a positive integer is an error naming `flag`.
inline absl::StatusOr<std::vector<int64_t>> ParseCounts(const std::string& flag, const std::string& text) {
  std::vector<int64_t> v;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t x = 0;
    if (!absl::SimpleAtoi(item, &x) || x <= 0)
      return absl::InvalidArgumentError(absl::StrCat(flag, " '", text, "': '", item, "' is not a positive integer"));
    v.push_back(x);
  }
  if (v.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, " is empty"));
  return v;
}

}  // namespace flashmem::bench
