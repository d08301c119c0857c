#include "worker/kv/entry_pages.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/numerics.h"

namespace flashmem::kv {

EntryPages::EntryPages(PageFormat format, bool encoded, bool packed_twin)
    : format_(format), encoded_(encoded), twin_(packed_twin && !encoded) {
  format_.entries = kEntriesPerPage;
}

std::unique_ptr<float[]> EntryPages::NewPage() const {
  const int64_t floats = (page_bytes() + 3) / 4;
  return std::unique_ptr<float[]>(new float[floats]());  // zeroed: unwritten entries decode to 0
}

int64_t EntryPages::resident_pages() const {
  return std::count_if(pages_.begin(), pages_.end(), [](const auto& p) { return p != nullptr; });
}

namespace {

// A page's KvPage after any change: its bytes (null: not in memory) under a fresh version, the
// change not known.
void Renew(kernels::KvPage& m, const uint8_t* bytes, int64_t size) {
  m.bytes = bytes;
  m.size = size;
  m.entries = kEntriesPerPage;
  m.version = kernels::NewKvPageVersion();
  m.before = 0;
  m.changed = {};
}

}  // namespace

void EntryPages::Touch(int64_t page) { Renew(*page_meta_[page], pages_[page] ? Bytes(page) : nullptr, rows_page_bytes()); }

void EntryPages::EntryChanged(kernels::KvPage& m, uint64_t before, int64_t e) const {
  m.before = before;
  m.changed = {{{format_.entry_data_offset(e), format_.data_bytes_per_entry()},
                {format_.entry_scales_offset(e), format_.scale_bytes_per_entry()}}};
}

std::unique_ptr<uint8_t[]> EntryPages::NewTwinPage() const {
  // Every entry as a zero row encodes (what EncodePage gives the fp32 page's unwritten entries),
  // encoded once and copied.
  const std::vector<float> zero(format_.dim, 0.0f);
  std::vector<uint8_t> data(format_.data_bytes_per_entry()), scales(format_.scale_bytes_per_entry());
  EncodeEntry(format_, zero.data(), data.data(), scales.data());
  auto bytes = std::make_unique<uint8_t[]>(format_.page_bytes());
  for (int64_t e = 0; e < kEntriesPerPage; ++e) {
    std::copy(data.begin(), data.end(), bytes.get() + format_.entry_data_offset(e));
    std::copy(scales.begin(), scales.end(), bytes.get() + format_.entry_scales_offset(e));
  }
  return bytes;
}

void EntryPages::TouchTwin(int64_t page) { Renew(*twin_meta_[page], twin_pages_[page].get(), format_.page_bytes()); }

bool EntryPages::WriteTwin(int64_t page, int64_t e, const float* row) {
  uint8_t* bytes = twin_pages_[page].get();
  const uint64_t before = twin_meta_[page]->version;
  if (EncodeEntry(format_, row, bytes + format_.entry_data_offset(e), bytes + format_.entry_scales_offset(e)) >= 0)
    return false;
  TouchTwin(page);
  if (before != 0) EntryChanged(*twin_meta_[page], before, e);  // only entry e's bytes changed since `before`
  return true;
}

void EntryPages::DropTwin() {
  twin_ = false;
  fell_back_ = true;
  for (size_t p = 0; p < twin_pages_.size(); ++p) {
    twin_pages_[p].reset();
    TouchTwin(static_cast<int64_t>(p));
  }
}

void EntryPages::Write(int64_t page, int64_t e, const float* row) {
  if (twin_ && !WriteTwin(page, e, row)) DropTwin();
  const uint64_t before = page_meta_[page]->version;
  const bool was_encoded = encoded_;
  if (encoded_ && EncodeEntry(format_, row, Bytes(page) + format_.entry_data_offset(e),
                              Bytes(page) + format_.entry_scales_offset(e)) >= 0) {
    TurnToFp32();  // this entry is then written below, as fp32
  }
  if (!encoded_) std::copy(row, row + format_.dim, pages_[page].get() + e * format_.dim);
  Touch(page);
  if (before == 0 || encoded_ != was_encoded) return;  // a new page, or every page rewritten as fp32
  // Only entry e changed since `before`: a device copy of that version takes just its bytes.
  kernels::KvPage& m = *page_meta_[page];
  if (encoded_) {
    EntryChanged(m, before, e);
  } else {
    m.before = before;
    m.changed = {{{e * format_.dim * 4, format_.dim * 4}, {}}};
  }
}

void EntryPages::AddPage() {
  pages_.push_back(NewPage());
  page_meta_.push_back(std::make_unique<kernels::KvPage>());
  twin_pages_.push_back(twin_ ? NewTwinPage() : nullptr);
  twin_meta_.push_back(std::make_unique<kernels::KvPage>());
}

void EntryPages::Append(const float* row) {
  if (size_ % kEntriesPerPage == 0) AddPage();
  Write(num_pages() - 1, size_ % kEntriesPerPage, row);
  ++size_;
}

int64_t EntryPages::AppendForWrite() {
  if (size_ % kEntriesPerPage == 0) {
    AddPage();
    Touch(num_pages() - 1);  // a new page: no copy of it anywhere to patch
    TouchTwin(num_pages() - 1);
  }
  return size_++;
}

void EntryPages::Evict(int64_t page) {
  pages_[page].reset();
  Touch(page);
  twin_pages_[page].reset();
  TouchTwin(page);
}

void EntryPages::Overwrite(int64_t i, const float* row) {
  if (pages_[i / kEntriesPerPage]) Write(i / kEntriesPerPage, i % kEntriesPerPage, row);
}

bool EntryPages::BeginRecordWrite(int64_t i, uint8_t** data, uint8_t** scales, const kernels::KvPage** page,
                                  int32_t* entry) {
  const int64_t p = i / kEntriesPerPage, e = i % kEntriesPerPage;
  if (!encoded_ || twin_ || i < 0 || i >= size_ || !pages_[p]) return false;
  const uint64_t before = page_meta_[p]->version;
  Touch(p);
  EntryChanged(*page_meta_[p], before, e);  // the op writes entry e's bytes alone
  *data = Bytes(p) + format_.entry_data_offset(e);
  *scales = Bytes(p) + format_.entry_scales_offset(e);
  *page = page_meta_[p].get();
  *entry = static_cast<int32_t>(e);
  return true;
}

kernels::KeyRun EntryPages::Run(int64_t first, int64_t count) const {
  const int64_t page = first / kEntriesPerPage, e = first % kEntriesPerPage;
  kernels::KeyRun run;
  run.count = count;
  if (encoded_ || !pages_[page]) return run;
  run.rows = pages_[page].get() + e * format_.dim;
  run.page = page_meta_[page].get();
  run.entry = static_cast<int32_t>(e);
  if (twin_) run.packed = twin_meta_[page].get();
  return run;
}

bool EntryPages::ReadRow(int64_t i, float* out) const {
  const int64_t page = i / kEntriesPerPage, e = i % kEntriesPerPage;
  if (!pages_[page]) return false;
  if (!encoded_) {
    std::copy_n(pages_[page].get() + e * format_.dim, format_.dim, out);
    return true;
  }
  // The scale bytes were written by EncodeEntry (or verified by Restore): never NaN.
  return DecodeEntry(format_, Bytes(page) + format_.entry_data_offset(e), Bytes(page) + format_.entry_scales_offset(e), out);
}

const float* EntryPages::Row(int64_t i) const {
  if (encoded_) return nullptr;
  const float* p = pages_[i / kEntriesPerPage].get();
  return p ? p + (i % kEntriesPerPage) * format_.dim : nullptr;
}

absl::Status EntryPages::Serialize(int64_t page, std::vector<uint8_t>* out, bool* as_bf16) const {
  if (!pages_[page]) return absl::FailedPreconditionError(absl::StrCat("page ", page, " is not in memory"));
  *as_bf16 = false;
  if (encoded_) {
    out->assign(Bytes(page), Bytes(page) + format_.page_bytes());
    return absl::OkStatus();
  }
  if (twin_) {  // the page in its format already
    out->assign(twin_pages_[page].get(), twin_pages_[page].get() + format_.page_bytes());
    return absl::OkStatus();
  }
  const std::span<const float> values(pages_[page].get(), format_.page_floats());
  if (EncodePage(format_, values, out).ok()) return absl::OkStatus();
  *as_bf16 = true;
  out->resize(format_.bf16_page_bytes());
  num::FloatsToBf16Bytes(values.data(), values.size(), out->data());
  return absl::OkStatus();
}

absl::Status EntryPages::Restore(int64_t page, std::span<const uint8_t> bytes) {
  if (encoded_ && static_cast<int64_t>(bytes.size()) == format_.page_bytes()) {
    for (int64_t e = 0; e < kEntriesPerPage; ++e)  // what ReadRow relies on
      if (!ScalesValid(format_, bytes.data() + format_.entry_scales_offset(e)))
        return absl::DataLossError(absl::StrCat("KV page entry ", e, ": NaN scale byte"));
    pages_[page] = NewPage();
    std::memcpy(Bytes(page), bytes.data(), bytes.size());
    Touch(page);
    return absl::OkStatus();
  }
  std::vector<float> values;
  if (absl::Status st = DecodePage(format_, bytes, &values); !st.ok()) return st;
  if (encoded_) {  // the bf16 form of an older worker: held encoded like the rest
    std::vector<uint8_t> encoded;
    if (EncodePage(format_, values, &encoded).ok()) return Restore(page, encoded);
    TurnToFp32();
  }
  pages_[page] = NewPage();
  std::copy(values.begin(), values.end(), pages_[page].get());
  Touch(page);
  if (twin_) {
    // A recall brings the page in its format: it is the twin as it was sent, unless a scale byte
    // is one the encoder never writes (0: below UE8M0's normal range, which a device decode does
    // not take) — then, and for the bf16 form, the twin is encoded from the values.
    const bool as_sent = static_cast<int64_t>(bytes.size()) == format_.page_bytes() &&
                         std::none_of(bytes.begin() + format_.entry_scales_offset(0), bytes.end(),
                                      [](uint8_t b) { return b == 0; });
    std::vector<uint8_t> packed;
    if (as_sent || EncodePage(format_, values, &packed).ok()) {
      twin_pages_[page] = std::make_unique<uint8_t[]>(format_.page_bytes());
      std::memcpy(twin_pages_[page].get(), as_sent ? bytes.data() : packed.data(), format_.page_bytes());
      TouchTwin(page);
    } else {
      DropTwin();
    }
  }
  return absl::OkStatus();
}

void EntryPages::AppendEvictedPage() {
  pages_.emplace_back();
  page_meta_.push_back(std::make_unique<kernels::KvPage>());
  Touch(num_pages() - 1);
  twin_pages_.emplace_back();
  twin_meta_.push_back(std::make_unique<kernels::KvPage>());
  TouchTwin(num_pages() - 1);
  size_ += kEntriesPerPage;
}

void EntryPages::TurnToFp32() {
  std::vector<std::unique_ptr<float[]>> rows(pages_.size());
  const PageFormat f = format_;
  encoded_ = false;
  fell_back_ = true;
  for (size_t p = 0; p < pages_.size(); ++p) {
    if (!pages_[p]) continue;
    rows[p] = NewPage();
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(pages_[p].get());
    for (int64_t e = 0; e < kEntriesPerPage; ++e)
      DecodeEntry(f, bytes + f.entry_data_offset(e), bytes + f.entry_scales_offset(e), rows[p].get() + e * f.dim);
  }
  pages_ = std::move(rows);
  for (size_t p = 0; p < pages_.size(); ++p) Touch(static_cast<int64_t>(p));
}

}  // namespace flashmem::kv
