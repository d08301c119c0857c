#include "worker/kv/kv_pager.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"

namespace flashmem::kv {

KvPager::KvPager(const model::ModelArgs& args, KvPagerOptions options, memtier::MemTierClient* client)
    : args_(args), options_(std::move(options)), client_(client) {}

KvPager::~KvPager() {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& [id, s] : sessions_) Harvest(id, *s, /*wait=*/true);
}

uint64_t KvPager::PageBytes(const Stream& s) const { return static_cast<uint64_t>(s.pages->page_bytes()); }

void KvPager::AddSession(uint64_t id, uint64_t memtier_key, model::SessionState* state) {
  auto s = std::make_unique<Session>();
  s->key = memtier_key;
  s->state = state;
  int64_t csa = 0;
  for (int64_t l = 0; l < args_.n_layers; ++l) {
    const int r = args_.ratio(l);
    if (r == 0) continue;
    model::LayerState& ls = state->layers[l];
    s->streams.push_back({l, 0, r == 4, r == 4, &ls.compressed, {}, {}, {}});
    if (r == 4) {
      const bool pinned = std::find(options_.pinned_index_layers.begin(), options_.pinned_index_layers.end(), csa) !=
                          options_.pinned_index_layers.end();
      s->streams.push_back({l, 1, !pinned, true, &ls.index_keys, {}, {}, {}});
      ++csa;
    }
  }
  for (Stream& st : s->streams) {
    const int64_t n = st.pages->num_pages();
    st.Track(n);
    for (int64_t p = 0; p < n; ++p)
      if (!st.pages->resident(p)) {  // referenced by the snapshot this session came from
        st.state[p] = 2;
        st.evicted[p] = 1;
      }
  }
  std::lock_guard<std::mutex> l(mu_);
  sessions_[id] = std::move(s);
}

void KvPager::RemoveSession(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Harvest(id, *it->second, /*wait=*/true);
  sessions_.erase(it);
}

void KvPager::Harvest(uint64_t id, Session& s, bool wait) {
  while (!s.inflight.empty()) {
    Session::Inflight& f = s.inflight.front();
    if (!wait && f.done.wait_for(std::chrono::seconds(0)) != std::future_status::ready) break;
    const absl::Status st = f.done.get();
    for (auto [si, p] : f.pages) {
      Stream& stream = s.streams[si];
      if (p < static_cast<int64_t>(stream.state.size())) stream.state[p] = st.ok() ? 2 : 0;  // failed: retried
      if (st.ok() && options_.record_acks) acked_.push_back({id, si, p});
    }
    (st.ok() ? stats_.pages_committed : stats_.commit_failures) += f.pages.size();
    s.inflight.pop_front();
  }
}

absl::Status KvPager::Recall(Session& s, const std::vector<std::pair<int, int64_t>>& want,
                             std::vector<std::vector<uint8_t>>* out) {
  if (!client_) return absl::FailedPreconditionError("KV pages are in memtier but this worker has no memtier client");
  std::vector<memtier::PageKey> keys(want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const Stream& st = s.streams[want[i].first];
    keys[i] = {s.key, MemtierLayer(st.layer, st.kind), static_cast<uint32_t>(want[i].second)};
  }
  out->assign(want.size(), {});
  // A page in its memtier form (or the bf16 one of older workers), kept as it came: the stream
  // holds it in that form (EntryPages::Restore).
  auto keep = [&](size_t i, std::span<const uint8_t> bytes) {
    const PageFormat& f = s.streams[want[i].first].pages->format();
    if (static_cast<int64_t>(bytes.size()) != f.page_bytes() && static_cast<int64_t>(bytes.size()) != f.bf16_page_bytes())
      return absl::DataLossError(absl::StrCat("KV page ", memtier::ToString(keys[i]), ": memtier returned ", bytes.size(),
                                              " bytes, its format has ", f.page_bytes()));
    (*out)[i].assign(bytes.begin(), bytes.end());
    return absl::OkStatus();
  };
  // Same node: read in place from memtier's RAM tier, the node's one copy (every rank of a group
  // maps the same chunks), each batch leased while it is copied out; over UCX otherwise, or when
  // memtier's RAM cannot hold a batch at once. Both take any number of pages and pipeline them.
  if (client_->has_local()) {
    const absl::Status st = client_->RecallLocalView(s.key, keys, [&](size_t first, std::span<const std::span<const uint8_t>> views) {
      for (size_t i = 0; i < views.size(); ++i)
        if (absl::Status st = keep(first + i, views[i]); !st.ok()) return st;
      return absl::OkStatus();
    });
    if (st.ok()) return st;
    if (!absl::IsResourceExhausted(st))
      return absl::Status(st.code(), absl::StrCat("recall of ", want.size(), " KV pages from memtier's memory: ", st.message()));
  }
  std::vector<std::vector<uint8_t>> bufs(want.size());
  std::vector<memtier::PageToRecall> req(want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    // Room for either form (page_codec.h): the bf16 one of older workers is the larger.
    bufs[i].resize(s.streams[want[i].first].pages->format().bf16_page_bytes());
    req[i].key = keys[i];
    req[i].dst = bufs[i];
  }
  if (const absl::Status st = client_->Recall(s.key, req); !st.ok())
    return absl::Status(st.code(), absl::StrCat("recall of ", want.size(), " KV pages from memtier: ", st.message()));
  for (size_t i = 0; i < want.size(); ++i)
    if (absl::Status st = keep(i, std::span<const uint8_t>(bufs[i]).first(req[i].length)); !st.ok()) return st;
  return absl::OkStatus();
}

absl::Status KvPager::EnsureVisible(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::OkStatus();
  Session& s = *it->second;
  const model::Residency& view = s.state->residency;
  std::vector<std::pair<int, int64_t>> missing;
  for (int si = 0; si < static_cast<int>(s.streams.size()); ++si) {
    Stream& st = s.streams[si];
    for (int64_t p = 0; p < st.pages->num_pages(); ++p) {
      if (st.pages->resident(p)) continue;
      if (st.evictable && st.csa && !view.PageVisible(p)) continue;
      auto staged = s.staged.find({si, p});
      if (staged != s.staged.end()) {
        if (absl::Status rs = st.pages->Restore(p, staged->second); !rs.ok()) return rs;
        st.evicted[p] = 0;
        s.staged.erase(staged);
        stats_.pages_recalled++;
      } else {
        missing.push_back({si, p});
      }
    }
  }
  // Staged pages not needed yet stay for the set they were fetched for.
  if (missing.empty()) return absl::OkStatus();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::vector<uint8_t>> data;
  if (auto st = Recall(s, missing, &data); !st.ok()) return st;
  for (size_t i = 0; i < missing.size(); ++i) {
    Stream& st = s.streams[missing[i].first];
    if (absl::Status rs = st.pages->Restore(missing[i].second, data[i]); !rs.ok()) return rs;
    st.evicted[missing[i].second] = 0;
  }
  stats_.pages_recalled += missing.size();
  stats_.late_pages += missing.size();
  stats_.late_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return absl::OkStatus();
}

void KvPager::Stage(uint64_t id, const std::vector<int64_t>& pages, const std::vector<int64_t>& ranked) {
  std::vector<std::pair<int, int64_t>> want;
  std::vector<memtier::PageKey> hint;
  uint64_t key = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end() || !client_) return;
    Session& s = *it->second;
    key = s.key;
    for (int si = 0; si < static_cast<int>(s.streams.size()); ++si) {
      const Stream& st = s.streams[si];
      if (!st.evictable || !st.csa) continue;
      for (int64_t p : pages)
        if (p < static_cast<int64_t>(st.evicted.size()) && st.evicted[p] && !s.staged.count({si, p})) want.push_back({si, p});
      for (size_t r = 0; r < ranked.size() && r < 2 * pages.size(); ++r)
        if (ranked[r] < static_cast<int64_t>(st.evicted.size()) && st.evicted[ranked[r]])
          hint.push_back({key, MemtierLayer(st.layer, st.kind), static_cast<uint32_t>(ranked[r])});
    }
  }
  if (!hint.empty()) (void)client_->Prefetch(key, hint, /*deadline_ms=*/1000);
  if (want.empty()) return;
  // Recall outside the lock: the scheduler keeps stepping meanwhile.
  std::vector<std::vector<uint8_t>> data;
  Session* s = nullptr;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    s = it->second.get();
  }
  // The session record cannot go away while its LSA task runs (the scheduler waits for the task
  // before removing the session), so using `s` unlocked here is safe; Recall only reads streams'
  // immutable fields.
  if (!Recall(*s, want, &data).ok()) return;  // EnsureVisible will recall them (late)
  std::lock_guard<std::mutex> l(mu_);
  if (!sessions_.count(id)) return;
  for (size_t i = 0; i < want.size(); ++i) s->staged[want[i]] = std::move(data[i]);
  stats_.pages_staged += want.size();
}

void KvPager::AfterStep() {
  std::lock_guard<std::mutex> l(mu_);
  ++step_;
  struct Candidate { uint64_t last_used; int64_t page; Session* s; int si; };
  std::vector<Candidate> cand;
  uint64_t resident = 0, dense = 0, needed = 0, fell_back = 0;
  for (auto& [id, sp] : sessions_) {
    Session& s = *sp;
    Harvest(id, s, /*wait=*/false);
    std::vector<memtier::PageToCommit> commit;
    std::vector<std::vector<uint8_t>> bytes;
    std::vector<std::pair<int, int64_t>> which;
    const model::Residency& view = s.state->residency;
    for (int si = 0; si < static_cast<int>(s.streams.size()); ++si) {
      Stream& st = s.streams[si];
      const int64_t n = st.pages->num_pages();
      st.Track(n);
      fell_back += st.pages->fell_back_to_fp32();
      for (int64_t p = 0; p < st.pages->complete_pages(); ++p) {
        if (st.state[p] != 0 || !client_ || !options_.commit || !st.pages->resident(p)) continue;
        std::vector<uint8_t> b;
        bool as_bf16 = false;
        if (!st.pages->Serialize(p, &b, &as_bf16).ok()) continue;  // resident: cannot happen
        if (as_bf16) stats_.pages_sent_bf16++;  // off its grid (not expected)
        stats_.committed_bytes += b.size();
        bytes.push_back(std::move(b));
        which.push_back({si, p});
        st.state[p] = 1;
      }
      if (!st.evictable) continue;
      const uint64_t pb = PageBytes(st);
      for (int64_t p = 0; p < n; ++p) {
        dense += pb;
        const bool visible = !st.csa || view.PageVisible(p);
        if (visible) st.last_used[p] = step_;
        if (!st.pages->resident(p)) continue;
        resident += pb;
        if (visible || st.state[p] != 2) needed += pb;
        else cand.push_back({st.last_used[p], p, &s, si});
      }
    }
    // Write-behind in batches that fit the client's buffer; a full queue blocks (back-pressure).
    const uint64_t room = client_ ? client_->buffer_bytes() : 0;
    for (size_t first = 0; first < which.size();) {
      size_t last = first;
      uint64_t total = 0;
      commit.clear();
      while (last < which.size() && (last == first || total + bytes[last].size() <= room)) {
        const Stream& st = s.streams[which[last].first];
        commit.push_back({{s.key, MemtierLayer(st.layer, st.kind), static_cast<uint32_t>(which[last].second)}, bytes[last]});
        total += bytes[last++].size();
      }
      s.inflight.push_back({client_->CommitAsync(s.key, commit, options_.max_queued_commits),
                            std::vector<std::pair<int, int64_t>>(which.begin() + first, which.begin() + last)});
      first = last;
    }
  }
  if (options_.budget_bytes > 0 && resident > options_.budget_bytes) {
    std::sort(cand.begin(), cand.end(), [](const Candidate& a, const Candidate& b) {
      return std::tie(a.last_used, a.page) < std::tie(b.last_used, b.page);
    });
    for (const Candidate& c : cand) {
      if (resident <= options_.budget_bytes) break;
      Stream& st = c.s->streams[c.si];
      st.pages->Evict(c.page);
      st.evicted[c.page] = 1;
      resident -= PageBytes(st);
      stats_.pages_evicted++;
    }
    if (resident > options_.budget_bytes) stats_.over_budget_steps++;
  }
  (void)needed;
  stats_.resident_bytes = resident;
  stats_.streams_fp32 = fell_back;
  stats_.dense_bytes = dense;
  stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, resident);
}

std::vector<AckedPage> KvPager::TakeAcked() {
  std::lock_guard<std::mutex> l(mu_);
  return std::exchange(acked_, {});
}

void KvPager::MarkCommitted(const std::vector<AckedPage>& pages) {
  std::lock_guard<std::mutex> l(mu_);
  for (const AckedPage& a : pages) {
    auto it = sessions_.find(a.session);
    if (it == sessions_.end() || a.stream < 0 || a.stream >= static_cast<int32_t>(it->second->streams.size())) continue;
    Stream& st = it->second->streams[a.stream];
    if (a.page < 0 || a.page >= st.pages->complete_pages()) continue;
    st.Track(st.pages->num_pages());
    st.state[a.page] = 2;
    stats_.pages_committed++;
  }
}

bool KvPager::Committed(uint64_t id, int64_t layer, int kind, int64_t page) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return false;
  for (const Stream& st : it->second->streams)
    if (st.layer == layer && st.kind == kind)
      return page < static_cast<int64_t>(st.state.size()) && st.state[page] == 2;
  return false;
}

void KvPager::Flush(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it != sessions_.end()) Harvest(id, *it->second, /*wait=*/true);
}

KvPagerStats KvPager::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}

SessionKvStats KvPager::session_stats(uint64_t id) const {
  std::lock_guard<std::mutex> l(mu_);
  SessionKvStats out;
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return out;
  const Session& s = *it->second;
  for (const Stream& st : s.streams) {
    const uint64_t pb = PageBytes(st);
    for (int64_t p = 0; p < st.pages->num_pages(); ++p) {
      const bool res = st.pages->resident(p);
      out.committed_pages += p < static_cast<int64_t>(st.state.size()) && st.state[p] == 2;
      out.evicted_pages += !res;
      if (st.evictable) {
        out.dense_bytes += pb;
        if (res) out.resident_bytes += pb;
      } else if (res) {
        out.fixed_bytes += pb;
      }
    }
  }
  for (const model::LayerState& ls : s.state->layers) out.fixed_bytes += ls.window.memory_bytes();
  return out;
}

}  // namespace flashmem::kv
