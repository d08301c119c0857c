// A Communicator that forwards to another and counts the wall time spent in host-array
// collectives (benchmarks: the share of a decode step spent communicating). The time includes
// waiting for the slowest rank to arrive, so it is an upper bound on the transfer itself.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "worker/parallel/communicator.h"

namespace flashmem::parallel {

class TimedCommunicator final : public Communicator {
 public:
  explicit TimedCommunicator(const Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  absl::Status Health() const override { return inner_.Health(); }
  void AllReduceSum(float* data, int64_t n) const override {
    Timed([&] { inner_.AllReduceSum(data, n); });
  }
  void AllGather(const float* local, int64_t n, float* out) const override {
    Timed([&] { inner_.AllGather(local, n, out); });
  }
  void Abort() const override { inner_.Abort(); }
  absl::Status AllGatherDevice(const void* local, int64_t bytes, void* out, void* stream) const override {
    return inner_.AllGatherDevice(local, bytes, out, stream);
  }
  absl::Status BroadcastDevice(void* data, int64_t bytes, int root, void* stream) const override {
    return inner_.BroadcastDevice(data, bytes, root, stream);
  }

  double seconds() const { return static_cast<double>(nanos_.load()) * 1e-9; }
  int64_t calls() const { return calls_.load(); }
  void Reset() {
    nanos_ = 0;
    calls_ = 0;
  }

 private:
  template <typename F>
  void Timed(F&& f) const {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    nanos_ += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    ++calls_;
  }
  const Communicator& inner_;
  mutable std::atomic<int64_t> nanos_{0}, calls_{0};
};

}  // namespace flashmem::parallel
