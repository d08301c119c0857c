// The bookkeeping of a device backend's KV reserve: a fixed array of page-sized slots in device
// memory holding copies of the KV pages attention reads (kernels::KvPage). The host bytes stay the
// truth; a slot's copy is trusted only while its version is the page's current one (versions are
// unique in the process), so a page written, freed or restored since is uploaded again. Slots are
// reclaimed with the CLOCK rule (a second chance for a slot used since the hand last passed), the
// usual approximation of least-recently-used; never a slot the call in progress uses.
//
// The device memory and the copies are the backend's: this class says which pages must go where.
// Not thread-safe (the backend runs one op at a time).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/ops.h"

namespace flashmem::kernels {

class KvReserve {
 public:
  KvReserve() = default;
  // `slots` copies of pages of `page_bytes` each.
  KvReserve(int64_t slots, int64_t page_bytes);

  int64_t slots() const { return static_cast<int64_t>(version_.size()); }
  int64_t page_bytes() const { return page_bytes_; }

  // One call's pages: Begin, Place every page the call reads, then the call uploads
  // uploads() (whole pages to their slots) and patches() (byte ranges into slots) before it
  // reads; Abort when it does not happen.
  void Begin();
  // The slot holding (or about to hold) `page`'s current bytes; -1 when every slot is taken by
  // pages of this call (the caller stages this call's pages instead, after Abort). A page whose
  // slot holds the version its last write started from (KvPage::before) is patched in place with
  // the bytes that write changed, not uploaded whole.
  // `writes_changed`: the caller writes the bytes the page's last write changed (KvPage::changed)
  // into the slot itself, after the call's uploads, instead of their being patched from the host.
  int64_t Place(const KvPage& page, bool writes_changed = false);
  struct Upload {
    const uint8_t* bytes;
    int64_t slot;
  };
  const std::vector<Upload>& uploads() const { return uploads_; }
  struct Patch {
    const uint8_t* bytes;  // the page's bytes at `offset`
    int64_t slot, offset, size;
  };
  const std::vector<Patch>& patches() const { return patches_; }
  // Forgets the slots this call was to fill or patch (their copies may be partly written: none is
  // trusted again).
  void Abort();

  // Totals since creation: pages found in place, pages uploaded whole, pages patched (planned by
  // calls not aborted).
  int64_t hits() const { return hits_; }
  int64_t uploaded() const { return uploaded_; }
  int64_t patched() const { return patched_; }
  // Pages whose changed bytes their caller wrote in place (Place's writes_changed).
  int64_t written() const { return written_; }
  // Slots holding a page copy.
  int64_t used() const { return slots() - static_cast<int64_t>(free_.size()); }

 private:
  int64_t TakeSlot();

  int64_t page_bytes_ = 0;
  std::vector<uint64_t> version_;  // of the copy in each slot; 0: empty (no page has version 0)
  std::vector<uint64_t> call_;     // the call that last used each slot
  std::vector<uint8_t> referenced_;
  std::vector<int64_t> free_;      // empty slots
  int64_t hand_ = 0;
  uint64_t call_clock_ = 0;
  std::vector<Upload> uploads_;
  std::vector<Patch> patches_;
  std::vector<int64_t> patched_slots_;  // this call's
  int64_t hits_ = 0, uploaded_ = 0, patched_ = 0, written_ = 0, call_hits_ = 0, call_written_ = 0;
};

}  // namespace flashmem::kernels
