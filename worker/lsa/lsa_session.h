// The refresh schedule of one session (spec/memory_indexer.md §4, DESIGN.md §3). Every
// `interval` decode steps (phase-staggered across sessions) the step's forward captures the
// target layers' attention inputs; after the step, the memory indexer scores every chunk of
// history off the decode path (a background task) and the resident set is built. The set is
// swapped into the session's Level-2 view at the next boundary (apply = boundary, DESIGN's "one
// cycle stale") or before the very next step (apply = step, the release's s+1); if it is not ready
// by then the step waits, and the wait is counted as a stall. Everything is a function of the
// session's own tokens, so the same session gives the same tokens on any worker, however busy.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/lsa/memory_indexer.h"
#include "worker/lsa/resident_set.h"
#include "worker/model/config.h"
#include "worker/model/state.h"

namespace flashmem::lsa {

enum class LsaMode { kOff, kAuto, kForceDense };

struct LsaStats {
  uint64_t refreshes = 0;         // Level-1 cycles scored
  uint64_t sets_applied = 0;
  uint64_t pages_recalled = 0;    // pages newly in a set (not in the previous one)
  double churn_jaccard_sum = 0;   // Jaccard of consecutive sets, summed over applied sets
  uint64_t churn_count = 0;
  uint64_t stalls = 0;            // applies that had to wait for the background task
  double stall_seconds = 0;
  bool fallback = false;          // threshold fallback: dense for the rest of the request
  int64_t selected_pages = 0;     // pages of the set in force
  int64_t covered_pages = 0;      // pages the set in force chose among
  double last_score_ms = 0;       // duration of the last Level-1 scoring
};

// The outcome of one Level-1 cycle.
struct Selection {
  bool dense = false;              // fallback triggered
  int64_t covered_chunks = 0;      // n at the refresh
  std::vector<int64_t> pages;      // selected pages, ascending
  std::vector<int64_t> ranked;     // candidate pages by score (for prefetch), best first
  double score_ms = 0;
};

class LsaSession {
 public:
  // `indexer` outlives the session. `phase` staggers refreshes (0 unless lsa.stagger).
  LsaSession(const MemoryIndexer& indexer, const model::ModelArgs& args, LsaOptions options,
             LsaMode mode, int64_t phase, bool apply_at_boundary = true);
  ~LsaSession();

  // Checks that the indexer fits the model (hidden size, target layers are CSA layers).
  static absl::Status CheckCompatible(const MemoryIndexer& indexer, const model::ModelArgs& args,
                                      const LsaOptions& options);

  // Around each forward pass that consumes this session's tokens. `decode` is true when the
  // pass feeds a sampled token; a prompt chunk restarts the schedule (step 0, dense until the
  // first set lands) as the release's prefill reset does.
  void BeforeStep(model::SessionState& state, bool decode);
  void AfterStep(model::SessionState& state, bool decode);

  // Runs at the end of every background scoring task with its selection (the pager stages the
  // selected pages that are in memtier, off the decode path).
  void SetStageHook(std::function<void(const Selection&)> hook) { stage_hook_ = std::move(hook); }

  const LsaStats& stats() const { return stats_; }
  LsaMode mode() const { return mode_; }
  const LsaOptions& options() const { return options_; }

  // Snapshot of the schedule (step, pending set, fallback counters); the Level-2 view itself
  // travels in the SessionState.
  std::string Save();
  absl::Status Load(absl::string_view blob);

 private:
  // The set computed but not yet in force (waits for the background task); nullptr when none.
  const Selection* Pending();
  bool RefreshDue(int64_t step) const;
  int64_t NextBoundary(int64_t step) const;
  Selection Score(std::vector<std::vector<float>> x, int64_t pos,
                  std::vector<std::vector<const float*>> keys, int64_t n);
  void Apply(model::SessionState& state, const Selection& sel);

  const MemoryIndexer& indexer_;
  const model::ModelArgs& args_;
  LsaOptions options_;
  LsaMode mode_;
  int64_t phase_;
  bool apply_at_boundary_;
  std::vector<int64_t> layer_of_csa_;  // model layer of each CSA id
  std::vector<int> slot_csa_;     // CSA id of each indexer slot used
  std::vector<int> slot_index_;   // the indexer's slot for each
  int64_t step_ = 0;              // decode steps since the last prefill
  bool capturing_ = false;
  ThresholdFallback fallback_;
  std::future<Selection> task_;
  std::optional<Selection> pending_;
  int64_t pending_due_ = -1;      // the step before which the pending set is put in force
  std::vector<int64_t> current_pages_;
  bool have_current_ = false;
  LsaStats stats_;
  std::function<void(const Selection&)> stage_hook_;
};

}  // namespace flashmem::lsa
