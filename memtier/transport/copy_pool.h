// A few threads for the byte work of one request: the copies of a recall and the checksum pass
// after it. One core copies ~4-6 GB/s between DRAM buffers and hashes ~9-19 GB/s (measured on
// the VM and the H200 host, docs/benchmarks.md), so a batch of 37 KB pages is core-bound long
// before the memory system is; spreading its pages over cores is what lets a recall approach
// the memory bandwidth. The threads are RocksDB's ThreadPool (already linked for the store; idle
// threads sleep on a condition variable rather than spin).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>

namespace rocksdb {
class ThreadPool;
}

namespace flashmem::memtier {

class CopyPool {
 public:
  // `threads` <= 1: everything runs on the calling thread.
  explicit CopyPool(int threads);
  ~CopyPool();
  CopyPool(const CopyPool&) = delete;
  CopyPool& operator=(const CopyPool&) = delete;

  int threads() const { return threads_; }
  // Calls fn(i) for every i in [0, n), split into contiguous ranges of at least `min_per_range`
  // items, one range per thread (the caller runs the first); returns when every call has.
  // Concurrent callers share the pool's threads.
  void ForEach(size_t n, const std::function<void(size_t)>& fn, size_t min_per_range = 4);

  // hardware_concurrency / share, between 1 and 8: the default for a pool that shares the
  // node's cores with `share` - 1 others of its kind.
  static int DefaultThreads(int share);

 private:
  int threads_;
  std::unique_ptr<rocksdb::ThreadPool> pool_;
};

}  // namespace flashmem::memtier
