// The library workers use to talk to memtier: one registered buffer (UCX), commit of pages
// (synchronous or queued in the background), recall of a page set into caller buffers with the
// checksum verified after transfer, prefetch hints, state blobs, and reconnection with backoff
// when memtier restarts (stale epoch) or the endpoint fails. Every call returns absl::Status.
#pragma once

#include <grpcpp/security/credentials.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "memtier/store/page_key.h"

namespace flashmem::v1 {
class RecallRequest;
class RecallResponse;
class LocateResponse;
}  // namespace flashmem::v1

namespace flashmem::memtier {

class CopyPool;
class MappedChunks;
namespace ucx {
class Worker;
class Region;
}  // namespace ucx

struct MemTierClientOptions {
  std::string target = "127.0.0.1:7070";  // memtier's gRPC address
  uint64_t buffer_bytes = 64ull << 20;    // registered staging buffer (largest request)
  std::string name = "client";
  int reconnect_attempts = 8;             // per call, with exponential backoff
  std::chrono::milliseconds backoff_initial{50};
  std::chrono::milliseconds rpc_timeout{30000};
  // At Connect, how long to wait for memtier to accept connections (a worker may start before
  // it); 0: fail at once with the connection's error.
  std::chrono::milliseconds connect_wait{0};
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // null: plaintext (common/tls.h)
  // Threads that verify (and copy out) recalled pages; 0: CopyPool::DefaultThreads(2) — half
  // the cores, at most 8 (idle ones sleep; a node's clients rarely recall all at once).
  int copy_threads = 0;
  // Recall batches in flight at once, each in its own part of the buffer (buffer_bytes /
  // recall_in_flight): the next batch moves while one is verified, and the gRPC round trip
  // (~0.1-0.4 ms) is hidden. 1: one batch at a time.
  int recall_in_flight = 4;
  // How long memtier keeps the pages of one RecallLocalView batch leased if this client never
  // releases them (it dies mid-batch); released as soon as the batch is consumed. A consumer
  // slower than this makes the recall fail (ABORTED): the slots may have been reused under it.
  uint32_t lease_ms = 10000;
};

struct PageToCommit {
  PageKey key;
  std::span<const uint8_t> bytes;
};

struct PageToRecall {
  PageKey key;
  std::span<uint8_t> dst;  // at least the page's length
  uint32_t length = 0;     // filled by Recall
};

struct RemoteStats {
  uint64_t epoch = 0, pages_total = 0, pages_in_ram = 0, evictions = 0, promotions = 0, checksum_failures = 0;
  uint64_t ram_hits = 0, ram_misses = 0, pinned_bytes = 0;
};

class MemTierClient {
 public:
  static absl::StatusOr<std::unique_ptr<MemTierClient>> Connect(const MemTierClientOptions& options);
  ~MemTierClient();

  absl::Status OpenSession(uint64_t session);
  absl::Status CloseSession(uint64_t session);
  absl::Status DropSession(uint64_t session);
  // Durable when this returns OK (memtier's WAL has the pages).
  absl::Status Commit(uint64_t session, std::span<const PageToCommit> pages);
  // Queued commit (bounded queue: blocks when `max_queued` commits wait); the future carries
  // the commit's status. The bytes are copied before this returns.
  std::future<absl::Status> CommitAsync(uint64_t session, std::span<const PageToCommit> pages, size_t max_queued = 64);
  // Recalls pages into the callers' buffers, any number of them (in batches that fit the
  // registered buffer, pipelined); checksums verified after transfer (DATA_LOSS on mismatch).
  // INVALID_ARGUMENT when one page's buffer is larger than the registered buffer.
  absl::Status Recall(uint64_t session, std::span<PageToRecall> pages);
  // Zero-copy: the verified pages as views of the registered buffer, batch by batch (each page
  // given `room` bytes there, batches pipelined as in Recall). `consume(first, views)` gets the
  // views of keys[first, first + views.size()) as each batch lands, in landing order; they are
  // valid only during the call (that part of the buffer is reused after it returns). An error
  // from `consume` ends the recall with that error.
  using BatchConsumer = std::function<absl::Status(size_t first, std::span<const std::span<const uint8_t>> views)>;
  absl::Status RecallStream(uint64_t session, std::span<const PageKey> keys, uint32_t room, const BatchConsumer& consume);
  // Same-node fast path: maps memtier's RAM chunks (read-only) from its Unix socket.
  absl::Status AttachLocal(const std::string& shm_socket);
  // Recall by reading memtier's memory directly (after AttachLocal), any number of pages: they
  // are located in pieces, the next piece's Locate in flight while one is copied and verified on
  // the copy pool. Pages whose bytes fail the checksum (slot reused meanwhile) are recalled over
  // UCX instead; `fallbacks` counts those.
  absl::Status RecallLocal(uint64_t session, std::span<PageToRecall> pages, int* fallbacks = nullptr);
  // Zero-copy same-node recall: verified views of the pages in memtier's own memory (mapped by
  // AttachLocal), handed to `consume` batch by batch as in RecallStream. Each batch is leased while
  // it is consumed — memtier neither evicts nor reuses its slots — so the views hold the bytes that
  // were verified until `consume` returns (a GPU worker registers the mapping and DMAs from it:
  // one copy from memtier's memory). A checksum mismatch is corruption here, not a reused slot:
  // DATA_LOSS. RESOURCE_EXHAUSTED when memtier's RAM cannot hold a batch's pages at once.
  absl::Status RecallLocalView(uint64_t session, std::span<const PageKey> keys, const BatchConsumer& consume);
  bool has_local() const {
    absl::MutexLock l(&mu_);
    return local_ != nullptr;
  }
  absl::StatusOr<uint32_t> Prefetch(uint64_t session, std::span<const PageKey> ranked, uint32_t deadline_ms);
  absl::Status PutState(uint64_t session, uint64_t version, std::span<const uint8_t> blob);
  absl::StatusOr<std::pair<uint64_t, std::vector<uint8_t>>> GetState(uint64_t session);
  absl::StatusOr<RemoteStats> Stats();
  uint64_t epoch() const;
  // The memtier's store identity (ConnectResponse.store_id): which data directory holds the pages.
  std::string store_id() const;
  // The registered buffer's size: the most bytes one commit or recall may move.
  uint64_t buffer_bytes() const { return buffer_.size(); }
  int reconnects() const { return reconnects_; }

 private:
  explicit MemTierClient(const MemTierClientOptions& o);
  absl::Status Register();  // Connect RPC: (re)registers the buffer, learns the epoch
  // Runs `call` (given client id and epoch); on stale epoch / unavailable, reconnects with backoff.
  template <typename F>
  absl::Status WithReconnect(F&& call);
  template <typename Method>
  absl::Status SessionCall(Method method, uint64_t session, const char* what);
  void AsyncLoop();
  // What to do with a batch once memtier answered (the bytes are in the registered buffer).
  using Landed = std::function<absl::Status(const v1::RecallRequest&, const v1::RecallResponse&)>;
  using BatchLanded = std::function<absl::Status(size_t first, size_t last, const v1::RecallRequest&, const v1::RecallResponse&)>;
  // One request for pages laid out from the buffer's start, with reconnects. Holds mu_.
  absl::Status RecallOne(uint64_t session, std::span<const PageKey> keys, std::span<const uint32_t> rooms,
                         const Landed& landed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Any number of pages: batches of at most buffer / recall_in_flight bytes, that many in flight,
  // `landed` called for each batch [first, last) as it arrives. Holds mu_.
  absl::Status RecallPipelined(uint64_t session, std::span<const PageKey> keys, std::span<const uint32_t> rooms,
                               const BatchLanded& landed) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Locates `keys` in pieces (a quarter of them, 64 to 1,024 pages), the next piece's Locate in
  // flight while `handle(first, count, located)` runs for one; leased (lease_ms > 0) pieces are
  // released after their handle returns, whatever it returned. Holds mu_.
  using Located = std::function<absl::Status(size_t first, size_t count, const v1::LocateResponse&)>;
  absl::Status LocatePipelined(uint64_t session, std::span<const PageKey> keys, uint32_t lease_ms, const Located& handle)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks memtier's answer and verifies every page's checksum (spread over the copy pool),
  // copying each page to dsts[i] when dsts is not empty; views of the buffer out.
  absl::Status Deliver(const v1::RecallRequest& req, const v1::RecallResponse& resp, std::span<const PageKey> keys,
                       std::span<const uint32_t> rooms, std::span<PageToRecall> dsts,
                       std::vector<std::span<const uint8_t>>* views) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  MemTierClientOptions options_;
  struct Rpc;  // gRPC channel and stub (kept out of this header)
  std::unique_ptr<Rpc> rpc_;
  std::unique_ptr<ucx::Worker> worker_;
  std::span<uint8_t> buffer_;  // the registered buffer (owned by region_)
  std::unique_ptr<ucx::Region> region_;
  std::unique_ptr<MappedChunks> local_;
  std::unique_ptr<CopyPool> copies_;
  mutable absl::Mutex mu_;  // one request uses the buffer at a time
  uint64_t client_id_ = 0, epoch_ = 0;
  std::string store_id_;
  int reconnects_ = 0;
  // Background commits.
  struct Queued {
    uint64_t session;
    std::vector<PageKey> keys;
    std::vector<std::vector<uint8_t>> bytes;
    std::promise<absl::Status> done;
  };
  std::mutex qmu_;
  std::condition_variable qcv_;
  std::deque<Queued> queue_;
  bool stop_ = false;
  std::thread async_;
};

}  // namespace flashmem::memtier
