// Paged KV in the worker (DESIGN.md §2, issue 5 item 4): every complete page of compressed KV and
// of indexer keys is committed to memtier (write-behind through the client's bounded queue; a
// full queue blocks the step: back-pressure). Once memtier has acknowledged a page it may leave
// the worker: the evictable pages (CSA main KV, index-K of non-target layers) are held in a
// reserve of `budget_bytes`, page-LRU, and pages the session's Level-2 view does not show go
// first. Before a session's forward pass every page its view shows is in memory: pages staged by
// the LSA background task are installed, anything still missing is recalled synchronously and
// counted as late. An evicted page exists only in memtier; it comes back through the memtier
// client (UCX), checksum-verified.
#pragma once

#include <cstdint>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "memtier/client/memtier_client.h"
#include "worker/model/config.h"
#include "worker/kv/entry_pages.h"
#include "worker/model/state.h"

namespace flashmem::kv {

struct KvPagerOptions {
  // Bytes of evictable pages held in memory across all sessions (0: no limit, nothing evicted).
  uint64_t budget_bytes = 0;
  // CSA ids whose indexer keys never leave (the memory indexer's target layers).
  std::vector<int> pinned_index_layers;
  size_t max_queued_commits = 64;  // the write-behind queue's bound
  // false: a follower rank of a tensor-parallel group — its leader commits the (identical) pages;
  // this pager only recalls the ones a restored snapshot references, and evicts nothing.
  bool commit = true;
  // The leader of a group: keep the pages memtier acknowledges so that TakeAcked() can pass them
  // to the followers, which may then evict them too.
  bool record_acks = false;
};

// A page memtier has acknowledged (tensor-parallel groups: relayed from the leader to followers).
struct AckedPage {
  uint64_t session = 0;  // the scheduler's id
  int32_t stream = 0;    // index of the session's page stream (same on every rank)
  int64_t page = 0;
};

struct KvPagerStats {
  uint64_t pages_committed = 0, commit_failures = 0;
  uint64_t committed_bytes = 0;   // page bytes sent to memtier (the compact forms of page_codec.h)
  uint64_t pages_sent_bf16 = 0;   // pages off their format's grid, sent as bf16 instead (none expected)
  uint64_t streams_fp32 = 0;      // KV streams of the sessions held that fell back to fp32 rows, or index
                                  // keys that dropped their MXFP4 twin (none expected)
  uint64_t pages_evicted = 0, pages_recalled = 0, pages_staged = 0, late_pages = 0;
  double late_seconds = 0;        // time decode steps waited for late pages
  uint64_t over_budget_steps = 0; // steps after which the needed pages alone exceeded the budget
  uint64_t resident_bytes = 0;    // evictable pages in memory now (all sessions)
  uint64_t peak_resident_bytes = 0;
  uint64_t dense_bytes = 0;       // the same pages if nothing were evicted
};

struct SessionKvStats {
  uint64_t resident_bytes = 0;     // evictable pages in memory
  uint64_t dense_bytes = 0;        // all of them (what dense decode holds)
  uint64_t fixed_bytes = 0;        // never evicted: windows, HCA entries, pinned index keys, newest pages
  uint64_t committed_pages = 0;    // acknowledged by memtier
  uint64_t evicted_pages = 0;
};

class KvPager {
 public:
  KvPager(const model::ModelArgs& args, KvPagerOptions options, memtier::MemTierClient* client);
  ~KvPager();

  // A session whose pages go to memtier under `memtier_key`. Pages already evicted in `state`
  // (a restored snapshot that references memtier) are known to be there.
  void AddSession(uint64_t id, uint64_t memtier_key, model::SessionState* state);
  void RemoveSession(uint64_t id);

  // Scheduler thread, before the session's forward pass: every page its view shows is in memory.
  absl::Status EnsureVisible(uint64_t id);
  // Scheduler thread, after a forward pass: commit new complete pages, take acknowledgements,
  // evict to the budget.
  void AfterStep();
  // Any thread (the LSA background task): fetch the evicted pages among `pages` (logical CSA
  // pages) into staging, after hinting memtier with the ranked candidates (lookahead to disk).
  void Stage(uint64_t id, const std::vector<int64_t>& pages, const std::vector<int64_t>& ranked);

  // Leader (record_acks): the pages acknowledged since the last call.
  std::vector<AckedPage> TakeAcked();
  // Follower: the leader's acknowledgements; those pages may now be evicted here too (they are
  // in memtier, the node's one copy, and come back from there).
  void MarkCommitted(const std::vector<AckedPage>& pages);

  // Whether a page is acknowledged by memtier (snapshots reference it instead of carrying it).
  bool Committed(uint64_t id, int64_t layer, int kind, int64_t page) const;
  // Waits for every queued commit of the session (before a snapshot references its pages).
  void Flush(uint64_t id);

  KvPagerStats stats() const;
  SessionKvStats session_stats(uint64_t id) const;

 private:
  struct Stream {
    int64_t layer;
    int kind;            // 0: compressed entries, 1: indexer keys
    bool evictable;
    bool csa;            // pages follow the CSA chunk numbering (the Level-2 view applies)
    kv::EntryPages* pages;         // its format() is how its pages travel to memtier
    std::vector<uint8_t> state;    // per page: 0 not committed, 1 in flight, 2 acknowledged
    std::vector<uint8_t> evicted;  // mirror of !pages->resident(p), readable off-thread
    std::vector<uint64_t> last_used;
    // Per-page records for the stream's n pages (pages new to them: not committed, resident, unused).
    void Track(int64_t n) {
      state.resize(n, 0);
      evicted.resize(n, 0);
      last_used.resize(n, 0);
    }
  };
  struct Session {
    uint64_t key;
    model::SessionState* state;
    std::vector<Stream> streams;
    struct Inflight {
      std::future<absl::Status> done;
      std::vector<std::pair<int, int64_t>> pages;  // (stream, page)
    };
    std::deque<Inflight> inflight;
    std::map<std::pair<int, int64_t>, std::vector<uint8_t>> staged;  // pages in their memtier form
  };
  static uint32_t MemtierLayer(int64_t layer, int kind) { return static_cast<uint32_t>(layer * 2 + kind); }
  uint64_t PageBytes(const Stream& s) const;
  void Harvest(uint64_t id, Session& s, bool wait);
  absl::Status Recall(Session& s, const std::vector<std::pair<int, int64_t>>& want,
                      std::vector<std::vector<uint8_t>>* out);

  const model::ModelArgs& args_;
  KvPagerOptions options_;
  memtier::MemTierClient* client_;
  mutable std::mutex mu_;  // sessions_ records (streams' state/evicted, staged) and stats_
  std::map<uint64_t, std::unique_ptr<Session>> sessions_;
  uint64_t step_ = 0;
  KvPagerStats stats_;
  std::vector<AckedPage> acked_;  // record_acks: not yet taken
};

}  // namespace flashmem::kv
