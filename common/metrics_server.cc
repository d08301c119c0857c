#include "common/metrics_server.h"

#include <exception>

#include "absl/strings/str_cat.h"

namespace flashmem {

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& listen) {
  std::unique_ptr<MetricsServer> m(new MetricsServer());
  try {
    m->exposer_ = std::make_unique<prometheus::Exposer>(listen);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("--metrics-listen ", listen, ": ", e.what()));
  }
  m->exposer_->RegisterCollectable(m->registry_);
  return m;
}

MetricsServer::~MetricsServer() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

prometheus::Gauge& MetricsServer::Gauge(const std::string& name, const std::string& help) {
  return GaugeFamily(name, help).Add({});
}

prometheus::Family<prometheus::Gauge>& MetricsServer::GaugeFamily(const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(*registry_);
}

prometheus::Histogram& MetricsServer::LatencyHistogram(const std::string& name, const std::string& help) {
  static const prometheus::Histogram::BucketBoundaries kBuckets = {0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30};
  return prometheus::BuildHistogram().Name(name).Help(help).Register(*registry_).Add({}, kBuckets);
}

void MetricsServer::RefreshEvery(std::chrono::milliseconds period, std::function<void()> refresh) {
  if (thread_.joinable()) return;
  thread_ = std::thread([this, period, refresh = std::move(refresh)] {
    while (!stop_.load()) {
      refresh();
      std::this_thread::sleep_for(period);
    }
  });
}

int MetricsServer::port() const { return exposer_->GetListeningPorts().front(); }

}  // namespace flashmem
