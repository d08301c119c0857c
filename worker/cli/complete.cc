// Clients of the public SessionService: `flashmem complete` (one prompt, one completion) and
// `flashmem chat` (a conversation: every line the user types is appended to the same session,
// then the reply is generated and streamed; the context grows turn by turn).
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/tls.h"
#include "health.grpc.pb.h"
#include "session.grpc.pb.h"
#include "worker/cli/commands.h"

namespace flashmem::cli {
namespace {

absl::Status Fail(const grpc::Status& s, const char* what) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

// One session on the public API.
class ApiSession {
 public:
  explicit ApiSession(const std::string& target, std::shared_ptr<grpc::ChannelCredentials> creds)
      : stub_(v1::SessionService::NewStub(grpc::CreateChannel(target, std::move(creds)))) {}
  ~ApiSession() {
    if (id_.empty()) return;
    v1::SessionRef ref;
    ref.set_session_id(id_);
    v1::CloseSessionResponse cr;
    grpc::ClientContext ctx;
    Auth(&ctx);
    (void)stub_->CloseSession(&ctx, ref, &cr);
  }

  absl::Status Create() {
    v1::CreateSessionResponse cs;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (auto s = stub_->CreateSession(&ctx, v1::CreateSessionRequest(), &cs); !s.ok()) return Fail(s, "create session");
    id_ = cs.session_id();
    token_ = cs.token();
    return absl::OkStatus();
  }

  // Appends text, showing prefill progress on stderr.
  absl::Status Append(const std::string& text, bool bos) {
    v1::AppendRequest a;
    a.set_session_id(id_);
    a.set_text(text);
    a.set_add_bos(bos);
    grpc::ClientContext ctx;
    Auth(&ctx);
    auto r = stub_->Append(&ctx, a);
    v1::AppendProgress p;
    while (r->Read(&p))
      std::fprintf(stderr, "\rprefill %llu/%llu tokens", static_cast<unsigned long long>(p.consumed()),
                   static_cast<unsigned long long>(p.total()));
    std::fprintf(stderr, "\n");
    if (auto s = r->Finish(); !s.ok()) return Fail(s, "append");
    return absl::OkStatus();
  }

  // Generates, streaming the text to stdout as it comes.
  absl::Status Generate(uint32_t max_tokens, float temperature, float top_p, uint64_t seed) {
    v1::GenerateRequest g;
    g.set_session_id(id_);
    g.set_max_tokens(max_tokens);
    g.mutable_sampling()->set_temperature(temperature);
    g.mutable_sampling()->set_top_p(top_p);
    g.mutable_sampling()->set_seed(seed);
    grpc::ClientContext ctx;
    Auth(&ctx);
    auto r = stub_->Generate(&ctx, g);
    v1::GeneratedToken t;
    while (r->Read(&t)) {
      std::printf("%s", t.text().c_str());
      std::fflush(stdout);
    }
    std::printf("\n");
    if (auto s = r->Finish(); !s.ok()) return Fail(s, "generate");
    return absl::OkStatus();
  }

 private:
  void Auth(grpc::ClientContext* ctx) const { ctx->AddMetadata("authorization", "Bearer " + token_); }
  std::unique_ptr<v1::SessionService::Stub> stub_;
  std::string id_, token_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(const CompleteOptions& o) {
  TlsOptions t;
  t.ca_file = o.tls_ca;
  t.cert_file = o.tls_cert;
  t.key_file = o.tls_key;
  return MakeChannelCredentials(t);
}

absl::Status Complete(const CompleteOptions& o) {
  auto creds = Credentials(o);
  if (!creds.ok()) return creds.status();
  ApiSession s(o.target, *creds);
  if (auto st = s.Create(); !st.ok()) return st;
  if (auto st = s.Append(o.prompt, /*bos=*/true); !st.ok()) return st;
  std::printf("%s", o.prompt.c_str());
  return s.Generate(o.max_tokens, o.temperature, o.top_p, o.seed);
}

absl::Status Chat(const CompleteOptions& o, std::istream& in) {
  auto creds = Credentials(o);
  if (!creds.ok()) return creds.status();
  ApiSession s(o.target, *creds);
  if (auto st = s.Create(); !st.ok()) return st;
  std::fprintf(stderr, "chat with %s: type a line, Enter to send; /quit or end of input to leave\n", o.target.c_str());
  std::string line;
  bool first = true;
  for (;;) {
    std::fprintf(stderr, "> ");
    if (!std::getline(in, line) || line == "/quit") break;
    if (line.empty()) continue;
    if (auto st = s.Append(line + "\n", first); !st.ok()) return st;
    first = false;
    // The server's sampler draws by (seed, the session's step): turns never repeat a draw.
    if (auto st = s.Generate(o.max_tokens, o.temperature, o.top_p, o.seed); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> HealthCheck(const CompleteOptions& o, const std::string& service, int timeout_s) {
  auto creds = Credentials(o);
  if (!creds.ok()) return creds.status();
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(o.target, *creds));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(timeout_s));
  if (auto s = stub->Check(&ctx, req, &resp); !s.ok()) return Fail(s, "health check");
  std::printf("%s\n", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()).c_str());
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

}  // namespace flashmem::cli
