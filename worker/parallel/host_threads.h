// The ranks of a tensor-parallel group share their node's cores. Each rank's host-side work (row
// gathers for the GPU ops, the CPU backend's ops) runs on OpenMP; with every rank claiming all of
// the node's cores the node is oversubscribed N times over and OpenMP's spinning threads fight
// each other.
#pragma once

namespace flashmem::parallel {

// Threads for one of `ranks` processes on a node with `cpus` cores: at least one.
int HostThreadsPerRank(int cpus, int ranks);

// Unless OMP_NUM_THREADS is set (the operator's word wins), gives this process its share of the
// cores it may run on (its CPU affinity) as OpenMP's thread count. Returns the count set, or 0
// when it left the setting alone (OMP_NUM_THREADS set, or ranks < 2).
int ShareHostThreads(int ranks);

}  // namespace flashmem::parallel
