// Failover without recompute, with real processes: a worker that snapshots its sessions to a
// real flashmem-memtier is SIGKILLed after a generation; another worker adopts the session from
// memtier and continues it — the tokens equal an uninterrupted run, and it ran no prefill.
#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "session.grpc.pb.h"
#include "tests/model/test_models.h"
#include "tests/process_util.h"
#include "tests/server/cluster_util.h"
#include "memtier.grpc.pb.h"
#include "worker.grpc.pb.h"

namespace flashmem::testing {
namespace {

// The admin call that makes `api`'s worker take session `sid` over from memtier.
grpc::Status Adopt(Api& api, const std::string& sid, v1::AdoptSessionResponse* ad) {
  v1::AdoptSessionRequest ar;
  ar.set_session_id(sid);
  grpc::ClientContext ctx;
  return api.admin->AdoptSession(&ctx, ar, ad);
}

TEST(Failover, AnotherWorkerAdoptsTheSessionFromMemtierWithoutPrefill) {
  const std::string dir = TempDir("failover");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  const std::vector<std::string> wargs = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target};
  v1::SamplingParams sp;
  sp.set_temperature(0.8f);
  sp.set_top_p(0.95f);
  sp.set_seed(1234);
  const std::string prompt = "Every acknowledged page survives the loss of its worker.";
  grpc::Status st;

  // Uninterrupted reference: one worker generates 5 + 7 tokens.
  std::vector<int32_t> want;
  {
    Child w = Spawn(FLASHMEM_WORKER_BIN, wargs);
    ASSERT_FALSE(w.target.empty()) << w.output;
    Api api(w.target);
    v1::CreateSessionResponse cs;
    grpc::ClientContext ctx;
    ASSERT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
    ASSERT_TRUE(Append(api, cs.session_id(), cs.token(), prompt).ok());
    want = Generate(api, cs.session_id(), cs.token(), 5, sp, &st);
    ASSERT_TRUE(st.ok()) << st.error_message();
    auto more = Generate(api, cs.session_id(), cs.token(), 7, sp, &st);
    ASSERT_TRUE(st.ok());
    want.insert(want.end(), more.begin(), more.end());
    Stop(w);
  }
  // Worker A generates 5 tokens, then dies.
  Child a = Spawn(FLASHMEM_WORKER_BIN, wargs);
  ASSERT_FALSE(a.target.empty());
  Api api_a(a.target);
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(api_a.session->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  ASSERT_TRUE(Append(api_a, cs.session_id(), cs.token(), prompt).ok());
  std::vector<int32_t> got = Generate(api_a, cs.session_id(), cs.token(), 5, sp, &st);
  ASSERT_TRUE(st.ok());
  Stop(a, SIGKILL);
  // Worker B adopts the session from memtier and continues it.
  Child b = Spawn(FLASHMEM_WORKER_BIN, wargs);
  ASSERT_FALSE(b.target.empty());
  Api api_b(b.target);
  v1::AdoptSessionResponse ad;
  {
    const grpc::Status s = Adopt(api_b, cs.session_id(), &ad);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(ad.generated(), 5u);
  auto more = Generate(api_b, cs.session_id(), cs.token(), 7, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  got.insert(got.end(), more.begin(), more.end());
  EXPECT_EQ(got, want);
  // The adopted session's context already held the prompt: B consumed only sampled tokens.
  const v1::SessionInfo info = Info(api_b, cs);
  EXPECT_EQ(info.worker_prefill_tokens(), 0u);
  EXPECT_EQ(info.generated(), 12u);
  // The session's token still guards it on the new worker.
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer nope");
    v1::SessionRef ref;
    ref.set_session_id(cs.session_id());
    v1::SessionInfo denied;
    EXPECT_EQ(api_b.session->GetSession(&ctx, ref, &denied).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  Stop(b);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// AdoptSession is network-facing and reads a snapshot from memtier: malformed ids, unknown
// sessions and corrupt snapshots (a header whose token count would wrap, truncated, garbage
// after a valid header) get clear errors, and the worker keeps serving.
TEST(Failover, AdoptionRefusesBadIdsAndCorruptSnapshots) {
  const std::string dir = TempDir("failover_bad_adopt");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  Child w = Spawn(FLASHMEM_WORKER_BIN, {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target});
  ASSERT_FALSE(w.target.empty()) << w.output;
  Api api(w.target);
  v1::AdoptSessionResponse ad;
  for (const std::string id : {"", "xyz", "0123456789abcdef0", "0123456789ABCDEF"}) {
    const grpc::Status s = Adopt(api, id, &ad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << id << ": " << s.error_message();
    EXPECT_NE(s.error_message().find("session id"), std::string::npos) << s.error_message();
  }
  EXPECT_EQ(Adopt(api, "00000000000000aa", &ad).error_code(), grpc::StatusCode::NOT_FOUND);

  auto mt = v1::MemTier::NewStub(grpc::CreateChannel(memtier.target, grpc::InsecureChannelCredentials()));
  auto put = [&](uint64_t session, const std::string& blob) {
    grpc::ClientContext c1, c2;
    v1::SessionRequest open;
    open.set_session(session);
    v1::SessionResponse r;
    ASSERT_TRUE(mt->OpenSession(&c1, open, &r).ok());
    v1::PutStateRequest ps;
    ps.set_session(session);
    ps.set_version(1);
    ps.set_blob(blob);
    ASSERT_TRUE(mt->PutState(&c2, ps, &r).ok());
  };
  auto header = [](uint64_t generated) {  // [token len][token][temperature][top_p][seed][appends][n]
    std::string h;
    const uint32_t tlen = 3;
    h.append(reinterpret_cast<const char*>(&tlen), 4).append("tok");
    const float t = 1.0f, p = 1.0f;
    const uint64_t seed = 1, appends = 1;
    h.append(reinterpret_cast<const char*>(&t), 4).append(reinterpret_cast<const char*>(&p), 4);
    h.append(reinterpret_cast<const char*>(&seed), 8).append(reinterpret_cast<const char*>(&appends), 8);
    h.append(reinterpret_cast<const char*>(&generated), 8);
    return h;
  };
  struct Bad {
    uint64_t session;
    std::string blob;
    grpc::StatusCode code;
    std::string names;
  };
  for (const Bad& b : {Bad{0xb1, header(uint64_t{1} << 62), grpc::StatusCode::DATA_LOSS, "generated tokens"},
                       Bad{0xb2, header(0).substr(0, 10), grpc::StatusCode::DATA_LOSS, "truncated"},
                       Bad{0xb3, header(0) + std::string(64, '\x5a'), grpc::StatusCode::INVALID_ARGUMENT, "snapshot"}}) {
    put(b.session, b.blob);
    char id[17];
    std::snprintf(id, sizeof id, "%016llx", static_cast<unsigned long long>(b.session));
    const grpc::Status s = Adopt(api, id, &ad);
    EXPECT_EQ(s.error_code(), b.code) << id << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(b.names), std::string::npos) << s.error_message();
  }
  // Still serving.
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  ASSERT_TRUE(Append(api, cs.session_id(), cs.token(), "still serving").ok());
  grpc::Status st;
  EXPECT_EQ(Generate(api, cs.session_id(), cs.token(), 3, v1::SamplingParams(), &st).size(), 3u);
  EXPECT_TRUE(st.ok()) << st.error_message();
  Stop(w);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// Through the coordinator: a worker SIGKILLed in the middle of a Generate stream; the client's
// stream carries on from another worker with exactly the uninterrupted tokens.
TEST(Failover, CoordinatorMovesTheSessionAndTheStreamCarriesOn) {
  const std::string dir = TempDir("failover_coord");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child coord = StartCoordinator(dir, {"--metrics-listen", "127.0.0.1:0"});
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  Child memtier = StartMemtier(dir, {"--coordinator", coord.target});
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  const std::vector<std::string> wargs = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                          "--coordinator", coord.target};
  Child w1 = Spawn(FLASHMEM_WORKER_BIN, wargs), w2 = Spawn(FLASHMEM_WORKER_BIN, wargs);
  ASSERT_FALSE(w1.target.empty() || w2.target.empty());
  Api api(coord.target);
  v1::SamplingParams sp;
  sp.set_temperature(0.7f);
  sp.set_seed(99);
  const std::string prompt = "A worker dies; the stream does not notice.";
  auto create = [&](v1::CreateSessionResponse* cs) {
    grpc::ClientContext ctx;
    return api.session->CreateSession(&ctx, v1::CreateSessionRequest(), cs);
  };
  grpc::Status st;
  v1::CreateSessionResponse ref;
  ASSERT_TRUE(create(&ref).ok());
  ASSERT_TRUE(Append(api, ref.session_id(), ref.token(), prompt).ok());
  const std::vector<int32_t> want = Generate(api, ref.session_id(), ref.token(), 16, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  ASSERT_EQ(want.size(), 16u);

  v1::CreateSessionResponse cs;
  ASSERT_TRUE(create(&cs).ok());
  ASSERT_TRUE(Append(api, cs.session_id(), cs.token(), prompt).ok());
  const std::string first = Info(api, cs).served_by();
  Child& victim = first == w1.target ? w1 : w2;
  ASSERT_TRUE(first == w1.target || first == w2.target) << first;
  // Placement counts sessions from the workers' heartbeats, so both may land on one worker (a
  // heartbeat had not yet counted the first): every session of the killed worker moves.
  const int moves = 1 + (Info(api, ref).served_by() == first ? 1 : 0);
  // Stream 16 tokens; SIGKILL the serving worker after the 5th.
  const std::vector<int32_t> got = Generate(api, cs.session_id(), cs.token(), 16, sp, &st, [&](size_t k) {
    if (k == 5) Stop(victim, SIGKILL);
  });
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(got, want);
  EXPECT_NE(Info(api, cs).served_by(), first);
  if (moves == 2) EXPECT_NE(Info(api, ref).served_by(), first);  // moved too (now at the latest)
  // The coordinator's /metrics saw the move and its resume time.
  const auto m = coord.output.find("METRICS ");
  ASSERT_NE(m, std::string::npos) << coord.output;
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // gauges refresh every 200 ms
  const std::string metrics = HttpGet(std::stoi(coord.output.substr(m + 8)), "/metrics");
  EXPECT_NE(metrics.find(absl::StrCat("flashmem_coordinator_failovers ", moves, "\n")), std::string::npos) << metrics;
  EXPECT_NE(metrics.find(absl::StrCat("flashmem_coordinator_resume_seconds_count ", moves, "\n")), std::string::npos)
      << metrics;
  EXPECT_NE(metrics.find("flashmem_coordinator_tokens 32"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("flashmem_coordinator_workers_live 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("flashmem_coordinator_memtiers_live 1"), std::string::npos) << metrics;
  Stop(w1);
  Stop(w2);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// A worker that lost a session without dying (cut off, then back): once another worker has
// adopted the session, the old copy cannot write a snapshot (memtier refuses its version: the
// adopter claimed a newer owner generation), its client gets ABORTED naming the move, the copy is
// dropped, and the adopter goes on with the uninterrupted tokens.
TEST(Failover, AStaleCopyCannotOverwriteTheAdoptersSnapshot) {
  const std::string dir = TempDir("failover_stale");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  const std::vector<std::string> wargs = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target};
  Child a = Spawn(FLASHMEM_WORKER_BIN, wargs), b = Spawn(FLASHMEM_WORKER_BIN, wargs);
  ASSERT_FALSE(a.target.empty() || b.target.empty());
  Api api_a(a.target), api_b(b.target);
  v1::SamplingParams sp;
  sp.set_temperature(0.9f);
  sp.set_seed(77);
  const std::string prompt = "Two workers, one session, one owner.";
  grpc::Status st;
  v1::CreateSessionResponse ref, cs;
  OpenSession(api_a, prompt, &ref);
  std::vector<int32_t> want = Generate(api_a, ref.session_id(), ref.token(), 12, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  OpenSession(api_a, prompt, &cs);
  std::vector<int32_t> got = Generate(api_a, cs.session_id(), cs.token(), 4, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  // B adopts while A still holds its copy.
  v1::AdoptSessionResponse ad;
  {
    const grpc::Status s = Adopt(api_b, cs.session_id(), &ad);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(ad.generated(), 4u);
  // A's copy tries to go on: its snapshot is refused, the client is told, the copy is gone.
  (void)Generate(api_a, cs.session_id(), cs.token(), 3, sp, &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::ABORTED) << st.error_message();
  EXPECT_NE(st.error_message().find("moved to another worker"), std::string::npos) << st.error_message();
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + cs.token());
    v1::SessionRef sref;
    sref.set_session_id(cs.session_id());
    v1::SessionInfo info;
    EXPECT_EQ(api_a.session->GetSession(&ctx, sref, &info).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  // B's copy is intact: the uninterrupted tokens, and its snapshots still land.
  auto more = Generate(api_b, cs.session_id(), cs.token(), 8, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  got.insert(got.end(), more.begin(), more.end());
  EXPECT_EQ(got, want);
  Stop(a);
  Stop(b);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// One memtier per node (the Kubernetes layout): a session moves only to a worker of the memtier
// that holds its snapshot and pages (workers register their memtier's store id), never to an
// otherwise preferred worker of another memtier, which could not adopt it.
TEST(Failover, TheSessionMovesOnlyToAWorkerOfItsMemtier) {
  const std::string dir = TempDir("failover_store");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child coord = StartCoordinator(dir);
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  Child mt_a = StartMemtier(dir + "/a"), mt_b = StartMemtier(dir + "/b");
  ASSERT_FALSE(mt_a.target.empty() || mt_b.target.empty());
  auto worker_of = [&](const Child& mt) {
    return Spawn(FLASHMEM_WORKER_BIN, {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", mt.target,
                                       "--coordinator", coord.target});
  };
  Child a1 = worker_of(mt_a);  // alone at first: both sessions start here
  ASSERT_FALSE(a1.target.empty()) << a1.output;
  Api api(coord.target);
  v1::SamplingParams sp;
  sp.set_temperature(0.7f);
  sp.set_seed(5);
  const std::string prompt = "Pages stay where they were written.";
  grpc::Status st;
  v1::CreateSessionResponse ref, cs;
  OpenSession(api, prompt, &ref);
  const std::vector<int32_t> want = Generate(api, ref.session_id(), ref.token(), 16, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  OpenSession(api, prompt, &cs);
  ASSERT_EQ(Info(api, cs).served_by(), a1.target);
  // Now a worker of memtier B registers first (lower id, no sessions: placement's first choice),
  // then a second worker of memtier A.
  Child b = worker_of(mt_b);
  ASSERT_FALSE(b.target.empty()) << b.output;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  Child a2 = worker_of(mt_a);
  ASSERT_FALSE(a2.target.empty()) << a2.output;
  const std::vector<int32_t> got = Generate(api, cs.session_id(), cs.token(), 16, sp, &st, [&](size_t k) {
    if (k == 5) Stop(a1, SIGKILL);
  });
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(got, want);
  EXPECT_EQ(Info(api, cs).served_by(), a2.target) << "B's worker is " << b.target;
  Stop(a2);
  Stop(b);
  Stop(coord);
  Stop(mt_a);
  Stop(mt_b);
  std::filesystem::remove_all(dir);
}

// LSA on, with a KV budget that keeps pages in memtier: a worker SIGKILLed mid-stream; the
// session (its schedule, resident set and page references) moves to the other worker, which
// recalls the pages it needs from memtier; the tokens equal the uninterrupted run.
TEST(Failover, WithLsaAndEvictedPagesTheTokensAreTheSame) {
  const std::string dir = TempDir("failover_lsa");
  ASSERT_EQ(WriteTinyModel(dir, 4), 0);
  ASSERT_EQ(std::system((std::string(FLASHMEM_BIN) + " indexer init --model " + dir + "/m --out " + dir + "/idx > /dev/null").c_str()), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  Child coord = StartCoordinator(dir);
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  const std::vector<std::string> wargs = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                          "--coordinator", coord.target, "--lsa-indexer", dir + "/idx",
                                          "--lsa-options", "interval=8,kmax=2,tail_chunks=16", "--kv-budget-bytes", "262144"};  // ~7 of the 37,376-byte main-KV pages
  Child w1 = Spawn(FLASHMEM_WORKER_BIN, wargs), w2 = Spawn(FLASHMEM_WORKER_BIN, wargs);
  ASSERT_FALSE(w1.target.empty() || w2.target.empty()) << w1.output << w2.output;
  Api api(coord.target);
  const std::vector<int32_t> prompt = Prompt(1500, 1000, 3);  // 375 chunks: 6 pages per CSA stream
  auto info = [&](const v1::CreateSessionResponse& cs) { return Info(api, cs); };
  v1::SamplingParams greedy;
  grpc::Status st;
  v1::CreateSessionResponse ref;
  OpenSession(api, prompt, &ref);
  const std::vector<int32_t> want = Generate(api, ref.session_id(), ref.token(), 40, greedy, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  const v1::SessionInfo ri = info(ref);
  EXPECT_TRUE(ri.lsa().enabled());
  EXPECT_GE(ri.lsa().sets_applied(), 3u);
  EXPECT_GT(ri.kv_pages_in_memtier(), 0u);
  EXPECT_LT(ri.kv_bytes_worker(), ri.kv_bytes_dense());

  v1::CreateSessionResponse cs;
  OpenSession(api, prompt, &cs);
  const std::string first = info(cs).served_by();
  Child& victim = first == w1.target ? w1 : w2;
  // The survivor's prefill counter before the failover (it may serve the reference session).
  const v1::SessionInfo ref_now = info(ref);
  const uint64_t survivor_prefill = ref_now.served_by() != first ? ref_now.worker_prefill_tokens() : 0;
  const std::vector<int32_t> got = Generate(api, cs.session_id(), cs.token(), 40, greedy, &st, [&](size_t k) {
    if (k == 12) Stop(victim, SIGKILL);
  });
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(got, want);
  const v1::SessionInfo ci = info(cs);
  EXPECT_NE(ci.served_by(), first);
  EXPECT_TRUE(ci.lsa().enabled());
  EXPECT_EQ(ci.worker_prefill_tokens(), survivor_prefill) << "the adopting worker ran no prefill";
  Stop(w1);
  Stop(w2);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// Many rounds, each killing the serving worker at a random token of the stream (seeded): every
// round's final tokens equal the uninterrupted run; the killed worker is restarted for the next.
TEST(Failover, RandomStepsManyRounds) {
  const std::string dir = TempDir("failover_rounds");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  Child coord = StartCoordinator(dir);
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  const std::vector<std::string> wargs = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                          "--coordinator", coord.target};
  std::vector<Child> workers = {Spawn(FLASHMEM_WORKER_BIN, wargs), Spawn(FLASHMEM_WORKER_BIN, wargs)};
  ASSERT_FALSE(workers[0].target.empty() || workers[1].target.empty());
  Api api(coord.target);
  v1::SamplingParams sp;
  sp.set_temperature(0.8f);
  sp.set_seed(2026);
  const std::string prompt = "Round after round, the same tokens.";
  constexpr int kTokens = 24;
  grpc::Status st;
  v1::CreateSessionResponse ref;
  OpenSession(api, prompt, &ref);
  const std::vector<int32_t> want = Generate(api, ref.session_id(), ref.token(), kTokens, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  uint64_t x = 77;
  for (int round = 0; round < 4; ++round) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    const size_t kill_at = 1 + (x >> 33) % (kTokens - 2);
    v1::CreateSessionResponse cs;
    OpenSession(api, prompt, &cs);
    const std::string serving = Info(api, cs).served_by();
    const size_t victim = serving == workers[0].target ? 0 : 1;
    ASSERT_EQ(serving, workers[victim].target);
    const std::vector<int32_t> got = Generate(api, cs.session_id(), cs.token(), kTokens, sp, &st, [&](size_t k) {
      if (k == kill_at) Stop(workers[victim], SIGKILL);
    });
    ASSERT_TRUE(st.ok()) << "round " << round << ": " << st.error_message();
    EXPECT_EQ(got, want) << "round " << round << ", killed after token " << kill_at;
    workers[victim] = Spawn(FLASHMEM_WORKER_BIN, wargs);
    ASSERT_FALSE(workers[victim].target.empty()) << workers[victim].output;
  }
  for (Child& w : workers) Stop(w);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// An idle session on a worker that dies is moved by the coordinator itself once the lease runs
// out, before any client call on it.
TEST(Failover, IdleSessionsMoveWhenTheLeaseRunsOut) {
  const std::string dir = TempDir("failover_idle");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child memtier = StartMemtier(dir);
  Child coord = StartCoordinator(dir, {"--metrics-listen", "127.0.0.1:0"});
  ASSERT_FALSE(memtier.target.empty() || coord.target.empty());
  const std::vector<std::string> wargs = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                          "--coordinator", coord.target};
  Child w1 = Spawn(FLASHMEM_WORKER_BIN, wargs), w2 = Spawn(FLASHMEM_WORKER_BIN, wargs);
  ASSERT_FALSE(w1.target.empty() || w2.target.empty());
  Api api(coord.target);
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  ASSERT_TRUE(Append(api, cs.session_id(), cs.token(), "idle for a while").ok());
  const std::string first = Info(api, cs).served_by();
  Stop(first == w1.target ? w1 : w2, SIGKILL);
  const int metrics_port = std::stoi(coord.output.substr(coord.output.find("METRICS ") + 8));
  std::string metrics;
  for (int i = 0; i < 60 && metrics.find("flashmem_coordinator_failovers 1") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    metrics = HttpGet(metrics_port, "/metrics");
  }
  EXPECT_NE(metrics.find("flashmem_coordinator_failovers 1"), std::string::npos) << "moved without a client call: " << metrics;
  const std::string now = Info(api, cs).served_by();
  EXPECT_NE(now, first);
  EXPECT_TRUE(now == w1.target || now == w2.target) << now;
  Stop(w1);
  Stop(w2);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// Port of a "host:port" target.
std::string PortOf(const std::string& target) { return target.substr(target.rfind(':') + 1); }

// The coordinator is SIGKILLed and restarted on the same address: its session table (RocksDB)
// keeps the session, workers register again, and the session continues with the same tokens.
TEST(Failover, CoordinatorRestartKeepsSessions) {
  const std::string dir = TempDir("coord_restart");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  Child coord = StartCoordinator(dir);
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  const std::string coord_target = coord.target;
  Child w = Spawn(FLASHMEM_WORKER_BIN, {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                        "--coordinator", coord_target});
  ASSERT_FALSE(w.target.empty()) << w.output;
  v1::SamplingParams sp;
  sp.set_temperature(0.9f);
  sp.set_seed(5);
  grpc::Status st;
  std::vector<int32_t> want, got;
  v1::CreateSessionResponse ref, cs;
  {
    Api api(coord_target);
    for (auto* c : {&ref, &cs}) {
      grpc::ClientContext ctx;
      ASSERT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), c).ok());
      ASSERT_TRUE(Append(api, c->session_id(), c->token(), "The table outlives the coordinator.").ok());
    }
    want = Generate(api, ref.session_id(), ref.token(), 12, sp, &st);
    ASSERT_TRUE(st.ok()) << st.error_message();
    got = Generate(api, cs.session_id(), cs.token(), 5, sp, &st);
    ASSERT_TRUE(st.ok()) << st.error_message();
  }
  Stop(coord, SIGKILL);
  coord = Spawn(FLASHMEM_COORDINATOR_BIN, {"--listen", "127.0.0.1:" + PortOf(coord_target), "--data-dir", dir + "/coord"});
  ASSERT_EQ(coord.target, coord_target) << coord.output;
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // the worker's next heartbeats register it again
  Api api(coord_target);
  auto more = Generate(api, cs.session_id(), cs.token(), 7, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  got.insert(got.end(), more.begin(), more.end());
  EXPECT_EQ(got, want);
  Stop(w);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

// memtier is SIGKILLed during a generation and restarted on the same address and data: the
// generation ends either correctly or with a retryable error (UNAVAILABLE), and generating the
// rest gives exactly the uninterrupted tokens — never wrong ones.
TEST(Failover, MemtierRestartDuringGenerationContinuesOrFailsRetryably) {
  const std::string dir = TempDir("memtier_restart");
  ASSERT_EQ(WriteTinyModel(dir, 4), 0);
  Child memtier = StartMemtier(dir);
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  const std::string mt_target = memtier.target;
  Child w = Spawn(FLASHMEM_WORKER_BIN, {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", mt_target});
  ASSERT_FALSE(w.target.empty()) << w.output;
  Api api(w.target);
  const std::vector<int32_t> prompt = Prompt(600, 1000, 8);  // complete pages get committed during decode
  v1::SamplingParams greedy;
  grpc::Status st;
  v1::CreateSessionResponse ref, cs;
  OpenSession(api, prompt, &ref);
  const std::vector<int32_t> want = Generate(api, ref.session_id(), ref.token(), 60, greedy, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  OpenSession(api, prompt, &cs);
  std::vector<int32_t> got = Generate(api, cs.session_id(), cs.token(), 60, greedy, &st, [&](size_t k) {
    if (k != 10) return;
    Stop(memtier, SIGKILL);
    memtier = Spawn(FLASHMEM_MEMTIER_BIN, {"--grpc-listen", "127.0.0.1:" + PortOf(mt_target), "--data-dir", dir + "/mt",
                                           "--ram-bytes", "268435456"});
    EXPECT_EQ(memtier.target, mt_target) << memtier.output;
  });
  for (int attempt = 0; attempt < 5 && got.size() < want.size(); ++attempt) {
    ASSERT_TRUE(st.ok() || st.error_code() == grpc::StatusCode::UNAVAILABLE) << st.error_code() << " " << st.error_message();
    // A retryable error: try again after a pause, as a client backs off (the worker's channel to
    // memtier reconnects on its own backoff).
    if (!st.ok()) std::this_thread::sleep_for(std::chrono::seconds(1 + attempt));
    auto more = Generate(api, cs.session_id(), cs.token(), static_cast<int>(want.size() - got.size()), greedy, &st);
    got.insert(got.end(), more.begin(), more.end());
  }
  EXPECT_TRUE(st.ok() || st.error_code() == grpc::StatusCode::UNAVAILABLE) << st.error_code() << " " << st.error_message();
  EXPECT_EQ(got, want);
  Stop(w);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::testing
