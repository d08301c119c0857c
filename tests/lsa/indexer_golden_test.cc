// fm-indexer-a: flashmem's memory indexer and selection rules against the official release's
// outputs (tests/golden/fm-indexer-a, tolerances of its manifest): logits within 5e-5 (ref) and
// 1e-3 (fp8q) of the row max, every mask exact, page scores and K exact, page lists valid
// under the must/tie rule and equal to pages_canonical.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>

#include <gtest/gtest.h>

#include "kernels/ops.h"
#include "tests/model/golden_util.h"
#include "tests/model/test_models.h"
#include "worker/lsa/golden_eval.h"
#include "worker/lsa/memory_indexer.h"
#include "worker/model/safetensors.h"

namespace flashmem::lsa {
namespace {

const std::string kDir = std::string(FLASHMEM_GOLDEN_DIR) + "/fm-indexer-a";

std::vector<uint8_t> U8(const model::SafetensorsFile& f, const std::string& name) {
  auto it = f.tensors().find(name);
  if (it == f.tensors().end()) return {};
  return std::vector<uint8_t>(it->second.bytes.begin(), it->second.bytes.end());
}

class IndexerGolden : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    out_path_ = new std::string((std::filesystem::temp_directory_path() / "fm_indexer_golden_eval.safetensors").string());
    ASSERT_TRUE(RunGoldenEval(kDir, *out_path_, testing::TestBackend()).ok());
    mine_ = model::SafetensorsFile::Open(*out_path_)->release();
    golden_ = model::SafetensorsFile::Open(kDir + "/expected.safetensors")->release();
  }
  static void TearDownTestSuite() {
    delete mine_;
    delete golden_;
    std::filesystem::remove(*out_path_);
    delete out_path_;
  }
  static testing::Array Mine(const std::string& n) { return testing::ReadArray(*mine_, n); }
  static testing::Array Gold(const std::string& n) { return testing::ReadArray(*golden_, n); }

  static std::string* out_path_;
  static model::SafetensorsFile* mine_;
  static model::SafetensorsFile* golden_;
};
std::string* IndexerGolden::out_path_ = nullptr;
model::SafetensorsFile* IndexerGolden::mine_ = nullptr;
model::SafetensorsFile* IndexerGolden::golden_ = nullptr;

const char* kLayers[] = {"l10", "l12", "l20"};
const char* kVariants[] = {"ref", "fp8q"};

TEST_F(IndexerGolden, RopeInverseFrequenciesAreTheOfficialTable) {
  auto mi = MemoryIndexer::Load(kDir + "/indexer_weights.safetensors", testing::TestBackend());
  ASSERT_TRUE(mi.ok()) << mi.status();
  const auto g = Gold("rope_inv_freq");
  ASSERT_EQ(g.f.size(), 32u);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(mi->rope_inv_freq()[i], g.f[i]) << "inv_freq[" << i << "]";
}

TEST_F(IndexerGolden, QueryIntermediates) {
  for (const char* l : kLayers) {
    const auto q = Mine(std::string("q_final.") + l), gq = Gold(std::string("q_final.") + l);
    ASSERT_EQ(q.f.size(), gq.f.size());
    double max_rel = 0;
    for (size_t i = 0; i < q.f.size(); i += 128) {  // per head, relative to the head's max
      double hm = 0, d = 0;
      for (size_t k = i; k < i + 128; ++k) {
        hm = std::max(hm, std::fabs(static_cast<double>(gq.f[k])));
        d = std::max(d, std::fabs(static_cast<double>(q.f[k]) - gq.f[k]));
      }
      max_rel = std::max(max_rel, d / hm);
    }
    EXPECT_LT(max_rel, 1e-2) << l << " (a bf16 ulp of small elements at most)";
    const auto w = Mine(std::string("fused_w.") + l), gw = Gold(std::string("fused_w.") + l);
    for (size_t i = 0; i < w.f.size(); ++i) EXPECT_NEAR(w.f[i], gw.f[i], 1e-6 * std::fabs(gw.f[i]) + 1e-9) << l << " fused_w " << i;
  }
}

TEST_F(IndexerGolden, LogitsWithinManifestTolerance) {
  for (const char* v : kVariants) {
    const double tol = std::string(v) == "ref" ? 5e-5 : 1e-3;
    for (const char* l : kLayers) {
      const std::string name = std::string("logits_") + v + "." + l;
      const auto m = Mine(name), g = Gold(name);
      ASSERT_EQ(m.shape, g.shape) << name;
      const int64_t N = g.shape[1];
      double worst = 0;
      for (int64_t q = 0; q < g.shape[0]; ++q) {
        double rowmax = 0, d = 0;
        for (int64_t j = 0; j < N; ++j) rowmax = std::max(rowmax, std::fabs(static_cast<double>(g.f[q * N + j])));
        for (int64_t j = 0; j < N; ++j) {
          ASSERT_FALSE(std::isnan(m.f[q * N + j])) << name;
          d = std::max(d, std::fabs(static_cast<double>(m.f[q * N + j]) - g.f[q * N + j]));
        }
        worst = std::max(worst, d / rowmax);
      }
      EXPECT_LE(worst, tol) << name;
      std::printf("%s: max |mine - golden| / row max = %.3g (tolerance %.0e)\n", name.c_str(), worst, tol);
      RecordProperty(name + ".max_rel_to_rowmax", std::to_string(worst));
    }
  }
}

TEST_F(IndexerGolden, EnsemblesAndChunkSetsExact) {
  for (const char* v : kVariants) {
    // The ensembles inherit the logits' tolerance through sigmoid' <= 1/4: per query,
    // |d ens| <= tol/4 * (largest row max |logit| over the layers).
    const double tol = std::string(v) == "ref" ? 5e-5 : 1e-3;
    const auto g0 = Gold(std::string("logits_") + v + ".l10");
    const int64_t Q = g0.shape[0], N = g0.shape[1];
    std::vector<double> rowmax(Q, 0.0);
    for (const char* l : kLayers) {
      const auto g = Gold(std::string("logits_") + v + "." + l);
      for (int64_t q = 0; q < Q; ++q)
        for (int64_t j = 0; j < N; ++j) rowmax[q] = std::max(rowmax[q], std::fabs(static_cast<double>(g.f[q * N + j])));
    }
    for (const char* e : {"ens_max.", "ens_mean."}) {
      const auto m = Mine(std::string(e) + v), g = Gold(std::string(e) + v);
      ASSERT_EQ(m.f.size(), g.f.size());
      for (int64_t i = 0; i < Q * N; ++i)
        ASSERT_NEAR(m.f[i], g.f[i], 0.25 * tol * rowmax[i / N]) << e << v << " " << i;
    }
    for (const char* c : {"C1", "C2", "C3", "C4"}) {
      const std::string name = std::string("sel.") + c + "." + v + ".keep";
      const auto m = U8(*mine_, name), g = U8(*golden_, name);
      ASSERT_FALSE(g.empty()) << name;
      ASSERT_EQ(m.size(), g.size()) << name;
      int64_t diff = 0;
      for (size_t i = 0; i < g.size(); ++i) diff += m[i] != g[i];
      EXPECT_EQ(diff, 0) << name;
    }
  }
}

TEST_F(IndexerGolden, PageSetsExactUnderTheTieRule) {
  for (const char* v : kVariants) {
    for (const char* p : {"P0", "P1", "P2", "P3", "P4", "P5"}) {
      const std::string s = std::string("sel.") + p + "." + v + ".";
      const auto ms = Mine(s + "page_score"), gs = Gold(s + "page_score");
      ASSERT_EQ(ms.f.size(), gs.f.size()) << s;
      for (size_t i = 0; i < gs.f.size(); ++i) ASSERT_EQ(ms.f[i], gs.f[i]) << s << "page_score " << i;
      EXPECT_EQ(Mine(s + "K").i, Gold(s + "K").i) << s;
      const auto pages = Mine(s + "pages"), canon = Gold(s + "pages_canonical");
      EXPECT_EQ(pages.i, canon.i) << s << "pages vs pages_canonical";
      // The acceptance rule on its own: every must page, exactly n_from_tie tie pages.
      const auto must = U8(*golden_, s + "must"), tie = U8(*golden_, s + "tie");
      const auto n_from_tie = Gold(s + "n_from_tie").i;
      const int64_t Q = static_cast<int64_t>(n_from_tie.size()), NP = static_cast<int64_t>(must.size()) / Q;
      const int64_t kmax = pages.shape[1];
      for (int64_t q = 0; q < Q; ++q) {
        std::vector<uint8_t> chosen(NP, 0);
        for (int64_t k = 0; k < kmax; ++k)
          if (pages.i[q * kmax + k] >= 0) chosen[pages.i[q * kmax + k]] = 1;
        int64_t from_tie = 0;
        for (int64_t pg = 0; pg < NP; ++pg) {
          if (must[q * NP + pg]) EXPECT_TRUE(chosen[pg]) << s << "q" << q << " must page " << pg;
          if (chosen[pg] && !must[q * NP + pg]) {
            EXPECT_TRUE(tie[q * NP + pg]) << s << "q" << q << " page " << pg << " is neither must nor tie";
            ++from_tie;
          }
        }
        EXPECT_EQ(from_tie, n_from_tie[q]) << s << "q" << q;
      }
      // keep: exact where the official choice is the canonical one, else the canonical expansion.
      const auto mk = U8(*mine_, s + "keep");
      const auto gp = Gold(s + "pages");
      const auto gk = U8(*golden_, s + "keep");
      const int64_t N = static_cast<int64_t>(gk.size()) / Q;
      for (int64_t q = 0; q < Q; ++q) {
        bool same = true;
        for (int64_t k = 0; k < kmax; ++k) same &= gp.i[q * kmax + k] == canon.i[q * kmax + k];
        if (!same) continue;
        for (int64_t j = 0; j < N; ++j) ASSERT_EQ(mk[q * N + j], gk[q * N + j]) << s << "keep q" << q << " chunk " << j;
      }
    }
  }
}

TEST_F(IndexerGolden, ThresholdFallbackTrace) {
  EXPECT_EQ(U8(*mine_, "fb.triggered"), U8(*golden_, "fb.triggered"));
  EXPECT_EQ(U8(*mine_, "fb.keep"), U8(*golden_, "fb.keep"));
  EXPECT_EQ(Mine("fb.cum_thresh").i, Gold("fb.cum_thresh").i);
  EXPECT_EQ(Mine("fb.cum_c4").i, Gold("fb.cum_c4").i);
  EXPECT_EQ(Mine("fb.n_keep").i, Gold("fb.n_keep").i);
}

}  // namespace
}  // namespace flashmem::lsa
