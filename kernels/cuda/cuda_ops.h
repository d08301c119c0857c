// The CUDA sm_90 backend, first ops. The full backend (every op of kernels/ops.h on the GPU)
// is a separate issue; these kernels establish the build, the device checks and the
// CPU-vs-GPU test harness. Host-facing API: plain pointers to host memory, synchronous.
#pragma once

#include <cstdint>

#include "absl/status/status.h"

namespace flashmem::kernels::cuda {

// Number of usable CUDA devices (0 when there is no driver or no GPU).
int DeviceCount();

// Same semantics as Backend::RmsNorm / Fp8RoundTrip / Fp4RoundTrip of the CPU reference.
absl::Status RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y);
absl::Status Fp8RoundTrip(float* x, int64_t n, int64_t block);
absl::Status Fp4RoundTrip(float* x, int64_t n, int64_t block);

}  // namespace flashmem::kernels::cuda
