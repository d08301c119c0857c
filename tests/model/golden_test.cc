// The decode engine against the official reference's golden vectors (tests/golden, copied
// verbatim from shared/golden). Teacher-forced: the recorded tokens are fed, never our argmax.
// dsv4-tiny-c is checked with its manifest's tight tolerances on the logits and on every
// component; dsv4-tiny-a with its acceptance bands (the reference itself is chaotic there).
#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/model/golden_util.h"
#include "tests/model/test_models.h"
#include "worker/model/transformer.h"

namespace flashmem::testing {
namespace {

using model::BatchItem;
using model::ForwardTrace;
using model::SessionState;
using model::Transformer;
using nlohmann::json;

std::string GoldenDir(const std::string& set) { return std::string(FLASHMEM_GOLDEN_DIR) + "/" + set; }

json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

std::string Sha256File(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char md[32];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  char b[3];
  for (unsigned i = 0; i < len; ++i) { std::snprintf(b, sizeof b, "%02x", md[i]); hex += b; }
  return hex;
}

// One scenario: prefill `prefill`, then feed `fed` one token per call; every row traced.
struct ScenarioRun {
  std::vector<std::vector<float>> logits;
  std::vector<ForwardTrace> traces;
  std::unique_ptr<SessionState> state;
};

ScenarioRun RunScenario(const Transformer& tf, const std::vector<int32_t>& prefill, const std::vector<int32_t>& fed) {
  ScenarioRun run;
  run.state = tf.NewSession();
  auto step = [&](std::span<const int32_t> toks) {
    std::vector<float> logits;
    ForwardTrace trace;
    BatchItem item{run.state.get(), toks, &logits, &trace};
    const absl::Status st = tf.Forward(std::span<BatchItem>(&item, 1));
    EXPECT_TRUE(st.ok()) << st;
    run.logits.push_back(std::move(logits));
    run.traces.push_back(std::move(trace));
  };
  step(prefill);
  for (int32_t t : fed) step(std::span<const int32_t>(&t, 1));
  return run;
}

std::vector<int32_t> Ints(const Array& a, int64_t begin = 0, int64_t end = -1) {
  if (end < 0) end = static_cast<int64_t>(a.i.size());
  return std::vector<int32_t>(a.i.begin() + begin, a.i.begin() + end);
}

class GoldenSet {
 public:
  explicit GoldenSet(const std::string& name) : name_(name) {
    auto f = model::SafetensorsFile::Open(GoldenDir(name) + "/golden.safetensors");
    EXPECT_TRUE(f.ok()) << f.status();
    file_ = std::move(*f);
    manifest_ = ReadJson(GoldenDir(name) + "/manifest.json");
    auto tf = Transformer::Load(GoldenDir(name), TestBackend());
    EXPECT_TRUE(tf.ok()) << tf.status();
    tf_ = std::move(*tf);
    const Array prompt = Get("prompt_ids");
    const auto& L = manifest_["scenario_lengths"];
    const int64_t split = L["split_len"], short_len = L["short_len"];
    const std::vector<int32_t> ids = Ints(prompt);
    const Array s1n = Get("s1_next_tokens"), s3n = Get("s3_next_tokens");
    runs_["s1"] = RunScenario(*tf_, ids, Ints(s1n, 0, static_cast<int64_t>(s1n.i.size()) - 1));
    runs_["s2"] = RunScenario(*tf_, std::vector<int32_t>(ids.begin(), ids.begin() + split),
                              std::vector<int32_t>(ids.begin() + split, ids.end()));
    runs_["s3"] = RunScenario(*tf_, std::vector<int32_t>(ids.begin(), ids.begin() + short_len),
                              Ints(s3n, 0, static_cast<int64_t>(s3n.i.size()) - 1));
  }
  Array Get(const std::string& n) const { return ReadArray(*file_, n); }
  const ScenarioRun& run(const std::string& s) const { return runs_.at(s); }
  const json& manifest() const { return manifest_; }
  const Transformer& model() const { return *tf_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::unique_ptr<model::SafetensorsFile> file_;
  json manifest_;
  std::unique_ptr<Transformer> tf_;
  std::map<std::string, ScenarioRun> runs_;
};

void Report(const std::string& what, double value, const std::string& op, double bound) {
  std::printf("  %-46s %12.6f   %s %g\n", what.c_str(), value, op.c_str(), bound);
}

// ---- integrity ------------------------------------------------------------------------------

TEST(GoldenFiles, CopiesMatchManifestSha256) {
  for (const std::string set : {"dsv4-tiny-a", "dsv4-tiny-c"}) {
    const json m = ReadJson(GoldenDir(set) + "/manifest.json");
    ASSERT_TRUE(m.contains("files_sha256"));
    for (auto it = m["files_sha256"].begin(); it != m["files_sha256"].end(); ++it)
      EXPECT_EQ(Sha256File(GoldenDir(set) + "/" + it.key()), it.value().get<std::string>()) << set << "/" << it.key();
  }
}

// ---- dsv4-tiny-c: the precision oracle ---------------------------------------------------------

class GoldenC : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { set_ = new GoldenSet("dsv4-tiny-c"); }
  static void TearDownTestSuite() { delete set_; }
  static const json& Tol() { return set_->manifest()["recommended_tolerances"]; }
  static GoldenSet* set_;
};
GoldenSet* GoldenC::set_ = nullptr;

TEST_F(GoldenC, LogitsWithinManifestTolerances) {
  const json& t = Tol()["logits"];
  for (const std::string s : {"s1", "s2", "s3"}) {
    const LogitStats st = CompareLogits(set_->Get(s + "_logits"), set_->run(s).logits);
    std::printf("dsv4-tiny-c %s logits (rows %zu):\n", s.c_str(), set_->run(s).logits.size());
    Report("row max|d| median", st.maxabs_median, "<=", t["row_maxabs_median_max"]);
    Report("row max|d| max", st.maxabs_max, "<=", t["row_maxabs_max"]);
    Report("row rel-RMS max", st.relrms_max, "<=", t["row_relrms_max"]);
    Report("centred cosine min", st.cosine_min, ">=", t["cosine_min_min"]);
    Report("argmax agreement", st.argmax_agree, "info", 0);
    EXPECT_LE(st.maxabs_median, t["row_maxabs_median_max"].get<double>()) << s;
    EXPECT_LE(st.maxabs_max, t["row_maxabs_max"].get<double>()) << s;
    EXPECT_LE(st.relrms_max, t["row_relrms_max"].get<double>()) << s;
    EXPECT_GE(st.cosine_min, t["cosine_min_min"].get<double>()) << s;
    EXPECT_EQ(st.argmax_violations, 0) << s << ": argmax differs where the golden margin exceeds 0.5";
  }
}

TEST_F(GoldenC, HeadInputAndHiddenStreams) {
  for (const std::string s : {"s1", "s2", "s3"}) {
    const Array hi = set_->Get(s + "_head_input");
    const ScenarioRun& run = set_->run(s);
    std::vector<double> rel;
    for (int64_t r = 0; r < hi.shape[0]; ++r)
      rel.push_back(RelRms(hi.f.data() + r * hi.row_size(), run.traces[r].head_input.data(), hi.row_size()));
    const json& t = Tol()["head_input"];
    Report(s + " head_input rel-RMS median", Median(rel), "<=", t["row_relrms_median_max"]);
    Report(s + " head_input rel-RMS max", Max(rel), "<=", t["row_relrms_max"]);
    EXPECT_LE(Median(rel), t["row_relrms_median_max"].get<double>()) << s;
    EXPECT_LE(Max(rel), t["row_relrms_max"].get<double>()) << s;
    const Array hh = set_->Get(s + "_hidden_hc");
    if (hh.f.empty()) continue;  // s2 records only its final row
    rel.clear();
    for (int64_t r = 0; r < hh.shape[0]; ++r)
      rel.push_back(RelRms(hh.f.data() + r * hh.row_size(), run.traces[r].hidden_hc.data(), hh.row_size()));
    const json& th = Tol()["hidden_hc"];
    Report(s + " hidden_hc rel-RMS median", Median(rel), "<=", th["row_relrms_median_max"]);
    Report(s + " hidden_hc rel-RMS max", Max(rel), "<=", th["row_relrms_max"]);
    EXPECT_LE(Median(rel), th["row_relrms_median_max"].get<double>()) << s;
    EXPECT_LE(Max(rel), th["row_relrms_max"].get<double>()) << s;
  }
}

TEST_F(GoldenC, BlockOutputsPerLayer) {
  const json& t = Tol()["block_out_hc"];
  for (const std::string s : {"s1", "s3"}) {
    const Array bo = set_->Get(s + "_block_out_hc"), rows = set_->Get(s + "_block_out_rows");
    const int64_t layers = bo.shape[1], per = bo.shape[2] * bo.shape[3];
    for (int64_t l = 0; l < layers; ++l) {
      std::vector<double> rel;
      for (int64_t k = 0; k < bo.shape[0]; ++k) {
        const auto& mine = set_->run(s).traces[rows.i[k]].block_out[l];
        rel.push_back(RelRms(bo.f.data() + (k * layers + l) * per, mine.data(), per));
        EXPECT_LE(rel.back(), t["relrms_max"].get<double>()) << s << " row " << rows.i[k] << " layer " << l;
      }
      Report(s + " block_out L" + std::to_string(l) + " rel-RMS median", Median(rel), "<=", t["per_layer_relrms_median_max"][l]);
      EXPECT_LE(Median(rel), t["per_layer_relrms_median_max"][l].get<double>()) << s << " layer " << l;
    }
  }
  // s2: the final row's block outputs.
  const Array fb = set_->Get("s2_final_block_out_hc");
  const int64_t per = fb.shape[1] * fb.shape[2];
  for (int64_t l = 0; l < fb.shape[0]; ++l)
    EXPECT_LE(RelRms(fb.f.data() + l * per, set_->run("s2").traces.back().block_out[l].data(), per), t["relrms_max"].get<double>()) << "s2 layer " << l;
}

TEST_F(GoldenC, IndexerSelectionsAndScores) {
  const json& t = Tol()["indexer_scores"];
  for (const std::string s : {"s1", "s2", "s3"}) {
    const Array topk = set_->Get(s + "_indexer_topk"), scores = set_->Get(s + "_indexer_scores");
    const ScenarioRun& run = set_->run(s);
    const int64_t rows = topk.shape[0], nl = topk.shape[1], k = topk.shape[2], ns = scores.shape[2];
    std::vector<double> rel;
    int same_sets = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < nl; ++c) {
        std::set<int32_t> g, y(run.traces[r].indexer_topk[c].begin(), run.traces[r].indexer_topk[c].end());
        for (int64_t j = 0; j < k; ++j) if (topk.i[(r * nl + c) * k + j] >= 0) g.insert(static_cast<int32_t>(topk.i[(r * nl + c) * k + j]));
        same_sets += g == y;
        EXPECT_EQ(g, y) << s << " row " << r << " csa layer " << c;
        std::vector<float> gs, ys;
        const auto& mine = run.traces[r].indexer_scores[c];
        for (int64_t j = 0; j < ns; ++j) {
          const float gv = scores.f[(r * nl + c) * ns + j];
          if (!std::isfinite(gv) || j >= static_cast<int64_t>(mine.size())) continue;
          gs.push_back(gv);
          ys.push_back(mine[j]);
        }
        if (!gs.empty()) rel.push_back(RelRms(gs.data(), ys.data(), static_cast<int64_t>(gs.size())));
      }
    Report(s + " indexer identical sets", static_cast<double>(same_sets) / (rows * nl), ">=", 1.0);
    Report(s + " index-score rel-RMS median", Median(rel), "<=", t["relrms_median_max"]);
    Report(s + " index-score rel-RMS max", Max(rel), "<=", t["relrms_max"]);
    EXPECT_LE(Median(rel), t["relrms_median_max"].get<double>()) << s;
    EXPECT_LE(Max(rel), t["relrms_max"].get<double>()) << s;
  }
}

TEST_F(GoldenC, MoERouting) {
  const json& t = Tol()["moe"];
  for (const std::string s : {"s1", "s2", "s3"}) {
    const Array ex = set_->Get(s + "_moe_experts"), wt = set_->Get(s + "_moe_weights");
    const ScenarioRun& run = set_->run(s);
    const int64_t rows = ex.shape[0], layers = ex.shape[1], k = ex.shape[2];
    const int64_t E = set_->model().args().n_routed_experts;
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t l = 0; l < layers; ++l) {
        std::vector<float> gd(E, 0.0f), yd(E, 0.0f);
        std::set<int64_t> gs, ys;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t ge = ex.i[(r * layers + l) * k + j];
          gs.insert(ge);
          gd[ge] = wt.f[(r * layers + l) * k + j];
          ys.insert(run.traces[r].moe_experts[l][j]);
          yd[run.traces[r].moe_experts[l][j]] = run.traces[r].moe_weights[l][j];
        }
        EXPECT_EQ(gs, ys) << s << " row " << r << " layer " << l;
        worst = std::max(worst, MaxAbsDiff(gd.data(), yd.data(), E));
      }
    Report(s + " MoE dense weight max|d|", worst, "<=", t["dense_weight_maxabs_max"]);
    EXPECT_LE(worst, t["dense_weight_maxabs_max"].get<double>()) << s;
  }
}

// The caches at the end of s1, against the reference's dumps.
struct CacheStats {
  double frac_exact = 0, rel_rms = 0, entry_relrms_max = 0;
};

CacheStats CompareRows(const std::string& name, const Array& g, const std::vector<const float*>& mine) {
  CacheStats st;
  const int64_t rows = g.shape[0], dim = g.shape[1];
  EXPECT_EQ(static_cast<int64_t>(mine.size()), rows) << name;
  if (static_cast<int64_t>(mine.size()) != rows) return st;
  std::vector<float> flat;
  for (int64_t r = 0; r < rows; ++r) {
    flat.insert(flat.end(), mine[r], mine[r] + dim);
    st.entry_relrms_max = std::max(st.entry_relrms_max, RelRms(g.f.data() + r * dim, mine[r], dim));
  }
  st.frac_exact = FracExact(g.f.data(), flat.data(), rows * dim);
  st.rel_rms = RelRms(g.f.data(), flat.data(), rows * dim);
  Report(name + " identical fraction", st.frac_exact, "info", 0);
  Report(name + " rel-RMS", st.rel_rms, "info", 0);
  return st;
}

// The entries' values, decoded (main KV is held as FP8 records); `rows` point into `values`.
struct DecodedRows {
  std::vector<float> values;
  std::vector<const float*> rows;
};
DecodedRows PageRows(const kv::EntryPages& pages) {
  DecodedRows d;
  d.values.assign(pages.size() * pages.dim(), 0.0f);
  for (int64_t e = 0; e < pages.size(); ++e) {
    float* row = d.values.data() + e * pages.dim();
    d.rows.push_back(pages.ReadRow(e, row) ? row : nullptr);
  }
  return d;
}

// The window ring's window_size entries, slot by slot.
DecodedRows WindowRows(const SessionState& st, int layer) { return PageRows(st.layers[layer].window); }

void CompareCache(const std::string& name, const Array& g, const std::vector<const float*>& mine, const json& t) {
  const CacheStats st = CompareRows(name, g, mine);
  Report(name + " worst entry rel-RMS", st.entry_relrms_max, "<=", t["entry_relrms_max"]);
  EXPECT_GE(st.frac_exact, t["frac_exact_min"].get<double>()) << name;
  EXPECT_LE(st.rel_rms, t["rel_rms_max"].get<double>()) << name;
  EXPECT_LE(st.entry_relrms_max, t["entry_relrms_max"].get<double>()) << name;
}

TEST_F(GoldenC, CachesAfterS1) {
  const json& t = Tol()["caches_s1_end"];
  const SessionState& st = *set_->run("s1").state;
  const auto& a = set_->model().args();
  for (int l = 0; l < 2; ++l) {
    const std::string n = "s1_end_window_kv_L" + std::to_string(l);
    CompareCache(n, set_->Get(n), WindowRows(st, l).rows, t[n]);
  }
  for (int64_t l = 1; l < a.n_layers; ++l) {
    const std::string n = "s1_end_compressed_kv_L" + std::to_string(l);
    CompareCache(n, set_->Get(n), PageRows(st.layers[l].compressed).rows, t[n]);
    if (a.ratio(l) != 4) continue;
    const std::string ni = "s1_end_indexer_kv_L" + std::to_string(l);
    CompareCache(ni, set_->Get(ni), PageRows(st.layers[l].index_keys).rows, t[ni]);
  }
}

TEST_F(GoldenC, PrefillAgreesWithOwnDecode) {
  const auto& r0 = set_->run("s1").logits.front();
  const auto& last = set_->run("s2").logits.back();
  const double d = MaxAbsDiff(r0.data(), last.data(), static_cast<int64_t>(r0.size()));
  Report("own prefill vs own decode at p=610, max|d|", d, "<=", Tol()["prefill_vs_own_decode"]["s1_row0_vs_s2_last_row_maxabs_max"]);
  EXPECT_LE(d, Tol()["prefill_vs_own_decode"]["s1_row0_vs_s2_last_row_maxabs_max"].get<double>());
}

// ---- dsv4-tiny-a: real top-k selection, acceptance bands ---------------------------------------

class GoldenA : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { set_ = new GoldenSet("dsv4-tiny-a"); }
  static void TearDownTestSuite() { delete set_; }
  static GoldenSet* set_;
};
GoldenSet* GoldenA::set_ = nullptr;

TEST_F(GoldenA, LogitsWithinAcceptanceBands) {
  const json& b = set_->manifest()["recommended_tolerances"]["recommended_logits_bounds"];
  for (const std::string s : {"s1", "s2", "s3"}) {
    const LogitStats st = CompareLogits(set_->Get(s + "_logits"), set_->run(s).logits);
    std::printf("dsv4-tiny-a %s logits:\n", s.c_str());
    Report("centred cosine median", st.cosine_median, ">=", b["centred_cosine_median_min"]);
    Report("centred cosine min", st.cosine_min, ">=", b["centred_cosine_min_min"]);
    Report("row max|d| median", st.maxabs_median, "<=", b["row_maxabs_median_max"]);
    Report("row max|d| p90", st.maxabs_p90, "<=", b["row_maxabs_p90_max"]);
    Report("argmax agreement", st.argmax_agree, ">=", b["argmax_agree_frac_min"]);
    EXPECT_GE(st.cosine_median, b["centred_cosine_median_min"].get<double>()) << s;
    EXPECT_GE(st.cosine_min, b["centred_cosine_min_min"].get<double>()) << s;
    EXPECT_LE(st.maxabs_median, b["row_maxabs_median_max"].get<double>()) << s;
    EXPECT_LE(st.maxabs_p90, b["row_maxabs_p90_max"].get<double>()) << s;
    EXPECT_GE(st.argmax_agree, b["argmax_agree_frac_min"].get<double>()) << s;
  }
}

// Bounds of recommended_component_bounds (stated in words in the manifest).
constexpr double kWindowL0FracExact = 0.99, kWindowL0RelRms = 0.01;
constexpr double kCompressedFracExact = 0.25, kCompressedRelRms = 0.15;
constexpr double kIndexerKvFracExact = 0.6, kIndexerKvRelRms = 0.25;
constexpr double kTopkOverlap = 0.7, kMoeSameSets = 0.85, kHeadInputRelRms = 0.25;

TEST_F(GoldenA, ComponentsWithinBands) {
  const auto& a = set_->model().args();
  for (const std::string s : {"s1", "s2", "s3"}) {
    const ScenarioRun& run = set_->run(s);
    const Array topk = set_->Get(s + "_indexer_topk");
    const int64_t rows = topk.shape[0], nl = topk.shape[1], k = topk.shape[2];
    double overlap = 0;
    int64_t n_sets = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < nl; ++c) {
        std::set<int32_t> g;
        for (int64_t j = 0; j < k; ++j) if (topk.i[(r * nl + c) * k + j] >= 0) g.insert(static_cast<int32_t>(topk.i[(r * nl + c) * k + j]));
        if (g.empty()) continue;
        int64_t hit = 0;
        for (int32_t e : run.traces[r].indexer_topk[c]) hit += g.count(e);
        overlap += static_cast<double>(hit) / g.size();
        ++n_sets;
      }
    overlap /= std::max<int64_t>(1, n_sets);
    const Array ex = set_->Get(s + "_moe_experts");
    const int64_t layers = ex.shape[1], ke = ex.shape[2];
    int64_t same = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t l = 0; l < layers; ++l) {
        std::set<int64_t> g(ex.i.begin() + (r * layers + l) * ke, ex.i.begin() + (r * layers + l + 1) * ke);
        std::set<int64_t> y(run.traces[r].moe_experts[l].begin(), run.traces[r].moe_experts[l].end());
        same += g == y;
      }
    const double same_frac = static_cast<double>(same) / (rows * layers);
    const Array hi = set_->Get(s + "_head_input");
    std::vector<double> rel;
    for (int64_t r = 0; r < rows; ++r) rel.push_back(RelRms(hi.f.data() + r * a.dim, run.traces[r].head_input.data(), a.dim));
    std::printf("dsv4-tiny-a %s components:\n", s.c_str());
    Report("indexer top-k mean overlap", overlap, ">=", kTopkOverlap);
    Report("MoE identical expert sets", same_frac, ">=", kMoeSameSets);
    Report("head_input rel-RMS max", Max(rel), "<=", kHeadInputRelRms);
    EXPECT_GE(overlap, kTopkOverlap) << s;
    EXPECT_GE(same_frac, kMoeSameSets) << s;
    EXPECT_LE(Max(rel), kHeadInputRelRms) << s;
  }
  const SessionState& st = *set_->run("s1").state;
  auto check = [&](const std::string& n, const std::vector<const float*>& mine, double fe_min, double rr_max) {
    const CacheStats cs = CompareRows(n, set_->Get(n), mine);
    EXPECT_GE(cs.frac_exact, fe_min) << n;
    EXPECT_LE(cs.rel_rms, rr_max) << n;
  };
  check("s1_end_window_kv_L0", WindowRows(st, 0).rows, kWindowL0FracExact, kWindowL0RelRms);
  for (int64_t l = 1; l < a.n_layers; ++l) {
    check("s1_end_compressed_kv_L" + std::to_string(l), PageRows(st.layers[l].compressed).rows, kCompressedFracExact, kCompressedRelRms);
    if (a.ratio(l) == 4)
      check("s1_end_indexer_kv_L" + std::to_string(l), PageRows(st.layers[l].index_keys).rows, kIndexerKvFracExact, kIndexerKvRelRms);
  }
}

}  // namespace
}  // namespace flashmem::testing
