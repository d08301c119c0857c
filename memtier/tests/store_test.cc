// PageStore with a real RocksDB in a temp dir and a real memfd RAM tier.
#include "memtier/store/page_store.h"

#include <atomic>
#include <filesystem>
#include <random>
#include <thread>

#include "gtest/gtest.h"

namespace flashmem::memtier {
namespace {

constexpr size_t kMainPage = 64 * 584;   // CSA main-KV page: 37,376 B
constexpr size_t kIndexPage = 64 * 132;  // index-K page: 8,448 B

std::string TempDir(const std::string& name) {
  const auto p = std::filesystem::temp_directory_path() / ("fm_store_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  return p.string();
}

std::vector<uint8_t> PageBytes(const PageKey& k, size_t n) {
  std::mt19937_64 g(k.session * 1000003 + k.layer * 1009 + k.page);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(g());
  return b;
}

PageStoreOptions Options(const std::string& dir, uint64_t ram_bytes = 64ull << 20) {
  PageStoreOptions o;
  o.ram.capacity_bytes = ram_bytes;
  o.ram.chunk_bytes = 8ull << 20;
  o.rocks.path = dir;
  return o;
}

absl::Status CommitPages(PageStore& s, uint64_t session, uint32_t layer, uint32_t first, uint32_t count, size_t size) {
  std::vector<std::vector<uint8_t>> data;
  std::vector<PageWrite> w;
  for (uint32_t p = first; p < first + count; ++p) data.push_back(PageBytes({session, layer, p}, size));
  for (uint32_t i = 0; i < count; ++i) {
    const PageKey k{session, layer, first + i};
    w.push_back({k, data[i], PageChecksum(data[i])});
  }
  return s.Commit(session, w);
}

void ExpectPage(PageStore& s, const PageKey& k, size_t size) {
  std::vector<uint8_t> buf(size);
  auto m = s.Recall(k, buf);
  ASSERT_TRUE(m.ok()) << ToString(k) << ": " << m.status();
  ASSERT_EQ(m->length, size);
  EXPECT_EQ(buf, PageBytes(k, size)) << ToString(k);
}

TEST(PageStore, ThousandsOfPagesFromTwoConcurrentWritersRoundTrip) {
  const std::string dir = TempDir("rt");
  auto s = PageStore::Open(Options(dir, 512ull << 20));
  ASSERT_TRUE(s.ok()) << s.status();
  PageStore& st = **s;
  ASSERT_TRUE(st.OpenSession(1).ok());
  ASSERT_TRUE(st.OpenSession(2).ok());
  auto writer = [&](uint64_t session) {
    for (uint32_t batch = 0; batch < 50; ++batch) {
      ASSERT_TRUE(CommitPages(st, session, 0, batch * 20, 20, kMainPage).ok());
      ASSERT_TRUE(CommitPages(st, session, 1, batch * 20, 20, kIndexPage).ok());
    }
  };
  std::thread a(writer, 1), b(writer, 2);
  a.join();
  b.join();
  for (uint64_t session : {1, 2})
    for (uint32_t p = 0; p < 1000; p += 7) {
      ExpectPage(st, {session, 0, p}, kMainPage);
      ExpectPage(st, {session, 1, p}, kIndexPage);
    }
  EXPECT_EQ(st.counters().pages_total, 4000u);
  auto list = st.ListPages(2);
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 2000u);
  std::filesystem::remove_all(dir);
}

TEST(PageStore, RamOverflowSpillsToRocksAndRecallPromotes) {
  const std::string dir = TempDir("spill");
  auto s = PageStore::Open(Options(dir, 4ull << 20));  // room for ~100 main pages
  ASSERT_TRUE(s.ok());
  PageStore& st = **s;
  ASSERT_TRUE(st.OpenSession(7).ok());
  ASSERT_TRUE(CommitPages(st, 7, 3, 0, 400, kMainPage).ok());
  auto c = st.counters();
  EXPECT_GT(c.evictions, 250u);
  EXPECT_LE(st.ram_stats().used_bytes, 4ull << 20);
  EXPECT_LT(c.pages_in_ram, 400u);
  for (uint32_t p = 0; p < 400; ++p) ExpectPage(st, {7, 3, p}, kMainPage);
  c = st.counters();
  EXPECT_GT(c.ram_misses, 0u);
  EXPECT_GT(c.promotions, 0u);
  EXPECT_LE(st.ram_stats().mapped_bytes, (4ull << 20) + (8ull << 20));  // chunks, never one huge block
  std::filesystem::remove_all(dir);
}

// Promotions read RocksDB with the store's lock released: several threads recalling, locating
// and prefetching the same spilled pages at once (the same page promoted by two of them, pages
// evicted and promoted again under them, a session dropped meanwhile) get every page intact or a
// clear NOT_FOUND for the dropped one, never wrong bytes.
TEST(PageStore, ConcurrentPromotionsOfTheSamePagesStayCorrect) {
  const std::string dir = TempDir("concurrent_promote");
  auto s = PageStore::Open(Options(dir, 4ull << 20));  // ~100 main pages in RAM
  ASSERT_TRUE(s.ok());
  PageStore& st = **s;
  ASSERT_TRUE(st.OpenSession(1).ok());
  ASSERT_TRUE(st.OpenSession(2).ok());
  ASSERT_TRUE(CommitPages(st, 1, 0, 0, 300, kMainPage).ok());
  ASSERT_TRUE(CommitPages(st, 2, 0, 0, 100, kMainPage).ok());
  std::atomic<int> bad{0}, recalled{0};
  auto reader = [&](int seed) {
    std::mt19937 g(seed);
    std::vector<uint8_t> buf(kMainPage);
    for (int i = 0; i < 400; ++i) {
      const PageKey k{1, 0, static_cast<uint32_t>(g() % 300)};
      if (i % 3 == 0) {
        auto loc = st.Locate(k);
        if (!loc.ok() && !absl::IsResourceExhausted(loc.status())) bad++;
        continue;
      }
      auto m = st.Recall(k, buf);
      if (!m.ok() || buf != PageBytes(k, kMainPage)) bad++;
      else recalled++;
    }
  };
  auto prefetcher = [&] {
    for (int round = 0; round < 20; ++round) {
      std::vector<PageKey> ranked;
      for (uint32_t p = 0; p < 60; ++p) ranked.push_back({1, 0, (p * 7 + static_cast<uint32_t>(round) * 13) % 300});
      if (!st.Prefetch(1, ranked, std::chrono::steady_clock::now() + std::chrono::seconds(5)).ok()) bad++;
    }
  };
  auto dropper = [&] {
    std::vector<uint8_t> buf(kMainPage);
    for (uint32_t p = 0; p < 50; ++p) (void)st.Recall({2, 0, p}, buf);
    EXPECT_TRUE(st.DropSession(2).ok());
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(reader, t);
  threads.emplace_back(prefetcher);
  threads.emplace_back(dropper);
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(recalled.load(), 0);
  EXPECT_GT(st.counters().promotions, 0u);
  std::vector<uint8_t> buf(kMainPage);
  EXPECT_TRUE(absl::IsNotFound(st.Recall({2, 0, 3}, buf).status()));
  for (uint32_t p = 0; p < 300; p += 11) ExpectPage(st, {1, 0, p}, kMainPage);
  EXPECT_LE(st.ram_stats().used_bytes, 4ull << 20);
  std::filesystem::remove_all(dir);
}

TEST(PageStore, RestartRebuildsTheIndexFromRocks) {
  const std::string dir = TempDir("restart");
  {
    auto s = PageStore::Open(Options(dir));
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE((*s)->OpenSession(5).ok());
    ASSERT_TRUE(CommitPages(**s, 5, 2, 0, 50, kMainPage).ok());
    ASSERT_TRUE((*s)->PutState(5, 3, std::vector<uint8_t>{1, 2, 3}).ok());
  }
  auto s = PageStore::Open(Options(dir));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE((*s)->HasSession(5));
  EXPECT_EQ((*s)->counters().pages_total, 50u);
  EXPECT_EQ((*s)->counters().pages_in_ram, 0u);
  for (uint32_t p = 0; p < 50; ++p) ExpectPage(**s, {5, 2, p}, kMainPage);
  auto state = (*s)->GetState(5);
  ASSERT_TRUE(state.ok());
  EXPECT_EQ(state->version, 3u);
  EXPECT_EQ(state->bytes, (std::vector<uint8_t>{1, 2, 3}));
  // Versions only go up, across restarts too: a writer that is not the current owner is refused.
  EXPECT_EQ((*s)->PutState(5, 3, std::vector<uint8_t>{9}).code(), absl::StatusCode::kAborted);
  EXPECT_EQ((*s)->PutState(5, 2, std::vector<uint8_t>{9}).code(), absl::StatusCode::kAborted);
  EXPECT_TRUE((*s)->PutState(5, 4, std::vector<uint8_t>{9}).ok());
  std::filesystem::remove_all(dir);
}

TEST(PageStore, CorruptedBytesAreDetectedOnRecallAndNeverReturned) {
  const std::string dir = TempDir("corrupt");
  auto s = PageStore::Open(Options(dir));
  ASSERT_TRUE(s.ok());
  PageStore& st = **s;
  ASSERT_TRUE(st.OpenSession(9).ok());
  ASSERT_TRUE(CommitPages(st, 9, 0, 0, 3, kIndexPage).ok());
  ASSERT_TRUE(st.CloseSession(9).ok());  // RAM copies gone: the next recall reads RocksDB
  std::vector<uint8_t> bad = PageBytes({9, 0, 1}, kIndexPage);
  bad[100] ^= 0x40;
  ASSERT_TRUE(st.rocks().CorruptPageForTesting({9, 0, 1}, bad).ok());
  std::vector<uint8_t> buf(kIndexPage, 0);
  auto r = st.Recall({9, 0, 1}, buf);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_EQ(buf, std::vector<uint8_t>(kIndexPage, 0));  // nothing copied
  EXPECT_EQ(st.counters().checksum_failures, 1u);
  auto list = st.ListPages(9);
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE((*list)[1].bad);
  EXPECT_EQ(st.Recall({9, 0, 1}, buf).status().code(), absl::StatusCode::kDataLoss);  // marked bad
  ExpectPage(st, {9, 0, 0}, kIndexPage);  // the others are intact
  std::filesystem::remove_all(dir);
}

TEST(PageStore, HostileCommitsGetClearErrors) {
  const std::string dir = TempDir("hostile");
  auto s = PageStore::Open(Options(dir));
  ASSERT_TRUE(s.ok());
  PageStore& st = **s;
  std::vector<uint8_t> b = PageBytes({1, 0, 0}, 100);
  const PageWrite good{{1, 0, 0}, b, PageChecksum(b)};
  EXPECT_EQ(st.Commit(1, std::vector<PageWrite>{good}).code(), absl::StatusCode::kNotFound);  // unknown session
  ASSERT_TRUE(st.OpenSession(1).ok());
  PageWrite wrong_sum = good;
  wrong_sum.checksum ^= 1;
  auto e = st.Commit(1, std::vector<PageWrite>{wrong_sum});
  EXPECT_EQ(e.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(e.message()).find("checksum mismatch"), std::string::npos);
  PageWrite empty{{1, 0, 1}, {}, 0};
  EXPECT_EQ(st.Commit(1, std::vector<PageWrite>{empty}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.Commit(1, std::vector<PageWrite>{good, good}).code(), absl::StatusCode::kInvalidArgument);
  PageWrite other{{2, 0, 0}, b, PageChecksum(b)};
  EXPECT_EQ(st.Commit(1, std::vector<PageWrite>{other}).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(st.Commit(1, std::vector<PageWrite>{good}).ok());
  EXPECT_TRUE(st.Commit(1, std::vector<PageWrite>{good}).ok());  // idempotent retry of the same bytes
  std::vector<uint8_t> b2 = b;
  b2[0] ^= 1;
  auto dup = st.Commit(1, std::vector<PageWrite>{{{1, 0, 0}, b2, PageChecksum(b2)}});
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists) << dup;
  std::vector<uint8_t> small(10);
  EXPECT_EQ(st.Recall({1, 0, 0}, small).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.Recall({1, 0, 99}, small).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(st.counters().pages_total, 1u);
  std::filesystem::remove_all(dir);
}

TEST(PageStore, EvictionKeepsRankedPagesAndPrefetchPromotesInRankOrder) {
  const std::string dir = TempDir("rank");
  auto s = PageStore::Open(Options(dir, 2ull << 20));  // ~50 main pages
  ASSERT_TRUE(s.ok());
  PageStore& st = **s;
  ASSERT_TRUE(st.OpenSession(4).ok());
  ASSERT_TRUE(CommitPages(st, 4, 0, 0, 40, kMainPage).ok());
  // Rank pages 0..9 (oldest) as needed soon, then write 40 more: the ranked ones must survive.
  std::vector<PageKey> ranked;
  for (uint32_t p = 0; p < 10; ++p) ranked.push_back({4, 0, p});
  ASSERT_TRUE(st.Prefetch(4, ranked, std::chrono::steady_clock::now() + std::chrono::seconds(5)).ok());
  ASSERT_TRUE(CommitPages(st, 4, 0, 40, 40, kMainPage).ok());
  auto list = st.ListPages(4);
  ASSERT_TRUE(list.ok());
  for (uint32_t p = 0; p < 10; ++p) EXPECT_TRUE((*list)[p].in_ram) << p;
  EXPECT_GT(st.counters().evictions, 0u);
  int evicted_unranked = 0;
  for (uint32_t p = 10; p < 40; ++p) evicted_unranked += !(*list)[p].in_ram;
  EXPECT_GT(evicted_unranked, 0);
  // Prefetch of evicted pages promotes them from RocksDB, in rank order.
  std::vector<PageKey> want = {{4, 0, 15}, {4, 0, 12}, {4, 0, 11}};
  auto n = st.Prefetch(4, want, std::chrono::steady_clock::now() + std::chrono::seconds(5));
  ASSERT_TRUE(n.ok());
  list = st.ListPages(4);
  for (const PageKey& k : want) EXPECT_TRUE((*list)[k.page].in_ram) << k.page;
  // A deadline in the past promotes nothing.
  ASSERT_TRUE(st.CloseSession(4).ok());
  n = st.Prefetch(4, want, std::chrono::steady_clock::now() - std::chrono::seconds(1));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0);
  std::filesystem::remove_all(dir);
}

TEST(PageStore, APinnedSlotIsNeitherFreedNorReusedUntilUnpinned) {
  const std::string dir = TempDir("pin");
  auto s = PageStore::Open(Options(dir, 2ull << 20));  // ~50 main pages
  ASSERT_TRUE(s.ok());
  PageStore& st = **s;
  ASSERT_TRUE(st.OpenSession(3).ok());
  ASSERT_TRUE(CommitPages(st, 3, 0, 0, 10, kMainPage).ok());
  auto pin = st.Pin({3, 0, 4});
  ASSERT_TRUE(pin.ok()) << pin.status();
  const auto expect = PageBytes({3, 0, 4}, kMainPage);
  ASSERT_TRUE(std::equal(expect.begin(), expect.end(), pin->data));
  ASSERT_TRUE(st.CloseSession(3).ok());                       // releases every RAM copy...
  ASSERT_TRUE(CommitPages(st, 3, 1, 0, 45, kMainPage).ok());  // ...and RAM fills with other pages
  EXPECT_TRUE(std::equal(expect.begin(), expect.end(), pin->data));  // the pinned slot kept its bytes
  const uint64_t used = st.ram_stats().used_bytes;
  st.Unpin(pin->slot);
  EXPECT_EQ(st.ram_stats().used_bytes, used - RamTier::SizeClass(kMainPage));  // freed at unpin
  ExpectPage(st, {3, 0, 4}, kMainPage);
  std::filesystem::remove_all(dir);
}

// On a GPU machine every chunk is registered with cudaHostRegister (pinned); skipped, never
// faked, where there is no CUDA device (CI).
TEST(RamTier, PinsChunksWhenACudaDeviceIsPresent) {
  std::string why;
  if (!RamTier::PinningAvailable(&why)) GTEST_SKIP() << why;
  RamTierOptions o;
  o.capacity_bytes = 64ull << 20;
  o.chunk_bytes = 16ull << 20;
  auto ram = RamTier::Create(o);
  ASSERT_TRUE(ram.ok());
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE((*ram)->Allocate(kMainPage).ok());
  const RamTierStats st = (*ram)->stats();
  std::printf("chunks %llu, mapped %llu B, pinned %llu B in %.4f s\n", (unsigned long long)st.chunks,
              (unsigned long long)st.mapped_bytes, (unsigned long long)st.pinned_bytes, st.pin_seconds);
  EXPECT_GE(st.chunks, 2u);
  EXPECT_EQ(st.pinned_bytes, st.mapped_bytes);
  EXPECT_GT(st.pin_seconds, 0.0);
}

TEST(PageStore, DropSessionRemovesItsKeyRangeOnly) {
  const std::string dir = TempDir("drop");
  {
    auto s = PageStore::Open(Options(dir));
    ASSERT_TRUE(s.ok());
    for (uint64_t id : {10, 11}) {
      ASSERT_TRUE((*s)->OpenSession(id).ok());
      ASSERT_TRUE(CommitPages(**s, id, 0, 0, 20, kIndexPage).ok());
    }
    ASSERT_TRUE((*s)->DropSession(10).ok());
    EXPECT_EQ((*s)->Commit(10, {}).code(), absl::StatusCode::kNotFound);
  }
  auto s = PageStore::Open(Options(dir));
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE((*s)->HasSession(10));
  EXPECT_EQ((*s)->counters().pages_total, 20u);
  ExpectPage(**s, {11, 0, 19}, kIndexPage);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::memtier
