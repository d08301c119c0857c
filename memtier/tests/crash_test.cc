// SIGKILL of a real flashmem-memtier process at random points in a stream of commits, restart,
// and every acknowledged page is present and verified (checksum after transfer + bytes).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <random>
#include <thread>

#include "gtest/gtest.h"
#include "memtier/client/memtier_client.h"

namespace flashmem::memtier {
namespace {

constexpr size_t kPage = 64 * 132;

std::vector<uint8_t> PageBytes(const PageKey& k) {
  std::mt19937_64 g(k.session * 1000003 + k.layer * 1009 + k.page);
  std::vector<uint8_t> b(kPage);
  for (auto& x : b) x = static_cast<uint8_t>(g());
  return b;
}

struct Process {
  pid_t pid = -1;
  std::string target;
};

// Starts flashmem-memtier on a free port and waits for its "LISTENING host:port" line.
Process StartMemtier(const std::string& dir) {
  int fds[2];
  EXPECT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::execl(FLASHMEM_MEMTIER_BIN, FLASHMEM_MEMTIER_BIN, "--grpc-listen", "127.0.0.1:0", "--data-dir", dir.c_str(),
            "--ram-bytes", "16777216", "--ram-chunk-bytes", "4194304", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(fds[1]);
  Process p{pid, ""};
  std::string out;
  char buf[256];
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    pollfd pfd{fds[0], POLLIN, 0};
    if (::poll(&pfd, 1, 100) <= 0) continue;
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    out.append(buf, n);
    const auto at = out.find("LISTENING ");
    const auto nl = out.find('\n', at);
    if (at != std::string::npos && nl != std::string::npos) {
      p.target = out.substr(at + 10, nl - at - 10);
      break;
    }
  }
  ::close(fds[0]);
  EXPECT_FALSE(p.target.empty()) << "memtier did not start: " << out;
  return p;
}

TEST(MemTierCrash, SigkillDuringCommitsLosesNoAcknowledgedPage) {
  const std::string dir = (std::filesystem::temp_directory_path() / ("fm_crash_" + std::to_string(::getpid()))).string();
  std::filesystem::remove_all(dir);
  std::mt19937 rng(20261128);
  std::vector<PageKey> acked;
  constexpr int kRounds = 20;
  for (int round = 0; round < kRounds; ++round) {
    Process p = StartMemtier(dir);
    ASSERT_FALSE(p.target.empty());
    MemTierClientOptions o;
    o.target = p.target;
    o.buffer_bytes = 1 << 20;
    o.reconnect_attempts = 0;
    o.rpc_timeout = std::chrono::milliseconds(5000);
    auto c = MemTierClient::Connect(o);
    ASSERT_TRUE(c.ok()) << c.status();
    // Everything acknowledged so far survived the previous kills.
    for (size_t i = 0; i < acked.size(); i += 64) {
      const size_t n = std::min<size_t>(64, acked.size() - i);
      std::vector<std::vector<uint8_t>> bufs(n, std::vector<uint8_t>(kPage));
      std::vector<PageToRecall> pages;
      for (size_t j = 0; j < n; ++j) pages.push_back({acked[i + j], bufs[j]});
      const absl::Status st = (*c)->Recall(1, pages);
      ASSERT_TRUE(st.ok()) << "round " << round << ": " << st;
      for (size_t j = 0; j < n; ++j) ASSERT_EQ(bufs[j], PageBytes(acked[i + j])) << ToString(acked[i + j]);
    }
    ASSERT_TRUE((*c)->OpenSession(1).ok());
    // A stream of commits, killed at a random point.
    std::atomic<bool> stop{false};
    std::vector<PageKey> round_acked;
    std::thread writer([&] {
      for (uint32_t batch = 0; !stop.load(); ++batch) {
        std::vector<std::vector<uint8_t>> data;
        std::vector<PageToCommit> pages;
        for (uint32_t j = 0; j < 8; ++j) data.push_back(PageBytes({1, static_cast<uint32_t>(round), batch * 8 + j}));
        for (uint32_t j = 0; j < 8; ++j) pages.push_back({{1, static_cast<uint32_t>(round), batch * 8 + j}, data[j]});
        const absl::Status cs = (*c)->Commit(1, pages);
        if (!cs.ok()) {
          std::printf("commit stream ended by the kill: %s\n", std::string(cs.message()).c_str());
          return;
        }
        for (const auto& pg : pages) round_acked.push_back(pg.key);
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(20, 250)(rng)));
    ASSERT_EQ(::kill(p.pid, SIGKILL), 0);
    int status = 0;
    ::waitpid(p.pid, &status, 0);
    stop.store(true);
    writer.join();
    c->reset();
    acked.insert(acked.end(), round_acked.begin(), round_acked.end());
    std::printf("round %d: %zu pages acknowledged before SIGKILL (total %zu)\n", round, round_acked.size(), acked.size());
  }
  // Final check after the last kill.
  Process p = StartMemtier(dir);
  MemTierClientOptions o;
  o.target = p.target;
  o.buffer_bytes = 1 << 20;
  auto c = MemTierClient::Connect(o);
  ASSERT_TRUE(c.ok());
  for (size_t i = 0; i < acked.size(); i += 64) {
    const size_t n = std::min<size_t>(64, acked.size() - i);
    std::vector<std::vector<uint8_t>> bufs(n, std::vector<uint8_t>(kPage));
    std::vector<PageToRecall> pages;
    for (size_t j = 0; j < n; ++j) pages.push_back({acked[i + j], bufs[j]});
    ASSERT_TRUE((*c)->Recall(1, pages).ok());
    for (size_t j = 0; j < n; ++j) ASSERT_EQ(bufs[j], PageBytes(acked[i + j]));
  }
  EXPECT_GT(acked.size(), 0u);
  c->reset();
  ::kill(p.pid, SIGTERM);
  ::waitpid(p.pid, nullptr, 0);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::memtier
