// PageStore: memtier's core, transport-free. Pages are committed write-through (RocksDB WAL
// first, then the RAM tier), recalled from RAM or promoted from RocksDB, prefetched ahead of use
// by rank, and evicted from RAM between watermarks with the prefetch ranking (pages predicted to
// be needed soon go last). Every tier crossing verifies the xxh3 checksum; a mismatch marks the
// page bad and is an error, never data.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "memtier/store/page_key.h"
#include "memtier/store/ram_tier.h"
#include "memtier/store/rocks_tier.h"

namespace flashmem::memtier {

struct PageStoreOptions {
  RamTierOptions ram;
  RocksTierOptions rocks;
  double high_watermark = 0.90;  // evict when RAM use exceeds this fraction of capacity...
  double low_watermark = 0.75;   // ...down to this fraction
  uint64_t max_page_bytes = 64ull << 20;
  uint64_t max_state_bytes = 256ull << 20;
  // Threads a prefetch promotes with (RocksDB reads, checksums and copies run in parallel; each
  // takes the next candidate in rank order).
  int prefetch_threads = 4;
};

struct PageInfo {
  PageKey key;
  PageMeta meta;
  bool in_ram = false;
  bool bad = false;
};

struct StoreCounters {
  uint64_t commits = 0, pages_committed = 0, bytes_committed = 0;
  uint64_t ram_hits = 0, ram_misses = 0, promotions = 0, evictions = 0;
  uint64_t checksum_failures = 0, prefetch_promotions = 0;
  uint64_t pages_total = 0, bytes_total = 0, pages_in_ram = 0, bytes_in_ram = 0;
};

class PageStore {
 public:
  static absl::StatusOr<std::unique_ptr<PageStore>> Open(const PageStoreOptions& options);

  absl::Status OpenSession(uint64_t session);
  // Releases the session's RAM copies; its pages stay durable.
  absl::Status CloseSession(uint64_t session);
  // Deletes the session's pages (range delete) and state.
  absl::Status DropSession(uint64_t session);
  bool HasSession(uint64_t session) const;

  // Write-through commit of pages whose bytes the caller holds; returns after the WAL has them.
  absl::Status Commit(uint64_t session, std::span<const PageWrite> pages);
  // Copies a page into dst (dst.size() >= its length); RAM hit, or promotion from RocksDB.
  absl::StatusOr<PageMeta> Recall(const PageKey& key, std::span<uint8_t> dst);
  // Ranked candidates (most needed first): kept in RAM last on eviction, promoted from RocksDB
  // in rank order until `deadline`. Returns the number promoted.
  absl::StatusOr<int64_t> Prefetch(uint64_t session, std::span<const PageKey> ranked,
                                   std::chrono::steady_clock::time_point deadline);
  // Where a page sits in the RAM tier (promoting it first when it is on disk only).
  struct Location {
    RamSlot slot;
    PageMeta meta;
  };
  absl::StatusOr<Location> Locate(const PageKey& key);
  // Locate (pin = false) or Pin (pin = true) for a batch under one lock acquisition (a promotion
  // still lets the lock go while it reads RocksDB). On an error, `out` holds the pages done
  // before the failing one, out->size() its index — and, pinned, they are unpinned again.
  absl::Status LocateMany(std::span<const PageKey> keys, bool pin, std::vector<Location>* out);
  // Zero-copy read: the page's RAM slot stays valid (never freed or reused) until Unpin, even if
  // the page is evicted or its session dropped meanwhile. Promotes pages on disk first;
  // RESOURCE_EXHAUSTED when RAM cannot hold it (use Recall then).
  struct PinnedPage {
    const uint8_t* data = nullptr;
    PageMeta meta;
    RamSlot slot;
  };
  absl::StatusOr<PinnedPage> Pin(const PageKey& key);
  void Unpin(const RamSlot& slot);
  void UnpinMany(std::span<const RamSlot> slots);
  // RAM slots held by Pin / LocateMany(pin) and not yet unpinned.
  size_t pinned_slots() const;
  absl::StatusOr<std::vector<PageInfo>> ListPages(uint64_t session) const;
  absl::StatusOr<PageMeta> Lookup(const PageKey& key) const;

  // Versioned state blob: a put must carry a version above the stored one.
  absl::Status PutState(uint64_t session, uint64_t version, std::span<const uint8_t> bytes);
  absl::StatusOr<StateBlob> GetState(uint64_t session) const;

  StoreCounters counters() const;
  RamTierStats ram_stats() const { return ram_->stats(); }
  RamTier& ram() { return *ram_; }
  RocksTier& rocks() { return *rocks_; }
  const PageStoreOptions& options() const { return options_; }

 private:
  struct Entry {
    PageMeta meta;
    bool in_ram = false;
    bool bad = false;
    RamSlot slot;
    uint64_t last_use = 0;
    int64_t rank = -1;  // position in the latest prefetch ranking (-1: not ranked)
    bool promoting = false;  // a thread is reading it from RocksDB (outside the lock)
  };
  explicit PageStore(const PageStoreOptions& o) : options_(o) {}
  // Copies bytes into a fresh RAM slot, evicting first when needed. False when RAM cannot hold it.
  bool PlaceInRam(Entry& e, std::span<const uint8_t> bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A fresh RAM slot for the entry's length (evicting first when needed); false when RAM is full.
  bool AllocateInRam(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A RAM slot of `length` bytes not yet attached to any entry (evicting first when needed).
  absl::StatusOr<RamSlot> AllocateSlot(uint32_t length) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EvictToLowWatermark() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnpinLocked(const RamSlot& slot) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropFromRam(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The index entry of a readable page (NOT_FOUND / DATA_LOSS otherwise), touched for LRU.
  absl::StatusOr<Entry*> ReadableLocked(const PageKey& key, const char* what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Brings the page into RAM (promotion); without room, into `fallback` when given, else
  // RESOURCE_EXHAUSTED. Returns the page's entry looked up again: promotion releases the lock.
  absl::StatusOr<Entry*> MakeResidentLocked(const PageKey& key, const char* what, std::span<uint8_t> fallback = {})
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads a page from RocksDB into a RAM slot (verified); without room in RAM, into `fallback`
  // when given (else a scratch buffer, just to verify). The read runs with the lock released, so
  // one session's promotions never hold up other requests; a second reader of the same page
  // waits for the first. Entry pointers taken before the call are stale after it: use the
  // returned one.
  absl::StatusOr<Entry*> PromoteLocked(const PageKey& key, std::span<uint8_t> fallback = {})
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  PageStoreOptions options_;
  std::unique_ptr<RamTier> ram_;
  std::unique_ptr<RocksTier> rocks_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<PageKey, Entry> index_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> sessions_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, uint64_t> state_versions_ ABSL_GUARDED_BY(mu_);
  uint64_t tick_ ABSL_GUARDED_BY(mu_) = 0;
  // Slots being read in place: pin count, and whether the slot was released meanwhile (it is
  // freed when the last pin goes).
  struct SlotPins {
    uint32_t count = 0;
    bool free_when_unpinned = false;
  };
  static uint64_t SlotId(const RamSlot& s) { return (static_cast<uint64_t>(s.chunk) << 40) | s.offset; }
  absl::flat_hash_map<uint64_t, SlotPins> pins_ ABSL_GUARDED_BY(mu_);
  StoreCounters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace flashmem::memtier
