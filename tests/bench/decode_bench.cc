// Decode throughput of the CPU reference backend and time per op (Google Benchmark).
//   build/tests/bench/decode_bench --benchmark_counters_tabular=true
// Models are random checkpoints of the `tiny` and `small` presets written to a temp dir once.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <map>
#include <random>

#include "kernels/numerics.h"
#include "kernels/ops.h"
#include "worker/model/random_checkpoint.h"
#include "worker/model/transformer.h"

namespace flashmem {
namespace {

using model::BatchItem;
using model::Transformer;

Transformer& Model(const std::string& preset) {
  static std::map<std::string, std::unique_ptr<Transformer>> cache;
  auto& m = cache[preset];
  if (!m) {
    const std::string dir = (std::filesystem::temp_directory_path() / ("flashmem_bench_" + preset)).string();
    if (!std::filesystem::exists(dir + "/model.safetensors")) {
      auto args = model::PresetArgs(preset);
      if (!args.ok() || !model::WriteRandomCheckpoint(*args, 1, dir).ok()) std::abort();
    }
    auto tf = Transformer::Load(dir, kernels::CpuBackend());
    if (!tf.ok()) std::abort();
    m = std::move(*tf);
  }
  return *m;
}

// One decode step per iteration for `batch` sessions that each hold `context` tokens.
void BM_Decode(benchmark::State& state, const std::string& preset) {
  Transformer& tf = Model(preset);
  const int64_t batch = state.range(0), context = state.range(1);
  std::vector<std::unique_ptr<model::SessionState>> sessions;
  std::vector<int32_t> prompt(context);
  for (int64_t i = 0; i < context; ++i) prompt[i] = static_cast<int32_t>((i * 7919 + 13) % tf.args().vocab_size);
  std::vector<std::vector<float>> logits(batch);
  for (int64_t b = 0; b < batch; ++b) {
    sessions.push_back(tf.NewSession());
    BatchItem it{sessions.back().get(), prompt, nullptr, nullptr};
    if (!tf.Forward(std::span<BatchItem>(&it, 1)).ok()) std::abort();
  }
  std::vector<int32_t> next(batch, 1);
  for (auto _ : state) {
    std::vector<BatchItem> items;
    for (int64_t b = 0; b < batch; ++b) items.push_back({sessions[b].get(), std::span<const int32_t>(&next[b], 1), &logits[b], nullptr});
    if (!tf.Forward(items).ok()) std::abort();
    for (int64_t b = 0; b < batch; ++b)
      next[b] = static_cast<int32_t>(std::max_element(logits[b].begin(), logits[b].end()) - logits[b].begin());
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(state.iterations() * batch), benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_Decode, tiny, std::string("tiny"))->Args({1, 512})->Args({8, 512})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Decode, small, std::string("small"))->Args({1, 512})->Args({8, 512})->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Prefill(benchmark::State& state, const std::string& preset) {
  Transformer& tf = Model(preset);
  std::vector<int32_t> prompt(state.range(0));
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 7919 + 13) % tf.args().vocab_size);
  for (auto _ : state) {
    auto s = tf.NewSession();
    std::vector<float> logits;
    BatchItem it{s.get(), prompt, &logits, nullptr};
    if (!tf.Forward(std::span<BatchItem>(&it, 1)).ok()) std::abort();
  }
  state.counters["tok/s"] = benchmark::Counter(static_cast<double>(state.iterations() * prompt.size()), benchmark::Counter::kIsRate);
}
BENCHMARK_CAPTURE(BM_Prefill, tiny, std::string("tiny"))->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

// ---- ops ---------------------------------------------------------------------------------------

std::vector<float> Rand(size_t n, float std = 1.0f) {
  std::mt19937 g(1);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = num::RoundBf16(d(g));
  return v;
}

kernels::WeightMatrix Weight(kernels::WeightFormat f, int64_t rows, int64_t cols) {
  kernels::WeightMatrix w;
  w.format = f;
  w.rows = rows;
  w.cols = cols;
  w.values = Rand(rows * cols);
  for (float& v : w.values) v = num::RoundE4m3(v);
  w.scales.assign(f == kernels::WeightFormat::kFp4Group32 ? rows * cols / 32 : ((rows + 127) / 128) * ((cols + 127) / 128), 0.01f);
  return w;
}

void BM_Linear(benchmark::State& state, kernels::WeightFormat f) {
  const int64_t rows = state.range(0), cols = state.range(1), n = state.range(2);
  const auto w = Weight(f, rows, cols);
  const auto x = Rand(n * cols);
  std::vector<float> y(n * rows);
  for (auto _ : state) kernels::CpuBackend().Linear(w, x.data(), n, y.data(), kernels::Rounding::kBf16);
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(state.iterations() * rows * cols * n) / 1e9, benchmark::Counter::kIsRate);
}
// wq_b of tiny (2048x128), routed expert w1 of tiny (256x128), the tiny head (129280x128).
BENCHMARK_CAPTURE(BM_Linear, fp8, kernels::WeightFormat::kFp8Block128)->Args({2048, 128, 1})->Args({2048, 128, 8})->UseRealTime();
BENCHMARK_CAPTURE(BM_Linear, fp4, kernels::WeightFormat::kFp4Group32)->Args({256, 128, 1})->Args({256, 128, 8})->UseRealTime();
BENCHMARK_CAPTURE(BM_Linear, dense_head, kernels::WeightFormat::kDense)->Args({129280, 128, 1})->UseRealTime();

void BM_SparseAttention(benchmark::State& state) {
  const int64_t heads = state.range(0), n = state.range(1), D = 512;
  const auto q = Rand(heads * D, 0.1f), kv = Rand(n * D);
  std::vector<const float*> rows;
  for (int64_t j = 0; j < n; ++j) rows.push_back(kv.data() + j * D);
  std::vector<float> sink(heads, 1.0f), out(heads * D);
  for (auto _ : state) kernels::CpuBackend().SparseAttention(q.data(), heads, D, rows, sink.data(), 0.044f, out.data());
}
BENCHMARK(BM_SparseAttention)->Args({4, 128 + 16})->Args({4, 128 + 162})->Args({64, 128 + 512})->UseRealTime();

void BM_IndexScores(benchmark::State& state) {
  const int64_t heads = state.range(0), n = state.range(1), D = 128;
  const auto q = Rand(heads * D), k = Rand(n * D), w = Rand(heads);
  std::vector<const float*> rows;
  for (int64_t j = 0; j < n; ++j) rows.push_back(k.data() + j * D);
  std::vector<float> s(n);
  for (auto _ : state) kernels::CpuBackend().IndexScores(q.data(), w.data(), heads, D, rows, s.data());
}
BENCHMARK(BM_IndexScores)->Args({4, 256})->Args({64, 2048})->UseRealTime();

void BM_HcPre(benchmark::State& state) {
  const int hc = 4;
  const int64_t dim = state.range(0), mix = (2 + hc) * hc;
  const auto x = Rand(hc * dim), fn = Rand(mix * hc * dim, 0.01f), base = Rand(mix);
  std::vector<float> scale = {1, 1, 1}, y(dim), post(hc), comb(hc * hc);
  for (auto _ : state)
    kernels::CpuBackend().HcPre(x.data(), 1, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, y.data(), post.data(), comb.data());
}
BENCHMARK(BM_HcPre)->Arg(128)->Arg(4096)->UseRealTime();

void BM_Hadamard(benchmark::State& state) {
  auto x = Rand(state.range(0) * 128);
  for (auto _ : state) kernels::CpuBackend().Hadamard(x.data(), state.range(0), 128);
}
BENCHMARK(BM_Hadamard)->Arg(4)->Arg(64)->UseRealTime();

}  // namespace
}  // namespace flashmem

BENCHMARK_MAIN();
