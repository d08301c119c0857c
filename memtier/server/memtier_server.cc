#include "memtier/server/memtier_server.h"

#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "memtier/server/memtier_service.h"
#include "memtier/transport/local_share.h"
#include "prometheus/collectable.h"
#include "prometheus/exposer.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "prometheus/metric_family.h"
#include "spdlog/spdlog.h"

namespace flashmem::memtier {
namespace {

// Builds the metric families from the store's counters at scrape time.
class StoreCollector final : public prometheus::Collectable {
 public:
  StoreCollector(PageStore& s, MemTierService& svc) : store_(s), svc_(svc) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    const StoreCounters c = store_.counters();
    const RamTierStats r = store_.ram_stats();
    std::vector<prometheus::MetricFamily> out;
    auto add = [&](const std::string& name, const std::string& help, prometheus::MetricType type,
                   std::vector<std::pair<std::map<std::string, std::string>, double>> values) {
      prometheus::MetricFamily f{name, help, type, {}};
      for (auto& [labels, v] : values) {
        prometheus::ClientMetric m;
        for (auto& [k, val] : labels) m.label.push_back({k, val});
        if (type == prometheus::MetricType::Counter) m.counter.value = v; else m.gauge.value = v;
        f.metric.push_back(m);
      }
      out.push_back(std::move(f));
    };
    using T = prometheus::MetricType;
    add("flashmem_memtier_pages", "Pages held, by tier", T::Gauge,
        {{{{"tier", "ram"}}, double(c.pages_in_ram)}, {{{"tier", "rocksdb"}}, double(c.pages_total)}});
    add("flashmem_memtier_bytes", "Page bytes held, by tier", T::Gauge,
        {{{{"tier", "ram"}}, double(c.bytes_in_ram)}, {{{"tier", "rocksdb"}}, double(c.bytes_total)}});
    add("flashmem_memtier_recall_total", "Recalls by tier outcome", T::Counter,
        {{{{"result", "ram_hit"}}, double(c.ram_hits)}, {{{"result", "ram_miss"}}, double(c.ram_misses)}});
    add("flashmem_memtier_promotions_total", "RocksDB to RAM promotions", T::Counter, {{{}, double(c.promotions)}});
    add("flashmem_memtier_prefetch_promotions_total", "Promotions done by prefetch", T::Counter, {{{}, double(c.prefetch_promotions)}});
    add("flashmem_memtier_evictions_total", "RAM evictions", T::Counter, {{{}, double(c.evictions)}});
    add("flashmem_memtier_checksum_failures_total", "Pages whose xxh3 checksum did not match", T::Counter, {{{}, double(c.checksum_failures)}});
    add("flashmem_memtier_commits_total", "Commit batches made durable", T::Counter, {{{}, double(c.commits)}});
    add("flashmem_memtier_pinned_bytes", "RAM tier bytes registered with cudaHostRegister", T::Gauge, {{{}, double(r.pinned_bytes)}});
    add("flashmem_memtier_pin_seconds", "Seconds spent pinning RAM tier chunks", T::Gauge, {{{}, r.pin_seconds}});
    add("flashmem_memtier_ram_capacity_bytes", "RAM tier capacity", T::Gauge, {{{}, double(r.capacity_bytes)}});
    add("flashmem_memtier_clients", "Registered UCX clients", T::Gauge, {{{}, double(svc_.clients())}});
    add("flashmem_memtier_leased_pages", "Pages leased to same-node readers (Locate with lease_ms)", T::Gauge,
        {{{}, double(svc_.leased_pages())}});
    return out;
  }

 private:
  PageStore& store_;
  MemTierService& svc_;
};

}  // namespace

struct MemTierServer::Impl {
  std::unique_ptr<PageStore> store;
  std::unique_ptr<ucx::Worker> worker;
  std::unique_ptr<CopyPool> copies;
  std::unique_ptr<MemTierService> service;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<prometheus::Exposer> exposer;
  std::shared_ptr<StoreCollector> collector;
  std::shared_ptr<prometheus::Registry> registry;
  std::unique_ptr<ChunkShareServer> share;
  int port = 0;
  std::string host;
};

MemTierServer::MemTierServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MemTierServer::~MemTierServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<MemTierServer>> MemTierServer::Start(const MemTierServerOptions& o) {
  auto impl = std::make_unique<Impl>();
  FM_ASSIGN_OR_RETURN(impl->store, PageStore::Open(o.store));
  FM_ASSIGN_OR_RETURN(impl->worker, ucx::Worker::Create());
  std::random_device rd;
  const uint64_t epoch = (static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) << 8) ^ rd();
  std::string ucx_address;
  if (!o.ucx_listen.empty()) {
    FM_ASSIGN_OR_RETURN(ucx_address, impl->worker->Listen(o.ucx_listen));
  }
  impl->copies = std::make_unique<CopyPool>(o.copy_threads > 0 ? o.copy_threads : CopyPool::DefaultThreads(2));
  impl->service = std::make_unique<MemTierService>(*impl->store, *impl->worker, *impl->copies, epoch, ucx_address);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder b;
  b.AddListeningPort(o.grpc_listen, o.credentials ? o.credentials : grpc::InsecureServerCredentials(), &impl->port);
  b.SetMaxReceiveMessageSize(64 << 20);
  b.RegisterService(impl->service.get());
  impl->server = b.BuildAndStart();
  if (!impl->server || impl->port == 0)
    return absl::UnavailableError(absl::StrCat("--grpc-listen ", o.grpc_listen, ": cannot listen"));
  impl->host = o.grpc_listen.substr(0, o.grpc_listen.rfind(':'));
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  if (!o.metrics_listen.empty()) {
    try {
      impl->exposer = std::make_unique<prometheus::Exposer>(o.metrics_listen);
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("--metrics-listen ", o.metrics_listen, ": ", e.what()));
    }
    impl->collector = std::make_shared<StoreCollector>(*impl->store, *impl->service);
    impl->exposer->RegisterCollectable(impl->collector);
    impl->registry = std::make_shared<prometheus::Registry>();
    auto& family = prometheus::BuildHistogram()
                       .Name("flashmem_memtier_request_seconds")
                       .Help("memtier request latency by method")
                       .Register(*impl->registry);
    const prometheus::Histogram::BucketBoundaries buckets = {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3};
    auto hist = std::make_shared<std::map<std::string, prometheus::Histogram*>>();
    for (const char* m : {"Commit", "Recall", "Locate", "Prefetch", "PutState", "GetState", "Connect"})
      (*hist)[m] = &family.Add({{"method", m}}, buckets);
    impl->service->set_latency_observer([hist](const std::string& m, double s) {
      auto it = hist->find(m);
      if (it != hist->end()) it->second->Observe(s);
    });
    impl->exposer->RegisterCollectable(impl->registry);
  }
  if (!o.shm_socket.empty()) {
    RamTier* ram = &impl->store->ram();
    FM_ASSIGN_OR_RETURN(impl->share, ChunkShareServer::Start(o.shm_socket, [ram] {
      std::vector<SharedChunk> out;
      for (const RamChunkInfo& c : ram->chunks()) out.push_back({c.fd, c.bytes});
      return out;
    }));
  }
  spdlog::info("memtier serving gRPC on {}:{}, UCX on {} (epoch {}), data dir {}, RAM {} bytes", impl->host, impl->port,
               ucx_address.empty() ? "worker addresses" : ucx_address, epoch, o.store.rocks.path, o.store.ram.capacity_bytes);
  return std::unique_ptr<MemTierServer>(new MemTierServer(std::move(impl)));
}

int MemTierServer::grpc_port() const { return impl_->port; }
int MemTierServer::metrics_port() const {
  if (!impl_->exposer) return 0;
  auto ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}
std::string MemTierServer::grpc_target() const { return absl::StrCat(impl_->host, ":", impl_->port); }
uint64_t MemTierServer::epoch() const { return impl_->service->epoch(); }
void MemTierServer::Wait() { impl_->server->Wait(); }
PageStore& MemTierServer::store() { return *impl_->store; }
MemTierService& MemTierServer::service() { return *impl_->service; }

void MemTierServer::Shutdown() {
  if (impl_ && impl_->server) {
    impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    impl_->server.reset();
  }
  if (impl_) impl_->share.reset();
}

}  // namespace flashmem::memtier
