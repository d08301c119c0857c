// RamTier: the host-RAM page pool. Memory comes in chunks of at most 1 GiB (never one huge
// allocation), each a memfd segment so that same-node clients can map it (DESIGN.md §1); when a
// CUDA device is present each chunk is registered with cudaHostRegister (pinned) so a recall is
// one DMA, otherwise it stays pageable with a warning. Slots come in size classes of 512 B.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace flashmem::memtier {

struct RamTierOptions {
  uint64_t capacity_bytes = 1ull << 30;  // page bytes the tier may hold
  uint64_t chunk_bytes = 256ull << 20;   // one memfd segment; at most 1 GiB
  bool pin = true;                       // cudaHostRegister chunks when a CUDA device is present
};

struct RamSlot {
  uint32_t chunk = 0;
  uint64_t offset = 0;
  uint32_t capacity = 0;  // the slot's size class
};

struct RamChunkInfo {
  int fd = -1;
  uint64_t bytes = 0;
  uint8_t* base = nullptr;
  bool pinned = false;
};

struct RamTierStats {
  uint64_t capacity_bytes = 0, used_bytes = 0, mapped_bytes = 0, pinned_bytes = 0;
  double pin_seconds = 0;
  uint64_t chunks = 0;
};

class RamTier {
 public:
  static absl::StatusOr<std::unique_ptr<RamTier>> Create(const RamTierOptions& options);
  ~RamTier();

  // RESOURCE_EXHAUSTED when `bytes` more would exceed the capacity (the caller evicts first).
  absl::StatusOr<RamSlot> Allocate(uint64_t bytes);
  void Free(const RamSlot& slot);
  uint8_t* Data(const RamSlot& slot) const;
  uint64_t used_bytes() const;
  uint64_t capacity_bytes() const { return options_.capacity_bytes; }
  static uint32_t SizeClass(uint64_t bytes) { return static_cast<uint32_t>((bytes + 511) / 512 * 512); }
  RamTierStats stats() const;
  // Whether chunks can be pinned here (a CUDA runtime and device were found), and if not why.
  static bool PinningAvailable(std::string* why_not = nullptr);
  std::vector<RamChunkInfo> chunks() const;

 private:
  explicit RamTier(const RamTierOptions& o) : options_(o) {}
  absl::Status AddChunk(uint32_t size_class) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  RamTierOptions options_;
  mutable absl::Mutex mu_;
  std::vector<RamChunkInfo> chunks_ ABSL_GUARDED_BY(mu_);
  // Per size class: free slots, and the chunk being carved with its next offset.
  struct ClassState {
    std::vector<RamSlot> free;
    int64_t carving_chunk = -1;
    uint64_t next = 0;
  };
  std::vector<std::pair<uint32_t, ClassState>> classes_ ABSL_GUARDED_BY(mu_);
  uint64_t used_ ABSL_GUARDED_BY(mu_) = 0;
  double pin_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  bool warned_unpinned_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace flashmem::memtier
