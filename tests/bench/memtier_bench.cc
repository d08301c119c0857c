// memtier throughput and latency: commit latency (p50/p99), recall bandwidth of batched 37 KB
// pages over UCX and over the same-node mapped fast path (copied out, or leased views verified in
// memtier's memory), RocksDB spill and promote bandwidth.
// The transport comes from UCX_TLS; tests/bench/memtier_bench.sh runs it next to ucx_perftest
// and dd and prints the ratios (docs/benchmarks.md).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "memtier/client/memtier_client.h"
#include "memtier/server/memtier_server.h"

using namespace flashmem::memtier;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kPage = 64 * 584;  // CSA main-KV page
double Secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

void Die(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, std::string(s.message()).c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Usage: memtier_bench [pages] [batch] [in_flight] [server_copy_threads] [client_copy_threads]
  const int pages = argc > 1 ? std::atoi(argv[1]) : 2048;     // 76.5 MB of 37 KB pages
  const int batch = argc > 2 ? std::atoi(argv[2]) : 64;       // pages per request
  const int in_flight = argc > 3 ? std::atoi(argv[3]) : 4;    // recall requests in flight
  const int server_threads = argc > 4 ? std::atoi(argv[4]) : 0;  // memtier's copy threads (0: default)
  const int client_threads = argc > 5 ? std::atoi(argv[5]) : 0;  // the client's verify/copy threads
  const std::string dir = (std::filesystem::temp_directory_path() / "fm_memtier_bench").string();
  std::filesystem::remove_all(dir);
  MemTierServerOptions o;
  o.grpc_listen = "127.0.0.1:0";
  o.shm_socket = dir + ".sock";
  o.store.rocks.path = dir;
  o.store.ram.capacity_bytes = 4ull << 30;
  o.copy_threads = server_threads;
  auto server = MemTierServer::Start(o);
  Die(server.status(), "start");
  MemTierClientOptions co;
  co.target = (*server)->grpc_target();
  co.buffer_bytes = static_cast<uint64_t>(batch) * kPage * in_flight;
  co.recall_in_flight = in_flight;
  co.copy_threads = client_threads;
  auto client = MemTierClient::Connect(co);
  Die(client.status(), "connect");
  MemTierClient& c = **client;
  Die(c.OpenSession(1), "open");
  std::vector<std::vector<uint8_t>> data(pages, std::vector<uint8_t>(kPage));
  std::mt19937_64 g(1);
  for (auto& d : data)  // one generator draw per 8 bytes (kPage is a multiple of 8)
    for (size_t i = 0; i < d.size(); i += 8) {
      const uint64_t v = g();
      std::memcpy(d.data() + i, &v, 8);
    }

  // Commit: latency per batch (durable on return), and throughput.
  std::vector<double> lat;
  const auto t0 = Clock::now();
  for (int b = 0; b < pages; b += batch) {
    std::vector<PageToCommit> pc;
    for (int i = b; i < std::min(pages, b + batch); ++i) pc.push_back({{1, 0, static_cast<uint32_t>(i)}, data[i]});
    const auto s = Clock::now();
    Die(c.Commit(1, pc), "commit");
    lat.push_back(Secs(s, Clock::now()) * 1e3);
  }
  const double commit_s = Secs(t0, Clock::now());
  std::sort(lat.begin(), lat.end());
  const double bytes = static_cast<double>(pages) * kPage;

  // Over UCX: one Recall of every page (the client pipelines it in batches of `batch`); same
  // node, mapped: one RecallLocal of every page (Locate in pieces, each copied and verified while
  // the next is located).
  std::vector<std::vector<uint8_t>> out(pages, std::vector<uint8_t>(kPage));
  auto recall_all = [&](bool local) {
    std::vector<PageToRecall> pr;
    for (int i = 0; i < pages; ++i) pr.push_back({{1, 0, static_cast<uint32_t>(i)}, out[i]});
    const auto s = Clock::now();
    if (!local) Die(c.Recall(1, pr), "recall");
    if (local) Die(c.RecallLocal(1, pr), "recall local");
    return bytes / Secs(s, Clock::now()) / 1e9;
  };
  recall_all(false);  // warm up
  const double recall_ucx = recall_all(false);
  std::vector<PageKey> keys;
  for (int i = 0; i < pages; ++i) keys.push_back({1, 0, static_cast<uint32_t>(i)});
  // Zero-copy recalls: `recall(consume)` hands verified views batch by batch; GB/s over all pages.
  auto views_gbps = [&](const char* what, const auto& recall) {
    size_t seen = 0;
    const auto s = Clock::now();
    Die(recall([&](size_t, std::span<const std::span<const uint8_t>> views) {
          seen += views.size();
          return absl::OkStatus();
        }), what);
    if (seen != keys.size()) Die(absl::InternalError("pages missing"), what);
    return bytes / Secs(s, Clock::now()) / 1e9;
  };
  // Views of the client's registered buffer (memtier put the pages there).
  const double recall_view_gbps = views_gbps("recall stream", [&](const auto& consume) { return c.RecallStream(1, keys, kPage, consume); });
  Die(c.AttachLocal(o.shm_socket), "attach");
  recall_all(true);  // warm up: the client's first read of each mapped memtier page faults it in
  const double recall_local = recall_all(true);
  // Views of memtier's own memory, leased batch by batch and verified in place.
  const double recall_local_view_gbps =
      views_gbps("recall local view", [&](const auto& consume) { return c.RecallLocalView(1, keys, consume); });

  // Promote: drop the RAM copies, then prefetch everything back from RocksDB.
  Die(c.CloseSession(1), "close");
  const auto p0 = Clock::now();
  auto promoted = c.Prefetch(1, keys, 600000);
  Die(promoted.status(), "prefetch");
  const double promote_s = Secs(p0, Clock::now());

  std::printf("pages %d x %zu B, batch %d, %d in flight, UCX_TLS=%s\n", pages, kPage, batch, in_flight, std::getenv("UCX_TLS") ? std::getenv("UCX_TLS") : "default");
  std::printf("commit_p50_ms %.3f\ncommit_p99_ms %.3f\ncommit_GBps %.3f\n", lat[lat.size() / 2],
              lat[std::min(lat.size() - 1, static_cast<size_t>(lat.size() * 0.99))], bytes / commit_s / 1e9);
  std::printf("recall_ucx_GBps %.3f\nrecall_view_GBps %.3f\nrecall_local_GBps %.3f\nrecall_local_view_GBps %.3f\n", recall_ucx,
              recall_view_gbps, recall_local, recall_local_view_gbps);
  std::printf("promote_GBps %.3f (%u pages)\n", bytes / promote_s / 1e9, *promoted);
  client->reset();
  server->reset();
  std::filesystem::remove_all(dir);
  return 0;
}
