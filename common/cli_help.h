// Help-text pieces shared by the service binaries' command lines.
#pragma once

#include <initializer_list>
#include <string>

#include "absl/strings/str_cat.h"

namespace flashmem {

// The help text's "Environment:" section: the variables a binary reads (the deploy test checks every
// manifest's env against it). `entries` are "NAME  meaning" lines; NAME may end in * (a prefix).
inline std::string EnvironmentHelp(std::initializer_list<const char*> entries) {
  std::string out = "Environment:\n";
  for (const char* e : entries) absl::StrAppend(&out, "  ", e, "\n");
  if (entries.size() == 0) out += "  (none)\n";
  return out;
}

}  // namespace flashmem
