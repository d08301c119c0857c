// GPU tensor parallelism over NCCL: one process per GPU, the NCCL unique id passed from rank 0
// to the others through the group leader's store (group_store.h), never a file. NVLink
// multicast stays off (NCCL_NVLS_ENABLE=0, always, whatever the environment says).
//
// The engine's activations still live in host memory (the CUDA backend stages each op), so a
// collective copies the host array into a device buffer, runs on the GPU and copies back. NCCL is
// loaded on first use (dlopen), like cuBLASLt: CPU-only processes never need it.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "worker/parallel/communicator.h"
#include "worker/parallel/gloo_communicator.h"

namespace flashmem::parallel {

// `device`: the CUDA ordinal this rank computes on. UNIMPLEMENTED in a build without CUDA.
absl::StatusOr<std::unique_ptr<Communicator>> ConnectNcclGroup(const GroupOptions& options, int device);

// The group for a backend device string: "cpu" → Gloo over TCP, "cuda:N" → NCCL on GPU N.
absl::StatusOr<std::unique_ptr<Communicator>> ConnectGroup(const GroupOptions& options, const std::string& device);

}  // namespace flashmem::parallel
