#include "memtier/store/page_store.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace flashmem::memtier {

absl::StatusOr<std::unique_ptr<PageStore>> PageStore::Open(const PageStoreOptions& options) {
  if (!(options.low_watermark > 0 && options.low_watermark <= options.high_watermark && options.high_watermark <= 1.0))
    return absl::InvalidArgumentError(absl::StrCat("watermarks must satisfy 0 < low (", options.low_watermark,
                                                   ") <= high (", options.high_watermark, ") <= 1"));
  std::unique_ptr<PageStore> s(new PageStore(options));
  FM_ASSIGN_OR_RETURN(s->ram_, RamTier::Create(options.ram));
  FM_ASSIGN_OR_RETURN(s->rocks_, RocksTier::Open(options.rocks));
  absl::MutexLock l(&s->mu_);
  // Rebuild the page index from RocksDB: every page starts on disk only.
  FM_RETURN_IF_ERROR(s->rocks_->ForEachPage([&](const PageKey& k, const PageMeta& m) {
    Entry e;
    e.meta = m;
    s->index_[k] = e;
    s->counters_.pages_total++;
    s->counters_.bytes_total += m.length;
  }));
  FM_ASSIGN_OR_RETURN(std::vector<uint64_t> sessions, s->rocks_->ListSessions());
  for (uint64_t id : sessions) {
    s->sessions_.insert(id);
    auto st = s->rocks_->GetState(id);
    if (st.ok()) s->state_versions_[id] = st->version;
  }
  return s;
}

absl::Status PageStore::OpenSession(uint64_t session) {
  absl::MutexLock l(&mu_);
  if (sessions_.contains(session)) return absl::OkStatus();
  FM_RETURN_IF_ERROR(rocks_->PutSession(session));
  sessions_.insert(session);
  return absl::OkStatus();
}

bool PageStore::HasSession(uint64_t session) const {
  absl::MutexLock l(&mu_);
  return sessions_.contains(session);
}

absl::Status PageStore::CloseSession(uint64_t session) {
  absl::MutexLock l(&mu_);
  if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  for (auto& [k, e] : index_)
    if (k.session == session) DropFromRam(e);
  return absl::OkStatus();
}

absl::Status PageStore::DropSession(uint64_t session) {
  absl::MutexLock l(&mu_);
  if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  FM_RETURN_IF_ERROR(rocks_->DropSession(session));
  for (auto it = index_.begin(); it != index_.end();) {
    if (it->first.session == session) {
      DropFromRam(it->second);
      counters_.pages_total--;
      counters_.bytes_total -= it->second.meta.length;
      index_.erase(it++);
    } else {
      ++it;
    }
  }
  sessions_.erase(session);
  state_versions_.erase(session);
  return absl::OkStatus();
}

absl::Status PageStore::Commit(uint64_t session, std::span<const PageWrite> pages) {
  absl::MutexLock l(&mu_);
  if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("commit: unknown session ", session));
  absl::flat_hash_set<PageKey> seen;
  std::vector<PageWrite> fresh;
  for (size_t i = 0; i < pages.size(); ++i) {
    const PageWrite& p = pages[i];
    if (p.key.session != session)
      return absl::InvalidArgumentError(absl::StrCat("commit: pages[", i, "] belongs to session ", p.key.session, ", not ", session));
    if (p.bytes.empty() || p.bytes.size() > options_.max_page_bytes)
      return absl::InvalidArgumentError(absl::StrCat("commit: pages[", i, "] ", ToString(p.key), " length ", p.bytes.size(),
                                                     " outside [1, ", options_.max_page_bytes, "]"));
    if (!seen.insert(p.key).second)
      return absl::InvalidArgumentError(absl::StrCat("commit: pages[", i, "] ", ToString(p.key), " appears twice in one commit"));
    if (PageChecksum(p.bytes) != p.checksum) {
      counters_.checksum_failures++;
      return absl::DataLossError(absl::StrCat("commit: pages[", i, "] ", ToString(p.key), " checksum mismatch: the bytes are not what the writer sent"));
    }
    auto it = index_.find(p.key);
    if (it != index_.end()) {
      if (it->second.meta.checksum == p.checksum && it->second.meta.length == p.bytes.size()) continue;  // idempotent retry
      return absl::AlreadyExistsError(absl::StrCat("commit: pages[", i, "] ", ToString(p.key), " is already committed with other contents"));
    }
    fresh.push_back(p);
  }
  if (fresh.empty()) return absl::OkStatus();
  FM_RETURN_IF_ERROR(rocks_->PutPages(fresh));  // durable (WAL) before anything else
  counters_.commits++;
  for (const PageWrite& p : fresh) {
    Entry& e = index_[p.key];
    e.meta = {static_cast<uint32_t>(p.bytes.size()), p.checksum};
    e.last_use = ++tick_;
    counters_.pages_committed++;
    counters_.bytes_committed += p.bytes.size();
    counters_.pages_total++;
    counters_.bytes_total += p.bytes.size();
    PlaceInRam(e, p.bytes);
  }
  return absl::OkStatus();
}

absl::StatusOr<RamSlot> PageStore::AllocateSlot(uint32_t length) {
  const uint64_t need = RamTier::SizeClass(length);
  const uint64_t cap = ram_->capacity_bytes();
  if (ram_->used_bytes() + need > static_cast<uint64_t>(options_.high_watermark * cap)) EvictToLowWatermark();
  return ram_->Allocate(length);
}

bool PageStore::AllocateInRam(Entry& e) {
  auto slot = AllocateSlot(e.meta.length);
  if (!slot.ok()) return false;  // the page stays in RocksDB only
  e.slot = *slot;
  e.in_ram = true;
  counters_.pages_in_ram++;
  counters_.bytes_in_ram += e.meta.length;
  return true;
}

bool PageStore::PlaceInRam(Entry& e, std::span<const uint8_t> bytes) {
  if (!AllocateInRam(e)) return false;
  std::memcpy(ram_->Data(e.slot), bytes.data(), bytes.size());
  return true;
}

void PageStore::DropFromRam(Entry& e) {
  if (!e.in_ram) return;
  auto pin = pins_.find(SlotId(e.slot));
  if (pin != pins_.end() && pin->second.count > 0) pin->second.free_when_unpinned = true;  // a reader holds it
  else ram_->Free(e.slot);
  e.in_ram = false;
  counters_.pages_in_ram--;
  counters_.bytes_in_ram -= e.meta.length;
}

void PageStore::EvictToLowWatermark() {
  const uint64_t target = static_cast<uint64_t>(options_.low_watermark * ram_->capacity_bytes());
  // Victims: unranked pages oldest first, then ranked pages from the least needed.
  std::vector<std::pair<std::pair<int64_t, uint64_t>, Entry*>> victims;
  for (auto& [k, e] : index_) {
    if (!e.in_ram || pins_.contains(SlotId(e.slot))) continue;  // pinned slots cannot be freed now
    const int64_t group = e.rank < 0 ? 0 : 1;
    const uint64_t order = e.rank < 0 ? e.last_use : UINT64_MAX - static_cast<uint64_t>(e.rank);
    victims.push_back({{group, order}, &e});
  }
  std::sort(victims.begin(), victims.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [order, e] : victims) {
    if (ram_->used_bytes() <= target) break;
    DropFromRam(*e);
    counters_.evictions++;
  }
}

absl::StatusOr<PageStore::Entry*> PageStore::PromoteLocked(const PageKey& key, std::span<uint8_t> fallback) {
  auto settled = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = index_.find(key);
    return it == index_.end() || !it->second.promoting;
  };
  mu_.Await(absl::Condition(&settled));  // another reader of this page finishes first
  auto it = index_.find(key);
  if (it == index_.end()) return absl::NotFoundError(absl::StrCat("page ", ToString(key), " was dropped"));
  if (it->second.bad) return absl::DataLossError(absl::StrCat("page ", ToString(key), " is marked bad (checksum mismatch)"));
  if (it->second.in_ram) return &it->second;  // that reader promoted it
  const PageMeta meta = it->second.meta;
  auto slot = AllocateSlot(meta.length);
  std::vector<uint8_t> scratch;
  if (!slot.ok() && fallback.empty()) scratch.resize(meta.length);
  const std::span<uint8_t> dst = slot.ok() ? std::span<uint8_t>(ram_->Data(*slot), meta.length)
                                 : fallback.empty() ? std::span<uint8_t>(scratch) : fallback;
  it->second.promoting = true;
  // The slot belongs to no entry yet: eviction cannot take it and no reader can see it.
  mu_.Unlock();
  const absl::Status st = rocks_->GetPage(key, meta, dst);
  mu_.Lock();
  it = index_.find(key);
  Entry* e = it == index_.end() ? nullptr : &it->second;
  if (e) e->promoting = false;
  if (!st.ok() || !e || e->in_ram) {  // failed, dropped meanwhile, or placed by a commit retry
    if (slot.ok()) ram_->Free(*slot);
    if (!e) return absl::NotFoundError(absl::StrCat("page ", ToString(key), " was dropped during its promotion"));
    if (!st.ok()) {
      if (absl::IsDataLoss(st)) {
        e->bad = true;
        counters_.checksum_failures++;
      }
      return st;
    }
    return e;
  }
  if (slot.ok()) {
    e->slot = *slot;
    e->in_ram = true;
    counters_.pages_in_ram++;
    counters_.bytes_in_ram += meta.length;
  }
  counters_.promotions++;
  return e;
}

absl::StatusOr<PageStore::Entry*> PageStore::ReadableLocked(const PageKey& key, const char* what) {
  auto it = index_.find(key);
  if (it == index_.end()) return absl::NotFoundError(absl::StrCat(what, ": no page ", ToString(key)));
  Entry& e = it->second;
  if (e.bad) return absl::DataLossError(absl::StrCat(what, ": page ", ToString(key), " is marked bad (checksum mismatch)"));
  e.last_use = ++tick_;
  return &e;
}

absl::StatusOr<PageStore::Entry*> PageStore::MakeResidentLocked(const PageKey& key, const char* what,
                                                                 std::span<uint8_t> fallback) {
  FM_ASSIGN_OR_RETURN(Entry * e, ReadableLocked(key, what));
  if (e->in_ram) {
    counters_.ram_hits++;
    return e;
  }
  counters_.ram_misses++;
  FM_ASSIGN_OR_RETURN(e, PromoteLocked(key, fallback));
  if (!e->in_ram && fallback.empty())
    return absl::ResourceExhaustedError(absl::StrCat(what, ": no RAM to hold page ", ToString(key), "; recall it with a copy"));
  return e;
}

absl::StatusOr<PageMeta> PageStore::Recall(const PageKey& key, std::span<uint8_t> dst) {
  absl::MutexLock l(&mu_);
  FM_ASSIGN_OR_RETURN(Entry * e, ReadableLocked(key, "recall"));
  if (dst.size() < e->meta.length)
    return absl::InvalidArgumentError(absl::StrCat("recall: buffer of ", dst.size(), " bytes is smaller than page ", ToString(key), " (", e->meta.length, ")"));
  FM_ASSIGN_OR_RETURN(e, MakeResidentLocked(key, "recall", dst));  // no room in RAM: straight into dst
  if (e->in_ram) std::memcpy(dst.data(), ram_->Data(e->slot), e->meta.length);
  return e->meta;
}

absl::StatusOr<PageStore::PinnedPage> PageStore::Pin(const PageKey& key) {
  absl::MutexLock l(&mu_);
  FM_ASSIGN_OR_RETURN(Entry * e, MakeResidentLocked(key, "recall"));
  pins_[SlotId(e->slot)].count++;
  return PinnedPage{ram_->Data(e->slot), e->meta, e->slot};
}

void PageStore::Unpin(const RamSlot& slot) {
  absl::MutexLock l(&mu_);
  UnpinLocked(slot);
}

size_t PageStore::pinned_slots() const {
  absl::MutexLock l(&mu_);
  return pins_.size();
}

void PageStore::UnpinMany(std::span<const RamSlot> slots) {
  absl::MutexLock l(&mu_);
  for (const RamSlot& slot : slots) UnpinLocked(slot);
}

void PageStore::UnpinLocked(const RamSlot& slot) {
  auto it = pins_.find(SlotId(slot));
  if (it == pins_.end()) return;
  if (--it->second.count > 0) return;
  if (it->second.free_when_unpinned) ram_->Free(slot);
  pins_.erase(it);
}

absl::StatusOr<int64_t> PageStore::Prefetch(uint64_t session, std::span<const PageKey> ranked,
                                            std::chrono::steady_clock::time_point deadline) {
  absl::MutexLock l(&mu_);
  if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("prefetch: unknown session ", session));
  for (auto& [k, e] : index_)
    if (k.session == session) e.rank = -1;  // the new ranking replaces the old one
  for (size_t i = 0; i < ranked.size(); ++i) {
    if (ranked[i].session != session)
      return absl::InvalidArgumentError(absl::StrCat("prefetch: candidates[", i, "] belongs to session ", ranked[i].session));
    auto it = index_.find(ranked[i]);
    if (it != index_.end() && it->second.rank < 0) it->second.rank = static_cast<int64_t>(i);
  }
  // Candidates on disk only, in rank order; promoted by several threads, each taking the next.
  std::vector<PageKey> todo;
  for (const PageKey& k : ranked) {
    auto it = index_.find(k);
    if (it != index_.end() && !it->second.in_ram && !it->second.bad) todo.push_back(k);
  }
  std::atomic<size_t> next{0};
  std::atomic<int64_t> promoted{0};
  auto work = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (size_t i; (i = next++) < todo.size();) {
      if (std::chrono::steady_clock::now() >= deadline) break;
      auto it = index_.find(todo[i]);
      if (it == index_.end() || it->second.in_ram || it->second.bad) continue;
      auto e = PromoteLocked(todo[i]);  // releases the lock while reading: other requests go on
      if (e.ok() && (*e)->in_ram) {
        ++promoted;
        counters_.prefetch_promotions++;
      }
    }
  };
  const int helpers = static_cast<int>(std::min<size_t>(std::max(options_.prefetch_threads, 1) - 1, todo.size() / 16));
  std::vector<std::thread> threads;
  for (int t = 0; t < helpers; ++t)
    threads.emplace_back([&] {
      absl::MutexLock hl(&mu_);
      work();
    });
  work();
  mu_.Unlock();  // the helpers need the lock to finish
  for (auto& t : threads) t.join();
  mu_.Lock();
  return promoted.load();
}

absl::StatusOr<PageStore::Location> PageStore::Locate(const PageKey& key) {
  absl::MutexLock l(&mu_);
  FM_ASSIGN_OR_RETURN(Entry * e, MakeResidentLocked(key, "locate"));
  return Location{e->slot, e->meta};
}

absl::Status PageStore::LocateMany(std::span<const PageKey> keys, bool pin, std::vector<Location>* out) {
  out->clear();
  out->reserve(keys.size());
  absl::MutexLock l(&mu_);
  for (const PageKey& key : keys) {
    absl::StatusOr<Entry*> e = MakeResidentLocked(key, pin ? "recall" : "locate");
    if (!e.ok()) {
      for (const Location& done : *out)
        if (pin) UnpinLocked(done.slot);
      return e.status();
    }
    if (pin) pins_[SlotId((*e)->slot)].count++;
    out->push_back(Location{(*e)->slot, (*e)->meta});
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PageInfo>> PageStore::ListPages(uint64_t session) const {
  absl::MutexLock l(&mu_);
  if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("list: unknown session ", session));
  std::vector<PageInfo> out;
  for (const auto& [k, e] : index_)
    if (k.session == session) out.push_back({k, e.meta, e.in_ram, e.bad});
  std::sort(out.begin(), out.end(), [](const PageInfo& a, const PageInfo& b) { return a.key < b.key; });
  return out;
}

absl::StatusOr<PageMeta> PageStore::Lookup(const PageKey& key) const {
  absl::MutexLock l(&mu_);
  auto it = index_.find(key);
  if (it == index_.end()) return absl::NotFoundError(absl::StrCat("no page ", ToString(key)));
  return it->second.meta;
}

absl::Status PageStore::PutState(uint64_t session, uint64_t version, std::span<const uint8_t> bytes) {
  absl::MutexLock l(&mu_);
  if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("put state: unknown session ", session));
  if (bytes.size() > options_.max_state_bytes)
    return absl::InvalidArgumentError(absl::StrCat("put state: ", bytes.size(), " bytes exceed the limit of ", options_.max_state_bytes));
  auto it = state_versions_.find(session);
  // ABORTED (a sequencer conflict): a writer that is not the session's current owner.
  if (it != state_versions_.end() && version <= it->second)
    return absl::AbortedError(absl::StrCat("put state: version ", version, " is not above the stored version ", it->second));
  FM_RETURN_IF_ERROR(rocks_->PutState(session, StateBlob{version, std::vector<uint8_t>(bytes.begin(), bytes.end())}));
  state_versions_[session] = version;
  return absl::OkStatus();
}

absl::StatusOr<StateBlob> PageStore::GetState(uint64_t session) const {
  {
    absl::MutexLock l(&mu_);
    if (!sessions_.contains(session)) return absl::NotFoundError(absl::StrCat("get state: unknown session ", session));
  }
  return rocks_->GetState(session);
}

StoreCounters PageStore::counters() const {
  absl::MutexLock l(&mu_);
  return counters_;
}

}  // namespace flashmem::memtier
