// flashmem-coordinator: the public SessionService in front of the workers, worker registry with
// leases, placement, session table in RocksDB, failover.
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <csignal>
#include <cstdio>
#include <thread>

#include "CLI/CLI.hpp"
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
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("coordinator"));
  std::signal(SIGPIPE, SIG_IGN);
  auto c = flashmem::coordinator::Coordinator::Open(o);
  if (!c.ok()) {
    std::fprintf(stderr, "flashmem-coordinator: %s\n", std::string(c.status().message()).c_str());
    return 1;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
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
  std::printf("LISTENING %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  std::fflush(stdout);
  server->Wait();
  return 0;
}
