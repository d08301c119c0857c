// Components start in any order (Kubernetes gives none): a memtier or worker started before its
// coordinator waits for it (LeaseKeeper), a worker started before memtier waits for it
// (MemTierClientOptions::connect_wait); when the wait runs out the error names what was missing.
// Real processes on 127.0.0.1, started late on a port chosen beforehand.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <future>
#include <thread>

#include "coordinator/lease_keeper.h"
#include "gtest/gtest.h"
#include "memtier/client/memtier_client.h"
#include "tests/model/test_models.h"
#include "tests/process_util.h"
#include "tests/server/cluster_util.h"

namespace flashmem::testing {
namespace {

// A port nothing listens on now (bound, then released).
int UnusedPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    return -1;
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

TEST(StartupOrder, ALeaseWaitsForACoordinatorThatStartsLater) {
  const std::string dir = TempDir("startup_coord");
  const int port = UnusedPort();
  ASSERT_GT(port, 0);
  const std::string target = "127.0.0.1:" + std::to_string(port);
  const auto t0 = Clock::now();
  auto lease = std::async(std::launch::async, [&] {
    return coordinator::LeaseKeeper::Start(target, grpc::InsecureChannelCredentials(), "127.0.0.1:1", v1::MEMTIER, nullptr,
                                           std::chrono::seconds(30));
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_EQ(lease.wait_for(std::chrono::seconds(0)), std::future_status::timeout) << "registered with nobody";
  Child coord = Spawn(FLASHMEM_COORDINATOR_BIN, {"--listen", target, "--data-dir", dir + "/coord"});
  ASSERT_FALSE(coord.target.empty()) << coord.output;
  auto k = lease.get();
  EXPECT_TRUE(k.ok()) << k.status();
  EXPECT_LT(Since(t0), 20.0);
  k = absl::UnknownError("released");  // the keeper stops before its coordinator
  Stop(coord);
  std::filesystem::remove_all(dir);
}

TEST(StartupOrder, ACoordinatorThatNeverComesIsAClearErrorAfterTheWait) {
  const std::string target = "127.0.0.1:" + std::to_string(UnusedPort());
  const auto t0 = Clock::now();
  auto k = coordinator::LeaseKeeper::Start(target, grpc::InsecureChannelCredentials(), "127.0.0.1:1", v1::MEMTIER, nullptr,
                                           std::chrono::milliseconds(1500));
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), absl::StatusCode::kUnavailable) << k.status();
  EXPECT_NE(k.status().message().find("--coordinator " + target), std::string::npos) << k.status();
  EXPECT_GE(Since(t0), 1.4);
  EXPECT_LT(Since(t0), 15.0);
}

TEST(StartupOrder, AMemtierClientWaitsForAMemtierThatStartsLater) {
  const std::string dir = TempDir("startup_mt");
  const int port = UnusedPort();
  ASSERT_GT(port, 0);
  memtier::MemTierClientOptions o;
  o.target = "127.0.0.1:" + std::to_string(port);
  o.buffer_bytes = 1 << 20;
  o.rpc_timeout = std::chrono::seconds(10);
  {  // nobody there, a short wait: the connection's own error, soon
    o.connect_wait = std::chrono::milliseconds(1000);
    const auto t0 = Clock::now();
    auto c = memtier::MemTierClient::Connect(o);
    ASSERT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
    EXPECT_LT(Since(t0), 15.0);
  }
  o.connect_wait = std::chrono::seconds(30);
  auto client = std::async(std::launch::async, [&] { return memtier::MemTierClient::Connect(o); });
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_EQ(client.wait_for(std::chrono::seconds(0)), std::future_status::timeout);
  Child mt = Spawn(FLASHMEM_MEMTIER_BIN, {"--grpc-listen", o.target, "--data-dir", dir + "/mt", "--ram-bytes", "67108864"});
  ASSERT_FALSE(mt.target.empty()) << mt.output;
  auto c = client.get();
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->OpenSession(7).ok());
  c->reset();  // before memtier goes away
  Stop(mt);
  std::filesystem::remove_all(dir);
}

// A worker whose coordinator never comes exits 1 with the coordinator named — also with its
// /metrics up (its refresh thread used to be left running there: std::terminate, exit 134).
TEST(StartupOrder, AWorkerWithMetricsExitsCleanlyWhenItsCoordinatorNeverComes) {
  const std::string dir = TempDir("startup_worker");
  ASSERT_EQ(WriteTinyModel(dir, 2), 0);
  const std::string coordinator = "127.0.0.1:" + std::to_string(UnusedPort());
  Child w = SpawnLogged(FLASHMEM_WORKER_BIN, {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                                              "--coordinator", coordinator, "--startup-wait-s", "0.5"},
                        dir + "/w.log");
  EXPECT_EQ(ExitCode(w, std::chrono::seconds(60)), 1);
  std::ifstream in(dir + "/w.log");
  const std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(log.find("--coordinator " + coordinator), std::string::npos) << log;
  EXPECT_EQ(log.find("terminate"), std::string::npos) << log;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::testing
