#include "worker/model/state_codec.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/numerics.h"

namespace flashmem::model {
namespace {

constexpr char kMagic[4] = {'F', 'M', 'S', 'S'};
constexpr uint32_t kVersion = 3;  // 2: + the LSA Level-2 view; 3: pages may be memtier references

class Writer {
 public:
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void F32s(const std::vector<float>& v) {
    U64(v.size());
    Raw(v.data(), v.size() * 4);
  }
  void Bf16s(const float* v, size_t n) {
    const size_t at = out.size();
    out.resize(at + 2 * n);
    num::FloatsToBf16Bytes(v, n, reinterpret_cast<uint8_t*>(out.data() + at));
  }
  void Raw(const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
  std::string out;
};

class Reader {
 public:
  explicit Reader(absl::string_view s) : s_(s) {}
  absl::Status Need(size_t n, absl::string_view what) {
    if (s_.size() - at_ < n)
      return absl::InvalidArgumentError(absl::StrCat("state blob truncated while reading ", what, " (at byte ", at_, ")"));
    return absl::OkStatus();
  }
  absl::StatusOr<uint64_t> U64(absl::string_view what) {
    if (auto st = Need(8, what); !st.ok()) return st;
    uint64_t v;
    std::memcpy(&v, s_.data() + at_, 8);
    at_ += 8;
    return v;
  }
  absl::StatusOr<uint32_t> U32(absl::string_view what) {
    if (auto st = Need(4, what); !st.ok()) return st;
    uint32_t v;
    std::memcpy(&v, s_.data() + at_, 4);
    at_ += 4;
    return v;
  }
  absl::Status F32s(std::vector<float>* v, absl::string_view what) {
    auto n = U64(what);
    if (!n.ok()) return n.status();
    if (*n != v->size())
      return absl::InvalidArgumentError(absl::StrCat("state blob: ", what, " has ", *n, " values, the model needs ", v->size()));
    if (auto st = Need(*n * 4, what); !st.ok()) return st;
    std::memcpy(v->data(), s_.data() + at_, *n * 4);
    at_ += *n * 4;
    return absl::OkStatus();
  }
  absl::Status Bf16s(float* v, size_t n, absl::string_view what) {
    if (auto st = Need(n * 2, what); !st.ok()) return st;
    num::Bf16BytesToFloats(reinterpret_cast<const uint8_t*>(s_.data()) + at_, n, v);
    at_ += n * 2;
    return absl::OkStatus();
  }
  size_t at() const { return at_; }
  // `n` entries page by page (see WritePages).
  absl::Status Pages(kv::EntryPages* pages, uint64_t n, absl::string_view what) {
    std::vector<float> row(pages->dim());
    for (uint64_t first = 0; first < n; first += kv::kEntriesPerPage) {
      if (auto st = Need(1, what); !st.ok()) return st;
      const uint8_t flag = static_cast<uint8_t>(s_[at_++]);
      const uint64_t len = std::min<uint64_t>(kv::kEntriesPerPage, n - first);
      if (flag == 1) {
        if (len != kv::kEntriesPerPage)
          return absl::InvalidArgumentError(absl::StrCat("state blob: ", what, ": a partial page cannot be a memtier reference"));
        pages->AppendEvictedPage();
        continue;
      }
      if (flag != 0) return absl::InvalidArgumentError(absl::StrCat("state blob: ", what, ": page flag ", flag));
      for (uint64_t e = 0; e < len; ++e) {
        if (auto st = Bf16s(row.data(), row.size(), what); !st.ok()) return st;
        pages->Append(row.data());
      }
    }
    return absl::OkStatus();
  }

 private:
  absl::string_view s_;
  size_t at_ = 0;
};

#define FM_TRY(lhs, expr)                      \
  auto lhs##_or = (expr);                      \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  const auto lhs = *lhs##_or

}  // namespace

namespace {

// Entries page by page: a flag byte per page, 1 = in memtier (complete page, not carried),
// 0 = its written entries inline as bf16.
void WritePages(Writer& w, const kv::EntryPages& pages, int64_t layer, int kind, const PageInStore& in_store) {
  w.U64(static_cast<uint64_t>(pages.size()));
  for (int64_t p = 0; p < pages.num_pages(); ++p) {
    const int64_t first = p * kv::kEntriesPerPage;
    const int64_t n = std::min<int64_t>(kv::kEntriesPerPage, pages.size() - first);
    const bool ref = n == kv::kEntriesPerPage && (!pages.resident(p) || (in_store && in_store(layer, kind, p)));
    const uint8_t flag = ref ? 1 : 0;
    w.Raw(&flag, 1);
    if (!ref) {
      std::vector<float> row(pages.dim());
      for (int64_t e = first; e < first + n; ++e) {
        pages.ReadRow(e, row.data());  // resident: not a reference
        w.Bf16s(row.data(), pages.dim());
      }
    }
  }
}

}  // namespace

std::string SerializeSessionState(const SessionState& s, const ModelArgs& a, const PageInStore& in_store) {
  Writer w;
  w.Raw(kMagic, 4);
  w.U32(kVersion);
  w.U64(static_cast<uint64_t>(s.position));
  w.U32(static_cast<uint32_t>(s.layers.size()));
  for (const LayerState& l : s.layers) {
    {
      std::vector<float> row(l.window.dim());
      for (int64_t e = 0; e < l.window.size(); ++e) {
        l.window.ReadRow(e, row.data());
        w.Bf16s(row.data(), row.size());
      }
    }
    w.F32s(l.compressor.kv);
    w.F32s(l.compressor.score);
    w.F32s(l.index_compressor.kv);
    w.F32s(l.index_compressor.score);
    const int64_t li = &l - s.layers.data();
    WritePages(w, l.compressed, li, 0, in_store);
    WritePages(w, l.index_keys, li, 1, in_store);
  }
  (void)a;
  w.U64(static_cast<uint64_t>(s.residency.covered_chunks));
  w.U64(s.residency.page_selected.size());
  w.Raw(s.residency.page_selected.data(), s.residency.page_selected.size());
  const uint64_t sum = XXH3_64bits(w.out.data(), w.out.size());
  w.U64(sum);
  return w.out;
}

absl::StatusOr<std::unique_ptr<SessionState>> DeserializeSessionState(absl::string_view blob, const ModelArgs& a) {
  if (blob.size() < 24 || std::memcmp(blob.data(), kMagic, 4) != 0)
    return absl::InvalidArgumentError("state blob: not a flashmem session state (bad magic or too short)");
  uint64_t sum;
  std::memcpy(&sum, blob.data() + blob.size() - 8, 8);
  if (XXH3_64bits(blob.data(), blob.size() - 8) != sum)
    return absl::DataLossError("state blob: checksum mismatch");
  Reader r(blob.substr(0, blob.size() - 8));
  if (auto st = r.Need(4, "magic"); !st.ok()) return st;
  FM_TRY(magic_skip, r.U32("magic"));
  (void)magic_skip;
  FM_TRY(version, r.U32("version"));
  if (version != kVersion) return absl::InvalidArgumentError(absl::StrCat("state blob: version ", version, " (this build reads ", kVersion, ")"));
  FM_TRY(position, r.U64("position"));
  FM_TRY(n_layers, r.U32("layer count"));
  if (n_layers != static_cast<uint64_t>(a.n_layers))
    return absl::InvalidArgumentError(absl::StrCat("state blob: ", n_layers, " layers, the model has ", a.n_layers));
  if (position > static_cast<uint64_t>(1) << 40) return absl::InvalidArgumentError(absl::StrCat("state blob: position ", position, " is implausible"));
  auto s = std::make_unique<SessionState>(a);
  s->position = static_cast<int64_t>(position);
  for (int64_t li = 0; li < a.n_layers; ++li) {
    LayerState& l = s->layers[li];
    const std::string at = absl::StrCat("layer ", li);
    {
      std::vector<float> row(l.window.dim());
      for (int64_t e = 0; e < l.window.size(); ++e) {
        if (auto st = r.Bf16s(row.data(), row.size(), at + " window"); !st.ok()) return st;
        l.window.Overwrite(e, row.data());
      }
    }
    if (auto st = r.F32s(&l.compressor.kv, at + " compressor kv"); !st.ok()) return st;
    if (auto st = r.F32s(&l.compressor.score, at + " compressor score"); !st.ok()) return st;
    if (auto st = r.F32s(&l.index_compressor.kv, at + " indexer compressor kv"); !st.ok()) return st;
    if (auto st = r.F32s(&l.index_compressor.score, at + " indexer compressor score"); !st.ok()) return st;
    l.compressor.Renew();  // new values: a device's copy of the rings (PoolSteps) is not theirs
    l.index_compressor.Renew();
    const int r_ratio = a.ratio(li);
    const uint64_t want_entries = r_ratio > 0 ? position / r_ratio : 0;
    FM_TRY(n_entries, r.U64(at + " entry count"));
    if (n_entries != want_entries)
      return absl::InvalidArgumentError(absl::StrCat("state blob: ", at, " has ", n_entries, " compressed entries, position ", position, " implies ", want_entries));
    if (auto st = r.Pages(&l.compressed, n_entries, at + " compressed entries"); !st.ok()) return st;
    const uint64_t want_keys = r_ratio == 4 ? position / 4 : 0;
    FM_TRY(n_keys, r.U64(at + " index key count"));
    if (n_keys != want_keys)
      return absl::InvalidArgumentError(absl::StrCat("state blob: ", at, " has ", n_keys, " index keys, position ", position, " implies ", want_keys));
    if (auto st = r.Pages(&l.index_keys, n_keys, at + " index keys"); !st.ok()) return st;
  }
  FM_TRY(covered, r.U64("residency"));
  FM_TRY(n_sel, r.U64("residency pages"));
  const int64_t cov = static_cast<int64_t>(covered);
  if (cov >= 0 && (cov > static_cast<int64_t>(position) / 4 || n_sel != static_cast<uint64_t>((cov + 63) / 64)))
    return absl::InvalidArgumentError(absl::StrCat("state blob: residency covers ", cov, " chunks with ", n_sel, " page flags at position ", position));
  if (cov < 0 && n_sel != 0) return absl::InvalidArgumentError("state blob: dense residency with page flags");
  if (auto st = r.Need(n_sel, "residency pages"); !st.ok()) return st;
  s->residency.covered_chunks = cov < 0 ? -1 : cov;
  s->residency.page_selected.assign(blob.data() + r.at(), blob.data() + r.at() + n_sel);
  if (r.at() + n_sel != blob.size() - 8) return absl::InvalidArgumentError("state blob: trailing bytes after the last layer");
  return s;
}

}  // namespace flashmem::model
