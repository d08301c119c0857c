#include "worker/parallel/striped_recall.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"

#ifdef FLASHMEM_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/device_ops.h"
#endif

namespace flashmem::parallel {

const char* RecallModeName(RecallMode mode) {
  switch (mode) {
    case RecallMode::kStriped: return "striped";
    case RecallMode::kEveryRank: return "every-rank";
    case RecallMode::kRootBroadcast: return "root-broadcast";
  }
  return "?";
}

#ifndef FLASHMEM_HAVE_CUDA

struct StripedRecall::Impl {};

absl::StatusOr<std::unique_ptr<StripedRecall>> StripedRecall::Create(const Communicator&, int, StripedRecallOptions) {
  return absl::UnimplementedError("striped recall: this build has no CUDA");
}
absl::Status StripedRecall::Recall(std::span<const uint8_t* const>, uint8_t*, RecallMode) {
  return absl::UnimplementedError("striped recall: this build has no CUDA");
}

#else

namespace {
absl::Status CudaCheck(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("striped recall: ", what, ": ", cudaGetErrorString(e)));
}
#define FM_CUDA_RETURN(expr, what) \
  if (absl::Status st_ = CudaCheck((expr), what); !st_.ok()) return st_
}  // namespace

struct StripedRecall::Impl {
  int device = 0;
  cudaStream_t gather = nullptr;   // host -> GPU page gathers
  cudaStream_t collect = nullptr;  // the group's collectives, each after its round's gather
  cudaEvent_t gathered = nullptr;
  const uint8_t** src = nullptr;   // device copy of the page pointers
  int64_t src_capacity = 0;
  std::vector<void*> dsts;         // copy engines: a round's destinations and sizes
  std::vector<size_t> sizes;

  ~Impl() {
    (void)cudaSetDevice(device);
    if (src) (void)cudaFree(src);
    if (gathered) (void)cudaEventDestroy(gathered);
    if (gather) (void)cudaStreamDestroy(gather);
    if (collect) (void)cudaStreamDestroy(collect);
  }
};

absl::StatusOr<std::unique_ptr<StripedRecall>> StripedRecall::Create(const Communicator& comm, int device,
                                                                     StripedRecallOptions options) {
  if (options.page_bytes <= 0 || options.page_bytes % 16 != 0)
    return absl::InvalidArgumentError(absl::StrCat("striped recall: page_bytes ", options.page_bytes,
                                                   " must be a positive multiple of 16"));
  if (options.round_pages <= 0)
    return absl::InvalidArgumentError(absl::StrCat("striped recall: round_pages ", options.round_pages, " must be positive"));
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  FM_CUDA_RETURN(cudaSetDevice(device), "cudaSetDevice");
  FM_CUDA_RETURN(cudaStreamCreateWithFlags(&impl->gather, cudaStreamNonBlocking), "stream");
  FM_CUDA_RETURN(cudaStreamCreateWithFlags(&impl->collect, cudaStreamNonBlocking), "stream");
  FM_CUDA_RETURN(cudaEventCreateWithFlags(&impl->gathered, cudaEventDisableTiming), "event");
  return std::unique_ptr<StripedRecall>(new StripedRecall(comm, options, std::move(impl)));
}

absl::Status StripedRecall::Recall(std::span<const uint8_t* const> pages, uint8_t* dst, RecallMode mode) {
  const int64_t count = static_cast<int64_t>(pages.size());
  if (count == 0) return absl::OkStatus();
  if (absl::Status st = comm_.Health(); !st.ok()) return st;
  Impl& m = *impl_;
  FM_CUDA_RETURN(cudaSetDevice(m.device), "cudaSetDevice");
  if (count > m.src_capacity) {
    if (m.src) (void)cudaFree(m.src);
    m.src = nullptr;
    m.src_capacity = 0;
    FM_CUDA_RETURN(cudaMalloc(reinterpret_cast<void**>(&m.src), count * sizeof(uint8_t*)), "cudaMalloc");
    m.src_capacity = count;
  }
  // One upload of the pointer list (8 B a page), then gathers read their slices of it.
  FM_CUDA_RETURN(cudaMemcpyAsync(m.src, pages.data(), count * sizeof(uint8_t*), cudaMemcpyHostToDevice, m.gather),
                 "pointer upload");
  const int64_t B = options_.page_bytes, n = comm_.size(), r = comm_.rank();
  auto gather = [&](int64_t first, int64_t k) -> absl::Status {
    if (k <= 0) return absl::OkStatus();
    if (!options_.copy_engines)
      return CudaCheck(kernels::cuda::GatherPages(m.src + first, k, B, dst + first * B, m.gather), "gather");
    m.dsts.resize(k);
    m.sizes.assign(k, static_cast<size_t>(B));
    for (int64_t i = 0; i < k; ++i) m.dsts[i] = dst + (first + i) * B;
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_index = 0;
    return CudaCheck(cudaMemcpyBatchAsync(m.dsts.data(), reinterpret_cast<const void* const*>(pages.data() + first),
                                          m.sizes.data(), static_cast<size_t>(k), &attr, &attr_index, 1, m.gather),
                     "cudaMemcpyBatchAsync");
  };
  // The collective of a round starts once this rank's gather of it is done.
  auto hand_over = [&]() -> absl::Status {
    FM_CUDA_RETURN(cudaEventRecord(m.gathered, m.gather), "event");
    return CudaCheck(cudaStreamWaitEvent(m.collect, m.gathered, 0), "event wait");
  };
  if (n == 1 || mode == RecallMode::kEveryRank) {
    if (absl::Status st = gather(0, count); !st.ok()) return st;
  } else if (mode == RecallMode::kStriped) {
    for (int64_t base = 0; base < count;) {
      const int64_t c = std::min(options_.round_pages, (count - base + n - 1) / n);
      const int64_t mine = base + r * c;
      if (absl::Status st = gather(mine, std::clamp<int64_t>(count - mine, 0, c)); !st.ok()) return st;
      if (absl::Status st = hand_over(); !st.ok()) return st;
      if (absl::Status st = comm_.AllGatherDevice(dst + mine * B, c * B, dst + base * B, m.collect); !st.ok()) return st;
      base += n * c;
    }
  } else {
    for (int64_t base = 0; base < count;) {
      const int64_t c = std::min(options_.round_pages * n, count - base);
      if (r == 0)
        if (absl::Status st = gather(base, c); !st.ok()) return st;
      if (absl::Status st = hand_over(); !st.ok()) return st;
      if (absl::Status st = comm_.BroadcastDevice(dst + base * B, c * B, 0, m.collect); !st.ok()) return st;
      base += c;
    }
  }
  FM_CUDA_RETURN(cudaStreamSynchronize(m.gather), "gather");
  FM_CUDA_RETURN(cudaStreamSynchronize(m.collect), "collective");
  return absl::OkStatus();
}

#endif  // FLASHMEM_HAVE_CUDA

StripedRecall::StripedRecall(const Communicator& comm, StripedRecallOptions options, std::unique_ptr<Impl> impl)
    : comm_(comm), options_(options), impl_(std::move(impl)) {}

StripedRecall::~StripedRecall() = default;

int64_t StripedRecall::DestinationPages(int64_t count, RecallMode mode) const {
  const int64_t n = comm_.size();
  if (n == 1 || mode != RecallMode::kStriped) return count;
  int64_t base = 0;
  while (base < count) base += n * std::min(options_.round_pages, (count - base + n - 1) / n);
  return base;
}

}  // namespace flashmem::parallel
