// The UCX data plane between two real workers (run by ctest once with UCX_TLS=tcp over
// loopback and once with the shared-memory transports).
#include "memtier/transport/ucx.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "memtier/transport/copy_pool.h"

namespace flashmem::memtier::ucx {
namespace {

TEST(Ucx, PutAndGetBetweenWorkers) {
  std::printf("UCX_TLS=%s\n", std::getenv("UCX_TLS") ? std::getenv("UCX_TLS") : "(default)");
  auto server = Worker::Create();
  auto client = Worker::Create();
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_TRUE(client.ok()) << client.status();
  std::vector<uint8_t> buf(1 << 20, 0);
  auto region = (*client)->Map(buf.data(), buf.size());
  ASSERT_TRUE(region.ok()) << region.status();
  const uint64_t base = reinterpret_cast<uint64_t>(buf.data());
  auto peer = (*server)->Connect((*client)->address(), (*region)->packed_rkey(), base, buf.size());
  ASSERT_TRUE(peer.ok()) << peer.status();
  // Server writes 37,376-byte pages into the client's buffer, then reads them back.
  std::vector<uint8_t> page(37376);
  std::iota(page.begin(), page.end(), 7);
  for (int i = 0; i < 20; ++i) ASSERT_TRUE((*peer)->Put(page.data(), page.size(), base + i * page.size()).ok());
  ASSERT_TRUE((*peer)->Flush().ok());
  for (int i = 0; i < 20; ++i)
    ASSERT_TRUE(std::equal(page.begin(), page.end(), buf.begin() + i * page.size())) << i;
  buf[5] = 0xab;
  std::vector<uint8_t> back(page.size());
  ASSERT_TRUE((*peer)->Get(back.data(), back.size(), base).ok());
  EXPECT_EQ(back[5], 0xab);
  EXPECT_EQ(back[6], page[6]);
  // Out-of-range accesses are refused before they reach UCX.
  EXPECT_EQ((*peer)->Put(page.data(), page.size(), base + buf.size() - 10).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*peer)->Get(back.data(), 16, base - 16).code(), absl::StatusCode::kInvalidArgument);
}

// Client-server mode: the client connects to a listener by sockaddr; the listening side takes
// the endpoint it accepted from the client's address and moves bytes through it. Connection
// establishment needs a sockaddr transport (tcp); without one, ConnectTo fails with a clear error.
TEST(Ucx, ClientServerBySockaddr) {
  auto server = Worker::Create();
  auto client = Worker::Create();
  ASSERT_TRUE(server.ok() && client.ok());
  auto listen = (*server)->Listen("127.0.0.1:0");
  const char* tls = std::getenv("UCX_TLS");
  const bool has_tcp = !tls || std::string(tls).find("tcp") != std::string::npos;
  if (!has_tcp) {
    const bool ok = listen.ok() && (*client)->ConnectTo(*listen).ok();
    EXPECT_FALSE(ok) << "sockaddr connection without a sockaddr-capable transport";
    return;
  }
  ASSERT_TRUE(listen.ok()) << listen.status();
  auto local = (*client)->ConnectTo(*listen);
  ASSERT_TRUE(local.ok()) << local.status();
  auto region = (*client)->Allocate(1 << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  const uint64_t base = reinterpret_cast<uint64_t>((*region)->base());
  auto peer = (*server)->TakeAccepted(*local, (*region)->packed_rkey(), base, 1 << 20, std::chrono::seconds(5));
  ASSERT_TRUE(peer.ok()) << peer.status();
  std::vector<uint8_t> page(37376, 0x5a);
  ASSERT_TRUE((*peer)->Put(page.data(), page.size(), base + 4096).ok());
  ASSERT_TRUE((*peer)->Flush().ok());
  EXPECT_EQ(static_cast<uint8_t*>((*region)->base())[4096 + 100], 0x5a);
  EXPECT_EQ((*server)->TakeAccepted("10.9.9.9:1", "x", 0, 1, std::chrono::milliseconds(10)).status().code(),
            absl::StatusCode::kNotFound);
}

// Same node over shared memory, a peer's UCX-allocated region is mapped into this process
// (ucp_rkey_ptr), so memtier can copy pages into it on several threads; over tcp nothing is
// mapped and Put/Get are the way.
TEST(Ucx, SharedMemoryMapsThePeersAllocatedRegion) {
  auto server = Worker::Create();
  auto client = Worker::Create();
  ASSERT_TRUE(server.ok() && client.ok());
  constexpr uint64_t kBytes = 1 << 20;
  auto region = (*client)->Allocate(kBytes);
  ASSERT_TRUE(region.ok()) << region.status();
  const uint64_t base = reinterpret_cast<uint64_t>((*region)->base());
  auto peer = (*server)->Connect((*client)->address(), (*region)->packed_rkey(), base, kBytes);
  ASSERT_TRUE(peer.ok()) << peer.status();
  const char* tls = std::getenv("UCX_TLS");
  const bool shm = !tls || std::string(tls).find("posix") != std::string::npos || std::string(tls).find("sysv") != std::string::npos;
  uint8_t* mapped = (*peer)->Mapped(base + 4096, 37376);
  if (!shm) {
    EXPECT_EQ(mapped, nullptr) << "UCX_TLS=" << tls << " has no shared-memory transport";
    return;
  }
  ASSERT_NE(mapped, nullptr);
  std::vector<uint8_t> page(37376);
  std::iota(page.begin(), page.end(), 3);
  std::memcpy(mapped, page.data(), page.size());  // a plain copy lands in the peer's memory
  EXPECT_EQ(std::memcmp(static_cast<uint8_t*>((*region)->base()) + 4096, page.data(), page.size()), 0);
  static_cast<uint8_t*>((*region)->base())[kBytes - 1] = 0x77;  // and the peer's writes are seen here
  ASSERT_NE((*peer)->Mapped(base + kBytes - 1, 1), nullptr);
  EXPECT_EQ(*(*peer)->Mapped(base + kBytes - 1, 1), 0x77);
  // Ranges outside the region are never mapped.
  EXPECT_EQ((*peer)->Mapped(base + kBytes - 10, 37376), nullptr);
  EXPECT_EQ((*peer)->Mapped(base - 1, 1), nullptr);
}

// A process may end right after a peer connected, before any transfer (memtier shut down just
// after a client's Connect): the endpoints' wireup may still be in flight. Tearing down then must
// not abort (UCX 1.13 asserts in ucp_worker_destroy when a wireup reply arrives for an endpoint
// already closed); the worker drains its wireup before destroying. Either side first.
TEST(Ucx, TearingDownRightAfterConnectIsClean) {
  for (int i = 0; i < 40; ++i) {
    auto server = Worker::Create();
    auto client = Worker::Create();
    ASSERT_TRUE(server.ok() && client.ok());
    auto region = (*client)->Allocate(4096);
    ASSERT_TRUE(region.ok()) << region.status();
    const uint64_t base = reinterpret_cast<uint64_t>((*region)->base());
    auto peer = (*server)->Connect((*client)->address(), (*region)->packed_rkey(), base, 4096);
    ASSERT_TRUE(peer.ok()) << peer.status();
    peer->reset();
    region->reset();  // a region never outlives its worker
    if (i % 4 >= 2) {  // and a sockaddr connection the listening side never took (where the
                       // transports allow one: UCX_TLS with tcp)
      auto listening = (*server)->Listen("127.0.0.1:0");
      if (listening.ok()) (void)(*client)->ConnectTo(*listening);
    }
    if (i % 2) {
      server->reset();
      client->reset();
    } else {
      client->reset();
      server->reset();
    }
  }
}

// The copy pool runs every index exactly once, also for callers sharing it at the same time,
// and degrades to the caller's thread for tiny or single-threaded work.
TEST(CopyPoolTest, EveryIndexRunsOnceUnderConcurrentCallers) {
  for (int threads : {1, 3}) {
    CopyPool pool(threads);
    EXPECT_EQ(pool.threads(), threads);
    auto run = [&](size_t n, size_t min_per_range) {
      std::vector<std::atomic<int>> hits(n);
      pool.ForEach(n, [&](size_t i) { hits[i].fetch_add(1); }, min_per_range);
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n " << n << " i " << i;
    };
    std::vector<std::thread> callers;
    for (int c = 0; c < 4; ++c) callers.emplace_back([&, c] { for (size_t n : {0, 1, 5, 64, 1001}) run(n + c, 1 + c); });
    for (auto& t : callers) t.join();
  }
  std::atomic<int> other_threads{0};
  const auto me = std::this_thread::get_id();
  CopyPool(4).ForEach(3, [&](size_t) { other_threads += std::this_thread::get_id() != me; }, 4);
  EXPECT_EQ(other_threads.load(), 0) << "3 items at 4 per range stay on the caller";
}

TEST(Ucx, MalformedAddressesAndRkeysAreRejected) {
  auto w = Worker::Create();
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->Connect("xx", "rkey", 0, 10).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> buf(4096);
  auto region = (*w)->Map(buf.data(), buf.size());
  ASSERT_TRUE(region.ok());
  EXPECT_FALSE((*w)->Connect((*w)->address(), "", 0, 10).ok());
}

}  // namespace
}  // namespace flashmem::memtier::ucx
