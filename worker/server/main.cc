// flashmem-worker: hosts the decode engine and serves the public SessionService (single-node
// serving; the coordinator, memtier commits and failover come with the rest of issue 4).
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "CLI/CLI.hpp"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "coordinator.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "worker/server/session_service.h"

namespace {
grpc::Server* g_server = nullptr;
void OnSignal(int) {
  if (g_server) std::thread([] { g_server->Shutdown(); }).detach();
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flashmem-worker: DeepSeek-V4 decode engine behind the public SessionService"};
  std::string listen = "127.0.0.1:7080", model_dir;
  flashmem::server::SchedulerOptions so;
  flashmem::server::SessionServiceOptions svo;
  app.add_option("--listen", listen, "gRPC address host:port (port 0: any free port)");
  app.add_option("--model", model_dir, "model directory (config.json, safetensors, tokenizer.json)")->required();
  app.add_option("--max-sessions", so.max_sessions, "sessions held at once");
  app.add_option("--prefill-chunk", so.prefill_chunk, "prompt tokens per forward pass of one session");
  app.add_option("--step-token-budget", so.step_token_budget, "prompt tokens per forward pass across sessions");
  app.add_option("--max-context", so.max_context, "tokens per session");
  std::string memtier_target, coordinator_target, metrics_listen;
  app.add_option("--metrics-listen", metrics_listen, "Prometheus /metrics address host:port (empty: off)");
  app.add_option("--coordinator", coordinator_target, "coordinator gRPC address: register and keep a lease with heartbeats");
  app.add_option("--memtier", memtier_target, "memtier gRPC address: sessions are snapshotted there and can be adopted by another worker");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("worker"));
  std::signal(SIGPIPE, SIG_IGN);
  auto model = flashmem::model::Transformer::Load(model_dir, flashmem::kernels::CpuBackend());
  if (!model.ok()) {
    std::fprintf(stderr, "flashmem-worker: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<flashmem::tokenizer::Tokenizer> tok;
  if (std::filesystem::exists(model_dir + "/tokenizer.json")) {
    auto t = flashmem::tokenizer::Tokenizer::Load(model_dir);
    if (!t.ok()) {
      std::fprintf(stderr, "flashmem-worker: %s\n", std::string(t.status().message()).c_str());
      return 1;
    }
    tok = std::move(*t);
  }
  svo.max_prompt_tokens = so.max_context;
  std::unique_ptr<flashmem::memtier::MemTierClient> memtier;
  if (!memtier_target.empty()) {
    flashmem::memtier::MemTierClientOptions mo;
    mo.target = memtier_target;
    mo.buffer_bytes = 1 << 20;
    mo.name = "worker";
    auto m = flashmem::memtier::MemTierClient::Connect(mo);
    if (!m.ok()) {
      std::fprintf(stderr, "flashmem-worker: --memtier %s: %s\n", memtier_target.c_str(), std::string(m.status().message()).c_str());
      return 1;
    }
    memtier = std::move(*m);
  }
  flashmem::server::Scheduler scheduler(**model, so);
  flashmem::server::SessionServiceImpl service(scheduler, tok.get(), (*model)->args().vocab_size, svo, memtier.get());
  flashmem::server::WorkerAdminImpl admin(service);
  // /metrics: sessions, tokens, steps, batch size, time to first token and between tokens.
  std::unique_ptr<prometheus::Exposer> exposer;
  auto registry = std::make_shared<prometheus::Registry>();
  std::atomic<bool> metrics_stop{false};
  std::thread metrics_thread;
  if (!metrics_listen.empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(metrics_listen);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "flashmem-worker: --metrics-listen %s: %s\n", metrics_listen.c_str(), e.what());
      return 1;
    }
    const prometheus::Histogram::BucketBoundaries buckets = {0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30};
    auto& ttft = prometheus::BuildHistogram().Name("flashmem_worker_time_to_first_token_seconds")
                     .Help("Generate: time to the first token").Register(*registry).Add({}, buckets);
    auto& itl = prometheus::BuildHistogram().Name("flashmem_worker_inter_token_seconds")
                    .Help("Generate: time between tokens").Register(*registry).Add({}, buckets);
    service.set_latency_observers([&ttft](double s) { ttft.Observe(s); }, [&itl](double s) { itl.Observe(s); });
    auto& sessions = prometheus::BuildGauge().Name("flashmem_worker_sessions").Help("sessions held").Register(*registry).Add({});
    auto& batch = prometheus::BuildGauge().Name("flashmem_worker_max_batch_rows").Help("largest forward pass (rows)").Register(*registry).Add({});
    auto& tokens = prometheus::BuildGauge().Name("flashmem_worker_tokens").Help("tokens run through the model, by kind").Register(*registry);
    auto& prefill = tokens.Add({{"kind", "prefill"}});
    auto& decode = tokens.Add({{"kind", "decode"}});
    auto& steps = prometheus::BuildGauge().Name("flashmem_worker_steps").Help("forward passes").Register(*registry).Add({});
    exposer->RegisterCollectable(registry);
    metrics_thread = std::thread([&] {
      while (!metrics_stop.load()) {
        const auto st = scheduler.stats();
        sessions.Set(static_cast<double>(scheduler.sessions()));
        batch.Set(static_cast<double>(st.max_batch_rows));
        prefill.Set(static_cast<double>(st.prefill_tokens));
        decode.Set(static_cast<double>(st.decode_tokens));
        steps.Set(static_cast<double>(st.steps));
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    });
    std::printf("METRICS %d\n", exposer->GetListeningPorts().front());
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  b.RegisterService(&service);
  b.RegisterService(&admin);
  auto server = b.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "flashmem-worker: --listen %s: cannot listen\n", listen.c_str());
    return 1;
  }
  g_server = server.get();
  const std::string my_address = listen.substr(0, listen.rfind(':')) + ":" + std::to_string(port);
  std::atomic<bool> stop{false};
  std::thread heartbeat;
  if (!coordinator_target.empty()) {
    auto stub = flashmem::v1::Coordinator::NewStub(grpc::CreateChannel(coordinator_target, grpc::InsecureChannelCredentials()));
    flashmem::v1::RegisterRequest rr;
    rr.set_address(my_address);
    flashmem::v1::RegisterResponse reg;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (auto st = stub->Register(&ctx, rr, &reg); !st.ok()) {
      std::fprintf(stderr, "flashmem-worker: --coordinator %s: %s\n", coordinator_target.c_str(), st.error_message().c_str());
      return 1;
    }
    heartbeat = std::thread([&, stub = std::move(stub), reg]() mutable {
      uint64_t id = reg.worker_id();
      while (!stop.load()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(reg.heartbeat_ms()));
        flashmem::v1::HeartbeatRequest hb;
        hb.set_worker_id(id);
        hb.set_sessions(static_cast<uint32_t>(scheduler.sessions()));
        flashmem::v1::HeartbeatResponse hr;
        grpc::ClientContext c;
        c.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(reg.heartbeat_ms()));
        if (stub->Heartbeat(&c, hb, &hr).error_code() == grpc::StatusCode::NOT_FOUND) {  // coordinator restarted
          grpc::ClientContext rc;
          flashmem::v1::RegisterResponse again;
          if (stub->Register(&rc, rr, &again).ok()) id = again.worker_id();
        }
      }
    });
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  spdlog::info("worker serving {} on port {} ({} sessions max)", model_dir, port, so.max_sessions);
  std::printf("LISTENING %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  std::fflush(stdout);
  server->Wait();
  stop.store(true);
  if (heartbeat.joinable()) heartbeat.join();
  metrics_stop.store(true);
  if (metrics_thread.joinable()) metrics_thread.join();
  return 0;
}
