// The public SessionService served by a worker directly (single-node serving; the coordinator
// fronts workers with the same API). Text in and out through the model's tokenizer, bearer token
// per session, streamed prefill progress and tokens.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "session.grpc.pb.h"
#include "worker/model/sampler.h"
#include "worker/server/scheduler.h"
#include "worker/tokenizer/tokenizer.h"

namespace flashmem::server {

struct SessionServiceOptions {
  int64_t max_prompt_tokens = 1 << 20;  // per Append
  uint32_t max_generate_tokens = 1 << 16;
};

class SessionServiceImpl final : public v1::SessionService::Service {
 public:
  SessionServiceImpl(Scheduler& scheduler, const tokenizer::Tokenizer* tok, int64_t vocab_size,
                     SessionServiceOptions options = {});

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
  };
  // The session named by the request, if the caller holds its token.
  grpc::Status Authorize(grpc::ServerContext* ctx, const std::string& id, std::shared_ptr<Session>* out);

  Scheduler& scheduler_;
  const tokenizer::Tokenizer* tok_;
  int64_t vocab_size_;
  SessionServiceOptions options_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Session>> sessions_;
};

}  // namespace flashmem::server
