#include "memtier/store/page_key.h"

#include <xxhash.h>

#include "absl/strings/str_cat.h"

namespace flashmem::memtier {
namespace {

void PutBe(std::string* out, uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetBe(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

}  // namespace

std::string EncodePageKey(const PageKey& k) {
  std::string out;
  out.reserve(kPageKeyBytes);
  PutBe(&out, k.session, 8);
  PutBe(&out, k.layer, 4);
  PutBe(&out, k.page, 4);
  return out;
}

bool DecodePageKey(absl::string_view b, PageKey* out) {
  if (b.size() != kPageKeyBytes) return false;
  out->session = GetBe(b.data(), 8);
  out->layer = static_cast<uint32_t>(GetBe(b.data() + 8, 4));
  out->page = static_cast<uint32_t>(GetBe(b.data() + 12, 4));
  return true;
}

std::string EncodeSessionPrefix(uint64_t session) {
  std::string out;
  PutBe(&out, session, 8);
  return out;
}

uint64_t PageChecksum(std::span<const uint8_t> bytes) { return XXH3_64bits(bytes.data(), bytes.size()); }

std::string ToString(const PageKey& k) { return absl::StrCat("(session ", k.session, ", layer ", k.layer, ", page ", k.page, ")"); }

}  // namespace flashmem::memtier
