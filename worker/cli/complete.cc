#include <grpcpp/grpcpp.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "session.grpc.pb.h"
#include "worker/cli/commands.h"

namespace flashmem::cli {

absl::Status Complete(const CompleteOptions& o) {
  auto stub = v1::SessionService::NewStub(grpc::CreateChannel(o.target, grpc::InsecureChannelCredentials()));
  auto fail = [](const grpc::Status& s, const char* what) {
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
  };
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (auto s = stub->CreateSession(&ctx, v1::CreateSessionRequest(), &cs); !s.ok()) return fail(s, "create session");
  }
  {
    v1::AppendRequest a;
    a.set_session_id(cs.session_id());
    a.set_text(o.prompt);
    a.set_add_bos(true);
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + cs.token());
    auto r = stub->Append(&ctx, a);
    v1::AppendProgress p;
    while (r->Read(&p)) {
      std::fprintf(stderr, "\rprefill %llu/%llu tokens", static_cast<unsigned long long>(p.consumed()), static_cast<unsigned long long>(p.total()));
    }
    std::fprintf(stderr, "\n");
    if (auto s = r->Finish(); !s.ok()) return fail(s, "append");
  }
  v1::GenerateRequest g;
  g.set_session_id(cs.session_id());
  g.set_max_tokens(o.max_tokens);
  g.mutable_sampling()->set_temperature(o.temperature);
  g.mutable_sampling()->set_top_p(o.top_p);
  g.mutable_sampling()->set_seed(o.seed);
  grpc::ClientContext ctx;
  ctx.AddMetadata("authorization", "Bearer " + cs.token());
  auto r = stub->Generate(&ctx, g);
  v1::GeneratedToken t;
  std::printf("%s", o.prompt.c_str());
  while (r->Read(&t)) {
    std::printf("%s", t.text().c_str());
    std::fflush(stdout);
  }
  std::printf("\n");
  if (auto s = r->Finish(); !s.ok()) return fail(s, "generate");
  v1::SessionRef ref;
  ref.set_session_id(cs.session_id());
  v1::CloseSessionResponse cr;
  grpc::ClientContext cctx;
  cctx.AddMetadata("authorization", "Bearer " + cs.token());
  (void)stub->CloseSession(&cctx, ref, &cr);
  return absl::OkStatus();
}

}  // namespace flashmem::cli
