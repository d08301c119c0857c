// CPU tensor parallelism over Gloo's TCP transport: one process per rank, the full mesh set up
// through the group leader's store (group_store.h). Rank 0 also serves the store.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "worker/parallel/communicator.h"

namespace flashmem::parallel {

struct GroupOptions {
  int rank = 0;
  int size = 1;
  std::string leader_address;      // host:port of rank 0's group store (--tp-leader)
  std::string host = "127.0.0.1";  // the address this rank's Gloo connections listen on
  std::string group = "default";   // name of the worker group (keys in the store are under it)
  absl::Duration timeout = absl::Seconds(60);  // connect, and every collective
};

// Connects the group (blocks until every rank has joined or `timeout` passed). size 1 needs no
// leader and makes no connections.
absl::StatusOr<std::unique_ptr<Communicator>> ConnectGlooGroup(const GroupOptions& options);

class GroupStoreServer;
// For any transport: checks rank, size and leader (errors name the flag) and, on rank 0, starts
// the group store at leader_address (`server`). Returns the address every rank reaches it at.
absl::StatusOr<std::string> JoinGroupStore(const GroupOptions& options, std::unique_ptr<GroupStoreServer>* server);

}  // namespace flashmem::parallel
