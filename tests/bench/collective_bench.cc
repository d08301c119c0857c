// Latency and bandwidth of the tensor-parallel group's host-array collectives (issue 8): the
// all-reduce and all-gather the model issues per layer (Communicator::AllReduceSum / AllGather),
// between real processes, over Gloo (cpu) or NCCL (cuda: rank R on cuda:R). A decode step at
// batch 1 issues ~2 collectives per layer of one 4096-float row each, so their per-call latency,
// not bandwidth, sets the group's overhead.
//
//   collective_bench --ranks 2 [--device cpu|cuda] [--floats 4096,262144,4194304] [--reps 200]
//
// The launcher forks one process per rank (as a worker group runs); rank 0 prints a row per size:
// microseconds per call (median over reps, after warm-up) and the algorithm bandwidth.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/net.h"
#include "tests/bench/bench_util.h"
#include "worker/parallel/gloo_communicator.h"
#include "worker/parallel/nccl_communicator.h"

namespace {

using namespace flashmem;

struct Flags {
  int ranks = 2, rank = -1, port = 0, reps = 200;
  std::string device = "cpu", floats = "4096,262144,4194304";
};

template <typename F>
double MedianMicros(int reps, F&& f) {
  for (int i = 0; i < std::max(3, reps / 10); ++i) f();  // warm-up: connections, NCCL's first launches
  std::vector<double> us(reps);
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    us[i] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  std::nth_element(us.begin(), us.begin() + reps / 2, us.end());
  return us[reps / 2];
}

int RunRank(const Flags& f, const std::vector<int64_t>& sizes) {
  const parallel::GroupOptions g = bench::LoopbackGroup(f.rank, f.ranks, f.port, "collective-bench");
  const std::string device = f.device == "cuda" ? "cuda:" + std::to_string(f.rank) : f.device;
  auto comm = parallel::ConnectGroup(g, device);
  if (!comm.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", f.rank, std::string(comm.status().message()).c_str());
    return 1;
  }
  if (f.rank == 0)
    std::printf("%d ranks on %s, median of %d calls\n%12s %14s %12s %14s %12s\n", f.ranks, f.device.c_str(), f.reps,
                "floats", "all-reduce us", "GB/s", "all-gather us", "GB/s");
  for (const int64_t n : sizes) {
    std::vector<float> data(n, 1.0f), all(n * f.ranks);
    const double ar = MedianMicros(f.reps, [&] { (*comm)->AllReduceSum(data.data(), n); });
    const double ag = MedianMicros(f.reps, [&] { (*comm)->AllGather(data.data(), n, all.data()); });
    if (auto st = (*comm)->Health(); !st.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", f.rank, std::string(st.message()).c_str());
      return 1;
    }
    if (f.rank == 0)
      std::printf("%12lld %14.1f %12.2f %14.1f %12.2f\n", static_cast<long long>(n), ar, n * 4.0 / ar / 1e3, ag,
                  n * 4.0 * f.ranks / ag / 1e3);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  CLI::App app{"tensor-parallel collective latency (Gloo or NCCL, one process per rank)"};
  app.add_option("--ranks", f.ranks, "ranks (processes)")->check(CLI::Range(2, 64));
  app.add_option("--device", f.device, "cpu (Gloo) or cuda (NCCL, rank R on cuda:R)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--floats", f.floats, "comma-separated sizes in floats");
  app.add_option("--reps", f.reps, "timed calls per size")->check(CLI::Range(1, 1000000));
  app.add_option("--rank", f.rank)->group("");  // set by the launcher
  app.add_option("--port", f.port)->group("");
  CLI11_PARSE(app, argc, argv);
  auto sizes = bench::ParseCounts("--floats", f.floats);  // before any rank starts
  if (!sizes.ok()) {
    std::fprintf(stderr, "%s\n", std::string(sizes.status().message()).c_str());
    return 2;
  }
  if (f.rank >= 0) return RunRank(f, *sizes);
  const int port = FreeLoopbackPort();
  return bench::LaunchRanks(std::vector<std::string>(argv, argv + argc), f.ranks, [&](int r) {
    return std::vector<std::string>{"--rank", std::to_string(r), "--port", std::to_string(port)};
  });
}
