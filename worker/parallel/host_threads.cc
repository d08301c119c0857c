#include "worker/parallel/host_threads.h"

#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <thread>

namespace flashmem::parallel {

int HostThreadsPerRank(int cpus, int ranks) { return std::max(1, cpus / std::max(1, ranks)); }

int ShareHostThreads(int ranks) {
  if (ranks < 2 || std::getenv("OMP_NUM_THREADS") != nullptr) return 0;
  cpu_set_t set;
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  const int threads = HostThreadsPerRank(cpus, ranks);
  omp_set_num_threads(threads);
  return threads;
}

}  // namespace flashmem::parallel
