// The public SessionService served by a worker directly (single-node serving; the coordinator
// fronts workers with the same API). Text in and out through the model's tokenizer, bearer token
// per session, streamed prefill progress and tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "memtier/client/memtier_client.h"
#include "session.grpc.pb.h"
#include "worker.grpc.pb.h"
#include "worker/model/sampler.h"
#include "worker/server/scheduler.h"
#include "worker/tokenizer/tokenizer.h"

namespace flashmem::server {

struct SessionServiceOptions {
  int64_t max_prompt_tokens = 1 << 20;  // per Append
  uint32_t max_generate_tokens = 1 << 16;
  const kv::KvPager* pager = nullptr;  // for GetSession's page counts
};

class SessionServiceImpl final : public v1::SessionService::Service {
 public:
  // With `memtier`, every session is snapshotted there after each Append and Generate (its
  // decode state, sampling step, token log and bearer token), so another worker can adopt it.
  SessionServiceImpl(Scheduler& scheduler, const tokenizer::Tokenizer* tok, int64_t vocab_size,
                     SessionServiceOptions options = {}, memtier::MemTierClient* memtier = nullptr);

  // Latency hooks for metrics: time to first token, and between tokens, of every Generate.
  void set_latency_observers(std::function<void(double)> first_token, std::function<void(double)> inter_token) {
    on_first_token_ = std::move(first_token);
    on_inter_token_ = std::move(inter_token);
  }

  // Loads a session's latest snapshot from memtier and serves it (failover; no re-prefill).
  absl::StatusOr<std::pair<uint64_t, uint64_t>> Adopt(const std::string& session_id);

  grpc::Status CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest*, v1::CreateSessionResponse*) override;
  grpc::Status Append(grpc::ServerContext*, const v1::AppendRequest*, grpc::ServerWriter<v1::AppendProgress>*) override;
  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest*, grpc::ServerWriter<v1::GeneratedToken>*) override;
  grpc::Status GetSession(grpc::ServerContext*, const v1::SessionRef*, v1::SessionInfo*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::SessionRef*, v1::CloseSessionResponse*) override;

 private:
  struct Session {
    uint64_t scheduler_id = 0;
    std::string token;
    model::SamplingOptions defaults;
    std::mutex mu;                  // one Append/Generate at a time
    std::vector<int32_t> generated; // the session's generated-token log (resume_from)
    uint64_t version = 0;           // of the last snapshot in memtier: owner generation << 40 | count
    uint64_t appends = 0;           // appends applied (idempotent retries by append_seq)
  };
  // Writes the session's snapshot to memtier (no-op without memtier).
  absl::Status Persist(const std::string& id, Session& s);
  // The session named by the request, if the caller holds its token.
  grpc::Status Authorize(grpc::ServerContext* ctx, const std::string& id, std::shared_ptr<Session>* out);

  Scheduler& scheduler_;
  const tokenizer::Tokenizer* tok_;
  int64_t vocab_size_;
  SessionServiceOptions options_;
  memtier::MemTierClient* memtier_;
  std::function<void(double)> on_first_token_, on_inter_token_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_;
};

class WorkerAdminImpl final : public v1::WorkerAdmin::Service {
 public:
  explicit WorkerAdminImpl(SessionServiceImpl& sessions) : sessions_(sessions) {}
  grpc::Status AdoptSession(grpc::ServerContext*, const v1::AdoptSessionRequest*, v1::AdoptSessionResponse*) override;

 private:
  SessionServiceImpl& sessions_;
};

}  // namespace flashmem::server
