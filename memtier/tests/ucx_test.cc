// The UCX data plane between two real workers (run by ctest once with UCX_TLS=tcp over
// loopback and once with the shared-memory transports).
#include "memtier/transport/ucx.h"

#include <cstdlib>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"

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
