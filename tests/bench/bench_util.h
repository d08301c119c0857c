// Small helpers shared by the benchmark programs.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "worker/parallel/gloo_communicator.h"

namespace flashmem::bench {

// "1,16,64" -> {1, 16, 64}; an item that is not a positive integer is an error naming `flag`.
inline absl::StatusOr<std::vector<int64_t>> ParseCounts(const std::string& flag, const std::string& text) {
  std::vector<int64_t> v;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t x = 0;
    if (!absl::SimpleAtoi(item, &x) || x <= 0)
      return absl::InvalidArgumentError(absl::StrCat(flag, " '", text, "': '", item, "' is not a positive integer"));
    v.push_back(x);
  }
  if (v.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, " is empty"));
  return v;
}

// The group of a benchmark's rank processes on this host: rank 0's store on 127.0.0.1:port.
inline parallel::GroupOptions LoopbackGroup(int rank, int size, int port, const std::string& name) {
  parallel::GroupOptions g;
  g.rank = rank;
  g.size = size;
  g.leader_address = absl::StrCat("127.0.0.1:", port);
  g.group = name;
  g.timeout = absl::Seconds(120);
  return g;
}

// Runs this program once per rank, as a worker group runs (one process each): rank r gets `argv`
// plus extra(r) (its --rank and the rendezvous it needs), and the launcher waits for them all.
// Returns 0 when every rank exited 0, else 1 (with a line on stderr naming how many failed).
inline int LaunchRanks(const std::vector<std::string>& argv, int ranks,
                       const std::function<std::vector<std::string>(int rank)>& extra) {
  std::vector<pid_t> kids;
  for (int r = 0; r < ranks; ++r) {
    std::vector<std::string> args = argv;
    for (std::string& a : extra(r)) args.push_back(std::move(a));
    const pid_t pid = ::fork();
    if (pid == 0) {
      std::vector<char*> c;
      for (auto& a : args) c.push_back(a.data());
      c.push_back(nullptr);
      ::execv("/proc/self/exe", c.data());
      ::_exit(127);
    }
    kids.push_back(pid);
  }
  int failed = 0;
  for (pid_t p : kids) {
    int status = 0;
    ::waitpid(p, &status, 0);
    failed += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  if (failed) std::fprintf(stderr, "%d rank(s) failed\n", failed);
  return failed ? 1 : 0;
}

}  // namespace flashmem::bench
