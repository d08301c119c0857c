#include "kernels/kv_reserve.h"

namespace flashmem::kernels {

KvReserve::KvReserve(int64_t slots, int64_t page_bytes)
    : page_bytes_(page_bytes), version_(slots, 0), call_(slots, 0), referenced_(slots, 0) {
  free_.reserve(slots);
  for (int64_t s = slots - 1; s >= 0; --s) free_.push_back(s);  // handed out from slot 0 up
}

void KvReserve::Begin() {
  ++call_clock_;
  uploads_.clear();
  patches_.clear();
  patched_slots_.clear();
  call_hits_ = 0;
  call_written_ = 0;
}

int64_t KvReserve::TakeSlot() {
  if (!free_.empty()) {
    const int64_t s = free_.back();
    free_.pop_back();
    return s;
  }
  // Two sweeps at most: the first clears every second chance it passes.
  for (int64_t step = 0, n = slots(); step < 2 * n; ++step) {
    const int64_t s = hand_;
    hand_ = (hand_ + 1) % n;
    if (call_[s] == call_clock_) continue;  // this call reads it
    if (referenced_[s]) {
      referenced_[s] = 0;
      continue;
    }
    return s;
  }
  return -1;
}

int64_t KvReserve::Place(const KvPage& page, bool writes_changed) {
  int64_t s = page.device_slot.load(std::memory_order_relaxed);
  const bool own = s >= 0 && s < slots();
  if (own && version_[s] == page.version) {
    if (call_[s] != call_clock_) {
      ++hits_;
      ++call_hits_;
    }
  } else if (own && page.before != 0 && version_[s] == page.before) {
    if (!writes_changed)
      for (const KvPage::Range& r : page.changed)
        if (r.bytes > 0) patches_.push_back({page.bytes + r.offset, s, r.offset, r.bytes});
    patched_slots_.push_back(s);
    version_[s] = page.version;
    ++(writes_changed ? written_ : patched_);
    call_written_ += writes_changed;
  } else {
    // Written by the caller: the whole page first (the entry's bytes on the host are the old
    // ones), the caller's write after it.
    s = TakeSlot();
    if (s < 0) return -1;
    version_[s] = page.version;
    page.device_slot.store(s, std::memory_order_relaxed);
    uploads_.push_back({page.bytes, s});
    ++uploaded_;
  }
  call_[s] = call_clock_;
  referenced_[s] = 1;
  return s;
}

void KvReserve::Abort() {
  auto forget = [&](int64_t slot) {
    version_[slot] = 0;
    call_[slot] = 0;
    referenced_[slot] = 0;
    free_.push_back(slot);
  };
  for (const Upload& u : uploads_) forget(u.slot);
  for (int64_t slot : patched_slots_) forget(slot);
  uploaded_ -= static_cast<int64_t>(uploads_.size());
  patched_ -= static_cast<int64_t>(patched_slots_.size()) - call_written_;
  written_ -= call_written_;
  hits_ -= call_hits_;
  uploads_.clear();
  patches_.clear();
  patched_slots_.clear();
  call_hits_ = 0;
  call_written_ = 0;
}

}  // namespace flashmem::kernels
