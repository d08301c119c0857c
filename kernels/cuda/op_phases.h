// Where a CUDA backend op's time goes (diagnostics: FLASHMEM_CUDA_PHASES=1): per op, the host's
// staging before and after, the enqueueing, the wait for the device, and the device's own time
// for the uploads, the kernels and the downloads (CUDA events). The medians go to stderr as a
// table when the backend is destroyed (medians: an op's first calls also load kernels and choose
// cuBLASLt algorithms, which would swamp means). The backend's round trips are serialized, so one
// set of events serves every op.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <array>
#include <map>
#include <memory>
#include <string>
#include <typeinfo>
#include <vector>

namespace flashmem::kernels::cuda {

class OpPhases {
 public:
  // An instance when FLASHMEM_CUDA_PHASES is set to anything but 0 (and the events could be
  // made), else null.
  static std::unique_ptr<OpPhases> FromEnv();
  ~OpPhases();  // prints the table

  // The name of the backend member a launch lambda was written in, from its type's mangled name
  // (Itanium: ...15CudaBackendImpl<length><member>...); "?" when there is none.
  static std::string OpName(const std::type_info& lambda) { return OpNameFromMangled(lambda.name()); }
  static std::string OpNameFromMangled(const std::string& mangled);

  // One op's round trip, marked in order: Begin, Staged (host copies in), Filled (the fill
  // callback), then the device work between the events Up / Kernels / Down (recorded on the
  // stream around the three enqueues), Waited (after the stream sync), End (host copies out).
  using Clock = std::chrono::steady_clock;
  struct Marks {
    Clock::time_point begin, staged, filled, enqueued, waited, end;
    size_t up_bytes = 0, down_bytes = 0;
  };
  cudaEvent_t event(int i) const { return events_[i]; }  // 0: before uploads, 1: before kernels, 2: before downloads, 3: after
  void Add(const std::string& op, const Marks& m);

 private:
  OpPhases() = default;
  static constexpr int kColumns = 10;  // stage in, fill, enqueue, wait, stage out, up, kernels, down, MB up, MB down
  cudaEvent_t events_[4] = {};
  std::map<std::string, std::vector<std::array<double, kColumns>>> samples_;  // by op
};

}  // namespace flashmem::kernels::cuda
