// The public SessionService on a real gRPC server (127.0.0.1) over the tiny model with the
// DeepSeek tokenizer: text in, text out, the same tokens as the engine run directly.
#include "worker/server/session_service.h"

#include <grpcpp/grpcpp.h>

#include <filesystem>

#include "gtest/gtest.h"
#include "absl/strings/match.h"
#include "tests/model/test_models.h"

namespace flashmem::server {
namespace {

class SessionApi : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto args = model::PresetArgs("tiny", 3);
    ASSERT_TRUE(args.ok());
    dir_ = new std::string(testing::TempDir("api"));
    ASSERT_TRUE(model::WriteRandomCheckpoint(*args, 1, *dir_).ok());
    auto tf = model::Transformer::Load(*dir_, kernels::CpuBackend());
    ASSERT_TRUE(tf.ok());
    tf_ = tf->release();
    auto tok = tokenizer::Tokenizer::Load(FLASHMEM_TOKENIZER_JSON);
    ASSERT_TRUE(tok.ok());
    tok_ = tok->release();
    sched_ = new Scheduler(*tf_, SchedulerOptions{.max_sessions = 4, .max_context = 4096});
    svc_ = new SessionServiceImpl(*sched_, tok_, tf_->args().vocab_size, SessionServiceOptions{.max_prompt_tokens = 2000});
    grpc::ServerBuilder b;
    b.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    b.RegisterService(svc_);
    server_ = b.BuildAndStart().release();
  }
  static void TearDownTestSuite() {
    server_->Shutdown();
    delete server_;
    delete svc_;
    delete sched_;
    delete tok_;
    delete tf_;
    std::filesystem::remove_all(*dir_);
  }
  std::unique_ptr<v1::SessionService::Stub> Stub() {
    return v1::SessionService::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials()));
  }
  static void Auth(grpc::ClientContext* ctx, const std::string& token) { ctx->AddMetadata("authorization", "Bearer " + token); }

  static std::string* dir_;
  static model::Transformer* tf_;
  static tokenizer::Tokenizer* tok_;
  static Scheduler* sched_;
  static SessionServiceImpl* svc_;
  static grpc::Server* server_;
  static int port_;
};
std::string* SessionApi::dir_ = nullptr;
model::Transformer* SessionApi::tf_ = nullptr;
tokenizer::Tokenizer* SessionApi::tok_ = nullptr;
Scheduler* SessionApi::sched_ = nullptr;
SessionServiceImpl* SessionApi::svc_ = nullptr;
grpc::Server* SessionApi::server_ = nullptr;
int SessionApi::port_ = 0;

TEST_F(SessionApi, TextInTextOutSameTokensAsTheEngine) {
  auto stub = Stub();
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  const std::string prompt = "The memory tier keeps every page of the session.";
  {
    v1::AppendRequest a;
    a.set_session_id(cs.session_id());
    a.set_text(prompt);
    a.set_add_bos(true);
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    auto reader = stub->Append(&ctx, a);
    v1::AppendProgress p, last;
    while (reader->Read(&p)) last = p;
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(last.consumed(), last.total());
  }
  std::vector<int32_t> got;
  std::string text;
  {
    v1::GenerateRequest g;
    g.set_session_id(cs.session_id());
    g.set_max_tokens(8);
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    auto reader = stub->Generate(&ctx, g);
    v1::GeneratedToken t;
    while (reader->Read(&t)) {
      got.push_back(t.id());
      text += t.text();
      if (t.last()) EXPECT_EQ(t.finish_reason(), "length");
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  // The engine directly: BOS + tokenized prompt, greedy.
  auto ids = tok_->Encode(prompt);
  ASSERT_TRUE(ids.ok());
  std::vector<int32_t> p = {0};
  p.insert(p.end(), ids->begin(), ids->end());
  auto s = tf_->NewSession();
  std::vector<float> logits;
  model::BatchItem it{s.get(), p, &logits, nullptr};
  ASSERT_TRUE(tf_->Forward(std::span<model::BatchItem>(&it, 1)).ok());
  std::vector<int32_t> want;
  for (int i = 0; i < 8; ++i) {
    want.push_back(static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
    model::BatchItem n{s.get(), std::span<const int32_t>(&want.back(), 1), &logits, nullptr};
    ASSERT_TRUE(tf_->Forward(std::span<model::BatchItem>(&n, 1)).ok());
  }
  EXPECT_EQ(got, want);
  auto decoded = tok_->Decode(want);
  ASSERT_TRUE(decoded.ok());
  EXPECT_TRUE(absl::StartsWith(*decoded, text)) << text;  // streamed text = decoded tokens (minus a held partial char)
  // Resume: the log is re-delivered from an index.
  {
    v1::GenerateRequest g;
    g.set_session_id(cs.session_id());
    g.set_max_tokens(1);
    g.set_resume_from(5);
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    auto reader = stub->Generate(&ctx, g);
    v1::GeneratedToken t;
    std::vector<int32_t> again;
    while (reader->Read(&t)) again.push_back(t.id());
    ASSERT_TRUE(reader->Finish().ok());
    EXPECT_EQ(again, std::vector<int32_t>(want.begin() + 5, want.end()));
  }
  v1::SessionInfo info;
  {
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    v1::SessionRef ref;
    ref.set_session_id(cs.session_id());
    ASSERT_TRUE(stub->GetSession(&ctx, ref, &info).ok());
  }
  EXPECT_GE(info.length(), p.size() + 7);
  EXPECT_EQ(info.generated(), 8u);
  EXPECT_GT(info.kv_bytes_worker(), 0u);
}

// A retried append (same append_seq) is applied once; a gap in the sequence is refused.
TEST_F(SessionApi, AppendSequenceMakesRetriesIdempotent) {
  auto stub = Stub();
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  auto append = [&](uint64_t seq) {
    v1::AppendRequest a;
    a.set_session_id(cs.session_id());
    for (int t : {5, 6, 7}) a.mutable_token_ids()->add_ids(t);
    a.set_append_seq(seq);
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    auto reader = stub->Append(&ctx, a);
    v1::AppendProgress p;
    while (reader->Read(&p)) {
    }
    return reader->Finish();
  };
  auto length = [&] {
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    v1::SessionRef ref;
    ref.set_session_id(cs.session_id());
    v1::SessionInfo info;
    EXPECT_TRUE(stub->GetSession(&ctx, ref, &info).ok());
    return info.length();
  };
  ASSERT_TRUE(append(1).ok());
  EXPECT_EQ(length(), 3u);
  ASSERT_TRUE(append(1).ok()) << "a retry of an applied append succeeds";
  EXPECT_EQ(length(), 3u) << "and appends nothing";
  EXPECT_EQ(append(3).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(append(2).ok());
  EXPECT_EQ(length(), 6u);
  ASSERT_TRUE(append(0).ok()) << "0: unchecked";
  EXPECT_EQ(length(), 9u);
}

TEST_F(SessionApi, HostileRequestsGetClearStatusCodes) {
  auto stub = Stub();
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  auto append = [&](const v1::AppendRequest& a, const std::string& token) {
    grpc::ClientContext ctx;
    Auth(&ctx, token);
    auto reader = stub->Append(&ctx, a);
    v1::AppendProgress p;
    while (reader->Read(&p)) {
    }
    return reader->Finish();
  };
  v1::AppendRequest a;
  a.set_session_id(cs.session_id());
  a.set_text("hello");
  EXPECT_EQ(append(a, "wrong").error_code(), grpc::StatusCode::PERMISSION_DENIED);
  v1::AppendRequest unknown = a;
  unknown.set_session_id("nope");
  EXPECT_EQ(append(unknown, cs.token()).error_code(), grpc::StatusCode::NOT_FOUND);
  v1::AppendRequest bad_utf8 = a;
  bad_utf8.set_text(std::string("ok \xff", 4));
  EXPECT_EQ(append(bad_utf8, cs.token()).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::AppendRequest oov = a;
  oov.mutable_token_ids()->add_ids(5000000);
  EXPECT_EQ(append(oov, cs.token()).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  v1::AppendRequest huge = a;
  huge.clear_text();
  for (int i = 0; i < 2500; ++i) huge.mutable_token_ids()->add_ids(7);
  EXPECT_EQ(append(huge, cs.token()).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  {
    v1::GenerateRequest g;
    g.set_session_id(cs.session_id());
    g.set_max_tokens(100000000);
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    auto reader = stub->Generate(&ctx, g);
    v1::GeneratedToken t;
    while (reader->Read(&t)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {
    v1::GenerateRequest g;  // nothing appended yet
    g.set_session_id(cs.session_id());
    g.set_max_tokens(3);
    grpc::ClientContext ctx;
    Auth(&ctx, cs.token());
    auto reader = stub->Generate(&ctx, g);
    v1::GeneratedToken t;
    while (reader->Read(&t)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  EXPECT_TRUE(append(a, cs.token()).ok());  // still serving
}

}  // namespace
}  // namespace flashmem::server
