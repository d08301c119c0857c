// Pieces of a real local cluster for server tests (failover_test, group_test): a tiny random
// checkpoint, memtier, coordinator, and public-API calls (create, append, generate, info).
#pragma once

#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "gtest/gtest.h"
#include "session.grpc.pb.h"
#include "tests/process_util.h"
#include "worker.grpc.pb.h"

namespace flashmem::testing {

// The cluster pieces every test starts: a tiny random checkpoint in dir/m (seed 9), a memtier
// on dir/mt with 256 MiB of RAM, a coordinator on dir/coord; `extra` appends flags.
inline int WriteTinyModel(const std::string& dir, int layers) {
  return std::system((std::string(FLASHMEM_BIN) + " ckpt random --preset tiny --layers " + std::to_string(layers) +
                      " --seed 9 --out " + dir + "/m > /dev/null").c_str());
}
inline Child StartMemtier(const std::string& dir, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--grpc-listen", "127.0.0.1:0", "--data-dir", dir + "/mt", "--ram-bytes", "268435456"};
  args.insert(args.end(), extra.begin(), extra.end());
  return Spawn(FLASHMEM_MEMTIER_BIN, args);
}
inline Child StartCoordinator(const std::string& dir, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"--listen", "127.0.0.1:0", "--data-dir", dir + "/coord"};
  args.insert(args.end(), extra.begin(), extra.end());
  return Spawn(FLASHMEM_COORDINATOR_BIN, args);
}

struct Api {
  std::unique_ptr<v1::SessionService::Stub> session;
  std::unique_ptr<v1::WorkerAdmin::Stub> admin;
  explicit Api(const std::string& target) {
    auto ch = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
    session = v1::SessionService::NewStub(ch);
    admin = v1::WorkerAdmin::NewStub(ch);
  }
};

// Streams n tokens; `on_token(k)` runs after the k-th token arrives (tests kill processes there).
inline std::vector<int32_t> Generate(Api& api, const std::string& sid, const std::string& token, int n, const v1::SamplingParams& sp,
                              grpc::Status* status, const std::function<void(size_t)>& on_token = nullptr) {
  v1::GenerateRequest g;
  g.set_session_id(sid);
  g.set_max_tokens(n);
  *g.mutable_sampling() = sp;
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + token);
  auto r = api.session->Generate(&ctx, g);
  v1::GeneratedToken t;
  std::vector<int32_t> out;
  while (r->Read(&t)) {
    out.push_back(t.id());
    if (on_token) on_token(out.size());
  }
  *status = r->Finish();
  return out;
}

// Runs an Append to its end (progress messages dropped).
inline grpc::Status RunAppend(Api& api, const v1::AppendRequest& a, const std::string& token) {
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + token);
  auto r = api.session->Append(&ctx, a);
  v1::AppendProgress p;
  while (r->Read(&p)) {
  }
  return r->Finish();
}

inline grpc::Status AppendIds(Api& api, const std::string& sid, const std::string& token, const std::vector<int32_t>& ids) {
  v1::AppendRequest a;
  a.set_session_id(sid);
  for (int32_t t : ids) a.mutable_token_ids()->add_ids(t);
  return RunAppend(api, a, token);
}

inline v1::SessionInfo Info(Api& api, const v1::CreateSessionResponse& cs) {
  v1::SessionInfo info;
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + cs.token());
  v1::SessionRef ref;
  ref.set_session_id(cs.session_id());
  EXPECT_TRUE(api.session->GetSession(&ctx, ref, &info).ok());
  return info;
}

inline grpc::Status Append(Api& api, const std::string& sid, const std::string& token, const std::string& text) {
  v1::AppendRequest a;
  a.set_session_id(sid);
  a.set_text(text);
  a.set_add_bos(true);
  return RunAppend(api, a, token);
}

// A new session with its prompt appended (text, or token ids); fails the test on an error.
template <typename Prompt>
inline void OpenSession(Api& api, const Prompt& prompt, v1::CreateSessionResponse* cs) {
  grpc::ClientContext ctx;
  ASSERT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), cs).ok());
  if constexpr (std::is_same_v<Prompt, std::string>) {
    ASSERT_TRUE(Append(api, cs->session_id(), cs->token(), prompt).ok());
  } else {
    ASSERT_TRUE(AppendIds(api, cs->session_id(), cs->token(), prompt).ok());
  }
}

}  // namespace flashmem::testing
