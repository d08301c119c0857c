// The MemTier gRPC service: control over gRPC, page bytes over UCX (memtier reads committed
// pages from the client's registered buffer and writes recalled pages into it).
#pragma once

#include <cstdint>
#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "memtier.grpc.pb.h"
#include "memtier/store/page_store.h"
#include "memtier/transport/copy_pool.h"
#include "memtier/transport/ucx.h"

namespace flashmem::memtier {

struct ServiceLimits {
  uint32_t max_pages_per_request = 65536;
  uint64_t max_request_bytes = 1ull << 30;
};

class MemTierService final : public flashmem::v1::MemTier::Service {
 public:
  // `copies` moves page bytes where the client's buffer is mapped here (same node, shared memory).
  MemTierService(PageStore& store, ucx::Worker& worker, CopyPool& copies, uint64_t epoch, std::string ucx_listen = "",
                 ServiceLimits limits = {});

  uint64_t epoch() const { return epoch_; }
  uint64_t clients() const;
  // Pages held by unexpired leases (Locate with lease_ms > 0).
  uint64_t leased_pages() const;
  static constexpr uint32_t kMaxLeaseMs = 60000;
  // Called with (method, seconds) after every request (metrics); set before serving.
  void set_latency_observer(std::function<void(const std::string&, double)> f) { observe_ = std::move(f); }

  grpc::Status OpenSession(grpc::ServerContext*, const v1::SessionRequest*, v1::SessionResponse*) override;
  grpc::Status CloseSession(grpc::ServerContext*, const v1::SessionRequest*, v1::SessionResponse*) override;
  grpc::Status DropSession(grpc::ServerContext*, const v1::SessionRequest*, v1::SessionResponse*) override;
  grpc::Status GetEndpoint(grpc::ServerContext*, const v1::Empty*, v1::EndpointResponse*) override;
  grpc::Status Connect(grpc::ServerContext*, const v1::ConnectRequest*, v1::ConnectResponse*) override;
  grpc::Status Commit(grpc::ServerContext*, const v1::CommitRequest*, v1::CommitResponse*) override;
  grpc::Status Recall(grpc::ServerContext*, const v1::RecallRequest*, v1::RecallResponse*) override;
  grpc::Status Locate(grpc::ServerContext*, const v1::LocateRequest*, v1::LocateResponse*) override;
  grpc::Status Release(grpc::ServerContext*, const v1::ReleaseRequest*, v1::SessionResponse*) override;
  grpc::Status Prefetch(grpc::ServerContext*, const v1::PrefetchRequest*, v1::PrefetchResponse*) override;
  grpc::Status PutState(grpc::ServerContext*, const v1::PutStateRequest*, v1::SessionResponse*) override;
  grpc::Status GetState(grpc::ServerContext*, const v1::SessionRequest*, v1::GetStateResponse*) override;
  grpc::Status ListPages(grpc::ServerContext*, const v1::SessionRequest*, grpc::ServerWriter<v1::PageInfo>*) override;
  grpc::Status Stats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse*) override;

 private:
  struct Client {
    std::unique_ptr<ucx::Peer> peer;
    uint64_t base = 0, bytes = 0;
    absl::Mutex mu;  // one UCX transfer at a time per client endpoint
  };
  // The client of a data request, after epoch and identity checks.
  absl::StatusOr<std::shared_ptr<Client>> Authorize(uint64_t client_id, uint64_t epoch);
  absl::Status CheckSlots(const google::protobuf::RepeatedPtrField<v1::PageSlot>& pages, uint64_t session,
                          const Client& c, uint64_t* total) const;
  void DropClient(uint64_t client_id);
  // Leases: pinned RAM slots a same-node reader uses in place (PageStore::Pin), released by
  // Release or when their time is up (checked on every Locate and Release).
  struct Lease {
    uint64_t session = 0;
    std::vector<RamSlot> slots;
    std::chrono::steady_clock::time_point expires;
  };
  void ExpireLeases();
  // Moves a batch between local memory and the client's buffer: plain copies spread over the
  // copy pool where the buffer is mapped here, else one pipelined batch of UCX puts or gets
  // (followed, for puts, by a flush: the bytes are in place before the reply; holds c.mu).
  absl::Status Transfer(Client& c, std::span<const ucx::RmaOp> ops, bool put);
  // Reports the lifetime of a request to the latency observer.
  struct Timed {
    const MemTierService* svc;
    const char* method;
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    ~Timed() {
      if (svc->observe_) svc->observe_(method, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  };
  mutable absl::Mutex leases_mu_;
  absl::flat_hash_map<uint64_t, Lease> leases_ ABSL_GUARDED_BY(leases_mu_);
  uint64_t next_lease_ ABSL_GUARDED_BY(leases_mu_) = 0;
  std::function<void(const std::string&, double)> observe_;

  PageStore& store_;
  ucx::Worker& worker_;
  CopyPool& copies_;
  const uint64_t epoch_;
  const std::string ucx_listen_;
  const ServiceLimits limits_;
  mutable absl::Mutex mu_;
  uint64_t next_client_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, std::shared_ptr<Client>> clients_ ABSL_GUARDED_BY(mu_);
};

}  // namespace flashmem::memtier
