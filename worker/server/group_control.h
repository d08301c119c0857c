// The control channel of a tensor-parallel worker group (issue 8). The leader (rank 0) serves the
// public API and schedules; each follower rank opens one Follow stream to the leader and receives
// every session change and forward pass in the leader's order, which its own scheduler applies
// (Scheduler::Follow*), so every rank runs the same forward passes and meets the same collectives.
//
// Failure: the group cannot continue without any of its ranks (their collectives would never
// complete). A follower whose stream breaks has lost its leader and exits; the leader, on losing a
// follower's stream, fails its steps and reports the loss (the worker then exits, its lease runs
// out and the coordinator moves the group's sessions to another group, which adopts them from
// memtier).
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "worker.grpc.pb.h"
#include "worker/server/scheduler.h"

namespace flashmem::server {

class GroupControlService final : public v1::GroupControl::Service, public GroupLeader {
 public:
  // `on_lost` runs once, on the thread that noticed, when a follower is gone.
  GroupControlService(std::string group, int size, std::function<void(const absl::Status&)> on_lost);
  ~GroupControlService() override;

  // Blocks until every follower rank has opened its stream (or `timeout`).
  absl::Status WaitForFollowers(absl::Duration timeout);
  // Ends the follower streams cleanly (the leader shuts down; followers exit 0).
  void Shutdown();
  absl::Status Health() const;

  grpc::Status Follow(grpc::ServerContext* ctx, const v1::FollowRequest* req,
                      grpc::ServerWriter<v1::GroupOp>* writer) override;

  // GroupLeader
  void Created(uint64_t id, const SessionOptions& options, int64_t lsa_phase) override;
  void Restored(uint64_t id, absl::string_view snapshot, uint64_t memtier_key, int64_t lsa_phase) override;
  void Closed(uint64_t id) override;
  absl::Status Step(const std::vector<GroupStepItem>& items, const std::vector<kv::AckedPage>& acked) override;

 private:
  struct Follower {
    bool joined = false;
    bool gone = false;
    std::deque<std::shared_ptr<const v1::GroupOp>> queue;
  };
  void Push(v1::GroupOp op);
  void Lost(int rank, const std::string& why);

  const std::string group_;
  const int size_;
  std::function<void(const absl::Status&)> on_lost_;
  mutable absl::Mutex mu_;
  std::vector<Follower> followers_ ABSL_GUARDED_BY(mu_);  // [rank - 1]
  uint64_t seq_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status health_ ABSL_GUARDED_BY(mu_);
};

struct FollowOptions {
  std::string leader;  // the leader's gRPC address (its control service)
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string group;
  int rank = 1, size = 2;
};

// A follower rank's life: follows the leader's stream and applies every op to `scheduler` (a
// follower scheduler) until the stream ends. OK when the leader ended the group cleanly;
// otherwise why the group is over. `on_following` runs once the leader has accepted the stream.
absl::Status FollowLeader(const FollowOptions& options, Scheduler& scheduler, const std::function<void()>& on_following);

}  // namespace flashmem::server
