// flashmem-memtier: the tiered KV page store service (one per node).
#include <csignal>
#include <cstdio>
#include <thread>

#include "CLI/CLI.hpp"
#include "common/tls.h"
#include "coordinator/lease_keeper.h"
#include "memtier/server/memtier_server.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {
flashmem::memtier::MemTierServer* g_server = nullptr;
void OnSignal(int) {
  if (g_server) std::thread([] { g_server->Shutdown(); }).detach();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flashmem-memtier: tiered KV page store (host RAM + RocksDB), UCX data plane, gRPC control"};
  flashmem::memtier::MemTierServerOptions o;
  o.store.ram.capacity_bytes = 1ull << 30;
  app.add_option("--grpc-listen", o.grpc_listen, "gRPC address host:port (port 0: any free port)");
  app.add_option("--ucx-listen", o.ucx_listen, "UCX listener host:port that clients connect to by sockaddr (port 0: any; empty: clients send worker addresses)");
  app.add_option("--metrics-listen", o.metrics_listen, "Prometheus /metrics address host:port (empty: off)");
  app.add_option("--shm-socket", o.shm_socket, "Unix socket that hands the RAM tier's memfd chunks to same-node clients (empty: off)");
  app.add_option("--data-dir", o.store.rocks.path, "RocksDB directory")->required();
  app.add_option("--ram-bytes", o.store.ram.capacity_bytes, "RAM tier capacity in bytes");
  app.add_option("--ram-chunk-bytes", o.store.ram.chunk_bytes, "RAM tier chunk size (at most 1 GiB)");
  app.add_flag("--sync-wal", o.store.rocks.sync_wal, "fsync the WAL before acknowledging a commit");
  app.add_option("--high-watermark", o.store.high_watermark, "evict above this fraction of --ram-bytes");
  app.add_option("--low-watermark", o.store.low_watermark, "evict down to this fraction");
  std::string coordinator_target;
  app.add_option("--coordinator", coordinator_target, "coordinator gRPC address: register as a memtier and keep a lease");
  flashmem::TlsOptions tls;
  flashmem::AddTlsFlags(app, tls, /*public_api=*/false);
  CLI11_PARSE(app, argc, argv);
  {
    auto creds = flashmem::MakeServerCredentials(tls);
    if (!creds.ok()) {
      std::fprintf(stderr, "flashmem-memtier: %s\n", std::string(creds.status().message()).c_str());
      return 1;
    }
    o.credentials = *creds;
  }
  // Logs go to stderr: stdout carries only the LISTENING line that scripts and tests read.
  spdlog::set_default_logger(spdlog::stderr_color_mt("memtier"));
  std::signal(SIGPIPE, SIG_IGN);
  auto server = flashmem::memtier::MemTierServer::Start(o);
  if (!server.ok()) {
    std::fprintf(stderr, "flashmem-memtier: %s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  g_server = server->get();
  std::unique_ptr<flashmem::coordinator::LeaseKeeper> lease;
  if (!coordinator_target.empty()) {
    auto creds = flashmem::MakeChannelCredentials(tls);
    auto k = creds.ok() ? flashmem::coordinator::LeaseKeeper::Start(coordinator_target, *creds, (*server)->grpc_target(),
                                                                     flashmem::v1::MEMTIER)
                        : absl::StatusOr<std::unique_ptr<flashmem::coordinator::LeaseKeeper>>(creds.status());
    if (!k.ok()) {
      std::fprintf(stderr, "flashmem-memtier: %s\n", std::string(k.status().message()).c_str());
      return 1;
    }
    lease = std::move(*k);
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  // Tests and scripts read the chosen port from this line.
  std::printf("LISTENING %s\n", (*server)->grpc_target().c_str());
  std::fflush(stdout);
  (*server)->Wait();
  lease.reset();
  return 0;
}
