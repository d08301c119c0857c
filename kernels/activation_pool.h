// Memory for the activations ops pass each other (model::Scratch). By default the heap. A device
// backend installs a pool of page-locked blocks, so its copies to and from the device run straight
// from the caller's buffer: no copy through the backend's pinned staging buffer on the host, which
// was a third of a batch-64 Linear's time on the H200 (docs/benchmarks.md, "Model level").
//
// The pool keeps freed blocks for reuse (page-locking is slow: cudaMallocHost takes ~0.5 s a GiB)
// and gives cached ones back only to make room under its capacity. Once installed it stays for the
// process's life: buffers it gave out can outlive the backend that installed it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace flashmem::kernels {

struct ActivationPoolOptions {
  // The most memory the pool takes from its source, in use and cached together. Past it,
  // allocations come from the heap.
  size_t capacity_bytes = size_t{1} << 30;
  // Allocations smaller than this come from the heap: a staging copy of them costs less than the
  // block (and a block would round them up to this size).
  size_t min_bytes = size_t{64} << 10;
  // Allocations larger than this come from the heap (a long prompt's activations).
  size_t max_bytes = size_t{256} << 20;
};

// A caching allocator of blocks taken from `source` in power-of-two sizes; a freed block is kept
// for the next allocation of its size. When a new block would pass the capacity, cached blocks of
// other sizes go back to the source first (largest first): a long prompt's big blocks do not
// keep the decode steps' sizes out. Thread-safe.
class ActivationPool {
 public:
  // Returns `bytes` of memory, or nullptr when it has none.
  using Source = std::function<void*(size_t bytes)>;
  // Gives a block back to the source (its address and size).
  using Release = std::function<void(void* p, size_t bytes)>;
  ActivationPool(Source source, Release release, ActivationPoolOptions options = {});
  ActivationPool(const ActivationPool&) = delete;
  ActivationPool& operator=(const ActivationPool&) = delete;

  // A block of at least `bytes`, or nullptr when the pool declines: the size is outside
  // [min_bytes, max_bytes], the blocks in use leave no room under the capacity, or the source
  // failed.
  void* Allocate(size_t bytes);
  // Takes back a block Allocate returned; false (and nothing done) when p is not one.
  bool Free(void* p);
  // Whether [p, p + bytes) lies inside one of the pool's blocks (in use or cached; a block given
  // back to the source is no longer one).
  bool Contains(const void* p, size_t bytes) const;

  size_t held_bytes() const;    // taken from the source
  size_t in_use_bytes() const;  // in blocks given out and not freed
  const ActivationPoolOptions& options() const { return options_; }

 private:
  struct Block {
    size_t bytes = 0;
    bool in_use = false;
  };
  // Gives cached blocks back until `bytes` more fit under the capacity; false when they cannot.
  bool MakeRoom(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Source source_;
  const Release release_;
  const ActivationPoolOptions options_;
  mutable absl::Mutex mu_;
  absl::btree_map<uintptr_t, Block> blocks_ ABSL_GUARDED_BY(mu_);          // by start address
  absl::flat_hash_map<size_t, std::vector<void*>> free_ ABSL_GUARDED_BY(mu_);  // cached, by size
  size_t held_ ABSL_GUARDED_BY(mu_) = 0;
  size_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

// The process's pool: nullptr until a backend installs one. The first installation wins (later
// calls return false and change nothing); the pool must live until the process ends.
bool InstallActivationPool(ActivationPool* pool);
ActivationPool* InstalledActivationPool();

// Activation memory: the installed pool's when it takes the size, else the heap. Free either kind
// with FreeActivation.
void* AllocateActivation(size_t bytes);
void FreeActivation(void* p);

}  // namespace flashmem::kernels
