// flashmem-coordinator: the public SessionService in front of the workers, worker registry with
// leases, placement, session table in RocksDB, failover.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <thread>

#include "CLI/CLI.hpp"
#include "common/cli_help.h"
#include "common/health_endpoint.h"
#include "common/metrics_server.h"
#include "common/tls.h"
#include "coordinator/coordinator.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {
grpc::Server* g_server = nullptr;
void OnSignal(int) {
  if (g_server) std::thread([] { g_server->Shutdown(); }).detach();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flashmem-coordinator"};
  std::string listen = "127.0.0.1:7060";
  flashmem::coordinator::CoordinatorOptions o;
  app.add_option("--listen", listen, "gRPC address host:port (public SessionService + worker registry)");
  app.add_option("--data-dir", o.data_dir, "RocksDB directory for the session table")->required();
  std::string metrics_listen;
  app.add_option("--metrics-listen", metrics_listen, "Prometheus /metrics address host:port (empty: off)");
  flashmem::TlsOptions tls;
  flashmem::AddTlsFlags(app, tls, /*public_api=*/true);
  std::string health_listen;
  flashmem::AddHealthFlag(app, health_listen);
  app.footer(flashmem::EnvironmentHelp({}));
  CLI11_PARSE(app, argc, argv);
  auto health_or = flashmem::HealthEndpoint::StartIfSet(health_listen);
  if (!health_or.ok()) {
    std::fprintf(stderr, "flashmem-coordinator: %s\n", std::string(health_or.status().message()).c_str());
    return 1;
  }
  const std::unique_ptr<flashmem::HealthEndpoint> health = std::move(*health_or);
  auto creds = flashmem::MakeTlsCredentials(tls);
  if (!creds.ok()) {
    std::fprintf(stderr, "flashmem-coordinator: %s\n", std::string(creds.status().message()).c_str());
    return 1;
  }
  o.worker_credentials = creds->channel;
  spdlog::set_default_logger(spdlog::stderr_color_mt("coordinator"));
  std::signal(SIGPIPE, SIG_IGN);
  auto c = flashmem::coordinator::Coordinator::Open(o);
  if (!c.ok()) {
    std::fprintf(stderr, "flashmem-coordinator: %s\n", std::string(c.status().message()).c_str());
    return 1;
  }
  // /metrics: sessions, workers, failovers and resume time, relayed appends/generates/tokens,
  // time to first token and between tokens as clients see them.
  std::unique_ptr<flashmem::MetricsServer> metrics;
  if (!metrics_listen.empty()) {
    auto m = flashmem::MetricsServer::Start(metrics_listen);
    if (!m.ok()) {
      std::fprintf(stderr, "flashmem-coordinator: %s\n", std::string(m.status().message()).c_str());
      return 1;
    }
    metrics = std::move(*m);
    auto& resume = metrics->LatencyHistogram("flashmem_coordinator_resume_seconds", "moving a session to another worker (lease wait + adoption)");
    auto& ttft = metrics->LatencyHistogram("flashmem_coordinator_time_to_first_token_seconds", "Generate: time to the first relayed token");
    auto& itl = metrics->LatencyHistogram("flashmem_coordinator_inter_token_seconds", "Generate: time between relayed tokens");
    (*c)->set_observers([&resume](double s) { resume.Observe(s); }, [&ttft](double s) { ttft.Observe(s); },
                        [&itl](double s) { itl.Observe(s); });
    auto gauge = [&](const char* name, const char* help) -> prometheus::Gauge& { return metrics->Gauge(name, help); };
    auto& sessions = gauge("flashmem_coordinator_sessions", "sessions in the session table");
    auto& workers = gauge("flashmem_coordinator_workers", "registered workers");
    auto& live = gauge("flashmem_coordinator_workers_live", "workers holding a lease");
    auto& memtiers = gauge("flashmem_coordinator_memtiers", "registered memtiers");
    auto& memtiers_live = gauge("flashmem_coordinator_memtiers_live", "memtiers holding a lease");
    auto& failovers = gauge("flashmem_coordinator_failovers", "sessions moved off a lost worker");
    auto& appends = gauge("flashmem_coordinator_appends", "appends relayed");
    auto& generates = gauge("flashmem_coordinator_generates", "generate streams started");
    auto& tokens = gauge("flashmem_coordinator_tokens", "tokens relayed to clients");
    metrics->RefreshEvery(std::chrono::milliseconds(200), [&, coord = c->get()] {
      const auto st = coord->stats();
      sessions.Set(static_cast<double>(st.sessions));
      workers.Set(static_cast<double>(st.workers));
      live.Set(static_cast<double>(st.workers_live));
      memtiers.Set(static_cast<double>(st.memtiers));
      memtiers_live.Set(static_cast<double>(st.memtiers_live));
      failovers.Set(static_cast<double>(st.failovers));
      appends.Set(static_cast<double>(st.appends));
      generates.Set(static_cast<double>(st.generates));
      tokens.Set(static_cast<double>(st.tokens));
    });
    std::printf("METRICS %d\n", metrics->port());
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(listen, creds->server, &port);
  b.RegisterService(static_cast<flashmem::v1::Coordinator::Service*>(c->get()));
  b.RegisterService(static_cast<flashmem::v1::SessionService::Service*>(c->get()));
  auto server = b.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "flashmem-coordinator: --listen %s: cannot listen\n", listen.c_str());
    return 1;
  }
  g_server = server.get();
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  if (health) health->SetServing(true);
  std::printf("LISTENING %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  std::fflush(stdout);
  server->Wait();
  if (health) health->SetServing(false);
  metrics.reset();
  return 0;
}
