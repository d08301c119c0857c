// Striped vs unstriped page recall on one node (issue 8 item 6; docs/benchmarks.md "Striped
// recall"). One host mirror of KV pages (a memfd, as memtier's RAM tier is; mapped read-only and
// registered with cudaHostRegisterReadOnly by every rank, as a worker attaches memtier's chunks)
// and N rank processes, one per GPU, in an NCCL group. Every rank must end with the same random
// set of pages in its device memory; three ways to get there are timed:
//   striped         rank r gathers 1/N of the pages host->GPU, then an all-gather over NVLink
//   every-rank      every rank gathers every page over its own PCIe link
//   root-broadcast  rank 0 gathers every page, then a broadcast
// Bandwidth is counted over the unique page bytes (what the node recalls from host memory per
// second); every result is checked page by page against the mirror.
//
//   recall_bench --ranks 2 [--pages 4096,16384] [--reps 5] [--round-pages 256] [--json OUT]
//
// Without --rank the program is the launcher: it creates and fills the mirror, then starts
// itself once per rank (exec, so no process inherits an initialised CUDA context).
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "tests/bench/bench_util.h"
#include "common/net.h"
#include "nlohmann/json.hpp"
#include "worker/parallel/gloo_communicator.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/parallel/striped_recall.h"

namespace {

using namespace flashmem;

uint64_t Mix(uint64_t x) {  // splitmix64: the mirror's contents, reproducible per page
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct Flags {
  int ranks = 2, rank = -1, memfd = -1, port = 0, reps = 5;
  int64_t page_bytes = 37376, mirror_pages = 65536, round_pages = 256;
  std::string pages = "4096,16384", json_out, copy = "kernel";
};

int Launch(const Flags& f, const std::vector<std::string>& argv) {
  const int fd = ::memfd_create("flashmem-mirror", 0);  // inherited across exec
  const uint64_t bytes = static_cast<uint64_t>(f.mirror_pages * f.page_bytes);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) { std::perror("memfd"); return 1; }
  auto* base = static_cast<uint64_t*>(::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  if (base == MAP_FAILED) { std::perror("mmap"); return 1; }
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < static_cast<int64_t>(bytes / 8); ++i) base[i] = Mix(static_cast<uint64_t>(i));
  ::munmap(base, bytes);
  std::printf("mirror: %lld pages of %lld B (%.2f GB) in a memfd, filled in %.1f s; %d ranks\n",
              static_cast<long long>(f.mirror_pages), static_cast<long long>(f.page_bytes), bytes / 1e9,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), f.ranks);
  std::fflush(stdout);
  const int port = FreeLoopbackPort();
  return bench::LaunchRanks(argv, f.ranks, [&](int r) {
    return std::vector<std::string>{"--rank", std::to_string(r), "--memfd", std::to_string(fd), "--port",
                                    std::to_string(port)};
  });
}

#define CHECK_CUDA(x)                                                                     \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "rank %d: %s: %s\n", f.rank, #x, cudaGetErrorString(e_));      \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

int RunRank(const Flags& f) {
  const parallel::GroupOptions g = bench::LoopbackGroup(f.rank, f.ranks, f.port, "recall-bench");
  auto comm = parallel::ConnectNcclGroup(g, f.rank);
  if (!comm.ok()) { std::fprintf(stderr, "rank %d: %s\n", f.rank, std::string(comm.status().message()).c_str()); return 1; }
  const uint64_t bytes = static_cast<uint64_t>(f.mirror_pages * f.page_bytes);
  CHECK_CUDA(cudaSetDevice(f.rank));
  // Attach as a worker attaches memtier's chunks: read-only mapping, registered once.
  auto* mirror = static_cast<uint8_t*>(::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, f.memfd, 0));
  if (mirror == MAP_FAILED) { std::perror("mmap"); return 1; }
  const auto t_reg = std::chrono::steady_clock::now();
  CHECK_CUDA(cudaHostRegister(mirror, bytes, cudaHostRegisterReadOnly));
  const double reg_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_reg).count();
  auto recall = parallel::StripedRecall::Create(**comm, f.rank, {f.page_bytes, f.round_pages, f.copy == "engines"});
  if (!recall.ok()) { std::fprintf(stderr, "rank %d: %s\n", f.rank, std::string(recall.status().message()).c_str()); return 1; }
  if (f.rank == 0)
    std::printf("registered %.2f GB read-only in %.2f s (rank 0); host->GPU by %s\n"
                "%-6s %-15s %7s %9s %10s %12s %13s %s\n",
                bytes / 1e9, reg_s, f.copy == "engines" ? "the copy engines" : "a gather kernel", "ranks", "mode",
                "pages", "MB", "ms", "node GB/s", "per-GPU GB/s", "check");
  nlohmann::json rows = nlohmann::json::array();
  int bad_total = 0;
  auto barrier = [&] {
    float x = 0;
    (*comm)->AllReduceSum(&x, 1);
  };
  auto counts = bench::ParseCounts("--pages", f.pages);
  if (!counts.ok()) { std::fprintf(stderr, "%s\n", std::string(counts.status().message()).c_str()); return 2; }
  for (int64_t count : *counts) {
    if (count > f.mirror_pages) { std::fprintf(stderr, "--pages %lld > --mirror-pages\n", static_cast<long long>(count)); return 2; }
    std::vector<int64_t> ids(f.mirror_pages);
    std::iota(ids.begin(), ids.end(), 0);
    std::mt19937_64 rng(static_cast<uint64_t>(count));  // the same pages on every rank
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<const uint8_t*> src(count);
    for (int64_t i = 0; i < count; ++i) src[i] = mirror + ids[i] * f.page_bytes;
    for (parallel::RecallMode mode : {parallel::RecallMode::kStriped, parallel::RecallMode::kEveryRank,
                                      parallel::RecallMode::kRootBroadcast}) {
      if (f.ranks == 1 && mode != parallel::RecallMode::kEveryRank) continue;
      const int64_t cap = (*recall)->DestinationPages(count, mode);
      uint8_t* dst = nullptr;
      CHECK_CUDA(cudaMalloc(&dst, cap * f.page_bytes));
      CHECK_CUDA(cudaMemset(dst, 0xEE, cap * f.page_bytes));  // poisoned: a missed page shows
      std::vector<float> worst;
      for (int rep = -1; rep < f.reps; ++rep) {  // rep -1: warm-up
        barrier();
        const auto t0 = std::chrono::steady_clock::now();
        if (auto st = (*recall)->Recall(src, dst, mode); !st.ok()) {
          std::fprintf(stderr, "rank %d: %s\n", f.rank, std::string(st.message()).c_str());
          return 1;
        }
        float dt = static_cast<float>(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        std::vector<float> all(f.ranks);
        (*comm)->AllGather(&dt, 1, all.data());
        if (rep >= 0) worst.push_back(*std::max_element(all.begin(), all.end()));  // the node is done when its last rank is
      }
      // Every page, byte for byte, on every rank.
      std::vector<uint8_t> back(count * f.page_bytes);
      CHECK_CUDA(cudaMemcpy(back.data(), dst, back.size(), cudaMemcpyDeviceToHost));
      float bad = 0;
      for (int64_t i = 0; i < count; ++i) bad += std::memcmp(back.data() + i * f.page_bytes, src[i], f.page_bytes) != 0;
      (*comm)->AllReduceSum(&bad, 1);
      bad_total += bad > 0;
      CHECK_CUDA(cudaFree(dst));
      std::sort(worst.begin(), worst.end());
      const double s = worst[worst.size() / 2];
      const double mb = count * f.page_bytes / 1e6;
      if (f.rank == 0) {
        std::printf("%-6d %-15s %7lld %9.1f %10.3f %12.1f %13.1f %s\n", f.ranks, parallel::RecallModeName(mode),
                    static_cast<long long>(count), mb, s * 1e3, mb / 1e3 / s, mb / 1e3 / s,
                    bad == 0 ? "verified" : "MISMATCH");
        std::fflush(stdout);
        rows.push_back({{"ranks", f.ranks}, {"mode", parallel::RecallModeName(mode)}, {"pages", count},
                        {"page_bytes", f.page_bytes}, {"round_pages", f.round_pages}, {"copy", f.copy},
                        {"median_ms", s * 1e3},
                        {"node_gb_s", mb / 1e3 / s}, {"mismatched_pages", bad}});
      }
    }
  }
  if (f.rank == 0 && !f.json_out.empty()) std::ofstream(f.json_out) << rows.dump(1) << "\n";
  (void)cudaHostUnregister(mirror);
  ::munmap(mirror, bytes);
  return bad_total ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Striped vs unstriped page recall from one host mirror into every GPU of a group"};
  Flags f;
  app.add_option("--ranks", f.ranks, "GPUs (one process each)");
  app.add_option("--pages", f.pages, "comma-separated page counts per recall");
  app.add_option("--page-bytes", f.page_bytes, "bytes per page (37,376: a CSA main-KV page)");
  app.add_option("--mirror-pages", f.mirror_pages, "pages in the host mirror the recalled pages are drawn from");
  app.add_option("--round-pages", f.round_pages, "pages per rank per pipelined round");
  app.add_option("--copy", f.copy, "host->GPU: kernel (gather kernel) or engines (cudaMemcpyBatchAsync per round)")
      ->check(CLI::IsMember({"kernel", "engines"}));
  app.add_option("--reps", f.reps, "timed recalls per configuration (median reported)");
  app.add_option("--json", f.json_out, "write the rows as JSON (rank 0)");
  app.add_option("--rank", f.rank, "(internal) this process's rank");
  app.add_option("--memfd", f.memfd, "(internal) the mirror's inherited fd");
  app.add_option("--port", f.port, "(internal) rank 0's group store port");
  CLI11_PARSE(app, argc, argv);
  if (f.rank < 0) return Launch(f, std::vector<std::string>(argv, argv + argc));
  return RunRank(f);
}
