// LSA Level 1 selection rules (spec/memory_indexer.md §2, §3, §6): the ensemble over target
// layers, the chunk-level resident set, the page-level set (density -> top-KMAX pages ∪ recency
// tail ∪ sink) and the threshold fallback. Chunks are c4 chunks (4 tokens); a page is 64 chunks.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace flashmem::lsa {

inline constexpr int64_t kChunksPerPage = 64;

enum class Ensemble { kOr, kMean };

// The release's knobs under flashmem's option names (spec §7); defaults are the deployed values.
struct LsaOptions {
  int64_t interval = 64;          // lsa.interval: decode steps between refreshes
  float threshold = 0.5f;         // lsa.threshold: selected iff ensemble score > threshold
  Ensemble ensemble = Ensemble::kOr;  // lsa.ensemble
  int64_t tail_chunks = 2048;     // lsa.tail_chunks: recency tail, in chunks
  int64_t sink_chunks = 0;        // lsa.sink_chunks
  int64_t kmax = 96;              // lsa.kmax: pages
  double kmax_ratio = 0.0;        // lsa.kmax_ratio: > 0 overrides kmax, relative to target_context
  int64_t target_context_tokens = 262144;
  int64_t max_resident = 0;       // chunk-level cap (0: none)
  double fallback_limit = 0.0;    // lsa.fallback_limit: > 0 enables the threshold fallback
  bool stagger = false;           // lsa.stagger: per-session phase = admission counter % interval
  std::vector<int> target_layers; // lsa.target_layers: CSA ids (empty: the indexer's own)
  // lsa.policy: how pages are chosen. `indexer` is LSA; `recency` (the KMAX newest pages) and
  // `random` (the forced tail and sink, then random pages up to KMAX) are the release's
  // ablations, for benchmarks at an equal budget.
  enum class Policy { kIndexer, kRecency, kRandom } policy = Policy::kIndexer;
};

// The ablation choices (pages ascending), K = min(KMAX, n_pages).
std::vector<int64_t> RecencyPages(int64_t n, const LsaOptions& o);
std::vector<int64_t> RandomPages(int64_t n, const LsaOptions& o, uint64_t seed);

// Parses "key=value,key=value" (keys as above without the "lsa." prefix, e.g.
// "kmax=8,tail_chunks=256,ensemble=mean"); errors name the key.
absl::StatusOr<LsaOptions> ParseLsaOptions(const std::string& text, LsaOptions base = {});

// KMAX in pages (spec §3.2): absolute, or max(1, int(tgt_pages * ratio + 0.9999)).
int64_t ResolveKmax(const LsaOptions& o);

// Per-chunk ensemble of per-layer sigmoid scores: max (or) or mean, fp32.
void EnsembleScores(std::span<const std::vector<float>> sigmoids, int64_t n, Ensemble mode,
                    float* out);

// Chunk-level set (§3.1): thr | recent | sink over [0, n), with the optional max_resident cap
// (ties at the cap: score descending, then index ascending). Returns a 0/1 mask of n entries.
std::vector<uint8_t> ChunkResidentSet(const float* ens, int64_t n, const LsaOptions& o);

struct PageSelection {
  std::vector<float> page_score;  // [n_pages]: threshold hits per page, +inf for forced pages
  int64_t k = 0;                  // min(KMAX, n_pages)
  std::vector<int64_t> pages;     // selected logical pages, ascending
};
// Page-level set (§3.2) with flashmem's tie rule: score descending, then page index ascending.
PageSelection SelectPages(const float* ens, int64_t n, const LsaOptions& o);
// The selection expanded to a 0/1 chunk mask of n entries.
std::vector<uint8_t> ExpandPages(const PageSelection& sel, int64_t n);

// The threshold fallback (§6): once the cumulative share of above-threshold chunks in the
// evictable region exceeds `limit`, the session is dense for the rest of the request.
class ThresholdFallback {
 public:
  explicit ThresholdFallback(double limit = 0.0) : limit_(limit) {}
  // One Level-1 cycle: updates the counters and returns whether the session is dense now.
  bool Observe(const float* ens, int64_t n, const LsaOptions& o);
  bool triggered() const { return triggered_; }
  int64_t cum_thresh() const { return cum_thresh_; }
  int64_t cum_c4() const { return cum_c4_; }

  // For snapshots.
  struct Saved { bool triggered; int64_t cum_thresh, cum_c4, last_n; };
  Saved Save() const { return {triggered_, cum_thresh_, cum_c4_, last_n_}; }
  void Load(const Saved& s) { triggered_ = s.triggered; cum_thresh_ = s.cum_thresh; cum_c4_ = s.cum_c4; last_n_ = s.last_n; }

 private:
  double limit_;
  bool triggered_ = false;
  int64_t cum_thresh_ = 0, cum_c4_ = 0;
  int64_t last_n_ = -1;
};

}  // namespace flashmem::lsa
