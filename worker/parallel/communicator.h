// The collectives a tensor-parallel worker group needs (spec/deepseek_v4_decode.md §7): an
// all-reduce sum (wo_b, the routed experts, index scores, the vocab-split embedding) and an
// all-gather (the vocab-split head's logits). The model calls this interface only; Gloo (CPU
// ranks, gloo_communicator.h) and NCCL (GPU ranks) implement it.
//
// Like kernels::Backend, a collective that fails (a peer died, a timeout) records the first error,
// later collectives do nothing, and Transformer::Forward returns the error (Health()).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace flashmem::parallel {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual absl::Status Health() const = 0;
  // data[0..n) = the element-wise sum over the ranks, identical on every rank.
  virtual void AllReduceSum(float* data, int64_t n) const = 0;
  // out[r * n .. (r + 1) * n) = rank r's local[0..n).
  virtual void AllGather(const float* local, int64_t n, float* out) const = 0;

  // From any thread, when a peer is known to be gone (the group's control stream broke): a
  // collective blocked on it returns an error instead of waiting forever. NCCL waits forever
  // otherwise (ncclCommAbort); Gloo's collectives time out by themselves, so it does nothing there.
  virtual void Abort() const {}

  // Device-memory collectives (NCCL ranks; UNIMPLEMENTED elsewhere), enqueued on `cuda_stream` (a
  // cudaStream_t; this header stays CUDA-free) and asynchronous: the caller orders and waits.
  // out[r * bytes .. (r + 1) * bytes) = rank r's local bytes; in place when local == out + rank * bytes.
  virtual absl::Status AllGatherDevice(const void* local, int64_t bytes, void* out, void* cuda_stream) const {
    (void)local, (void)bytes, (void)out, (void)cuda_stream;
    return absl::UnimplementedError("device-memory all-gather needs NCCL ranks");
  }
  // data[0..bytes) on every rank = root's.
  virtual absl::Status BroadcastDevice(void* data, int64_t bytes, int root, void* cuda_stream) const {
    (void)data, (void)bytes, (void)root, (void)cuda_stream;
    return absl::UnimplementedError("device-memory broadcast needs NCCL ranks");
  }
};

// What every implementation keeps: rank, size and the sticky error. Collective() runs one
// collective at a time (the model issues them in the same order on every rank) and records the
// first failure; after it, collectives do nothing.
class CommunicatorBase : public Communicator {
 public:
  CommunicatorBase(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status Health() const override {
    absl::MutexLock lock(&mu_);
    return health_;
  }

 protected:
  template <typename F>  // F: () -> absl::Status
  void Collective(F&& f) const {
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return;
    absl::Status st = f();
    if (!st.ok()) health_ = std::move(st);
  }

 private:
  const int rank_, size_;
  mutable absl::Mutex mu_;
  mutable absl::Status health_;
};

}  // namespace flashmem::parallel
