// Opens the compute backend a --device flag names: "cpu" (the exact reference) or "cuda:N".
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/ops.h"

namespace flashmem::kernels {

struct BackendHandle {
  const Backend* backend = nullptr;  // valid as long as the handle
  std::unique_ptr<Backend> owned;    // null for the process-wide CPU backend
};

// memory_budget_bytes: device memory a CUDA backend may hold (0: free memory minus 1 GiB).
// cuda_kernels: "exact" (bit-identical to the CPU reference), "fast" or "fast-fp8" (cuda_backend.h).
// kv_reserve_bytes: the part of the budget for device copies of KV pages (-1: a quarter; 0: none).
// Errors name the flag: an unknown device, a CUDA device in a build without CUDA, a missing GPU.
absl::StatusOr<BackendHandle> OpenBackend(const std::string& device, int64_t memory_budget_bytes = 0,
                                          const std::string& cuda_kernels = "exact", int64_t kv_reserve_bytes = -1);

// True when this build has the CUDA backend and a CUDA device is visible.
bool CudaAvailable();
// CUDA devices visible to this build (0 without CUDA or a GPU).
int CudaDeviceCount();

}  // namespace flashmem::kernels
