// Striped page recall for a tensor-parallel group on one node (issue 8 item 4, DESIGN.md §1).
//
// Every rank of a group needs the same KV pages (KV caches are replicated across TP ranks), and
// all of them read one host copy: memtier's RAM mirror, mapped read-only into each rank and
// registered with CUDA (memtier/transport/local_share.h). Each GPU has its own PCIe link
// (~55 GB/s host->GPU each, 110.8 GB/s for two at once), so instead of every rank pulling every
// page over its own link, rank r gathers 1/N of the pages host->GPU and the ranks all-gather them
// over NVLink. The work is cut into rounds so that the gather of round k+1 overlaps the all-gather
// of round k.
//
// The two alternatives are kept for measurement (tests/bench/cuda/recall_bench.cc): every rank
// gathering every page, and rank 0 gathering then broadcasting.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "worker/parallel/communicator.h"

namespace flashmem::parallel {

enum class RecallMode {
  kStriped,        // rank r gathers its share, then an all-gather over NVLink
  kEveryRank,      // every rank gathers every page over its own link
  kRootBroadcast,  // rank 0 gathers every page, then a broadcast
};
const char* RecallModeName(RecallMode mode);

struct StripedRecallOptions {
  int64_t page_bytes = 37376;  // one CSA main-KV page (64 x 584 B); a multiple of 16
  // Pages per rank per round: rounds pipeline the host->GPU gather against the collective. 256
  // pages of 37 KB = 9.6 MB per rank per round.
  int64_t round_pages = 256;
  // How a rank moves its pages host->GPU: false, a gather kernel (SMs load 16 B at a time over
  // PCIe from the mapped mirror); true, the copy engines, one cudaMemcpyBatchAsync per round (one
  // API call for all of a round's pages, never one call per page) — measured half as fast for
  // 37 KB pages (docs/benchmarks.md), kept for larger pages and for comparison.
  bool copy_engines = false;
};

class StripedRecall {
 public:
  // `comm`: the group's NCCL communicator (a group of one needs none of its device collectives);
  // `device`: this rank's CUDA ordinal. UNIMPLEMENTED in a build without CUDA.
  static absl::StatusOr<std::unique_ptr<StripedRecall>> Create(const Communicator& comm, int device,
                                                               StripedRecallOptions options = {});
  ~StripedRecall();

  // Pages the destination must have room for when recalling `count` pages with `mode`: the striped
  // rounds are padded to a multiple of the group size (the padding holds garbage).
  int64_t DestinationPages(int64_t count, RecallMode mode) const;

  // On every rank of the group, with the same `pages` on each: dst[i * page_bytes ..] = *pages[i]
  // for i < pages.size(). `pages` are device-visible pointers into registered host memory (16-byte
  // aligned); `dst` is device memory of DestinationPages() pages. Returns when the pages are there.
  absl::Status Recall(std::span<const uint8_t* const> pages, uint8_t* dst, RecallMode mode);

  const StripedRecallOptions& options() const { return options_; }

  struct Impl;

 private:
  StripedRecall(const Communicator& comm, StripedRecallOptions options, std::unique_ptr<Impl> impl);
  const Communicator& comm_;
  StripedRecallOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace flashmem::parallel
