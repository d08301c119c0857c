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
#include "tests/process_util.h"

namespace flashmem::memtier {
namespace {

constexpr size_t kPage = 64 * 132;

std::vector<uint8_t> PageBytes(const PageKey& k) {
  std::mt19937_64 g(k.session * 1000003 + k.layer * 1009 + k.page);
  std::vector<uint8_t> b(kPage);
  for (auto& x : b) x = static_cast<uint8_t>(g());
  return b;
}

using flashmem::testing::Child;

// flashmem-memtier on a free port, waiting for its "LISTENING host:port" line.
Child StartMemtier(const std::string& dir) {
  Child c = flashmem::testing::Spawn(FLASHMEM_MEMTIER_BIN, {"--grpc-listen", "127.0.0.1:0", "--data-dir", dir,
                                                            "--ram-bytes", "16777216", "--ram-chunk-bytes", "4194304"},
                                     std::chrono::seconds(30));
  EXPECT_FALSE(c.target.empty()) << "memtier did not start: " << c.output;
  return c;
}

TEST(MemTierCrash, SigkillDuringCommitsLosesNoAcknowledgedPage) {
  const std::string dir = (std::filesystem::temp_directory_path() / ("fm_crash_" + std::to_string(::getpid()))).string();
  std::filesystem::remove_all(dir);
  std::mt19937 rng(20261128);
  std::vector<PageKey> acked;
  constexpr int kRounds = 20;
  for (int round = 0; round < kRounds; ++round) {
    Child p = StartMemtier(dir);
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
  Child p = StartMemtier(dir);
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
