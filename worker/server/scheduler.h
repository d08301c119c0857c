// The worker's decode loop: continuous batching of many sessions in one forward pass per step,
// with chunked prefill so a long prompt does not stall the sessions that are decoding. Every
// step, each decoding session contributes its next token and prompts contribute chunks up to a
// token budget (oldest first); the model runs once over all of them.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/kv/kv_pager.h"
#include "worker/lsa/lsa_session.h"
#include "worker/model/sampler.h"
#include "worker/model/transformer.h"

namespace flashmem::server {

struct SessionOptions;

// Tensor-parallel worker groups (issue 8): every rank runs the same forward passes on its own
// shard. The leader's scheduler decides; it tells its follower ranks every session change and
// every forward pass in its own order (worker/server/group_control.h carries them), and each
// follower's scheduler applies them (the Follow* calls) with no decisions of its own.
struct GroupStepItem {
  uint64_t session = 0;
  std::vector<int32_t> tokens;
  bool decode = false;   // a sampled token (LSA counts decode steps)
  bool skipped = false;  // the leader could not recall its pages: LSA's before-step only
};
class GroupLeader {
 public:
  virtual ~GroupLeader() = default;
  // Called under the scheduler's lock, so in the scheduler's order; they must not block.
  virtual void Created(uint64_t id, const SessionOptions& options, int64_t lsa_phase) = 0;
  virtual void Restored(uint64_t id, absl::string_view snapshot, uint64_t memtier_key, int64_t lsa_phase) = 0;
  virtual void Closed(uint64_t id) = 0;
  // Before every forward pass, with the pages memtier acknowledged since the last one. An error
  // (a rank is gone) fails the step instead of running it: the other ranks would never join its
  // collectives.
  virtual absl::Status Step(const std::vector<GroupStepItem>& items, const std::vector<kv::AckedPage>& acked) = 0;
};

struct SchedulerOptions {
  int64_t max_sessions = 64;
  // A prompt is consumed in chunks of this many tokens (the last one shorter). Chunks depend on the
  // session alone, never on what else runs, so a session's arithmetic — and its tokens — are the
  // same however it is batched (and on the worker that resumes it).
  int64_t prefill_chunk = 256;
  int64_t step_token_budget = 512;  // prompt tokens per step across sessions (decode tokens always go)
  int64_t max_context = 1 << 20;    // tokens per session
  // LSA: sessions run Lookahead Sparse Attention with this memory indexer (null: dense only).
  const lsa::MemoryIndexer* indexer = nullptr;
  lsa::LsaOptions lsa;
  bool lsa_apply_at_boundary = true;  // false: a set is in force from the step after its refresh
  bool lsa_measure_agreement = false; // evaluation mode: Level-2 agreement with the full top-k
  // Paged KV: sessions created with a memtier key commit their pages there and keep only what
  // their view needs within the pager's budget (null: everything stays in memory).
  kv::KvPager* pager = nullptr;
  // Tensor parallel: the leader tells its followers (null: no group, or a follower).
  GroupLeader* group = nullptr;
  // A follower rank: no decode loop; the Follow* calls apply the leader's sequence.
  bool follower = false;
};

// Per-session choices at creation.
struct SessionOptions {
  lsa::LsaMode lsa_mode = lsa::LsaMode::kAuto;  // kAuto runs LSA when the worker has an indexer
  std::string lsa_overrides;                     // "kmax=8,interval=32" over the worker's options
  uint64_t memtier_key = 0;                      // non-zero: pages go to memtier under this session key
};

// A session's LSA figures (GetSession, /metrics, generate --stats).
struct SessionLsaStats {
  bool enabled = false;
  lsa::LsaStats lsa;
  double level2_agreement = -1;  // mean over decode tokens and CSA layers (evaluation mode)
  int64_t visible_pages = 0, total_pages = 0;  // Level-2 view now, per CSA layer
  double agreement_sum = 0;
  int64_t agreement_count = 0;
};

struct GenerateParams {
  int64_t max_tokens = 16;
  model::SamplingOptions sampling;
  std::vector<int32_t> stop_ids;
};

// Called from the scheduler thread for every generated token; `done` on the last one (with the
// reason: "length", "stop", or an error message).
using TokenCallback = std::function<void(int32_t token, bool done, const std::string& reason)>;

struct SchedulerStats {
  uint64_t steps = 0, prefill_tokens = 0, decode_tokens = 0, max_batch_rows = 0;
  uint64_t queued_tokens = 0;   // prompt tokens waiting for a forward pass (queue depth)
  uint64_t generating = 0;      // sessions generating now
  // LSA, summed over the sessions held now.
  uint64_t lsa_sessions = 0, lsa_refreshes = 0, lsa_sets_applied = 0, lsa_pages_recalled = 0;
  uint64_t lsa_stalls = 0, lsa_fallbacks = 0;
  double lsa_stall_seconds = 0, lsa_churn_jaccard_sum = 0;
  uint64_t lsa_churn_count = 0;
  uint64_t lsa_visible_pages = 0, lsa_total_pages = 0;
  double lsa_agreement_sum = 0;
  uint64_t lsa_agreement_count = 0;
};

class Scheduler {
 public:
  Scheduler(const model::Transformer& model, SchedulerOptions options = {});
  ~Scheduler();

  absl::StatusOr<uint64_t> CreateSession(const SessionOptions& options = {});
  // A session's snapshot: its state (model::SerializeSessionState), the sampling step and the
  // logits of its last token, taken once every queued token is consumed. Restoring it on another
  // scheduler (another worker) continues the session with no prefill and the same tokens.
  absl::StatusOr<std::string> Snapshot(uint64_t id);
  absl::StatusOr<uint64_t> Restore(absl::string_view snapshot, uint64_t memtier_key = 0);
  absl::Status CloseSession(uint64_t id);
  // Queues tokens to be consumed (prefill) before any further generation.
  absl::Status Append(uint64_t id, std::vector<int32_t> tokens);
  // Starts generating after the queued tokens; one generation at a time per session.
  absl::Status Generate(uint64_t id, const GenerateParams& params, TokenCallback on_token);
  // Ends the session's generation now (stop strings, cancelled clients); no more callbacks.
  absl::Status StopGeneration(uint64_t id);
  // Prompt tokens still queued (not yet taken into a forward pass).
  absl::StatusOr<int64_t> Pending(uint64_t id) const;
  // Runs `fn` on the session's state while the loop is not touching it (snapshots).
  absl::Status WithState(uint64_t id, const std::function<void(const model::SessionState&, uint64_t sampled_steps)>& fn);
  SchedulerStats stats() const;
  absl::StatusOr<SessionLsaStats> LsaStats(uint64_t id) const;
  int64_t sessions() const;

  // A follower rank applies its leader's sequence, in order (errors: the group has diverged).
  absl::Status FollowCreate(uint64_t id, const SessionOptions& options, int64_t lsa_phase);
  absl::Status FollowRestore(uint64_t id, absl::string_view snapshot, uint64_t memtier_key, int64_t lsa_phase);
  absl::Status FollowStep(const std::vector<GroupStepItem>& items, const std::vector<kv::AckedPage>& acked);

 private:
  struct Session {
    std::unique_ptr<model::SessionState> state;
    std::deque<int32_t> pending;      // tokens to feed
    bool sampled_pending = false;     // pending holds just the last sampled token
    bool generating = false;
    GenerateParams params;
    TokenCallback on_token;
    int64_t produced = 0;             // tokens of the current generation
    uint64_t sampled_steps = 0;       // tokens sampled over the session's life (RNG counter)
    std::vector<float> logits;
    bool has_logits = false;          // logits of the last consumed token are current
    bool in_flight = false;           // tokens of this session are in the running forward pass
    std::unique_ptr<lsa::LsaSession> lsa;
    bool paged = false;  // registered with the pager
    absl::Status broken;  // its pages could not be brought back; retried by the next Generate
    SessionLsaStats lsa_seen;  // copied after each step (readable under the lock)
    int64_t lsa_phase = 0;     // its Level-1 stagger phase (followers get the leader's)
  };
  // A session's part of one step.
  struct Work {
    uint64_t id;
    Session* s;
    std::vector<int32_t> tokens;
    bool sample_after = false;  // the logits of the chunk's last token yield the next token
    bool decode = false;        // the token fed is a sampled one (not prompt)
    bool skipped = false;       // its pages could not be recalled: no forward this step
    absl::Status recall_error;
  };
  static SessionLsaStats ReadLsa(const Session& s);
  // Registers a session's pages with the pager (and the LSA stage hook) once it has an id.
  void AttachPager(uint64_t id, Session& s, uint64_t memtier_key);
  // `phase` < 0: the next stagger phase; otherwise that one (a follower's).
  absl::StatusOr<std::unique_ptr<lsa::LsaSession>> MakeLsa(lsa::LsaMode mode, const std::string& overrides,
                                                           model::SessionState& state, int64_t phase, int64_t* chosen);
  // Registers the session under a new id (`id` 0) or the given one (a follower); `announce` runs
  // under the lock with the id (the leader tells its group).
  absl::StatusOr<uint64_t> Adopt(std::unique_ptr<Session> s, uint64_t id = 0,
                                 const std::function<void(uint64_t)>& announce = nullptr);
  absl::StatusOr<std::unique_ptr<Session>> Parse(absl::string_view snapshot, uint64_t memtier_key, int64_t lsa_phase);
  void Loop();
  bool StepOnce(std::unique_lock<std::mutex>& lock);
  // Outside the lock: LSA before-step, pages made visible, the group told, the forward pass, LSA
  // after-step. Sessions whose pages could not be recalled are marked skipped (leader).
  absl::Status RunForward(std::vector<Work>& work);
  // Under the lock, after a forward pass (leader and follower alike): the loop may touch the
  // sessions again, the step's counters, the sessions' LSA figures.
  void FinishStepLocked(const std::vector<Work>& work);

  const model::Transformer& model_;
  SchedulerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, std::unique_ptr<Session>> sessions_;
  uint64_t next_id_ = 1;
  uint64_t admitted_ = 0;  // admission counter (LSA phase stagger)
  bool stop_ = false;
  bool busy_ = false;  // a step runs outside the lock
  SchedulerStats stats_;
  std::thread loop_;
};

}  // namespace flashmem::server
