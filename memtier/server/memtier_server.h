// A running memtier: PageStore + UCX worker + gRPC server (MemTier service and grpc.health.v1)
// + Prometheus /metrics. Used by the flashmem-memtier binary and by in-process tests.
#pragma once

#include <grpcpp/security/server_credentials.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "memtier/store/page_store.h"

namespace flashmem::memtier {

class MemTierService;

struct MemTierServerOptions {
  std::string grpc_listen = "127.0.0.1:7070";  // host:port; port 0 picks a free one
  std::string ucx_listen = "127.0.0.1:0";      // UCX listener (clients connect by sockaddr); empty: off
  std::string metrics_listen;                  // host:port for /metrics; empty: no exporter
  std::string shm_socket;                      // Unix socket serving the RAM chunks to local clients; empty: off
  PageStoreOptions store;
  // Threads that copy page bytes into and out of same-node clients' mapped buffers
  // (CopyPool::DefaultThreads(2): half the cores, at most 8).
  int copy_threads = 0;
  std::shared_ptr<grpc::ServerCredentials> credentials;  // null: plaintext (common/tls.h)
};

class MemTierServer {
 public:
  static absl::StatusOr<std::unique_ptr<MemTierServer>> Start(const MemTierServerOptions& options);
  ~MemTierServer();
  int grpc_port() const;
  int metrics_port() const;  // 0 when the exporter is off
  std::string grpc_target() const;
  uint64_t epoch() const;
  void Wait();
  void Shutdown();
  PageStore& store();
  MemTierService& service();

 private:
  struct Impl;
  explicit MemTierServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace flashmem::memtier
