// The coordinator: the public SessionService in front of the workers. It keeps the registry of
// workers (register + heartbeats, 2 s leases), places each new session on the live worker with
// the fewest sessions (a tensor-parallel group counts as one worker, placed on only while all its
// ranks hold leases), keeps the session table in its own RocksDB (a restart keeps every
// session), and when a worker is lost moves its sessions to another worker, which adopts them
// from memtier; a Generate stream in flight carries on with exactly the tokens an uninterrupted
// run gives (the adopting worker replays the generation from the last snapshot
// deterministically, and the coordinator skips what the client already has).
#pragma once

#include <grpcpp/security/credentials.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <condition_variable>
#include <set>
#include <thread>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "coordinator.grpc.pb.h"
#include "session.grpc.pb.h"
#include "worker.grpc.pb.h"

namespace rocksdb {
class DB;
}

namespace flashmem::coordinator {

struct CoordinatorOptions {
  std::string data_dir;  // RocksDB with the session table
  std::chrono::milliseconds heartbeat{500};
  std::chrono::milliseconds lease{2000};
  std::shared_ptr<grpc::ChannelCredentials> worker_credentials;  // calls to workers; null: plaintext
};

class Coordinator final : public v1::Coordinator::Service, public v1::SessionService::Service {
 public:
  static absl::StatusOr<std::unique_ptr<Coordinator>> Open(const CoordinatorOptions& options);
  ~Coordinator() override;

  // Coordinator (internal)
  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest*, v1::RegisterResponse*) override;
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest*, v1::HeartbeatResponse*) override;
  // SessionService (public)
  grpc::Status CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest*, v1::CreateSessionResponse*) override;
  grpc::Status Append(grpc::ServerContext*, const v1::AppendRequest*, grpc::ServerWriter<v1::AppendProgress>*) override;
  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest*, grpc::ServerWriter<v1::GeneratedToken>*) override;
  grpc::Status GetSession(grpc::ServerContext*, const v1::SessionRef*, v1::SessionInfo*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::SessionRef*, v1::CloseSessionResponse*) override;

  uint64_t failovers() const;

  struct Stats {
    uint64_t sessions = 0, workers = 0, workers_live = 0, memtiers = 0, memtiers_live = 0, failovers = 0;
    uint64_t appends = 0, generates = 0, tokens = 0;  // relayed since start
  };
  Stats stats() const;
  // Observers for /metrics: seconds to move a session (lease wait + adoption), time to the first
  // token of a Generate as the coordinator relays it, and between tokens.
  void set_observers(std::function<void(double)> resume, std::function<void(double)> first_token,
                     std::function<void(double)> inter_token) {
    on_resume_ = std::move(resume);
    on_first_token_ = std::move(first_token);
    on_inter_token_ = std::move(inter_token);
  }

 private:
  struct Worker {
    std::string address;
    std::chrono::steady_clock::time_point last_seen;
    uint32_t sessions = 0;
    uint64_t kv_bytes = 0;
    bool memtier = false;  // registered as a memtier: tracked, never given sessions
    bool rank = false;     // a follower rank of a tensor-parallel group: never given sessions
    std::string group;     // tensor-parallel group (tp_size > 1)
    uint32_t tp_rank = 0, tp_size = 1;
    std::string memtier_store;  // where its sessions' snapshots and pages are ("" = unknown)
    std::shared_ptr<grpc::Channel> channel;
  };
  // A worker that takes sessions: a single worker or a group's leader.
  static bool TakesSessions(const Worker& w) { return !w.memtier && !w.rank; }
  // The registered worker (or group leader) at a session route's address; null when none.
  const Worker* SessionWorkerAt(const std::string& address) const;
  Coordinator() = default;
  // Its lease holds and, for a group's leader, every rank of the group holds one too (a group
  // missing a rank cannot run a forward pass).
  bool Live(const Worker& w) const;
  // Live() of the worker registered at a session route's address; false when none is.
  bool LiveAt(const std::string& address) const;
  bool LeaseHolds(const Worker& w) const;
  std::shared_ptr<grpc::ChannelCredentials> WorkerCredentials() const;
  // The live worker with the fewest sessions (ties: lowest id), excluding `avoid`; one of
  // `prefer_tp` ranks first when there is one (0: any).
  // `store` (non-empty): only workers of that memtier store (a moving session's snapshot is there).
  absl::StatusOr<uint64_t> PickWorker(const std::string& avoid = "", uint32_t prefer_tp = 0, const std::string& store = "");
  // The worker serving a session; moves the session (AdoptSession) when its worker is lost.
  absl::StatusOr<std::pair<std::string, std::shared_ptr<grpc::Channel>>> Route(const std::string& session_id, bool force_move);
  absl::Status SaveRoute(const std::string& session_id, const std::string& address);
  // Every heartbeat interval: sessions of workers whose lease ran out move to live workers.
  void ReassignLost();
  template <typename Msg, typename Start, typename Relay>
  grpc::Status WithFailover(grpc::ServerContext* ctx, const std::string& sid, const char* what, Start start, Relay relay);

  // While a call to the worker at `address` runs: checks its lease every heartbeat and cancels
  // the call when it runs out. Stop() (or the destructor) ends the watch; it returns whether the
  // call was cancelled for that reason.
  class LeaseWatch {
   public:
    LeaseWatch(Coordinator& c, std::string address, grpc::ClientContext* call);
    ~LeaseWatch();
    bool Stop();

   private:
    std::mutex mu_;
    std::condition_variable cv_;
    bool stopped_ = false, lapsed_ = false;
    std::thread thread_;  // last: starts once the fields above exist
  };

  CoordinatorOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
  mutable std::mutex mu_;
  uint64_t next_worker_ = 1;
  std::map<uint64_t, Worker> workers_;
  std::map<std::string, std::string> routes_;  // session id -> worker address
  std::map<std::string, uint64_t> appends_;    // session id -> appends applied (key "appends/<id>")
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_;
  uint64_t failovers_ = 0;
  std::set<std::string> moving_;      // sessions being moved (one move at a time per session)
  std::condition_variable moved_cv_;
  bool stop_ = false;
  std::condition_variable stop_cv_;
  std::thread reaper_;                // ReassignLost
  uint64_t appends_relayed_ = 0, generates_ = 0, tokens_relayed_ = 0;
  std::function<void(double)> on_resume_, on_first_token_, on_inter_token_;
};

}  // namespace flashmem::coordinator
