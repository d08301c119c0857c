// memtier end to end in one process: a real gRPC server on 127.0.0.1, real UCX (ctest runs this
// with UCX_TLS=tcp and with the shared-memory transports), real RocksDB in a temp dir, and the
// client library workers use.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "memtier.grpc.pb.h"
#include "memtier/client/memtier_client.h"
#include "memtier/server/memtier_server.h"
#include "memtier/server/memtier_service.h"
#include "memtier/transport/local_share.h"
#include "tests/process_util.h"
#include "memtier/transport/ucx.h"

namespace flashmem::memtier {
namespace {

constexpr size_t kMainPage = 64 * 584;
constexpr size_t kIndexPage = 64 * 132;

std::vector<uint8_t> PageBytes(const PageKey& k, size_t n) {
  std::mt19937_64 g(k.session * 1000003 + k.layer * 1009 + k.page);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(g());
  return b;
}

// A unary call with raw bytes (hostile payloads, services without generated stubs here).
std::pair<grpc::Status, std::string> RawUnary(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                                              const std::string& payload) {
  grpc::GenericStub generic(channel);
  grpc::Slice slice(payload);
  grpc::ByteBuffer in(&slice, 1), out;
  grpc::ClientContext ctx;
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  grpc::Status st;
  generic.UnaryCall(&ctx, method, grpc::StubOptions(), &in, &out, [&](grpc::Status s) {
    std::lock_guard<std::mutex> l(m);
    st = s;
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> l(m);
  cv.wait(l, [&] { return done; });
  std::string bytes;
  std::vector<grpc::Slice> slices;
  if (st.ok() && out.Dump(&slices).ok())
    for (auto& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  return {st, bytes};
}

class MemTierE2E : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(64ull << 20); }
  void TearDown() override {
    server_.reset();
    std::filesystem::remove_all(dir_);
  }
  std::string SocketPath() const { return dir_ + ".sock"; }
  void StartServer(uint64_t ram, int port = 0) {
    if (dir_.empty()) {
      dir_ = (std::filesystem::temp_directory_path() / ("fm_e2e_" + std::to_string(::getpid()) + "_" +
                                                         ::testing::UnitTest::GetInstance()->current_test_info()->name())).string();
      std::filesystem::remove_all(dir_);
    }
    MemTierServerOptions o;
    o.grpc_listen = "127.0.0.1:" + std::to_string(port);
    o.store.rocks.path = dir_;
    o.store.ram.capacity_bytes = ram;
    o.store.ram.chunk_bytes = 4ull << 20;
    if (with_metrics_) o.metrics_listen = "127.0.0.1:0";  // civetweb takes ~2 s to stop: only where tested
    o.shm_socket = SocketPath();
    o.copy_threads = kCopyThreads;
    auto s = MemTierServer::Start(o);
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  std::unique_ptr<MemTierClient> NewClient(const std::string& name, uint64_t buffer = 8ull << 20) {
    MemTierClientOptions o;
    o.target = server_->grpc_target();
    o.name = name;
    o.buffer_bytes = buffer;
    o.copy_threads = kCopyThreads;
    auto c = MemTierClient::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }
  static absl::Status CommitRange(MemTierClient& c, uint64_t session, uint32_t layer, uint32_t first, uint32_t n, size_t size) {
    std::vector<std::vector<uint8_t>> data;
    std::vector<PageToCommit> pages;
    for (uint32_t p = first; p < first + n; ++p) data.push_back(PageBytes({session, layer, p}, size));
    for (uint32_t i = 0; i < n; ++i) pages.push_back({{session, layer, first + i}, data[i]});
    return c.Commit(session, pages);
  }
  static void ExpectRange(MemTierClient& c, uint64_t session, uint32_t layer, uint32_t first, uint32_t n, size_t size) {
    std::vector<std::vector<uint8_t>> bufs(n, std::vector<uint8_t>(size));
    std::vector<PageToRecall> pages;
    for (uint32_t i = 0; i < n; ++i) pages.push_back({{session, layer, first + i}, bufs[i]});
    const absl::Status st = c.Recall(session, pages);
    ASSERT_TRUE(st.ok()) << st;
    for (uint32_t i = 0; i < n; ++i) {
      ASSERT_EQ(pages[i].length, size);
      ASSERT_EQ(bufs[i], PageBytes({session, layer, first + i}, size)) << "page " << first + i;
    }
  }
  // Copies and checksum passes spread over threads even on CI's 2 cores (the default there is 1).
  static constexpr int kCopyThreads = 3;
  std::string dir_;
  bool with_metrics_ = false;
  std::unique_ptr<MemTierServer> server_;
};

TEST_F(MemTierE2E, ThousandsOfPagesFromTwoConcurrentClientsRoundTrip) {
  auto work = [&](uint64_t session) {
    auto c = NewClient("c" + std::to_string(session));
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->OpenSession(session).ok());
    for (uint32_t b = 0; b < 40; ++b) {
      ASSERT_TRUE(CommitRange(*c, session, 0, b * 50, 50, kMainPage).ok());
      ASSERT_TRUE(CommitRange(*c, session, 1, b * 50, 50, kIndexPage).ok());
    }
    for (uint32_t b = 0; b < 40; ++b) {
      ExpectRange(*c, session, 0, b * 50, 50, kMainPage);
      ExpectRange(*c, session, 1, b * 50, 50, kIndexPage);
    }
  };
  std::thread a(work, 1), b(work, 2);
  a.join();
  b.join();
  EXPECT_EQ(server_->store().counters().pages_total, 8000u);
}

TEST_F(MemTierE2E, RamOverflowSpillsToRocksAndRecallBringsPagesBack) {
  server_.reset();
  StartServer(4ull << 20);  // ~100 main pages
  auto c = NewClient("spill");
  ASSERT_TRUE(c->OpenSession(3).ok());
  for (uint32_t b = 0; b < 8; ++b) ASSERT_TRUE(CommitRange(*c, 3, 0, b * 50, 50, kMainPage).ok());
  auto st = c->Stats();
  ASSERT_TRUE(st.ok());
  EXPECT_GT(st->evictions, 250u);
  EXPECT_LT(st->pages_in_ram, 400u);
  for (uint32_t b = 0; b < 8; ++b) ExpectRange(*c, 3, 0, b * 50, 50, kMainPage);
  st = c->Stats();
  EXPECT_GT(st->ram_misses, 0u);
  EXPECT_GT(st->promotions, 0u);
}

TEST_F(MemTierE2E, CorruptedPageIsDetectedOnRecallAndOthersKeepBeingServed) {
  auto c = NewClient("corrupt");
  ASSERT_TRUE(c->OpenSession(8).ok());
  ASSERT_TRUE(CommitRange(*c, 8, 0, 0, 4, kIndexPage).ok());
  ASSERT_TRUE(c->CloseSession(8).ok());
  auto bad = PageBytes({8, 0, 2}, kIndexPage);
  bad[7] ^= 1;
  ASSERT_TRUE(server_->store().rocks().CorruptPageForTesting({8, 0, 2}, bad).ok());
  std::vector<uint8_t> buf(kIndexPage);
  std::vector<PageToRecall> one = {{{8, 0, 2}, buf}};
  const absl::Status st = c->Recall(8, one);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_EQ(c->Stats()->checksum_failures, 1u);
  ExpectRange(*c, 8, 0, 0, 2, kIndexPage);
}

TEST_F(MemTierE2E, StateBlobsAreVersioned) {
  auto c = NewClient("state");
  ASSERT_TRUE(c->OpenSession(4).ok());
  EXPECT_EQ(c->GetState(4).status().code(), absl::StatusCode::kNotFound);
  std::vector<uint8_t> blob(300000, 7);
  ASSERT_TRUE(c->PutState(4, 1, blob).ok());
  blob[0] = 9;
  ASSERT_TRUE(c->PutState(4, 2, blob).ok());
  EXPECT_EQ(c->PutState(4, 2, blob).code(), absl::StatusCode::kAborted);  // a writer that is not the owner
  auto got = c->GetState(4);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->first, 2u);
  EXPECT_EQ(got->second, blob);
}

TEST_F(MemTierE2E, ClientReconnectsAfterMemtierRestartsWithoutLosingAckedPages) {
  auto c = NewClient("restart");
  ASSERT_TRUE(c->OpenSession(6).ok());
  ASSERT_TRUE(CommitRange(*c, 6, 0, 0, 30, kMainPage).ok());
  const uint64_t epoch = c->epoch();
  const int port = server_->grpc_port();
  server_.reset();
  StartServer(64ull << 20, port);
  ASSERT_TRUE(CommitRange(*c, 6, 0, 30, 30, kMainPage).ok());  // stale epoch -> reconnect -> retry
  EXPECT_NE(c->epoch(), epoch);
  EXPECT_GE(c->reconnects(), 1);
  ExpectRange(*c, 6, 0, 0, 60, kMainPage);
}

// A recall larger than the registered buffer is pipelined: batches of a quarter of the buffer,
// four in flight, each verified and copied out while the others move; after a restart the
// batches refused for the stale epoch are redone through the reconnecting path.
TEST_F(MemTierE2E, RecallsLargerThanTheBufferArePipelined) {
  auto c = NewClient("pipelined", 1 << 20);  // 28 main pages; parts of 7
  ASSERT_TRUE(c->OpenSession(11).ok());
  for (uint32_t b = 0; b < 12; ++b) ASSERT_TRUE(CommitRange(*c, 11, 0, b * 25, 25, kMainPage).ok());
  ExpectRange(*c, 11, 0, 0, 300, kMainPage);  // 43 batches
  ExpectRange(*c, 11, 0, 290, 10, kMainPage);
  // Zero-copy: every page handed over once, as a verified view, batch by batch.
  std::vector<PageKey> keys;
  for (uint32_t i = 0; i < 300; ++i) keys.push_back({11, 0, i});
  std::vector<int> seen(300, 0);
  ASSERT_TRUE(c->RecallStream(11, keys, kMainPage, [&](size_t first, std::span<const std::span<const uint8_t>> views) {
                 for (size_t i = 0; i < views.size(); ++i) {
                   ++seen[first + i];
                   const auto want = PageBytes(keys[first + i], kMainPage);
                   if (!std::equal(views[i].begin(), views[i].end(), want.begin(), want.end()))
                     return absl::InternalError(absl::StrCat("page ", first + i, " differs"));
                 }
                 return absl::OkStatus();
               }).ok());
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), 300);
  const absl::Status stop = c->RecallStream(11, keys, kMainPage, [](size_t first, auto) {
    return first >= 100 ? absl::CancelledError("enough") : absl::OkStatus();
  });
  EXPECT_EQ(stop.code(), absl::StatusCode::kCancelled) << stop;
  const uint64_t epoch = c->epoch();
  const int port = server_->grpc_port();
  server_.reset();
  StartServer(64ull << 20, port);
  ExpectRange(*c, 11, 0, 0, 300, kMainPage);  // every batch answered "stale epoch" or "unknown client" first
  EXPECT_NE(c->epoch(), epoch);
  EXPECT_GE(c->reconnects(), 1);
  // A page that could never fit is refused up front; a missing page fails the whole recall.
  std::vector<uint8_t> huge((1 << 20) + 1), buf(kMainPage);
  std::vector<PageToRecall> one = {{{11, 0, 1}, huge}};
  EXPECT_EQ(c->Recall(11, one).code(), absl::StatusCode::kInvalidArgument);
  std::vector<std::vector<uint8_t>> bufs(40, std::vector<uint8_t>(kMainPage));
  std::vector<PageToRecall> many;
  for (uint32_t i = 0; i < 40; ++i) many.push_back({{11, 0, i == 33 ? 9999u : i}, bufs[i]});
  EXPECT_EQ(c->Recall(11, many).code(), absl::StatusCode::kNotFound);
}

TEST_F(MemTierE2E, AsyncCommitsCompleteInOrderWithBackPressure) {
  auto c = NewClient("async");
  ASSERT_TRUE(c->OpenSession(2).ok());
  std::vector<std::future<absl::Status>> done;
  std::vector<std::vector<uint8_t>> data;
  for (uint32_t p = 0; p < 64; ++p) data.push_back(PageBytes({2, 5, p}, kIndexPage));
  for (uint32_t p = 0; p < 64; ++p) {
    PageToCommit one{{2, 5, p}, data[p]};
    done.push_back(c->CommitAsync(2, std::span<const PageToCommit>(&one, 1), 4));
  }
  for (auto& f : done) EXPECT_TRUE(f.get().ok());
  ExpectRange(*c, 2, 5, 0, 64, kIndexPage);
}

// Hostile requests straight at the gRPC service: clear errors, and the server keeps serving.
TEST_F(MemTierE2E, HostileRequestsGetClearErrorsAndTheServerKeepsServing) {
  auto good = NewClient("good");
  ASSERT_TRUE(good->OpenSession(1).ok());
  auto channel = grpc::CreateChannel(server_->grpc_target(), grpc::InsecureChannelCredentials());
  auto stub = v1::MemTier::NewStub(channel);
  // A raw client registration (its buffer is a real registered region of a second client).
  std::vector<uint8_t> buf(1 << 20);
  auto worker = ucx::Worker::Create();
  ASSERT_TRUE(worker.ok());
  auto region = (*worker)->Map(buf.data(), buf.size());
  ASSERT_TRUE(region.ok());
  v1::ConnectRequest creq;
  creq.set_worker_address((*worker)->address());
  creq.set_rkey((*region)->packed_rkey());
  creq.set_buffer_address(reinterpret_cast<uint64_t>(buf.data()));
  creq.set_buffer_bytes(buf.size());
  v1::ConnectResponse cresp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Connect(&ctx, creq, &cresp).ok());
  }
  auto commit = [&](v1::CommitRequest req) {
    v1::CommitResponse resp;
    grpc::ClientContext ctx;
    return stub->Commit(&ctx, req, &resp);
  };
  auto base = [&] {
    v1::CommitRequest r;
    r.set_client_id(cresp.client_id());
    r.set_epoch(cresp.epoch());
    r.set_session(1);
    auto* p = r.add_pages();
    p->mutable_id()->set_session(1);
    p->mutable_id()->set_page(1);
    p->set_offset(0);
    p->set_length(1000);
    p->set_checksum(PageChecksum(std::span<const uint8_t>(buf.data(), 1000)));
    return r;
  };
  auto expect = [](const grpc::Status& s, grpc::StatusCode code, const std::string& needle) {
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_NE(s.error_message().find(needle), std::string::npos) << s.error_message();
  };
  EXPECT_TRUE(commit(base()).ok());
  auto r = base();
  r.set_session(77);
  r.mutable_pages(0)->mutable_id()->set_session(77);
  expect(commit(r), grpc::StatusCode::NOT_FOUND, "unknown session 77");
  r = base();
  r.mutable_pages(0)->set_offset(buf.size() - 10);
  expect(commit(r), grpc::StatusCode::INVALID_ARGUMENT, "outside the registered buffer");
  r = base();
  r.mutable_pages(0)->set_length(0);
  expect(commit(r), grpc::StatusCode::INVALID_ARGUMENT, "pages[0].length 0");
  r = base();
  buf[0] ^= 1;  // same page id, other bytes
  r.mutable_pages(0)->set_checksum(PageChecksum(std::span<const uint8_t>(buf.data(), 1000)));
  expect(commit(r), grpc::StatusCode::ALREADY_EXISTS, "already committed");
  r = base();
  r.mutable_pages(0)->set_checksum(12345);
  expect(commit(r), grpc::StatusCode::DATA_LOSS, "checksum mismatch");
  r = base();
  for (int i = 0; i < 70000; ++i) *r.add_pages() = r.pages(0);
  expect(commit(r), grpc::StatusCode::INVALID_ARGUMENT, "exceed the limit");
  r = base();
  r.set_epoch(cresp.epoch() + 1);
  expect(commit(r), grpc::StatusCode::FAILED_PRECONDITION, "stale epoch");
  r = base();
  r.set_client_id(999);
  expect(commit(r), grpc::StatusCode::FAILED_PRECONDITION, "unknown client 999");
  {  // a malformed worker address / rkey at connect
    v1::ConnectRequest bad = creq;
    bad.set_worker_address("garbage");
    grpc::ClientContext ctx;
    EXPECT_EQ(stub->Connect(&ctx, bad, &cresp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Garbage protobuf bytes on the wire.
  EXPECT_FALSE(RawUnary(channel, "/flashmem.v1.MemTier/Commit", "\xff\xff\xff\xff\x0f garbage \x01\x02").first.ok());
  // The well-behaved client is still served.
  ASSERT_TRUE(CommitRange(*good, 1, 3, 0, 10, kIndexPage).ok());
  ExpectRange(*good, 1, 3, 0, 10, kIndexPage);
}

TEST_F(MemTierE2E, SameNodeClientsReadMemtierMemoryDirectly) {
  server_.reset();
  StartServer(4ull << 20);  // small: part of the pages live on disk only
  auto c = NewClient("local");
  ASSERT_TRUE(c->OpenSession(12).ok());
  for (uint32_t b = 0; b < 4; ++b) ASSERT_TRUE(CommitRange(*c, 12, 0, b * 50, 50, kMainPage).ok());
  ASSERT_TRUE(c->AttachLocal(SocketPath()).ok());
  for (uint32_t b = 0; b < 4; ++b) {
    std::vector<std::vector<uint8_t>> bufs(25, std::vector<uint8_t>(kMainPage));
    std::vector<PageToRecall> pages;
    for (uint32_t i = 0; i < 25; ++i) pages.push_back({{12, 0, b * 50 + i}, bufs[i]});
    int fallbacks = -1;
    const absl::Status st = c->RecallLocal(12, pages, &fallbacks);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(fallbacks, 0);
    for (uint32_t i = 0; i < 25; ++i) ASSERT_EQ(bufs[i], PageBytes({12, 0, b * 50 + i}, kMainPage));
  }
  EXPECT_GT(c->Stats()->promotions, 0u);  // pages on disk were promoted, then read in place
}

TEST_F(MemTierE2E, ALargeLocalRecallIsLocatedInPiecesAndStaysIntact) {
  server_.reset();
  StartServer(8ull << 20);  // ~220 main-KV pages: locating later pieces evicts earlier ones
  auto c = NewClient("local-large");
  ASSERT_TRUE(c->OpenSession(14).ok());
  constexpr uint32_t kPages = 600;  // pieces of 150 pages, two Locates in flight
  for (uint32_t b = 0; b < kPages; b += 100) ASSERT_TRUE(CommitRange(*c, 14, 0, b, 100, kMainPage).ok());
  ASSERT_TRUE(c->AttachLocal(SocketPath()).ok());
  std::vector<std::vector<uint8_t>> bufs(kPages, std::vector<uint8_t>(kMainPage));
  auto request = [&](uint32_t n) {
    std::vector<PageToRecall> pages;
    for (uint32_t i = 0; i < n; ++i) pages.push_back({{14, 0, i}, bufs[i]});
    return pages;
  };
  for (int round = 0; round < 2; ++round) {
    for (auto& b : bufs) std::fill(b.begin(), b.end(), 0);
    std::vector<PageToRecall> pages = request(kPages);
    int fallbacks = -1;
    const absl::Status st = c->RecallLocal(14, pages, &fallbacks);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_GE(fallbacks, 0);  // slots reused by a later piece's promotions come over UCX instead
    for (uint32_t i = 0; i < kPages; ++i) {
      ASSERT_EQ(pages[i].length, kMainPage) << i;
      ASSERT_EQ(bufs[i], PageBytes({14, 0, i}, kMainPage)) << "page " << i;
    }
  }
  {  // a missing page in the third piece: NOT_FOUND naming it, and the client keeps working
    std::vector<PageToRecall> pages = request(kPages);
    pages[350].key.page = 9999;
    const absl::Status st = c->RecallLocal(14, pages);
    EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
    EXPECT_NE(std::string(st.message()).find("9999"), std::string::npos) << st;
  }
  {  // a buffer too small for its page
    std::vector<PageToRecall> pages = request(200);
    pages[130].dst = pages[130].dst.subspan(0, 100);
    const absl::Status st = c->RecallLocal(14, pages);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  }
  std::vector<PageToRecall> pages = request(kPages);
  ASSERT_TRUE(c->RecallLocal(14, pages).ok());
  EXPECT_EQ(bufs[599], PageBytes({14, 0, 599}, kMainPage));
}

TEST_F(MemTierE2E, LeasedViewsOfMemtierMemoryHoldTheirBytesUntilConsumed) {
  server_.reset();
  StartServer(4ull << 20);  // ~100 main-KV pages: other sessions' commits evict
  auto c = NewClient("view");
  auto other = NewClient("pressure");
  ASSERT_TRUE(c->OpenSession(15).ok());
  ASSERT_TRUE(other->OpenSession(16).ok());
  constexpr uint32_t kPages = 60;
  ASSERT_TRUE(CommitRange(*c, 15, 0, 0, kPages, kMainPage).ok());
  ASSERT_TRUE(c->AttachLocal(SocketPath()).ok());
  std::vector<PageKey> keys;
  for (uint32_t i = 0; i < kPages; ++i) keys.push_back({15, 0, i});
  std::vector<int> seen(kPages, 0);
  bool pressed = false;
  absl::Status st = c->RecallLocalView(15, keys, [&](size_t first, std::span<const std::span<const uint8_t>> views) {
    EXPECT_GE(server_->service().leased_pages(), views.size());
    if (!pressed) {  // evict everything that is not leased: the views must keep their bytes
      pressed = true;
      EXPECT_TRUE(CommitRange(*other, 16, 0, 0, 150, kMainPage).ok());
      EXPECT_GT(server_->store().counters().evictions, 0u);
    }
    for (size_t i = 0; i < views.size(); ++i) {
      EXPECT_EQ(std::vector<uint8_t>(views[i].begin(), views[i].end()), PageBytes(keys[first + i], kMainPage)) << first + i;
      seen[first + i]++;
    }
    return absl::OkStatus();
  });
  ASSERT_TRUE(st.ok()) << st;
  for (uint32_t i = 0; i < kPages; ++i) EXPECT_EQ(seen[i], 1) << i;
  EXPECT_EQ(server_->service().leased_pages(), 0u);  // every batch released after it was consumed
  EXPECT_EQ(server_->store().pinned_slots(), 0u);
  // A consumer error ends the recall with it, and its batch is released all the same.
  st = c->RecallLocalView(15, keys, [](size_t, std::span<const std::span<const uint8_t>>) {
    return absl::CancelledError("consumer stops");
  });
  EXPECT_EQ(st.code(), absl::StatusCode::kCancelled) << st;
  for (int i = 0; i < 100 && server_->service().leased_pages() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(server_->service().leased_pages(), 0u);
  // A missing page: NOT_FOUND naming it, nothing left leased.
  std::vector<PageKey> missing = keys;
  missing[7].page = 4242;
  st = c->RecallLocalView(15, missing, [](size_t, std::span<const std::span<const uint8_t>>) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound) << st;
  EXPECT_NE(std::string(st.message()).find("4242"), std::string::npos) << st;
  EXPECT_EQ(server_->service().leased_pages(), 0u);

  {  // A consumer slower than the lease: ABORTED, never silently stale views.
    MemTierClientOptions o;
    o.target = server_->grpc_target();
    o.name = "slow";
    o.buffer_bytes = 1 << 20;
    o.lease_ms = 30;
    auto slow = MemTierClient::Connect(o);
    ASSERT_TRUE(slow.ok()) << slow.status();
    ASSERT_TRUE((*slow)->AttachLocal(SocketPath()).ok());
    st = (*slow)->RecallLocalView(15, std::span(keys).subspan(0, 4), [](size_t, std::span<const std::span<const uint8_t>>) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      return absl::OkStatus();
    });
    EXPECT_EQ(st.code(), absl::StatusCode::kAborted) << st;
    EXPECT_EQ(server_->service().leased_pages(), 0u);
  }

  // The wire: hostile lease requests, release of what is not held, and expiry.
  auto channel = grpc::CreateChannel(server_->grpc_target(), grpc::InsecureChannelCredentials());
  auto stub = v1::MemTier::NewStub(channel);
  auto locate = [&](uint32_t lease_ms, v1::LocateResponse* out) {
    v1::LocateRequest r;
    r.set_session(15);
    r.set_lease_ms(lease_ms);
    for (uint32_t i = 0; i < 5; ++i) {
      v1::PageId* id = r.add_pages();
      id->set_session(15);
      id->set_page(i);
    }
    grpc::ClientContext ctx;
    return stub->Locate(&ctx, r, out);
  };
  v1::LocateResponse resp;
  grpc::Status gs = locate(MemTierService::kMaxLeaseMs + 1, &resp);
  EXPECT_EQ(gs.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(gs.error_message().find("lease_ms"), std::string::npos) << gs.error_message();
  auto release = [&](uint64_t session, uint64_t lease) {
    v1::ReleaseRequest r;
    r.set_session(session);
    r.set_lease(lease);
    v1::SessionResponse out;
    grpc::ClientContext ctx;
    return stub->Release(&ctx, r, &out);
  };
  EXPECT_EQ(release(15, 12345).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(RawUnary(channel, "/flashmem.v1.MemTier/Release", "\xff\xff\xff\xff\x0f garbage \x01").first.ok());
  ASSERT_TRUE(locate(50, &resp).ok());
  ASSERT_NE(resp.lease(), 0u);
  EXPECT_EQ(server_->service().leased_pages(), 5u);
  EXPECT_EQ(release(16, resp.lease()).error_code(), grpc::StatusCode::NOT_FOUND);  // another session's id
  std::this_thread::sleep_for(std::chrono::milliseconds(120));
  ASSERT_TRUE(locate(0, &resp).ok());  // any Locate or Release ends the expired leases
  EXPECT_EQ(resp.lease(), 0u);
  EXPECT_EQ(server_->service().leased_pages(), 0u);
}

TEST_F(MemTierE2E, ALeaseLargerThanRamIsRefusedAndPinsNothing) {
  server_.reset();
  StartServer(2ull << 20);  // ~50 main-KV pages; a leased piece of 64 cannot be held at once
  auto c = NewClient("too-big");
  ASSERT_TRUE(c->OpenSession(17).ok());
  ASSERT_TRUE(CommitRange(*c, 17, 0, 0, 200, kMainPage).ok());
  ASSERT_TRUE(c->AttachLocal(SocketPath()).ok());
  std::vector<PageKey> keys;
  for (uint32_t i = 0; i < 200; ++i) keys.push_back({17, 0, i});
  const absl::Status st = c->RecallLocalView(17, keys, [](size_t, std::span<const std::span<const uint8_t>>) { return absl::OkStatus(); });
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
  EXPECT_EQ(server_->service().leased_pages(), 0u);
  EXPECT_EQ(server_->store().pinned_slots(), 0u);  // the pages pinned before the failing one were let go
  // The copy paths still deliver every page.
  ExpectRange(*c, 17, 0, 0, 200, kMainPage);
}

TEST_F(MemTierE2E, AReusedSlotFailsTheChecksumInsteadOfReturningAnotherPage) {
  server_.reset();
  StartServer(2ull << 20);
  auto c = NewClient("reuse");
  ASSERT_TRUE(c->OpenSession(13).ok());
  ASSERT_TRUE(CommitRange(*c, 13, 0, 0, 10, kMainPage).ok());
  auto loc = server_->store().Locate({13, 0, 0});
  ASSERT_TRUE(loc.ok());
  auto mapped = MappedChunks::Attach(SocketPath());
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  // Evict everything and fill RAM with other pages: page 0's slot now holds another page.
  ASSERT_TRUE(c->CloseSession(13).ok());
  ASSERT_TRUE(CommitRange(*c, 13, 1, 0, 45, kMainPage).ok());
  auto src = (*mapped)->Range(loc->slot.chunk, loc->slot.offset, loc->meta.length);
  ASSERT_TRUE(src.ok());
  EXPECT_NE(PageChecksum(std::span<const uint8_t>(*src, loc->meta.length)), loc->meta.checksum);
  // A fresh RecallLocal locates the page anew and returns its bytes.
  std::vector<uint8_t> buf(kMainPage);
  std::vector<PageToRecall> one = {{{13, 0, 0}, buf}};
  ASSERT_TRUE(c->AttachLocal(SocketPath()).ok());
  ASSERT_TRUE(c->RecallLocal(13, one).ok());
  EXPECT_EQ(buf, PageBytes({13, 0, 0}, kMainPage));
}

using flashmem::testing::HttpGet;

TEST_F(MemTierE2E, MetricsAndHealth) {
  with_metrics_ = true;
  server_.reset();
  StartServer(64ull << 20);
  auto c = NewClient("metrics");
  ASSERT_TRUE(c->OpenSession(1).ok());
  ASSERT_TRUE(CommitRange(*c, 1, 0, 0, 5, kIndexPage).ok());
  ASSERT_GT(server_->metrics_port(), 0);
  const std::string body = HttpGet(server_->metrics_port(), "/metrics");
  EXPECT_NE(body.find("flashmem_memtier_pages{tier=\"rocksdb\"} 5"), std::string::npos) << body;
  EXPECT_NE(body.find("flashmem_memtier_pages{tier=\"ram\"} 5"), std::string::npos);
  EXPECT_NE(body.find("flashmem_memtier_checksum_failures_total 0"), std::string::npos);
  EXPECT_NE(body.find("flashmem_memtier_pinned_bytes"), std::string::npos);
  EXPECT_NE(body.find("flashmem_memtier_leased_pages 0"), std::string::npos) << body;
  EXPECT_NE(body.find("flashmem_memtier_request_seconds_count{method=\"Commit\"} 1"), std::string::npos) << body;
  // grpc.health.v1.Health/Check with an empty request answers SERVING (field 1 = 1).
  auto channel = grpc::CreateChannel(server_->grpc_target(), grpc::InsecureChannelCredentials());
  auto [st, bytes] = RawUnary(channel, "/grpc.health.v1.Health/Check", std::string{});
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));
}

}  // namespace
}  // namespace flashmem::memtier
