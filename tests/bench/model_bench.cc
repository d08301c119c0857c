// Model-level decode benchmark (issue 6 item 5; docs/benchmarks.md "Model level"): decode step
// time and tokens/s of a checkpoint on a backend at several batch sizes and context lengths,
// dense attention vs LSA, with the time per op (kernels::ProfilingBackend).
//
// Contexts of 64K–256K tokens cannot be prefilled in a benchmark's time on the reference path,
// so each session starts from a synthetic state at position `context`: window ring, compressed
// entries and indexer keys filled with bf16 rows from a random pool, compressor blocks empty.
// A decode step reads exactly the bytes it would read after a real prefill (the same number of
// candidate rows, keys and pages); what the rows say does not change the work. The LSA policy
// runs the memory indexer (`indexer init` from the model unless --indexer) on that state; its
// page choices are therefore arbitrary but its budget (KMAX, tail) is the released one, so the
// step reads what LSA would read. Quality is measured elsewhere (lsa_bench, golden tests).
// Each step feeds every session its greedy pick (BatchItem::greedy: a GPU keeps the logits);
// --logits brings the logits back and picks on the host instead.
//
//   model_bench --model DIR [--device cuda:0 --cuda-kernels fast] --batch 1,8,64
//               --context 8192,65536,262144 [--policy dense,lsa] [--steps 4] [--profile] [--json OUT]
//
// --device null runs the steps on a backend that computes nothing (tests/bench/null_backend.h): the
// step time is then the host's own work around the ops, which a device backend's step hides.
//
// Tensor parallel (issue 8): one process per rank with --tp-size N --tp-rank R --tp-leader
// HOST:PORT (--device cuda puts rank R on cuda:R); every rank builds the same synthetic states
// and rank 0 prints. "comm" is the share of the step spent in the group's collectives.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "CLI/CLI.hpp"
#include "tests/bench/bench_util.h"
#include "tests/bench/null_backend.h"
#include "absl/strings/str_format.h"
#include "kernels/activation_pool.h"
#include "kernels/device.h"
#include "kernels/ops.h"
#include "kernels/numerics.h"
#include "kernels/profiling_backend.h"
#include "nlohmann/json.hpp"
#include "worker/lsa/indexer_init.h"
#include "worker/lsa/lsa_session.h"
#include "worker/model/transformer.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/parallel/timed_communicator.h"

namespace {

using namespace flashmem;

// A pool of bf16 rows the synthetic states copy from (memcpy speed, so 40 GB of state for
// batch 64 at 256K tokens is written in seconds rather than minutes of random draws).
class RowPool {
 public:
  // fp8_dims > 0: each row's first fp8_dims values through the model's FP8 round trip (main KV's
  // nope dims), so they sit on the grid of the records the session holds them in.
  RowPool(int64_t rows, int64_t dim, uint64_t seed, int64_t fp8_dims = 0) : rows_(rows), dim_(dim), v_(rows * dim) {
    std::mt19937_64 g(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (float& x : v_) x = num::RoundBf16(d(g));
    if (fp8_dims > 0)
      for (int64_t r = 0; r < rows; ++r) kernels::CpuBackend().Fp8RoundTrip(v_.data() + r * dim, fp8_dims, 64);
  }
  const float* Row(uint64_t i) const { return v_.data() + (i % rows_) * dim_; }

 private:
  int64_t rows_, dim_;
  std::vector<float> v_;
};

// Session `b`'s state after `context` tokens (context a multiple of 128: every compressor's
// pending block is empty, as right after a block boundary).
std::unique_ptr<model::SessionState> SyntheticState(const model::Transformer& tf, int64_t context, int64_t b,
                                                    const RowPool& main_rows, const RowPool& index_rows) {
  const model::ModelArgs& a = tf.args();
  auto s = tf.NewSession();
  s->position = context;
  uint64_t at = static_cast<uint64_t>(b) * 7919;
  for (int64_t l = 0; l < a.n_layers; ++l) {
    model::LayerState& ls = s->layers[l];
    for (int64_t w = 0; w < a.window_size; ++w)
      ls.window.Overwrite(w, main_rows.Row(at++));
    const int r = a.ratio(l);
    if (r > 0)
      for (int64_t i = 0; i < context / r; ++i) ls.compressed.Append(main_rows.Row(at++));
    if (r == 4)
      for (int64_t i = 0; i < context / 4; ++i) ls.index_keys.Append(index_rows.Row(at++));
  }
  return s;
}

struct Row {
  std::string policy;
  int64_t batch = 0, context = 0;
  double step_ms = 0, tok_s = 0, score_ms = 0, visible = 1, build_s = 0, comm_share = 0, comm_calls = 0;
  double ops_ms = 0;  // a step's time inside backend ops (the rest: the host's own work, collectives)
  double waits = 0;   // times a step waited for the device (Backend::DeviceWaits; 0 on the CPU)
  std::string profile;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Model-level decode benchmark: step time and tokens/s, dense vs LSA"};
  std::string model_dir, indexer_dir, device = "cpu", cuda_kernels = "fast", batches = "1", contexts = "8192",
                                      policies = "dense,lsa", lsa_options, json_out;
  int64_t steps = 4, warmup = 2, gpu_memory_bytes = 0, gpu_kv_reserve_bytes = -1;
  double max_state_gb = 60;
  bool profile = false;
  app.add_option("--model", model_dir)->required();
  app.add_option("--indexer", indexer_dir, "memory indexer (default: indexer init from the model)");
  app.add_option("--device", device, "cpu, cuda:N, or null (no computation: the host's own work)");
  app.add_option("--cuda-kernels", cuda_kernels, "exact, fast or fast-fp8");
  app.add_option("--gpu-memory-bytes", gpu_memory_bytes);
  app.add_option("--gpu-kv-reserve-bytes", gpu_kv_reserve_bytes, "KV reserve (-1: a quarter of the budget; 0: none)");
  app.add_option("--batch", batches, "comma-separated batch sizes");
  app.add_option("--context", contexts, "comma-separated context lengths (multiples of 128)");
  app.add_option("--policy", policies, "dense and/or lsa");
  app.add_option("--lsa-options", lsa_options, "LSA options (released defaults when empty)");
  app.add_option("--steps", steps, "timed decode steps per configuration");
  app.add_option("--warmup", warmup, "untimed decode steps first (the first LSA set lands after step 1)");
  app.add_option("--max-state-gb", max_state_gb, "skip configurations whose sessions need more host memory");
  app.add_flag("--profile", profile, "print the time per op of the timed steps");
  bool host_logits = false;
  app.add_flag("--logits", host_logits,
               "bring every row's logits back and pick the next token on the host (what a sampler with a "
               "temperature needs); default: greedy picks made where the head runs (BatchItem::greedy)");
  app.add_option("--json", json_out, "write the results as JSON");
  parallel::GroupOptions group;
  int tp_timeout_s = 600;
  app.add_option("--tp-size", group.size, "tensor-parallel ranks (one process each)");
  app.add_option("--tp-rank", group.rank, "this process's rank");
  app.add_option("--tp-leader", group.leader_address, "rank 0's group store host:port");
  app.add_option("--tp-timeout-s", tp_timeout_s, "group connect and collective timeout");
  CLI11_PARSE(app, argc, argv);
  group.timeout = absl::Seconds(tp_timeout_s);
  group.group = "model-bench";
  if (device == "cuda") device = "cuda:" + std::to_string(group.rank);
  const bool leader = group.rank == 0;
  // The other ranks compute but print nothing, unless FLASHMEM_BENCH_ALL_RANKS is set (to compare ranks' profiles).
  if (!leader && std::getenv("FLASHMEM_BENCH_ALL_RANKS") == nullptr) std::freopen("/dev/null", "w", stdout);

  const bool null_device = device == "null";
  if (null_device && group.size > 1) { std::fprintf(stderr, "--device null runs one rank\n"); return 2; }
  auto handle = kernels::OpenBackend(null_device ? "cpu" : device, gpu_memory_bytes, cuda_kernels, gpu_kv_reserve_bytes);
  if (!handle.ok()) { std::fprintf(stderr, "%s\n", std::string(handle.status().message()).c_str()); return 2; }
  auto comm = parallel::ConnectGroup(group, null_device ? "cpu" : device);
  if (!comm.ok()) { std::fprintf(stderr, "tensor parallel: %s\n", std::string(comm.status().message()).c_str()); return 2; }
  parallel::TimedCommunicator timed_comm(**comm);
  static const bench::NullBackend null_backend;
  if (null_device) {
    // Activations from a caching pool, as a GPU backend's page-locked one: without it every op's
    // scratch would be fresh heap pages, and their first-touch faults would count as host work.
    static kernels::ActivationPool heap_pool([](size_t bytes) { return std::aligned_alloc(4096, bytes); },
                                             [](void* p, size_t) { std::free(p); });
    kernels::InstallActivationPool(&heap_pool);
  }
  kernels::ProfilingBackend prof(null_device ? static_cast<const kernels::Backend&>(null_backend) : *handle->backend);
  const auto t_load = std::chrono::steady_clock::now();
  auto tf = model::Transformer::Load(model_dir, prof, model::ShardSpec{group.rank, group.size}, nullptr,
                                     group.size > 1 ? &timed_comm : nullptr);
  if (!tf.ok()) { std::fprintf(stderr, "model: %s\n", std::string(tf.status().message()).c_str()); return 1; }
  const model::ModelArgs& a = (*tf)->args();
  std::printf("model %s: %lld layers, dim %lld, %lld experts; backend %s; loaded in %.1f s\n", model_dir.c_str(),
              static_cast<long long>(a.n_layers), static_cast<long long>(a.dim),
              static_cast<long long>(a.n_routed_experts), prof.name(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count());
  std::optional<lsa::MemoryIndexer> mi;
  auto lsa_base = lsa::ParseLsaOptions(lsa_options);
  if (!lsa_base.ok()) { std::fprintf(stderr, "--lsa-options: %s\n", std::string(lsa_base.status().message()).c_str()); return 2; }
  if (policies.find("lsa") != std::string::npos) {
    if (indexer_dir.empty()) {
      indexer_dir = (std::filesystem::temp_directory_path() / ("model_bench_indexer." + std::to_string(group.rank))).string();
      if (auto st = lsa::InitIndexerFromModel(model_dir, {}, indexer_dir); !st.ok()) {
        std::fprintf(stderr, "indexer init: %s\n", std::string(st.message()).c_str());
        return 1;
      }
    }
    auto loaded = lsa::MemoryIndexer::Load(indexer_dir, prof);
    if (!loaded.ok()) { std::fprintf(stderr, "indexer: %s\n", std::string(loaded.status().message()).c_str()); return 1; }
    mi.emplace(std::move(*loaded));
  }

  const RowPool main_rows(4093, a.head_dim, 1, a.nope_head_dim()), index_rows(4093, a.index_head_dim, 2);
  // Host bytes of one session's KV at `context` tokens (fp32 rows).
  auto state_bytes = [&](int64_t context) {
    double b = 0;
    for (int64_t l = 0; l < a.n_layers; ++l) {
      const int r = a.ratio(l);
      b += a.window_size * a.head_dim * 4.0;
      if (r > 0) b += context / r * a.head_dim * 4.0;
      if (r == 4) b += context / 4 * a.index_head_dim * 4.0;
    }
    return b;
  };
  std::vector<Row> rows;
  auto context_list = bench::ParseCounts("--context", contexts);
  auto batch_list = bench::ParseCounts("--batch", batches);
  for (const auto* l : {&context_list, &batch_list})
    if (!l->ok()) { std::fprintf(stderr, "%s\n", std::string(l->status().message()).c_str()); return 2; }
  for (int64_t context : *context_list) {
    for (int64_t batch : *batch_list) {
      if (context % 128 != 0) { std::fprintf(stderr, "--context %lld: not a multiple of 128\n", static_cast<long long>(context)); return 2; }
      if (state_bytes(context) * batch / 1e9 > max_state_gb) {
        std::printf("skip batch %lld x context %lld: %.1f GB of host state > --max-state-gb\n", static_cast<long long>(batch),
                    static_cast<long long>(context), state_bytes(context) * batch / 1e9);
        continue;
      }
      const auto t_build = std::chrono::steady_clock::now();
      std::vector<std::unique_ptr<model::SessionState>> states;
      for (int64_t b = 0; b < batch; ++b) states.push_back(SyntheticState(**tf, context, b, main_rows, index_rows));
      const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_build).count();
      for (const std::string& policy : {std::string("dense"), std::string("lsa")}) {
        if (policies.find(policy) == std::string::npos) continue;
        for (auto& s : states) s->residency = model::Residency();  // dense again
        std::vector<std::unique_ptr<lsa::LsaSession>> lsa;
        if (policy == "lsa")
          for (int64_t b = 0; b < batch; ++b)
            lsa.push_back(std::make_unique<lsa::LsaSession>(*mi, a, *lsa_base, lsa::LsaMode::kAuto, 0,
                                                            /*apply_at_boundary=*/false));
        std::vector<int32_t> tokens(batch);
        std::vector<std::vector<float>> logits(batch);
        std::vector<int32_t> picks(batch);
        for (int64_t b = 0; b < batch; ++b) tokens[b] = static_cast<int32_t>((b * 7919 + 13) % a.vocab_size);
        double timed = 0;
        int64_t waits_before = prof.DeviceWaits();
        for (int64_t step = 0; step < warmup + steps; ++step) {
          if (step == warmup) {
            prof.Reset();
            timed_comm.Reset();
            waits_before = prof.DeviceWaits();
          }
          std::vector<model::BatchItem> items;
          for (int64_t b = 0; b < batch; ++b)
            items.push_back({states[b].get(), std::span<const int32_t>(&tokens[b], 1),
                             host_logits ? &logits[b] : nullptr, nullptr, host_logits ? nullptr : &picks[b]});
          const auto t0 = std::chrono::steady_clock::now();
          for (int64_t b = 0; b < static_cast<int64_t>(lsa.size()); ++b) lsa[b]->BeforeStep(*states[b], true);
          if (auto st = (*tf)->Forward(items); !st.ok()) {
            std::fprintf(stderr, "forward: %s\n", std::string(st.message()).c_str());
            return 1;
          }
          for (int64_t b = 0; b < static_cast<int64_t>(lsa.size()); ++b) lsa[b]->AfterStep(*states[b], true);
          if (step >= warmup) timed += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          for (int64_t b = 0; b < batch; ++b) tokens[b] = host_logits ? kernels::ArgmaxIndex(logits[b]) : picks[b];
        }
        Row r;
        r.policy = policy;
        r.batch = batch;
        r.context = context;
        r.build_s = build_s;
        r.step_ms = timed * 1e3 / steps;
        r.tok_s = batch * steps / timed;
        r.comm_share = timed_comm.seconds() / timed;
        r.comm_calls = static_cast<double>(timed_comm.calls()) / steps;
        r.waits = static_cast<double>(prof.DeviceWaits() - waits_before) / steps;
        for (int k = 0; k < static_cast<int>(kernels::OpKind::kCount); ++k)
          r.ops_ms += prof.Stats(static_cast<kernels::OpKind>(k)).seconds * 1e3 / steps;
        if (!lsa.empty()) {
          const lsa::LsaStats& st = lsa[0]->stats();
          r.score_ms = st.last_score_ms;
          r.visible = st.covered_pages ? static_cast<double>(st.selected_pages) / st.covered_pages : 1.0;
        }
        if (profile) r.profile = prof.Report();
        std::printf("%-5s tp %d batch %3lld context %7lld: step %9.2f ms, %9.1f tok/s, comm %4.1f%% (%.0f calls/step), "
                    "%.1f waits for the device/step%s (state built in %.1f s)\n",
                    policy.c_str(), group.size, static_cast<long long>(batch), static_cast<long long>(context), r.step_ms,
                    r.tok_s, 100 * r.comm_share, r.comm_calls, r.waits,
                    lsa.empty() ? "" : absl::StrFormat(", selected pages %.3f of covered, Level-1 scoring %.1f ms",
                                                       r.visible, r.score_ms).c_str(),
                    build_s);
        if (profile)
          std::printf("%sa step: %.2f ms in ops, %.2f ms outside them (host work, collectives, LSA)\n\n",
                      r.profile.c_str(), r.ops_ms, r.step_ms - r.ops_ms);
        std::fflush(stdout);
        rows.push_back(r);
      }
    }
  }
  if (!json_out.empty() && leader) {
    nlohmann::json j = nlohmann::json::array();
    for (const Row& r : rows)
      j.push_back({{"policy", r.policy}, {"batch", r.batch}, {"context", r.context}, {"step_ms", r.step_ms},
                   {"tok_s", r.tok_s}, {"lsa_selected_fraction", r.visible}, {"level1_score_ms", r.score_ms},
                   {"device", device}, {"cuda_kernels", cuda_kernels},
                   {"tp_size", group.size}, {"comm_share", r.comm_share}, {"comm_calls_per_step", r.comm_calls}, {"ops_ms_per_step", r.ops_ms},
                   {"device_waits_per_step", r.waits},
                   {"profile", r.profile}});
    std::ofstream(json_out) << j.dump(1) << "\n";
  }
  return 0;
}
