// Append-only KV entries stored in fixed pages of 64 entries (DESIGN.md §2: a page is 64
// compressed entries = 256 tokens of a CSA layer). Pages are the unit moved between the worker,
// host RAM and memtier: a complete page may be evicted (its memory freed; it then lives only in
// memtier) and later restored. Entries never move once written, so rows of a resident page stay
// valid until that page is evicted.
//
// A page is held either in its memtier form (page_codec.h; main KV: FP8 records, 584 B an entry
// against 2,048 as fp32 — rows are decoded when read, bit for bit) or as fp32 rows (index keys:
// the indexer reads every key every step). A page moves to and from memtier as it is held, with
// no conversion. Should an entry ever be off its format's grid (not expected: the model's round
// trips put every value there), the whole stream turns to fp32 rows for good, and says so.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kernels/ops.h"
#include "worker/kv/page_codec.h"

namespace flashmem::kv {

inline constexpr int64_t kEntriesPerPage = 64;

class EntryPages final : public kernels::RecordSink {
 public:
  EntryPages() = default;
  // Entries of format.dim values, moved to memtier in `format`; `encoded`: held in it too.
  // `packed_twin` (fp32 streams): each page is also kept in `format` beside its rows, written with
  // them — a device backend reads that form (KeyRun::packed: an MXFP4 index key is 68 bytes
  // against 512 as fp32) and Serialize sends it without encoding again. An entry off the format's
  // grid drops the twin for good (fell_back_to_fp32() then says so); the rows stay the truth.
  EntryPages(PageFormat format, bool encoded, bool packed_twin = false);

  int64_t dim() const { return format_.dim; }
  const PageFormat& format() const { return format_; }
  bool encoded() const { return encoded_; }
  // True once an off-grid entry turned an encoded stream into fp32 rows, or dropped a twin.
  bool fell_back_to_fp32() const { return fell_back_; }
  // Whether the pages are also kept in their format (packed_twin, while every entry is on its grid).
  bool has_packed_twin() const { return twin_; }
  int64_t size() const { return size_; }
  int64_t num_pages() const { return static_cast<int64_t>(pages_.size()); }
  // Pages whose 64 entries are all written (only those can leave the worker).
  int64_t complete_pages() const { return size_ / kEntriesPerPage; }
  // Memory a resident page holds, its twin included (and an entry's share of it).
  int64_t page_bytes() const { return rows_page_bytes() + (twin_ ? format_.page_bytes() : 0); }
  int64_t entry_bytes() const { return page_bytes() / kEntriesPerPage; }
  // Memory the resident pages hold.
  int64_t memory_bytes() const { return resident_pages() * page_bytes(); }

  void Append(const float* row);
  // Appends an entry whose values a write then gives (WriteOnHost, or an op's record through
  // BeginRecordWrite: Backend::WriteRecords); until then it reads as zero. Its index.
  int64_t AppendForWrite();
  // Rewrites written entry i (the sliding window's ring reuses its slots).
  void Overwrite(int64_t i, const float* row);
  // kernels::RecordSink, for Backend::WriteRecords: entry i of an encoded stream without a twin,
  // in a page in memory, written by an op (its page's version renewed here for that entry alone);
  // WriteOnHost is Overwrite.
  bool BeginRecordWrite(int64_t i, uint8_t** data, uint8_t** scales, const kernels::KvPage** page,
                        int32_t* entry) override;
  void WriteOnHost(int64_t i, const float* row) override { Overwrite(i, row); }
  // The entry's values into `out` (dim() floats); false while its page is evicted.
  bool ReadRow(int64_t i, float* out) const;
  // fp32 streams only: the entry's row in place, or nullptr while its page is evicted.
  const float* Row(int64_t i) const;
  bool RowResident(int64_t i) const { return resident(i / kEntriesPerPage); }
  // The entry as a slot (its record in place, or its fp32 row, with its page); masked while
  // evicted.
  kernels::KvSlot Slot(int64_t i) const;
  // Entries [first, first + count) of one page of an fp32 stream as keys to score: the rows in
  // place with their page (and its twin, when kept), or zero keys (rows null) while the page is
  // evicted or the stream encoded.
  kernels::KeyRun Run(int64_t first, int64_t count) const;
  bool resident(int64_t page) const { return pages_[page] != nullptr; }
  int64_t resident_pages() const;

  // A resident page as it goes to memtier: in its format (format().page_bytes()), or — an fp32
  // page whose values are off the format's grid — in the bf16 form (every entry is a bf16 value;
  // format().bf16_page_bytes()), which Restore reads too; *as_bf16 says which.
  // FAILED_PRECONDITION for a page not in memory.
  absl::Status Serialize(int64_t page, std::vector<uint8_t>* out, bool* as_bf16) const;
  // Frees a complete page's memory.
  void Evict(int64_t page);
  // Puts an evicted page back from its memtier form (or the bf16 one). DATA_LOSS for other bytes.
  absl::Status Restore(int64_t page, std::span<const uint8_t> bytes);
  // Appends an evicted complete page (restoring a snapshot whose page lives in memtier).
  void AppendEvictedPage();

 private:
  // Page storage: fp32 rows, or the page's bytes (accessed as unsigned char) in encoded streams.
  std::unique_ptr<float[]> NewPage() const;
  void AddPage();  // a new last page (and its twin), its KvPage not yet valid
  uint8_t* Bytes(int64_t page) const { return reinterpret_cast<uint8_t*>(pages_[page].get()); }
  void TurnToFp32();
  void Write(int64_t page, int64_t e, const float* row);
  // After any change to a page (written, allocated, restored, freed): its KvPage shows the
  // current bytes under a fresh version, so a device copy of the old bytes is never used.
  void Touch(int64_t page);
  // A page's own bytes (its KvPage's size): in the format, or fp32 rows; a twin's not included.
  int64_t rows_page_bytes() const { return encoded_ ? format_.page_bytes() : kEntriesPerPage * format_.dim * 4; }
  // m announces that only entry e changed since version `before`, in the format's layout.
  void EntryChanged(kernels::KvPage& m, uint64_t before, int64_t e) const;
  // The twin of a page (packed_twin): entry e written from `row` (false: off the grid), and the
  // page's KvPage after a change. DropTwin frees every twin for good.
  std::unique_ptr<uint8_t[]> NewTwinPage() const;
  bool WriteTwin(int64_t page, int64_t e, const float* row);
  void TouchTwin(int64_t page);
  void DropTwin();

  PageFormat format_;
  bool encoded_ = false;
  bool fell_back_ = false;
  int64_t size_ = 0;
  std::vector<std::unique_ptr<float[]>> pages_;
  // One per page, at a stable address (slots point at it).
  std::vector<std::unique_ptr<kernels::KvPage>> page_meta_;
  // packed_twin: each resident page in `format_` (null while evicted), with its own KvPage.
  bool twin_ = false;
  std::vector<std::unique_ptr<uint8_t[]>> twin_pages_;
  std::vector<std::unique_ptr<kernels::KvPage>> twin_meta_;
};

// Inline: a decode step's attention asks for every slot of every row (26K a layer at batch 64).
inline kernels::KvSlot EntryPages::Slot(int64_t i) const {
  const int64_t page = i / kEntriesPerPage, e = i % kEntriesPerPage;
  kernels::KvSlot s;
  if (!pages_[page]) return s;
  if (encoded_) {
    s.record = Bytes(page) + format_.entry_data_offset(e);
    s.scales = Bytes(page) + format_.entry_scales_offset(e);
  } else {
    s.row = pages_[page].get() + e * format_.dim;
  }
  s.page = page_meta_[page].get();
  s.entry = static_cast<int32_t>(e);
  return s;
}

}  // namespace flashmem::kv
