#include "kernels/device.h"

#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#ifdef FLASHMEM_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace flashmem::kernels {

int CudaDeviceCount() {
#ifdef FLASHMEM_HAVE_CUDA
  return cuda::DeviceCount();
#else
  return 0;
#endif
}

bool CudaAvailable() {
#ifdef FLASHMEM_HAVE_CUDA
  return cuda::DeviceCount() > 0;
#else
  return false;
#endif
}

absl::StatusOr<BackendHandle> OpenBackend(const std::string& device, int64_t memory_budget_bytes,
                                          const std::string& cuda_kernels, int64_t kv_reserve_bytes) {
  if (kv_reserve_bytes < -1)
    return absl::InvalidArgumentError(absl::StrCat("--gpu-kv-reserve-bytes: ", kv_reserve_bytes,
                                                   " is negative (-1: a quarter of the device budget; 0: none)"));
  if (cuda_kernels != "exact" && cuda_kernels != "fast" && cuda_kernels != "fast-fp8")
    return absl::InvalidArgumentError(
        absl::StrCat("--cuda-kernels: '", cuda_kernels, "' is none of exact, fast, fast-fp8"));
  if (device == "cpu") return BackendHandle{&CpuBackend(), nullptr};
  absl::string_view rest = device;
  int ordinal = -1;
  if (!absl::ConsumePrefix(&rest, "cuda:") || !absl::SimpleAtoi(rest, &ordinal) || ordinal < 0)
    return absl::InvalidArgumentError(absl::StrCat("--device: '", device, "' is neither cpu nor cuda:N"));
#ifdef FLASHMEM_HAVE_CUDA
  cuda::CudaBackendOptions opt;
  opt.device = ordinal;
  opt.memory_budget_bytes = memory_budget_bytes;
  opt.exact = cuda_kernels == "exact";
  opt.fp8_tensor_cores = cuda_kernels == "fast-fp8";
  opt.kv_reserve_bytes = kv_reserve_bytes;
  auto be = cuda::NewCudaBackend(opt);
  if (!be.ok()) return absl::Status(be.status().code(), absl::StrCat("--device ", device, ": ", be.status().message()));
  BackendHandle h;
  h.owned = std::move(*be);
  h.backend = h.owned.get();
  return h;
#else
  (void)memory_budget_bytes;
  (void)kv_reserve_bytes;
  return absl::FailedPreconditionError(
      absl::StrCat("--device ", device, ": this build has no CUDA backend (configure with nvcc available)"));
#endif
}

}  // namespace flashmem::kernels
