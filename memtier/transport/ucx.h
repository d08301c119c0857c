// UCX data plane of memtier: one context + worker per process (thread mode MULTI), a progress
// thread that sleeps on the worker's event fd, memory regions mapped with ucp_mem_map and
// published as packed rkeys, and peers (endpoints created from a worker address exchanged over
// gRPC) that move bytes with ucp_put_nbx / ucp_get_nbx. Host memory only: neither this machine's
// UCX nor the GPU machine's has CUDA support (../shared/gpu/README.md).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

typedef struct ucp_context* ucp_context_h;
typedef struct ucp_worker* ucp_worker_h;
typedef struct ucp_ep* ucp_ep_h;
typedef struct ucp_mem* ucp_mem_h;
typedef struct ucp_rkey* ucp_rkey_h;
typedef struct ucp_listener* ucp_listener_h;
typedef struct ucp_conn_request* ucp_conn_request_h;

namespace flashmem::memtier::ucx {

class Worker;

// A local memory region registered with UCX; its packed rkey lets a peer read or write it.
class Region {
 public:
  ~Region();
  void* base() const { return base_; }
  uint64_t bytes() const { return bytes_; }
  const std::string& packed_rkey() const { return rkey_; }

 private:
  friend class Worker;
  Region() = default;
  ucp_context_h ctx_ = nullptr;
  ucp_mem_h memh_ = nullptr;
  void* base_ = nullptr;
  uint64_t bytes_ = 0;
  std::string rkey_;
};

// One transfer of a batch: local bytes <-> remote_addr.
struct RmaOp {
  void* local = nullptr;
  uint64_t bytes = 0;
  uint64_t remote_addr = 0;
};

// An endpoint to a remote worker plus the remote region it may access.
class Peer {
 public:
  ~Peer();
  // Posts every operation of the batch, then waits for all (pipelined, not one at a time).
  absl::Status PutBatch(std::span<const RmaOp> ops);
  absl::Status GetBatch(std::span<const RmaOp> ops);
  // Copies `bytes` between local memory and remote_addr (inside the remote region); blocks until
  // the operation completes. UNAVAILABLE when the endpoint has failed.
  absl::Status Put(const void* local, uint64_t bytes, uint64_t remote_addr);
  absl::Status Get(void* local, uint64_t bytes, uint64_t remote_addr);
  // Remote completion of every put so far.
  absl::Status Flush();
  bool failed() const { return failed_.load(); }
  uint64_t remote_base() const { return remote_base_; }
  uint64_t remote_bytes() const { return remote_bytes_; }
  // False on transports without peer-failure handling (shared memory).
  bool peer_failure_detection() const { return peer_failure_detection_; }
  // Same node, shared-memory transports: the remote region mapped into this process
  // (ucp_rkey_ptr), so its bytes can be written or read by plain copies on any thread, in
  // parallel. nullptr when the transport cannot map it (tcp, another node) or the range is
  // outside the region; callers then use Put/Get.
  uint8_t* Mapped(uint64_t remote_addr, uint64_t bytes) const;

 private:
  friend class Worker;
  Peer() = default;
  absl::Status Wait(void* request, const char* what);
  absl::Status Batch(std::span<const RmaOp> ops, bool put);
  absl::Status CheckRange(uint64_t remote_addr, uint64_t bytes) const;
  Worker* worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  ucp_rkey_h rkey_ = nullptr;
  uint64_t remote_base_ = 0, remote_bytes_ = 0;
  std::atomic<bool> failed_{false};
  bool peer_failure_detection_ = true;
  uint8_t* mapped_base_ = nullptr;  // ucp_rkey_ptr of remote_base_, when the transport maps it
  void MapRemote();
  static void OnError(void* arg, ucp_ep_h ep, int status);
};

class Worker {
 public:
  static absl::StatusOr<std::unique_ptr<Worker>> Create();
  ~Worker();

  const std::string& address() const { return address_; }
  absl::StatusOr<std::unique_ptr<Region>> Map(void* base, uint64_t bytes);
  // Memory UCX allocates itself (UCP_MEM_MAP_ALLOCATE): on the shared-memory transports a peer
  // reaches it directly (no active-message emulation), so buffers others read or write should
  // come from here.
  absl::StatusOr<std::unique_ptr<Region>> Allocate(uint64_t bytes);
  // Endpoint to the worker at `address` that may access [remote_base, remote_base + remote_bytes)
  // through `packed_rkey`. INVALID_ARGUMENT for a malformed address or rkey.
  absl::StatusOr<std::unique_ptr<Peer>> Connect(const std::string& address, const std::string& packed_rkey,
                                                uint64_t remote_base, uint64_t remote_bytes);

  // Client-server mode. Listen("host:port") accepts connections (port 0 picks one; the bound
  // address is returned); a client connects by sockaddr with ConnectTo and learns the local
  // address of its connection; the listening side then takes the endpoint it accepted from that
  // address, with the client's rkey and buffer, as a Peer.
  absl::StatusOr<std::string> Listen(const std::string& host_port);
  absl::StatusOr<std::string> ConnectTo(const std::string& host_port);  // returns the local "ip:port"
  absl::StatusOr<std::unique_ptr<Peer>> TakeAccepted(const std::string& client_address, const std::string& packed_rkey,
                                                     uint64_t remote_base, uint64_t remote_bytes,
                                                     std::chrono::milliseconds wait);
  void Progress();
  ucp_worker_h raw() const { return worker_; }

 private:
  Worker() = default;
  void ProgressLoop();
  static absl::Status PackRkey(ucp_context_h ctx, Region* r);
  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int event_fd_ = -1;
  std::string address_;
  std::atomic<bool> stop_{false};
  std::thread progress_;
  ucp_listener_h listener_ = nullptr;
  std::mutex accepted_mu_;
  std::map<std::string, ucp_ep_h> accepted_;     // client "ip:port" -> endpoint (listening side)
  std::vector<ucp_ep_h> outgoing_;               // client side: endpoints made by ConnectTo
  static void OnConnRequest(ucp_conn_request_h req, void* arg);
};

}  // namespace flashmem::memtier::ucx
