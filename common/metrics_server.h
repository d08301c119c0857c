// A binary's /metrics (prometheus-cpp): one exposer on --metrics-listen, one registry, and a
// thread that refreshes the gauges from the component's own counters every `period`. The thread
// stops when the server is destroyed, on every return path of a main (a std::thread left running
// there would end the process in std::terminate instead of its exit code).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace flashmem {

class MetricsServer {
 public:
  // Serves /metrics on `listen` (host:port; port 0 picks one). INVALID_ARGUMENT naming
  // --metrics-listen when it cannot listen there.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& listen);
  ~MetricsServer();

  prometheus::Gauge& Gauge(const std::string& name, const std::string& help);
  prometheus::Family<prometheus::Gauge>& GaugeFamily(const std::string& name, const std::string& help);
  // Latencies from 1 ms to 30 s.
  prometheus::Histogram& LatencyHistogram(const std::string& name, const std::string& help);
  // Runs `refresh` every `period` on a thread of its own until this server is destroyed (once).
  void RefreshEvery(std::chrono::milliseconds period, std::function<void()> refresh);
  // The bound port (scripts and tests read it from the binary's "METRICS <port>" line).
  int port() const;

 private:
  MetricsServer() = default;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<prometheus::Registry> registry_ = std::make_shared<prometheus::Registry>();
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace flashmem
