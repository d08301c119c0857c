#include "memtier/store/page_key.h"

#if defined(__x86_64__)
#include <xxh_x86dispatch.h>  // picks the AVX2/AVX-512 XXH3 at run time: ~20% faster than the SSE2 default
#define FM_XXH3_64 XXH3_64bits_dispatch
#else
#include <xxhash.h>
#define FM_XXH3_64 XXH3_64bits
#endif

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

uint64_t PageChecksum(std::span<const uint8_t> bytes) { return FM_XXH3_64(bytes.data(), bytes.size()); }

std::string ToString(const PageKey& k) { return absl::StrCat("(session ", k.session, ", layer ", k.layer, ", page ", k.page, ")"); }

}  // namespace flashmem::memtier
