// LSA benchmark (issue 5 item 9; docs/benchmarks.md): one prefilled context, then the same
// decode steps under dense attention and under LSA with the memory indexer, recency-only and
// random page choices at an equal budget (KMAX). Per policy: bytes the worker must hold
// (visible evictable pages + what never leaves) against dense, decode step time, stalls per 1000
// steps, MB of pages newly recalled per refresh, and Level-2 agreement with the full top-k
// (a second pass, so the timing pass does not pay for the full top-k).
//
//   lsa_bench --model DIR --indexer DIR --context 8192 --steps 256 --lsa-options kmax=8,interval=64
//             [--state-cache FILE] [--json OUT]
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "CLI/CLI.hpp"
#include "common/file.h"
#include "kernels/ops.h"
#include "nlohmann/json.hpp"
#include "tests/test_prompt.h"
#include "worker/lsa/indexer_init.h"
#include "worker/lsa/lsa_session.h"
#include "worker/model/sampler.h"
#include "worker/model/state_codec.h"
#include "worker/model/transformer.h"

namespace {

using namespace flashmem;

// The benchmark's prompt: always the same ids (seed 12345).
std::vector<int32_t> Prompt(int64_t n, int64_t vocab) { return testing::Prompt(n, vocab, 12345); }

struct Result {
  std::string policy;
  double step_ms = 0, resident_bytes = 0, dense_bytes = 0, stalls_per_1000 = 0, mb_recalled_per_refresh = 0;
  double agreement = -1, churn = 1, score_ms = 0;
  uint64_t refreshes = 0;
};

// Bytes the worker must hold under the session's Level-2 view: the visible evictable pages (CSA
// main KV, index keys of non-target CSA layers) plus everything that never leaves.
std::pair<double, double> HeldBytes(const model::SessionState& s, const model::ModelArgs& a, const std::vector<int>& pinned) {
  double held = 0, dense = 0;
  int64_t csa = 0;
  for (int64_t l = 0; l < a.n_layers; ++l) {
    const model::LayerState& ls = s.layers[l];
    const double fixed = static_cast<double>(ls.window.memory_bytes()) + (ls.compressor.kv.size() + ls.index_compressor.kv.size()) * 4.0;
    held += fixed;
    dense += fixed;
    auto pages = [&](const kv::EntryPages& e, bool evictable) {
      for (int64_t p = 0; p < e.num_pages(); ++p) {
        const double b = std::min<int64_t>(64, e.size() - p * 64) * static_cast<double>(e.entry_bytes());
        dense += b;
        if (!evictable || p >= e.complete_pages() || s.residency.PageVisible(p)) held += b;
      }
    };
    const int r = a.ratio(l);
    if (r > 0) pages(ls.compressed, r == 4);
    if (r == 4) {
      pages(ls.index_keys, std::find(pinned.begin(), pinned.end(), csa) == pinned.end());
      ++csa;
    }
  }
  return {held, dense};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"LSA benchmark: dense vs memory indexer vs recency vs random at equal KMAX"};
  std::string model_dir, indexer_dir, lsa_options = "kmax=8", state_cache, json_out;
  int64_t context = 8192, steps = 256, agree_steps = 128;
  app.add_option("--model", model_dir)->required();
  app.add_option("--indexer", indexer_dir, "memory indexer (default: indexer init from the model)");
  app.add_option("--context", context, "prompt tokens");
  app.add_option("--steps", steps, "decode steps per policy (timing pass)");
  app.add_option("--agree-steps", agree_steps, "decode steps of the agreement pass");
  app.add_option("--lsa-options", lsa_options, "LSA options shared by every policy");
  app.add_option("--state-cache", state_cache, "reuse / write the prefilled state here");
  app.add_option("--json", json_out, "write the results as JSON");
  CLI11_PARSE(app, argc, argv);

  auto tf = model::Transformer::Load(model_dir, kernels::CpuBackend());
  if (!tf.ok()) { std::fprintf(stderr, "%s\n", std::string(tf.status().message()).c_str()); return 1; }
  const model::ModelArgs& a = (*tf)->args();
  if (indexer_dir.empty()) {
    indexer_dir = (std::filesystem::temp_directory_path() / "lsa_bench_indexer").string();
    if (auto st = lsa::InitIndexerFromModel(model_dir, {}, indexer_dir); !st.ok()) {
      std::fprintf(stderr, "%s\n", std::string(st.message()).c_str());
      return 1;
    }
  }
  auto mi = lsa::MemoryIndexer::Load(indexer_dir, kernels::CpuBackend());
  auto base = lsa::ParseLsaOptions(lsa_options);
  if (!mi.ok() || !base.ok()) { std::fprintf(stderr, "indexer or options: bad\n"); return 1; }

  // The prefilled context (cached: prefill dominates at long contexts).
  std::string blob;
  if (!state_cache.empty() && std::filesystem::exists(state_cache)) {
    blob = *ReadFileToString(state_cache);
    std::printf("context: %lld tokens from %s\n", static_cast<long long>(context), state_cache.c_str());
  } else {
    auto s = (*tf)->NewSession();
    const auto prompt = Prompt(context, a.vocab_size);
    std::vector<float> logits;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t at = 0; at < context; at += 512) {
      model::BatchItem it{s.get(), std::span<const int32_t>(prompt.data() + at, std::min<int64_t>(512, context - at)), &logits, nullptr};
      if (auto st = (*tf)->Forward(std::span<model::BatchItem>(&it, 1)); !st.ok()) return 1;
      std::fprintf(stderr, "\rprefill %lld / %lld tokens", static_cast<long long>(std::min<int64_t>(at + 512, context)),
                   static_cast<long long>(context));
    }
    std::printf("\nprefill: %lld tokens in %.1f s\n", static_cast<long long>(context),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    blob = model::SerializeSessionState(*s, a);
    if (!state_cache.empty()) std::ofstream(state_cache, std::ios::binary) << blob;
  }

  const std::vector<int> pinned = base->target_layers.empty() ? mi->csa_layers() : base->target_layers;
  const int64_t page_set_bytes = [&] {  // bytes of one logical CSA page across the evictable streams
    int64_t b = 0, csa = 0;
    for (int64_t l = 0; l < a.n_layers; ++l)
      if (a.ratio(l) == 4) {
        b += 64 * a.head_dim * 4;
        if (std::find(pinned.begin(), pinned.end(), csa++) == pinned.end()) b += 64 * a.index_head_dim * 4;
      }
    return b;
  }();
  std::vector<Result> results;
  for (const char* policy : {"dense", "indexer", "recency", "random"}) {
    Result r;
    r.policy = policy;
    for (int pass = 0; pass < 2; ++pass) {
      const bool measure = pass == 1;
      if (measure && r.policy == "dense") break;
      auto s = model::DeserializeSessionState(blob, a);
      if (!s.ok()) { std::fprintf(stderr, "state: %s\n", std::string(s.status().message()).c_str()); return 1; }
      std::unique_ptr<lsa::LsaSession> lsa;
      if (r.policy != "dense") {
        lsa::LsaOptions o = *lsa::ParseLsaOptions("policy=" + r.policy, *base);
        lsa = std::make_unique<lsa::LsaSession>(*mi, a, o, lsa::LsaMode::kAuto, 0);
        (*s)->residency.measure_agreement = measure;
      }
      std::vector<float> logits;
      int32_t tok = 2;
      const int64_t n = measure ? agree_steps : steps;
      double total = 0;
      for (int64_t i = 0; i < n; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        model::BatchItem it{s->get(), std::span<const int32_t>(&tok, 1), &logits, nullptr};
        if (lsa) lsa->BeforeStep(**s, true);
        if (!(*tf)->Forward(std::span<model::BatchItem>(&it, 1)).ok()) return 1;
        if (lsa) lsa->AfterStep(**s, true);
        total += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        tok = static_cast<int32_t>(model::SampleToken(logits, {}, static_cast<uint64_t>(i)));
      }
      if (measure) {
        const auto& res = (*s)->residency;
        if (res.agreement_count) r.agreement = res.agreement_sum / res.agreement_count;
        continue;
      }
      r.step_ms = total / n;
      auto [held, dense] = HeldBytes(**s, a, pinned);
      r.resident_bytes = held;
      r.dense_bytes = dense;
      if (lsa) {
        const lsa::LsaStats& st = lsa->stats();
        r.refreshes = st.refreshes;
        r.stalls_per_1000 = 1000.0 * st.stalls / n;
        r.mb_recalled_per_refresh = st.sets_applied ? st.pages_recalled * page_set_bytes / 1e6 / st.sets_applied : 0;
        r.churn = st.churn_count ? st.churn_jaccard_sum / st.churn_count : 1.0;
        r.score_ms = st.last_score_ms;
      }
    }
    std::printf("%-8s step %7.2f ms  held %8.2f MB / dense %8.2f MB (%.3f)  stalls/1000 %6.1f  MB recalled/refresh %7.3f  "
                "churn %.3f  scoring %6.1f ms  level-2 agreement %s\n",
                r.policy.c_str(), r.step_ms, r.resident_bytes / 1e6, r.dense_bytes / 1e6, r.resident_bytes / r.dense_bytes,
                r.stalls_per_1000, r.mb_recalled_per_refresh, r.churn, r.score_ms,
                r.agreement < 0 ? "-" : std::to_string(r.agreement).c_str());
    std::fflush(stdout);
    results.push_back(r);
  }
  if (!json_out.empty()) {
    nlohmann::json j = nlohmann::json::array();
    for (const Result& r : results)
      j.push_back({{"policy", r.policy}, {"context", context}, {"options", lsa_options}, {"step_ms", r.step_ms},
                   {"held_bytes", r.resident_bytes}, {"dense_bytes", r.dense_bytes}, {"stalls_per_1000", r.stalls_per_1000},
                   {"mb_recalled_per_refresh", r.mb_recalled_per_refresh}, {"churn", r.churn},
                   {"level2_agreement", r.agreement}, {"refreshes", r.refreshes}});
    std::ofstream(json_out) << j.dump(1) << "\n";
  }
  return 0;
}
