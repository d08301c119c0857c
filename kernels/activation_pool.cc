#include "kernels/activation_pool.h"

#include <atomic>
#include <bit>
#include <new>
#include <utility>

namespace flashmem::kernels {

ActivationPool::ActivationPool(Source source, Release release, ActivationPoolOptions options)
    : source_(std::move(source)), release_(std::move(release)), options_(options) {}

bool ActivationPool::MakeRoom(size_t bytes) {
  while (held_ + bytes > options_.capacity_bytes) {
    // The largest size with a cached block.
    auto largest = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (!it->second.empty() && (largest == free_.end() || it->first > largest->first)) largest = it;
    if (largest == free_.end()) return false;  // every block is in use
    void* p = largest->second.back();
    largest->second.pop_back();
    blocks_.erase(reinterpret_cast<uintptr_t>(p));
    held_ -= largest->first;
    release_(p, largest->first);
  }
  return true;
}

void* ActivationPool::Allocate(size_t bytes) {
  if (bytes < options_.min_bytes || bytes > options_.max_bytes || bytes == 0) return nullptr;
  const size_t size = std::bit_ceil(bytes);
  absl::MutexLock lock(&mu_);
  void* p = nullptr;
  if (auto it = free_.find(size); it != free_.end() && !it->second.empty()) {
    p = it->second.back();
    it->second.pop_back();
  } else {
    if (!MakeRoom(size)) return nullptr;
    p = source_(size);
    if (!p) return nullptr;
    blocks_[reinterpret_cast<uintptr_t>(p)] = Block{size, false};
    held_ += size;
  }
  Block& b = blocks_[reinterpret_cast<uintptr_t>(p)];
  b.in_use = true;
  in_use_ += b.bytes;
  return p;
}

bool ActivationPool::Free(void* p) {
  if (!p) return false;
  absl::MutexLock lock(&mu_);
  auto it = blocks_.find(reinterpret_cast<uintptr_t>(p));
  if (it == blocks_.end() || !it->second.in_use) return false;
  it->second.in_use = false;
  in_use_ -= it->second.bytes;
  free_[it->second.bytes].push_back(p);
  return true;
}

bool ActivationPool::Contains(const void* p, size_t bytes) const {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  absl::MutexLock lock(&mu_);
  auto it = blocks_.upper_bound(a);  // the first block starting after p
  if (it == blocks_.begin()) return false;
  --it;
  return a - it->first <= it->second.bytes && bytes <= it->second.bytes - (a - it->first);
}

size_t ActivationPool::held_bytes() const {
  absl::MutexLock lock(&mu_);
  return held_;
}

size_t ActivationPool::in_use_bytes() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

namespace {
std::atomic<ActivationPool*> installed{nullptr};
}  // namespace

bool InstallActivationPool(ActivationPool* pool) {
  ActivationPool* none = nullptr;
  return installed.compare_exchange_strong(none, pool);
}

ActivationPool* InstalledActivationPool() { return installed.load(std::memory_order_acquire); }

void* AllocateActivation(size_t bytes) {
  if (ActivationPool* pool = InstalledActivationPool())
    if (void* p = pool->Allocate(bytes)) return p;
  return ::operator new(bytes);
}

void FreeActivation(void* p) {
  if (!p) return;
  if (ActivationPool* pool = InstalledActivationPool())
    if (pool->Free(p)) return;
  ::operator delete(p);
}

}  // namespace flashmem::kernels
