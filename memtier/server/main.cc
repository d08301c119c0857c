// flashmem-memtier: the tiered KV page store service (one per node).
#include <csignal>
#include <cstdio>
#include <thread>

#include "CLI/CLI.hpp"
#include "common/cli_help.h"
#include "common/health_endpoint.h"
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
  std::string advertise_host, health_listen;
  app.add_option("--advertise-host", advertise_host, "host registered with the coordinator instead of --grpc-listen's (e.g. the pod's DNS name when listening on 0.0.0.0)");
  flashmem::AddHealthFlag(app, health_listen);
  app.add_option("--ucx-listen", o.ucx_listen, "UCX listener host:port that clients connect to by sockaddr (port 0: any; empty: clients send worker addresses)");
  app.add_option("--metrics-listen", o.metrics_listen, "Prometheus /metrics address host:port (empty: off)");
  app.add_option("--shm-socket", o.shm_socket, "Unix socket that hands the RAM tier's memfd chunks to same-node clients (empty: off)");
  app.add_option("--data-dir", o.store.rocks.path, "RocksDB directory")->required();
  app.add_option("--ram-bytes", o.store.ram.capacity_bytes, "RAM tier capacity in bytes");
  app.add_option("--ram-chunk-bytes", o.store.ram.chunk_bytes, "RAM tier chunk size (at most 1 GiB)");
  app.add_option("--copy-threads", o.copy_threads, "threads copying pages to and from same-node clients' buffers (0: half the cores, at most 8)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--sync-wal", o.store.rocks.sync_wal, "fsync the WAL before acknowledging a commit");
  app.add_option("--high-watermark", o.store.high_watermark, "evict above this fraction of --ram-bytes");
  app.add_option("--low-watermark", o.store.low_watermark, "evict down to this fraction");
  std::string coordinator_target;
  app.add_option("--coordinator", coordinator_target, "coordinator gRPC address: register as a memtier and keep a lease");
  double startup_wait_s = 60;
  app.add_option("--startup-wait-s", startup_wait_s, "at startup, how long to wait for the coordinator to accept connections (components start in any order)")
      ->check(CLI::NonNegativeNumber);
  flashmem::TlsOptions tls;
  flashmem::AddTlsFlags(app, tls, /*public_api=*/false);
  app.footer(flashmem::EnvironmentHelp({"UCX_*  UCX transport settings of the data plane (e.g. UCX_TLS, UCX_NET_DEVICES)"}));
  CLI11_PARSE(app, argc, argv);
  // Up first: NOT_SERVING while RocksDB opens and the page index is rebuilt.
  auto health_or = flashmem::HealthEndpoint::StartIfSet(health_listen);
  if (!health_or.ok()) {
    std::fprintf(stderr, "flashmem-memtier: %s\n", std::string(health_or.status().message()).c_str());
    return 1;
  }
  const std::unique_ptr<flashmem::HealthEndpoint> health = std::move(*health_or);
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
    std::string address = (*server)->grpc_target();
    if (!advertise_host.empty()) address = advertise_host + address.substr(address.rfind(':'));
    auto k = creds.ok() ? flashmem::coordinator::LeaseKeeper::Start(
                              coordinator_target, *creds, address, flashmem::v1::MEMTIER, nullptr,
                              std::chrono::milliseconds(static_cast<int64_t>(startup_wait_s * 1000)))
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
  if (health) health->SetServing(true);
  std::printf("LISTENING %s\n", (*server)->grpc_target().c_str());
  std::fflush(stdout);
  (*server)->Wait();
  if (health) health->SetServing(false);
  lease.reset();
  return 0;
}
