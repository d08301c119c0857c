// flashmem-worker: hosts the decode engine and serves the public SessionService; registers with
// the coordinator, snapshots sessions to memtier. With --tp-size N it is one rank of a
// tensor-parallel group (one process per GPU): rank 0 serves and schedules, ranks 1..N-1 follow
// it (worker/server/group_control.h).
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "kernels/device.h"
#include "CLI/CLI.hpp"
#include "common/tls.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"
#include "common/cli_help.h"
#include "common/health_endpoint.h"
#include "common/metrics_server.h"
#include "coordinator/lease_keeper.h"
#include "worker/parallel/group_store.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/server/group_control.h"
#include "worker/server/session_service.h"

#include <optional>

namespace {
std::atomic<grpc::Server*> g_server{nullptr};
std::atomic<int> g_exit_code{0};
std::atomic<flashmem::server::GroupControlService*> g_control{nullptr};
std::atomic<const flashmem::parallel::Communicator*> g_comm{nullptr};
void OnSignal(int) {
  // Follower streams end first: the server's shutdown waits for every call in progress.
  if (auto* c = g_control.load()) c->Shutdown();
  if (grpc::Server* s = g_server.load()) std::thread([s] { s->Shutdown(); }).detach();
}

std::string ControlKey(const flashmem::parallel::GroupOptions& g) { return "flashmem/" + g.group + "/control"; }

// This process's registration with the coordinator; a rank of a group names its group.
flashmem::v1::RegisterRequest Registration(const std::string& address, flashmem::v1::ComponentKind kind,
                                           const flashmem::parallel::GroupOptions& g, const std::string& memtier_store = "") {
  flashmem::v1::RegisterRequest reg;
  reg.set_address(address);
  reg.set_kind(kind);
  reg.set_memtier_store(memtier_store);
  if (g.size > 1) {
    reg.set_group(g.group);
    reg.set_tp_rank(static_cast<uint32_t>(g.rank));
    reg.set_tp_size(static_cast<uint32_t>(g.size));
  }
  return reg;
}

// A follower rank: finds the leader's control service through the group store, holds a lease
// as a rank of the group, and applies the leader's ops until the group ends.
int RunFollower(const flashmem::parallel::GroupOptions& group, std::shared_ptr<grpc::ChannelCredentials> creds,
                const std::string& coordinator_target, std::chrono::milliseconds startup_wait,
                flashmem::server::Scheduler& scheduler, flashmem::HealthEndpoint* health) {
  flashmem::parallel::GroupStoreClient store(group.leader_address, group.timeout);
  auto leader = store.Get(ControlKey(group), group.timeout);
  if (!leader.ok()) {
    std::fprintf(stderr, "flashmem-worker: tensor-parallel group '%s' rank %d: no leader address: %s\n",
                 group.group.c_str(), group.rank, std::string(leader.status().message()).c_str());
    return 1;
  }
  std::unique_ptr<flashmem::coordinator::LeaseKeeper> lease;
  flashmem::server::FollowOptions fo;
  fo.leader = *leader;
  fo.credentials = creds;
  fo.group = group.group;
  fo.rank = group.rank;
  fo.size = group.size;
  const absl::Status st = flashmem::server::FollowLeader(fo, scheduler, [&] {
    if (!coordinator_target.empty()) {
      const auto reg = Registration(absl::StrCat(group.group, "/rank", group.rank), flashmem::v1::WORKER_RANK, group);
      auto k = flashmem::coordinator::LeaseKeeper::Start(coordinator_target, creds, reg, [&](flashmem::v1::HeartbeatRequest* hb) {
        hb->set_sessions(static_cast<uint32_t>(scheduler.sessions()));
      }, startup_wait);
      if (k.ok()) lease = std::move(*k);
      else spdlog::error("rank {}: {}", group.rank, std::string(k.status().message()));
    }
    if (health) health->SetServing(true);
    spdlog::info("rank {} of group '{}' follows the leader at {}", group.rank, group.group, fo.leader);
    std::printf("FOLLOWING %s rank %d\n", group.group.c_str(), group.rank);
    std::fflush(stdout);
  });
  lease.reset();
  if (st.ok()) {
    spdlog::info("rank {}: the leader ended the group", group.rank);
    return 0;
  }
  std::fprintf(stderr, "flashmem-worker: %s\n", std::string(st.message()).c_str());
  return 1;
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flashmem-worker: DeepSeek-V4 decode engine behind the public SessionService"};
  std::string listen = "127.0.0.1:7080", model_dir;
  flashmem::server::SchedulerOptions so;
  flashmem::server::SessionServiceOptions svo;
  app.add_option("--listen", listen, "gRPC address host:port (port 0: any free port)");
  std::string advertise_host, health_listen;
  app.add_option("--advertise-host", advertise_host, "host that the coordinator and the group's ranks dial instead of --listen's (e.g. the pod's DNS name when listening on 0.0.0.0)");
  flashmem::AddHealthFlag(app, health_listen);  // a follower has no other gRPC server
  app.add_option("--model", model_dir, "model directory (config.json, safetensors, tokenizer.json)")->required();
  app.add_option("--max-sessions", so.max_sessions, "sessions held at once");
  app.add_option("--prefill-chunk", so.prefill_chunk, "prompt tokens per forward pass of one session");
  app.add_option("--step-token-budget", so.step_token_budget, "prompt tokens per forward pass across sessions");
  app.add_option("--max-context", so.max_context, "tokens per session");
  std::string memtier_target, coordinator_target, metrics_listen;
  app.add_option("--metrics-listen", metrics_listen, "Prometheus /metrics address host:port (empty: off)");
  app.add_option("--coordinator", coordinator_target, "coordinator gRPC address: register and keep a lease with heartbeats");
  double startup_wait_s = 60;
  app.add_option("--startup-wait-s", startup_wait_s, "at startup, how long to wait for memtier and the coordinator to accept connections (components start in any order)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--memtier", memtier_target, "memtier gRPC address: sessions are snapshotted there and can be adopted by another worker");
  uint64_t kv_budget_bytes = 0, memtier_buffer_bytes = 64ull << 20;
  std::string lsa_indexer, lsa_options, device = "cpu";
  app.add_option("--kv-budget-bytes", kv_budget_bytes, "bytes of evictable KV pages held in memory across sessions; the rest lives in memtier (0: no limit; needs --memtier)");
  app.add_option("--memtier-buffer-bytes", memtier_buffer_bytes, "registered buffer for page traffic with memtier (the largest commit; recalls run 4 parts of it in flight)");
  std::string memtier_shm;
  app.add_option("--memtier-shm-socket", memtier_shm, "memtier's --shm-socket on this node: recalls read its RAM tier directly (one copy per node, shared by every rank)");
  app.add_option("--lsa-indexer", lsa_indexer, "memory indexer (fm_indexer.safetensors or its directory): sessions run Lookahead Sparse Attention");
  app.add_option("--lsa-options", lsa_options, "LSA options, e.g. \"kmax=96,interval=64,tail_chunks=2048\" (docs/lsa.md)");
  app.add_flag("--lsa-apply-next-step", [&](int64_t) { so.lsa_apply_at_boundary = false; }, "put each resident set in force at the step after its refresh (the release) instead of the next boundary");
  app.add_flag("--lsa-measure-agreement", so.lsa_measure_agreement, "evaluation mode: compute the full Level-2 top-k alongside and export the agreement");
  int64_t gpu_memory_bytes = 0;
  app.add_option("--device", device, "compute backend: cpu (exact reference) or cuda:N");
  std::string cuda_kernels = "exact";
  app.add_option("--cuda-kernels", cuda_kernels, "exact (bit-identical to the CPU reference), fast (decode GEMV + bf16 tensor cores, within the golden tolerances) or fast-fp8 (cuBLASLt FP8 tensor cores, ~1e-4 relative)");
  app.add_option("--gpu-memory-bytes", gpu_memory_bytes, "device memory the CUDA backend may hold for weights, the KV reserve and workspaces (0: free memory minus 1 GiB)");
  int64_t gpu_kv_reserve_bytes = -1;
  app.add_option("--gpu-kv-reserve-bytes", gpu_kv_reserve_bytes, "the part of the device budget for copies of KV pages, so a page crosses PCIe only when new or written (-1: a quarter of the budget; 0: none, records staged every step)");
  flashmem::parallel::GroupOptions group;
  int tp_timeout_s = 120;
  app.add_option("--tp-size", group.size, "tensor-parallel ranks in this worker's group (one process per GPU)");
  app.add_option("--tp-rank", group.rank, "this process's rank: 0 serves the API and schedules, the others follow it");
  app.add_option("--tp-leader", group.leader_address, "host:port where rank 0 serves the group's rendezvous store");
  app.add_option("--group", group.group, "the group's name, unique in the cluster (default: tp@<--tp-leader>)");
  app.add_option("--tp-timeout-s", tp_timeout_s, "seconds to wait for the group's ranks (connect, first step)");
  flashmem::TlsOptions tls;
  flashmem::AddTlsFlags(app, tls, /*public_api=*/true);
  app.footer(flashmem::EnvironmentHelp({
      "UCX_*  UCX transport settings for page traffic with memtier (e.g. UCX_TLS, UCX_NET_DEVICES)",
      "NCCL_*  NCCL settings between GPU ranks (NCCL_NVLS_ENABLE is forced to 0)",
      "FLASHMEM_CUDA_FAST_PATHS  diagnostic: which fast CUDA paths stay on (docs/benchmarks.md)"}));
  group.group.clear();
  CLI11_PARSE(app, argc, argv);
  const auto startup_wait = std::chrono::milliseconds(static_cast<int64_t>(startup_wait_s * 1000));
  const bool in_group = group.size > 1, follower = group.rank > 0;
  if (group.size < 1 || group.size > 64 || group.rank < 0 || group.rank >= group.size) {
    std::fprintf(stderr, "flashmem-worker: --tp-rank %d / --tp-size %d: need 0 <= rank < size <= 64\n", group.rank, group.size);
    return 1;
  }
  if (in_group && group.group.empty()) group.group = "tp@" + group.leader_address;
  group.timeout = absl::Seconds(tp_timeout_s);
  if (device == "cuda") device = "cuda:" + std::to_string(group.rank);  // each rank on the GPU of its number
  auto creds = flashmem::MakeTlsCredentials(tls);
  if (!creds.ok()) {
    std::fprintf(stderr, "flashmem-worker: %s\n", std::string(creds.status().message()).c_str());
    return 1;
  }
  auto health_or = flashmem::HealthEndpoint::StartIfSet(health_listen);  // up first: NOT_SERVING while the model loads
  if (!health_or.ok()) {
    std::fprintf(stderr, "flashmem-worker: %s\n", std::string(health_or.status().message()).c_str());
    return 1;
  }
  const std::unique_ptr<flashmem::HealthEndpoint> health = std::move(*health_or);
  spdlog::set_default_logger(spdlog::stderr_color_mt("worker"));
  auto backend = flashmem::kernels::OpenBackend(device, gpu_memory_bytes, cuda_kernels, gpu_kv_reserve_bytes);
  if (!backend.ok()) {
    std::fprintf(stderr, "flashmem-worker: %s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  const flashmem::kernels::Backend& be = *backend->backend;
  std::unique_ptr<flashmem::parallel::Communicator> comm;
  if (in_group) {
    auto c = flashmem::parallel::ConnectGroup(group, device);
    if (!c.ok()) {
      std::fprintf(stderr, "flashmem-worker: %s\n", std::string(c.status().message()).c_str());
      return 1;
    }
    comm = std::move(*c);
  }
  if (kv_budget_bytes > 0 && memtier_target.empty()) {
    std::fprintf(stderr, "flashmem-worker: --kv-budget-bytes needs --memtier (evicted pages live there)\n");
    return 1;
  }
  std::signal(SIGPIPE, SIG_IGN);
  // "LOADING done total" lines on stdout let launchers show a progress bar.
  auto model = flashmem::model::Transformer::Load(model_dir, be, flashmem::model::ShardSpec{group.rank, group.size},
                                                  [](int64_t done, int64_t total) {
                                                    std::printf("LOADING %lld %lld\n", static_cast<long long>(done), static_cast<long long>(total));
                                                    std::fflush(stdout);
                                                  },
                                                  comm.get());
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
    mo.buffer_bytes = memtier_buffer_bytes;
    mo.credentials = creds->channel;
    mo.name = "worker";
    mo.connect_wait = startup_wait;
    auto m = flashmem::memtier::MemTierClient::Connect(mo);
    if (!m.ok()) {
      std::fprintf(stderr, "flashmem-worker: --memtier %s: %s\n", memtier_target.c_str(), std::string(m.status().message()).c_str());
      return 1;
    }
    memtier = std::move(*m);
    if (!memtier_shm.empty()) {
      if (absl::Status st = memtier->AttachLocal(memtier_shm); !st.ok()) {
        std::fprintf(stderr, "flashmem-worker: --memtier-shm-socket %s: %s\n", memtier_shm.c_str(), std::string(st.message()).c_str());
        return 1;
      }
    }
  } else if (!memtier_shm.empty()) {
    std::fprintf(stderr, "flashmem-worker: --memtier-shm-socket needs --memtier\n");
    return 1;
  }
  std::optional<flashmem::lsa::MemoryIndexer> indexer;
  if (!lsa_indexer.empty()) {
    auto mi = flashmem::lsa::MemoryIndexer::Load(lsa_indexer, be);
    auto lo = mi.ok() ? flashmem::lsa::ParseLsaOptions(lsa_options) : absl::StatusOr<flashmem::lsa::LsaOptions>(mi.status());
    absl::Status st = lo.ok() ? flashmem::lsa::LsaSession::CheckCompatible(*mi, (*model)->args(), *lo) : lo.status();
    if (!st.ok()) {
      std::fprintf(stderr, "flashmem-worker: --lsa-indexer %s: %s\n", lsa_indexer.c_str(), std::string(st.message()).c_str());
      return 1;
    }
    indexer = std::move(*mi);
    so.indexer = &*indexer;
    so.lsa = *lo;
  } else if (!lsa_options.empty()) {
    std::fprintf(stderr, "flashmem-worker: --lsa-options needs --lsa-indexer\n");
    return 1;
  }
  std::unique_ptr<flashmem::kv::KvPager> pager;
  if (memtier) {
    flashmem::kv::KvPagerOptions po;
    po.budget_bytes = kv_budget_bytes;
    // In a group the leader commits and tells its followers what memtier acknowledged; they evict
    // within the same budget and recall from memtier (the node's one copy) like the leader.
    po.commit = !follower;
    po.record_acks = in_group && !follower;
    if (indexer) po.pinned_index_layers = so.lsa.target_layers.empty() ? indexer->csa_layers() : so.lsa.target_layers;
    pager = std::make_unique<flashmem::kv::KvPager>((*model)->args(), po, memtier.get());
    so.pager = pager.get();
    svo.pager = pager.get();
  }
  so.follower = follower;
  // The leader tells its followers every session change and step; losing one ends this worker
  // (its lease then runs out and the coordinator moves the sessions to another group).
  std::unique_ptr<flashmem::server::GroupControlService> control;
  if (in_group && !follower) {
    control = std::make_unique<flashmem::server::GroupControlService>(group.group, group.size, [](const absl::Status&) {
      g_exit_code = 1;
      // A forward pass may be waiting in a collective the lost rank will never join.
      if (const auto* c = g_comm.load()) c->Abort();
      OnSignal(0);
    });
    g_comm = comm.get();
    so.group = control.get();
    g_control = control.get();
  }
  flashmem::server::Scheduler scheduler(**model, so);
  flashmem::server::SessionServiceImpl service(scheduler, tok.get(), (*model)->args().vocab_size, svo, memtier.get());
  flashmem::server::WorkerAdminImpl admin(service);
  // /metrics: sessions, tokens, steps, batch size, time to first token and between tokens.
  std::unique_ptr<flashmem::MetricsServer> metrics;
  if (!metrics_listen.empty()) {
    auto m = flashmem::MetricsServer::Start(metrics_listen);
    if (!m.ok()) {
      std::fprintf(stderr, "flashmem-worker: %s\n", std::string(m.status().message()).c_str());
      return 1;
    }
    metrics = std::move(*m);
    auto& ttft = metrics->LatencyHistogram("flashmem_worker_time_to_first_token_seconds", "Generate: time to the first token");
    auto& itl = metrics->LatencyHistogram("flashmem_worker_inter_token_seconds", "Generate: time between tokens");
    service.set_latency_observers([&ttft](double s) { ttft.Observe(s); }, [&itl](double s) { itl.Observe(s); });
    auto gauge = [&](const char* name, const char* help) -> prometheus::Gauge& { return metrics->Gauge(name, help); };
    auto& sessions = gauge("flashmem_worker_sessions", "sessions held");
    auto& batch = gauge("flashmem_worker_max_batch_rows", "largest forward pass (rows)");
    auto& tokens = metrics->GaugeFamily("flashmem_worker_tokens", "tokens run through the model, by kind");
    auto& prefill = tokens.Add({{"kind", "prefill"}});
    auto& decode = tokens.Add({{"kind", "decode"}});
    auto& steps = gauge("flashmem_worker_steps", "forward passes");
    auto& queued = gauge("flashmem_worker_queued_tokens", "prompt tokens waiting for a forward pass (queue depth)");
    auto& generating = gauge("flashmem_worker_generating_sessions", "sessions generating now");
    // LSA and paged KV (docs/lsa.md, docs/operations.md).
    auto& lsa_sessions = gauge("flashmem_lsa_sessions", "sessions running LSA");
    auto& lsa_refreshes = gauge("flashmem_lsa_refreshes", "Level-1 cycles scored (sessions held now)");
    auto& lsa_recalled = gauge("flashmem_lsa_pages_recalled", "pages newly in a resident set, summed over sets");
    auto& lsa_stalls = gauge("flashmem_lsa_stalls", "resident sets not ready when due");
    auto& lsa_stall_s = gauge("flashmem_lsa_stall_seconds", "time steps waited for resident sets");
    auto& lsa_fallbacks = gauge("flashmem_lsa_fallback_sessions", "sessions dense after the threshold fallback");
    auto& lsa_churn = gauge("flashmem_lsa_churn_jaccard", "mean Jaccard of consecutive resident sets");
    auto& lsa_fraction = gauge("flashmem_lsa_visible_fraction", "CSA pages visible to Level 2 / all CSA pages");
    auto& lsa_agree = gauge("flashmem_lsa_level2_agreement", "Level-2 top-k agreement with the full top-k (evaluation mode; -1 off)");
    auto& kv_resident = gauge("flashmem_kv_resident_bytes", "evictable KV pages in worker memory");
    auto& kv_dense = gauge("flashmem_kv_dense_bytes", "the same pages with nothing evicted (dense equivalent)");
    auto& kv_peak = gauge("flashmem_kv_peak_resident_bytes", "peak of flashmem_kv_resident_bytes");
    auto& kv_evicted = gauge("flashmem_kv_pages_evicted", "pages evicted to memtier");
    auto& kv_recalled = gauge("flashmem_kv_pages_recalled", "pages recalled from memtier");
    auto& kv_late = gauge("flashmem_kv_late_pages", "pages recalled synchronously because they were not staged in time");
    auto& kv_late_s = gauge("flashmem_kv_late_seconds", "time decode steps waited for late pages");
    auto& kv_committed = gauge("flashmem_kv_pages_committed", "pages acknowledged by memtier");
    auto& kv_commit_bytes = gauge("flashmem_kv_committed_bytes", "page bytes sent to memtier (FP8 records / MXFP4, worker/kv/page_codec.h)");
    auto& kv_bf16 = gauge("flashmem_kv_pages_sent_bf16", "pages off their format's grid, sent as bf16 (none expected)");
    auto& kv_fp32 = gauge("flashmem_kv_streams_fp32", "KV streams held as fp32 rows (or index keys without their MXFP4 twin) after an entry off its grid (none expected)");
    auto& kv_over = gauge("flashmem_kv_over_budget_steps", "steps whose needed pages alone exceeded --kv-budget-bytes");
    // The CUDA backend's KV reserve (--gpu-kv-reserve-bytes; docs/architecture.md): zeros on the CPU.
    struct ReserveGauges {
      prometheus::Gauge *held, *slots, *hits, *uploads, *patches, *bytes;
    };
    auto& reserve_pages = metrics->GaugeFamily("flashmem_gpu_kv_reserve_pages", "KV page copies in GPU memory, by kind (records: main KV; keys: indexer) and state (held, slots)");
    auto& reserve_hits = metrics->GaugeFamily("flashmem_gpu_kv_reserve_hits", "pages ops found in GPU memory, by kind");
    auto& reserve_uploads = metrics->GaugeFamily("flashmem_gpu_kv_reserve_uploads", "pages sent to GPU memory (new, or written since their copy), by kind");
    auto& reserve_patches = metrics->GaugeFamily("flashmem_gpu_kv_reserve_patches", "pages updated in GPU memory with only the entry written since their copy, by kind");
    auto& reserve_bytes = metrics->GaugeFamily("flashmem_gpu_kv_reserve_bytes", "GPU memory the KV reserve takes, by kind");
    auto reserve_gauges = [&](const char* kind) {
      return ReserveGauges{&reserve_pages.Add({{"kind", kind}, {"state", "held"}}), &reserve_pages.Add({{"kind", kind}, {"state", "slots"}}),
                           &reserve_hits.Add({{"kind", kind}}), &reserve_uploads.Add({{"kind", kind}}),
                           &reserve_patches.Add({{"kind", kind}}), &reserve_bytes.Add({{"kind", kind}})};
    };
    const ReserveGauges reserve_records = reserve_gauges("records"), reserve_keys = reserve_gauges("keys");
    // The reserve gauges by value: the refresh outlives this block (the other names are references).
    metrics->RefreshEvery(std::chrono::milliseconds(200), [&, reserve_records, reserve_keys] {
      const auto st = scheduler.stats();
      sessions.Set(static_cast<double>(scheduler.sessions()));
      batch.Set(static_cast<double>(st.max_batch_rows));
      prefill.Set(static_cast<double>(st.prefill_tokens));
      decode.Set(static_cast<double>(st.decode_tokens));
      steps.Set(static_cast<double>(st.steps));
      queued.Set(static_cast<double>(st.queued_tokens));
      generating.Set(static_cast<double>(st.generating));
      lsa_sessions.Set(static_cast<double>(st.lsa_sessions));
      lsa_refreshes.Set(static_cast<double>(st.lsa_refreshes));
      lsa_recalled.Set(static_cast<double>(st.lsa_pages_recalled));
      lsa_stalls.Set(static_cast<double>(st.lsa_stalls));
      lsa_stall_s.Set(st.lsa_stall_seconds);
      lsa_fallbacks.Set(static_cast<double>(st.lsa_fallbacks));
      lsa_churn.Set(st.lsa_churn_count ? st.lsa_churn_jaccard_sum / st.lsa_churn_count : 1.0);
      lsa_fraction.Set(st.lsa_total_pages ? static_cast<double>(st.lsa_visible_pages) / st.lsa_total_pages : 1.0);
      lsa_agree.Set(st.lsa_agreement_count ? st.lsa_agreement_sum / st.lsa_agreement_count : -1.0);
      const flashmem::kernels::KvReserveStats rs = be.ReserveStats();
      for (const auto& [g, k] : {std::pair{&reserve_records, &rs.records}, std::pair{&reserve_keys, &rs.keys}}) {
        g->held->Set(static_cast<double>(k->held));
        g->slots->Set(static_cast<double>(k->slots));
        g->hits->Set(static_cast<double>(k->hits));
        g->uploads->Set(static_cast<double>(k->uploads));
        g->patches->Set(static_cast<double>(k->patches));
        g->bytes->Set(static_cast<double>(k->bytes));
      }
      if (pager) {
        const auto ps = pager->stats();
        kv_resident.Set(static_cast<double>(ps.resident_bytes));
        kv_dense.Set(static_cast<double>(ps.dense_bytes));
        kv_peak.Set(static_cast<double>(ps.peak_resident_bytes));
        kv_evicted.Set(static_cast<double>(ps.pages_evicted));
        kv_recalled.Set(static_cast<double>(ps.pages_recalled));
        kv_late.Set(static_cast<double>(ps.late_pages));
        kv_late_s.Set(ps.late_seconds);
        kv_committed.Set(static_cast<double>(ps.pages_committed));
        kv_over.Set(static_cast<double>(ps.over_budget_steps));
        kv_commit_bytes.Set(static_cast<double>(ps.committed_bytes));
        kv_bf16.Set(static_cast<double>(ps.pages_sent_bf16));
        kv_fp32.Set(static_cast<double>(ps.streams_fp32));
      }
    });
    std::printf("METRICS %d\n", metrics->port());
    std::fflush(stdout);
  }
  if (follower) {  // no API of its own: it follows the leader until the group ends
    const int rc = RunFollower(group, creds->channel, coordinator_target, startup_wait, scheduler, health.get());
    metrics.reset();  // its refresh reads the scheduler
    return rc;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort(listen, creds->server, &port);
  b.RegisterService(&service);
  b.RegisterService(&admin);
  if (control) b.RegisterService(control.get());
  auto server = b.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "flashmem-worker: --listen %s: cannot listen\n", listen.c_str());
    return 1;
  }
  g_server = server.get();
  const std::string my_address =
      (advertise_host.empty() ? listen.substr(0, listen.rfind(':')) : advertise_host) + ":" + std::to_string(port);
  if (control) {  // followers find this server through the group store, then the group serves
    flashmem::parallel::GroupStoreClient store(group.leader_address, group.timeout);
    absl::Status st = store.Set(ControlKey(group), my_address);
    if (st.ok()) st = control->WaitForFollowers(group.timeout);
    if (!st.ok()) {
      std::fprintf(stderr, "flashmem-worker: %s\n", std::string(st.message()).c_str());
      server->Shutdown();
      return 1;
    }
  }
  std::unique_ptr<flashmem::coordinator::LeaseKeeper> lease;
  if (!coordinator_target.empty()) {
    auto k = flashmem::coordinator::LeaseKeeper::Start(
        coordinator_target, creds->channel, Registration(my_address, flashmem::v1::WORKER, group, memtier ? memtier->store_id() : ""), [&](flashmem::v1::HeartbeatRequest* hb) {
          hb->set_sessions(static_cast<uint32_t>(scheduler.sessions()));
          hb->set_queued_tokens(scheduler.stats().queued_tokens);
          if (pager) hb->set_kv_bytes(pager->stats().resident_bytes);
        }, startup_wait);
    if (!k.ok()) {
      std::fprintf(stderr, "flashmem-worker: %s\n", std::string(k.status().message()).c_str());
      return 1;
    }
    lease = std::move(*k);
  }
  std::signal(SIGTERM, OnSignal);
  std::signal(SIGINT, OnSignal);
  spdlog::info("worker serving {} on port {} ({} sessions max{})", model_dir, port, so.max_sessions,
               in_group ? absl::StrCat(", leader of tensor-parallel group '", group.group, "' of ", group.size) : "");
  if (health) health->SetServing(true);
  std::printf("LISTENING %s:%d\n", listen.substr(0, listen.rfind(':')).c_str(), port);
  std::fflush(stdout);
  server->Wait();
  if (health) health->SetServing(false);
  if (control) control->Shutdown();
  lease.reset();
  metrics.reset();
  return g_exit_code.load();
}
