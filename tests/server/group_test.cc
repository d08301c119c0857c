// Tensor-parallel worker groups in the service (issue 8), with real processes on the CPU (Gloo;
// tests/parallel/tp_test.cc shows TP=2 arithmetic against TP=1 and the golden sets): when a rank
// of the serving group is SIGKILLed mid-stream, the coordinator moves the session to another group, which
// adopts it from memtier (its follower recalling the evicted pages the snapshot references),
// and the client's stream carries on with exactly the uninterrupted tokens. The group's control
// stream and the coordinator's registration refuse malformed requests by field.
#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <thread>
#include <fstream>

#include "common/net.h"
#include "coordinator.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/model/test_models.h"
#include "tests/process_util.h"
#include "tests/server/cluster_util.h"
#include "worker.grpc.pb.h"

namespace flashmem::testing {
namespace {

struct Group {
  Child leader;
  std::vector<Child> followers;
};

// Followers first (they wait for the leader's store), then the leader, which listens once every
// follower follows it.
Group StartGroup(const std::string& dir, const std::string& name, int size, const std::vector<std::string>& wargs) {
  const std::string store = "127.0.0.1:" + std::to_string(FreeLoopbackPort());
  auto args_for = [&](int rank) {
    std::vector<std::string> a = wargs;
    a.insert(a.end(), {"--tp-size", std::to_string(size), "--tp-rank", std::to_string(rank), "--tp-leader", store,
                       "--group", name, "--tp-timeout-s", "60"});
    return a;
  };
  Group g;
  for (int r = 1; r < size; ++r)
    g.followers.push_back(SpawnLogged(FLASHMEM_WORKER_BIN, args_for(r), dir + "/" + name + "-rank" + std::to_string(r) + ".log"));
  g.leader = Spawn(FLASHMEM_WORKER_BIN, args_for(0), std::chrono::seconds(120));
  return g;
}

void StopGroup(Group& g) {
  Stop(g.leader);
  for (Child& f : g.followers) Stop(f);
}

// A Prometheus gauge's value in a /metrics text (-1 when absent).
double Gauge(const std::string& metrics, const std::string& name) {
  for (size_t at = metrics.find(name); at != std::string::npos; at = metrics.find(name, at + 1)) {
    if (at > 0 && metrics[at - 1] != '\n') continue;
    const size_t sp = at + name.size();
    if (sp < metrics.size() && metrics[sp] == ' ') return std::stod(metrics.substr(sp + 1));
  }
  return -1;
}

std::string ReadLog(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

TEST(TpGroup, ARankLossMovesTheSessionWithIdenticalTokens) {
  const std::string dir = TempDir("tp_group");
  ASSERT_EQ(WriteTinyModel(dir, 4), 0);
  ASSERT_EQ(std::system((std::string(FLASHMEM_BIN) + " indexer init --model " + dir + "/m --out " + dir + "/idx > /dev/null").c_str()), 0);
  Child coord = StartCoordinator(dir);
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  Child memtier = StartMemtier(dir, {"--coordinator", coord.target, "--shm-socket", dir + "/mt.sock"});
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  // LSA with a KV budget that keeps pages in memtier only: the adopting group's follower must
  // recall what the snapshot references.
  const std::vector<std::string> common = {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                           "--lsa-indexer", dir + "/idx", "--lsa-options", "interval=8,kmax=2,tail_chunks=16",
                                           "--kv-budget-bytes", "262144"};  // ~7 of the 37,376-byte main-KV pages
  const std::vector<int32_t> prompt = Prompt(1500, 1000, 3);  // 375 chunks: 6 pages per CSA stream
  v1::SamplingParams sp;
  sp.set_temperature(0.7f);
  sp.set_seed(77);
  grpc::Status st;
  auto run = [&](Api& api, const v1::SamplingParams& params, int n, const std::function<void(size_t)>& on_token,
                 v1::CreateSessionResponse* out) {
    v1::CreateSessionResponse cs;
    grpc::ClientContext ctx;
    EXPECT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
    EXPECT_TRUE(AppendIds(api, cs.session_id(), cs.token(), prompt).ok());
    if (out) *out = cs;
    auto got = Generate(api, cs.session_id(), cs.token(), n, params, &st, on_token);
    EXPECT_TRUE(st.ok()) << st.error_message();
    return got;
  };

  std::vector<std::string> wargs = common;
  wargs.insert(wargs.end(), {"--coordinator", coord.target, "--memtier-shm-socket", dir + "/mt.sock",
                             "--metrics-listen", "127.0.0.1:0"});
  Group a = StartGroup(dir, "ga", 2, wargs), b = StartGroup(dir, "gb", 2, wargs);
  ASSERT_FALSE(a.leader.target.empty()) << a.leader.output << ReadLog(dir + "/ga-rank1.log");
  ASSERT_FALSE(b.leader.target.empty()) << b.leader.output << ReadLog(dir + "/gb-rank1.log");
  Api api(coord.target);
  // The uninterrupted run on a group: 40 sampled tokens, then 20 more.
  v1::CreateSessionResponse ref;
  std::vector<int32_t> want = run(api, sp, 40, nullptr, &ref);
  ASSERT_EQ(want.size(), 40u);
  auto more = Generate(api, ref.session_id(), ref.token(), 20, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  want.insert(want.end(), more.begin(), more.end());
  // The serving group's follower keeps KV within the same budget: the leader relays memtier's
  // acknowledgements, the follower evicts and recalls from memtier's RAM tier (the node's copy).
  {
    const std::string ref_leader = Info(api, ref).served_by();
    const std::string log = ReadLog(dir + (ref_leader == a.leader.target ? "/ga" : "/gb") + "-rank1.log");
    const auto m = log.find("METRICS ");
    ASSERT_NE(m, std::string::npos) << log;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // gauges refresh every 200 ms
    const std::string metrics = HttpGet(std::stoi(log.substr(m + 8)), "/metrics");
    std::printf("  follower rank: %.0f pages acknowledged (relayed), %.0f evicted, %.0f recalled; %.0f of %.0f dense bytes resident\n",
                Gauge(metrics, "flashmem_kv_pages_committed"), Gauge(metrics, "flashmem_kv_pages_evicted"),
                Gauge(metrics, "flashmem_kv_pages_recalled"), Gauge(metrics, "flashmem_kv_resident_bytes"),
                Gauge(metrics, "flashmem_kv_dense_bytes"));
    EXPECT_GT(Gauge(metrics, "flashmem_kv_pages_committed"), 0) << metrics;
    EXPECT_GT(Gauge(metrics, "flashmem_kv_pages_evicted"), 0) << metrics;
    EXPECT_GT(Gauge(metrics, "flashmem_kv_pages_recalled"), 0) << metrics;
    EXPECT_LT(Gauge(metrics, "flashmem_kv_resident_bytes"), Gauge(metrics, "flashmem_kv_dense_bytes")) << metrics;
    EXPECT_GE(Gauge(metrics, "flashmem_worker_tokens{kind=\"decode\"}"), 59) << metrics;
    // CPU ranks hold no device copies of KV pages: the reserve's gauges are there, at zero.
    EXPECT_NE(metrics.find("flashmem_gpu_kv_reserve_uploads{kind=\"records\"} 0"), std::string::npos) << metrics;
  }
  // The same with the serving group's follower rank SIGKILLed after the 12th token (the stream may
  // have ended by then; the next Generate then finds the group broken).
  v1::CreateSessionResponse cs;
  std::string first;
  Group* serving = nullptr;
  std::vector<int32_t> got = run(api, sp, 40, [&](size_t k) {
    if (k != 12) return;
    first = Info(api, cs).served_by();
    serving = first == a.leader.target ? &a : &b;
    Stop(serving->followers[0], SIGKILL);
  }, &cs);
  ASSERT_TRUE(serving != nullptr);
  more = Generate(api, cs.session_id(), cs.token(), 20, sp, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  got.insert(got.end(), more.begin(), more.end());
  EXPECT_EQ(got, want) << "a session moved between groups of two ranks continues as if uninterrupted";
  const v1::SessionInfo after = Info(api, cs);
  EXPECT_NE(after.served_by(), first);
  EXPECT_GT(after.kv_pages_in_memtier(), 0u);
  // The broken group's leader knows it cannot go on: it exits with an error naming the lost rank.
  EXPECT_EQ(ExitCode(serving->leader, std::chrono::seconds(15)), 1);
  StopGroup(a);
  StopGroup(b);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
}

TEST(TpGroup, ControlStreamAndRegistrationRefuseBadRequests) {
  const std::string dir = TempDir("tp_group_bad");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  Child coord = StartCoordinator(dir);
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  Group g = StartGroup(dir, "g", 2, {"--model", dir + "/m", "--listen", "127.0.0.1:0"});
  ASSERT_FALSE(g.leader.target.empty()) << g.leader.output << ReadLog(dir + "/g-rank1.log");
  auto control = v1::GroupControl::NewStub(grpc::CreateChannel(g.leader.target, grpc::InsecureChannelCredentials()));
  auto follow = [&](const std::string& group, uint32_t rank, uint32_t size) {
    v1::FollowRequest r;
    r.set_group(group);
    r.set_rank(rank);
    r.set_size(size);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    auto reader = control->Follow(&ctx, r);
    v1::GroupOp op;
    while (reader->Read(&op)) {
    }
    return reader->Finish();
  };
  struct Bad {
    std::string group;
    uint32_t rank, size;
    grpc::StatusCode code;
    std::string names;
  };
  for (const Bad& c : {Bad{"other", 1, 2, grpc::StatusCode::INVALID_ARGUMENT, "group"},
                       Bad{"g", 1, 3, grpc::StatusCode::INVALID_ARGUMENT, "size"},
                       Bad{"g", 0, 2, grpc::StatusCode::INVALID_ARGUMENT, "rank"},
                       Bad{"g", 7, 2, grpc::StatusCode::INVALID_ARGUMENT, "rank"},
                       Bad{"g", 1, 2, grpc::StatusCode::FAILED_PRECONDITION, "already joined"}}) {
    const grpc::Status s = follow(c.group, c.rank, c.size);
    EXPECT_EQ(s.error_code(), c.code) << c.group << " " << c.rank << "/" << c.size << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.names), std::string::npos) << s.error_message();
  }
  // The group still serves: a greedy completion on the leader.
  Api api(g.leader.target);
  v1::CreateSessionResponse cs;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(api.session->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok());
  }
  ASSERT_TRUE(AppendIds(api, cs.session_id(), cs.token(), {0, 5, 6, 7}).ok());
  grpc::Status st;
  EXPECT_EQ(Generate(api, cs.session_id(), cs.token(), 4, v1::SamplingParams(), &st).size(), 4u);
  EXPECT_TRUE(st.ok()) << st.error_message();

  auto reg = v1::Coordinator::NewStub(grpc::CreateChannel(coord.target, grpc::InsecureChannelCredentials()));
  auto registers = [&](v1::ComponentKind kind, const std::string& group, uint32_t rank, uint32_t size) {
    v1::RegisterRequest r;
    r.set_address("127.0.0.1:1");
    r.set_kind(kind);
    r.set_group(group);
    r.set_tp_rank(rank);
    r.set_tp_size(size);
    v1::RegisterResponse out;
    grpc::ClientContext ctx;
    return reg->Register(&ctx, r, &out);
  };
  for (auto [s, names] : {std::make_pair(registers(v1::WORKER, "g", 2, 2), "tp_rank"),
                          std::make_pair(registers(v1::WORKER, "", 0, 2), "group"),
                          std::make_pair(registers(v1::WORKER_RANK, "g", 0, 2), "rank 0"),
                          std::make_pair(registers(v1::WORKER, "g", 1, 2), "rank 0"),
                          std::make_pair(registers(v1::WORKER, "g", 0, 1000), "tp_size"),
                          std::make_pair(registers(static_cast<v1::ComponentKind>(7), "", 0, 0), "kind")}) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
    EXPECT_NE(s.error_message().find(names), std::string::npos) << s.error_message();
  }
  // A clean leader shutdown ends the group: the follower exits 0.
  Stop(g.leader);
  EXPECT_EQ(ExitCode(g.followers[0], std::chrono::seconds(15)), 0) << ReadLog(dir + "/g-rank1.log");
  Stop(coord);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::testing
