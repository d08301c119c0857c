#include "memtier/transport/copy_pool.h"

#include <rocksdb/threadpool.h>

#include <algorithm>
#include <thread>

#include "absl/synchronization/blocking_counter.h"

namespace flashmem::memtier {

CopyPool::CopyPool(int threads) : threads_(std::max(1, threads)) {
  if (threads_ > 1) pool_.reset(rocksdb::NewThreadPool(threads_ - 1));
}

CopyPool::~CopyPool() {
  if (pool_) pool_->JoinAllThreads();
}

void CopyPool::ForEach(size_t n, const std::function<void(size_t)>& fn, size_t min_per_range) {
  const size_t ranges = std::min<size_t>(threads_, std::max<size_t>(1, n / std::max<size_t>(1, min_per_range)));
  auto run = [&](size_t r) {
    for (size_t i = n * r / ranges; i < n * (r + 1) / ranges; ++i) fn(i);
  };
  if (ranges <= 1) {
    run(0);
    return;
  }
  absl::BlockingCounter done(static_cast<int>(ranges - 1));
  for (size_t r = 1; r < ranges; ++r)
    pool_->SubmitJob([&run, &done, r] {
      run(r);
      done.DecrementCount();
    });
  run(0);
  done.Wait();
}

int CopyPool::DefaultThreads(int share) {
  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::clamp(hw / std::max(1, share), 1, 8);
}

}  // namespace flashmem::memtier
