// The CUDA sm_90 backend: every op of kernels/ops.h on one GPU. Callers keep the host-array
// interface of Backend: each op sends its inputs up (straight from page-locked activation memory,
// the rest through one pinned staging buffer), runs its kernels on the backend's stream and copies
// its outputs back. Weights (and the big
// constant hyper-connection matrices) are uploaded once, in compact form (FP8 1 B, FP4 0.5 B,
// dense bf16 2 B per value), and stay resident within the memory budget.
// Thread-safe: ops from several threads (the decode loop, LSA scoring) run one at a time.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kernels/ops.h"

namespace flashmem::kernels::cuda {

// Usable CUDA devices (0 without a driver or a GPU).
int DeviceCount();

struct CudaBackendOptions {
  int device = 0;  // CUDA device ordinal
  // Device memory this backend may hold (resident weights, the KV reserve, staging). 0: the
  // device's free memory at creation minus 1 GiB. Weights not used for longest leave first when it
  // runs short; one op that cannot fit fails with RESOURCE_EXHAUSTED.
  int64_t memory_budget_bytes = 0;
  // true: every op bit-identical to the CPU reference (the default). false ("fast"): quantized
  // Linear runs the decode GEMV below 4 tokens (and for FP4); from 4 tokens FP8 weights run on the
  // bf16 tensor cores, dequantized (weights once at upload, activations after act_quant: both exact
  // in bf16) with fp32 accumulation, i.e. the reference's product up to summation order; dense bf16
  // weights a cuBLASLt bf16 GEMM from 4 tokens, and below 4 tokens those of 4M elements or more
  // (the head, wo_a's groups) a dense GEMV on the same bf16 operands. Results stay within
  // the golden tolerances; the other ops stay exact. Costs 2 more bytes per FP8 weight value.
  bool exact = true;
  // With exact = false ("fast-fp8"): FP8 weights from 16 tokens on the FP8 tensor cores instead
  // (cuBLASLt block-scaled, DeepSeek's 1x128 / 128x128 scales): ~1.5x the bf16 rate at prefill
  // sizes, but they sum a 128-block with ~14 bits (relative error ~1e-4), which is outside the
  // golden cache tolerances of dsv4-tiny-c; for throughput runs that accept it.
  bool fp8_tensor_cores = false;
  // The KV reserve (part of memory_budget_bytes): device copies of the KV pages attention reads
  // (kernels::KvPage), so a page crosses PCIe when it is new or was written, not on every step.
  // Allocated at the first attention over paged records, from the budget not in use then (weights
  // are never evicted for it); -1: a quarter of the budget; 0: none (every call stages its
  // records). A call whose pages do not fit stages them as without a reserve.
  int64_t kv_reserve_bytes = -1;
  // Page-locked host memory for the model's activations (model::Scratch; kernels/activation_pool.h),
  // which the ops then copy to and from the device directly instead of through the staging buffer.
  // Process-wide: the first backend created installs it, for the process's life. 0: none.
  int64_t pinned_activation_bytes = int64_t{1} << 30;
  // Backend::HoldOnDevice honoured for buffers of at least this many bytes; smaller ones move
  // over PCIe around every op. 0 (every buffer): since ops whose outputs are all held return
  // without waiting, holding even batch 1's 16 KB rows pays — on the H200 (flash-shape, 8K,
  // alternating processes on one host) batch 1 went 11.48 / 9.97 -> 8.71 / 8.92 ms a step and
  // batch 8 14.67 / 11.94 -> 11.05 / 11.58 against the earlier 256 KB (FLASHMEM_CUDA_MIN_HOLD
  // overrides it, to measure).
  int64_t min_hold_bytes = 0;
  // Kernels read a held input and write a held output in place in the buffer's device twin, where
  // the range is laid out there as the op's staging frame lays it out (whole activations, a batch's
  // rows end to end, aligned); false: every held range is copied between the twin and the staging
  // buffer around the op (device to device; two or three copies an op at batch 1).
  // FLASHMEM_CUDA_IN_PLACE=0 overrides it, to measure.
  bool held_in_place = true;
};

absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(const CudaBackendOptions& options);

// What a CUDA backend's ops did with held buffers since it was created (zeros for any other
// backend): device-to-device copies between twins and the staging buffer, their bytes, and the
// ranges read or written in place instead.
struct HeldTraffic {
  int64_t copies = 0;
  int64_t copy_bytes = 0;
  int64_t in_place = 0;
};
HeldTraffic HeldTrafficOf(const Backend& backend);
// How many compressor steps (Backend::PoolSteps) a CUDA backend ran on the device; 0 for another.
int64_t DevicePoolStepsOf(const Backend& backend);

}  // namespace flashmem::kernels::cuda
