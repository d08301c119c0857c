#include "worker/server/scheduler.h"

#include <algorithm>
#include <cstring>

#include "worker/model/state_codec.h"

#include "absl/strings/str_cat.h"

namespace flashmem::server {

Scheduler::Scheduler(const model::Transformer& model, SchedulerOptions options) : model_(model), options_(options) {
  if (!options_.follower) loop_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (loop_.joinable()) loop_.join();
  // LSA tasks finish before the pager forgets the sessions (a task may be staging pages).
  for (auto& [id, sp] : sessions_) {
    sp->lsa.reset();
    if (sp->paged) options_.pager->RemoveSession(id);
  }
}

absl::StatusOr<std::unique_ptr<lsa::LsaSession>> Scheduler::MakeLsa(lsa::LsaMode mode, const std::string& overrides,
                                                                     model::SessionState& state, int64_t phase,
                                                                     int64_t* chosen) {
  *chosen = 0;
  if (!options_.indexer || mode == lsa::LsaMode::kOff) return std::unique_ptr<lsa::LsaSession>();
  auto opts = lsa::ParseLsaOptions(overrides, options_.lsa);
  if (!opts.ok()) return opts.status();
  if (auto st = lsa::LsaSession::CheckCompatible(*options_.indexer, model_.args(), *opts); !st.ok()) return st;
  if (phase < 0) {
    std::lock_guard<std::mutex> l(mu_);
    phase = opts->stagger ? static_cast<int64_t>(admitted_ % static_cast<uint64_t>(opts->interval)) : 0;
    ++admitted_;
  } else if (phase >= opts->interval) {
    return absl::InvalidArgumentError(absl::StrCat("lsa phase ", phase, " is outside the interval ", opts->interval));
  }
  *chosen = phase;
  state.residency.measure_agreement = options_.lsa_measure_agreement;
  return std::make_unique<lsa::LsaSession>(*options_.indexer, model_.args(), *opts, mode, phase,
                                           options_.lsa_apply_at_boundary);
}

absl::StatusOr<uint64_t> Scheduler::CreateSession(const SessionOptions& options) {
  if (options_.follower) return absl::FailedPreconditionError("a follower rank takes sessions from its leader only");
  auto s = std::make_unique<Session>();
  s->state = model_.NewSession();
  auto l = MakeLsa(options.lsa_mode, options.lsa_overrides, *s->state, -1, &s->lsa_phase);
  if (!l.ok()) return l.status();
  s->lsa = std::move(*l);
  s->lsa_seen = ReadLsa(*s);
  Session* raw = s.get();
  auto id = Adopt(std::move(s), 0, [&](uint64_t id) {
    if (options_.group) options_.group->Created(id, options, raw->lsa_phase);
  });
  if (id.ok()) AttachPager(*id, *raw, options.memtier_key);
  return id;
}

absl::Status Scheduler::FollowCreate(uint64_t id, const SessionOptions& options, int64_t lsa_phase) {
  auto s = std::make_unique<Session>();
  s->state = model_.NewSession();
  auto l = MakeLsa(options.lsa_mode, options.lsa_overrides, *s->state, lsa_phase, &s->lsa_phase);
  if (!l.ok()) return l.status();
  s->lsa = std::move(*l);
  s->lsa_seen = ReadLsa(*s);
  Session* raw = s.get();
  auto got = Adopt(std::move(s), id);
  if (!got.ok()) return got.status();
  AttachPager(id, *raw, options.memtier_key);
  return absl::OkStatus();
}

void Scheduler::AttachPager(uint64_t id, Session& s, uint64_t memtier_key) {
  if (!options_.pager || memtier_key == 0) return;
  options_.pager->AddSession(id, memtier_key, s.state.get());
  s.paged = true;
  if (s.lsa) {
    kv::KvPager* pager = options_.pager;
    s.lsa->SetStageHook([pager, id](const lsa::Selection& sel) { pager->Stage(id, sel.pages, sel.ranked); });
  }
}

SessionLsaStats Scheduler::ReadLsa(const Session& s) {
  SessionLsaStats out;
  if (!s.lsa) return out;
  out.enabled = true;
  out.lsa = s.lsa->stats();
  const model::Residency& r = s.state->residency;
  if (r.agreement_count > 0) out.level2_agreement = r.agreement_sum / static_cast<double>(r.agreement_count);
  out.agreement_sum = r.agreement_sum;
  out.agreement_count = r.agreement_count;
  out.total_pages = (s.state->position / 4 + 63) / 64;
  for (int64_t p = 0; p < out.total_pages; ++p) out.visible_pages += r.PageVisible(p);
  return out;
}

absl::StatusOr<SessionLsaStats> Scheduler::LsaStats(uint64_t id) const {
  std::unique_lock<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  return it->second->lsa_seen;
}

absl::StatusOr<uint64_t> Scheduler::Adopt(std::unique_ptr<Session> s, uint64_t id,
                                          const std::function<void(uint64_t)>& announce) {
  std::lock_guard<std::mutex> l(mu_);
  if (id != 0) {  // a follower: the leader's id, and the leader already checked the limit
    if (sessions_.count(id)) return absl::AlreadyExistsError(absl::StrCat("group op: session ", id, " exists already"));
  } else {
    if (static_cast<int64_t>(sessions_.size()) >= options_.max_sessions)
      return absl::ResourceExhaustedError(absl::StrCat("worker holds its maximum of ", options_.max_sessions, " sessions"));
    id = next_id_++;
  }
  sessions_[id] = std::move(s);
  if (announce) announce(id);
  return id;
}

absl::StatusOr<std::string> Scheduler::Snapshot(uint64_t id) {
  std::unique_lock<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  Session* s = it->second.get();
  if (s->generating) return absl::FailedPreconditionError("snapshot: the session is generating");
  cv_.wait(l, [&] { return !busy_ && (sessions_.count(id) == 0 || s->pending.empty() || !s->broken.ok()); });
  if (!sessions_.count(id)) return absl::NotFoundError(absl::StrCat("session ", id, " closed during the snapshot"));
  if (!s->broken.ok()) return s->broken;
  std::string out(17, '\0');
  const uint64_t n = s->has_logits ? s->logits.size() : 0;
  std::memcpy(out.data(), &s->sampled_steps, 8);
  out[8] = s->has_logits ? 1 : 0;
  std::memcpy(out.data() + 9, &n, 8);
  out.append(reinterpret_cast<const char*>(s->logits.data()), n * 4);
  const std::string lsa_blob = s->lsa ? s->lsa->Save() : std::string();
  model::PageInStore in_store;
  if (s->paged) {  // committed pages are referenced, not carried
    options_.pager->Flush(id);
    kv::KvPager* pager = options_.pager;
    in_store = [pager, id](int64_t layer, int kind, int64_t page) { return pager->Committed(id, layer, kind, page); };
  }
  const uint64_t lsa_len = lsa_blob.size();
  out.append(reinterpret_cast<const char*>(&lsa_len), 8);
  out += lsa_blob;
  out += model::SerializeSessionState(*s->state, model_.args(), in_store);
  return out;
}

absl::StatusOr<std::unique_ptr<Scheduler::Session>> Scheduler::Parse(absl::string_view snap, uint64_t memtier_key,
                                                                     int64_t lsa_phase) {
  if (snap.size() < 17) return absl::InvalidArgumentError("snapshot: truncated header");
  auto s = std::make_unique<Session>();
  uint64_t n = 0;
  std::memcpy(&s->sampled_steps, snap.data(), 8);
  s->has_logits = snap[8] == 1;
  std::memcpy(&n, snap.data() + 9, 8);
  if ((s->has_logits && n != static_cast<uint64_t>(model_.args().vocab_size)) || (!s->has_logits && n != 0) ||
      snap.size() - 17 < n * 4)
    return absl::InvalidArgumentError(absl::StrCat("snapshot: logits of ", n, " values do not fit this model"));
  s->logits.resize(n);
  std::memcpy(s->logits.data(), snap.data() + 17, n * 4);
  size_t at = 17 + n * 4;
  uint64_t lsa_len = 0;
  if (snap.size() - at < 8) return absl::InvalidArgumentError("snapshot: truncated LSA section");
  std::memcpy(&lsa_len, snap.data() + at, 8);
  at += 8;
  if (snap.size() - at < lsa_len) return absl::InvalidArgumentError("snapshot: truncated LSA section");
  const absl::string_view lsa_blob = snap.substr(at, lsa_len);
  at += lsa_len;
  auto state = model::DeserializeSessionState(snap.substr(at), model_.args());
  if (!state.ok()) return state.status();
  s->state = std::move(*state);
  if (lsa_len > 0) {
    // The session ran LSA: it continues with LSA here (same options, same schedule), or fails
    // clearly when this worker has no memory indexer.
    if (!options_.indexer)
      return absl::FailedPreconditionError("snapshot: the session runs LSA but this worker has no memory indexer");
    auto l = MakeLsa(lsa::LsaMode::kAuto, "", *s->state, lsa_phase, &s->lsa_phase);
    if (!l.ok()) return l.status();
    s->lsa = std::move(*l);
    if (auto st = s->lsa->Load(lsa_blob); !st.ok()) return st;
  }
  bool references = false;
  for (const model::LayerState& ls : s->state->layers)
    for (int64_t p = 0; p < ls.compressed.num_pages(); ++p) references |= !ls.compressed.resident(p);
  if (references && (!options_.pager || memtier_key == 0))
    return absl::FailedPreconditionError("snapshot: its KV pages are in memtier but this worker runs without a memtier pager");
  s->lsa_seen = ReadLsa(*s);
  return s;
}

absl::StatusOr<uint64_t> Scheduler::Restore(absl::string_view snap, uint64_t memtier_key) {
  if (options_.follower) return absl::FailedPreconditionError("a follower rank takes sessions from its leader only");
  auto s = Parse(snap, memtier_key, -1);
  if (!s.ok()) return s.status();
  Session* raw = s->get();
  auto id = Adopt(std::move(*s), 0, [&](uint64_t id) {
    if (options_.group) options_.group->Restored(id, snap, memtier_key, raw->lsa_phase);
  });
  if (id.ok()) AttachPager(*id, *raw, memtier_key);
  return id;
}

absl::Status Scheduler::FollowRestore(uint64_t id, absl::string_view snap, uint64_t memtier_key, int64_t lsa_phase) {
  auto s = Parse(snap, memtier_key, lsa_phase);
  if (!s.ok()) return s.status();
  Session* raw = s->get();
  auto got = Adopt(std::move(*s), id);
  if (!got.ok()) return got.status();
  AttachPager(id, *raw, memtier_key);
  return absl::OkStatus();
}



absl::Status Scheduler::CloseSession(uint64_t id) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !busy_; });
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  it->second->lsa.reset();  // waits for its background task (which may be staging pages)
  if (it->second->paged) options_.pager->RemoveSession(id);
  sessions_.erase(it);
  if (options_.group) options_.group->Closed(id);
  return absl::OkStatus();
}

absl::Status Scheduler::Append(uint64_t id, std::vector<int32_t> tokens) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  Session& s = *it->second;
  if (s.generating) return absl::FailedPreconditionError("append: the session is generating");
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= model_.args().vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("tokens[", i, "] = ", tokens[i], " is outside the vocabulary"));
  const int64_t total = s.state->position + static_cast<int64_t>(s.pending.size() + tokens.size());
  if (total > options_.max_context)
    return absl::ResourceExhaustedError(absl::StrCat("session would hold ", total, " tokens; the limit is ", options_.max_context));
  s.pending.insert(s.pending.end(), tokens.begin(), tokens.end());
  cv_.notify_all();
  return absl::OkStatus();
}

absl::Status Scheduler::Generate(uint64_t id, const GenerateParams& params, TokenCallback on_token) {
  if (auto st = model::ValidateSampling(params.sampling); !st.ok()) return st;
  if (params.max_tokens <= 0 || params.max_tokens > options_.max_context)
    return absl::InvalidArgumentError(absl::StrCat("max_tokens ", params.max_tokens, " must be in [1, ", options_.max_context, "]"));
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  Session& s = *it->second;
  if (s.generating) return absl::FailedPreconditionError("generate: the session is already generating");
  s.broken = absl::OkStatus();  // a retry after a failed recall
  if (s.pending.empty() && !s.has_logits && !s.in_flight)
    return absl::FailedPreconditionError("generate: the session has no tokens yet; append a prompt first");
  s.generating = true;
  s.params = params;
  s.on_token = std::move(on_token);
  s.produced = 0;
  cv_.notify_all();
  return absl::OkStatus();
}

absl::Status Scheduler::StopGeneration(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  it->second->generating = false;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> Scheduler::Pending(uint64_t id) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  return static_cast<int64_t>(it->second->pending.size()) - (it->second->sampled_pending ? 1 : 0);
}

absl::Status Scheduler::WithState(uint64_t id, const std::function<void(const model::SessionState&, uint64_t)>& fn) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return !busy_; });
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session ", id));
  fn(*it->second->state, it->second->sampled_steps);
  return absl::OkStatus();
}

int64_t Scheduler::sessions() const {
  std::lock_guard<std::mutex> l(mu_);
  return static_cast<int64_t>(sessions_.size());
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  SchedulerStats out = stats_;
  for (const auto& [id, sp] : sessions_) {
    out.queued_tokens += sp->pending.size() - (sp->sampled_pending ? 1 : 0);
    out.generating += sp->generating;
    const SessionLsaStats& ls = sp->lsa_seen;
    if (!ls.enabled) continue;
    out.lsa_sessions++;
    out.lsa_refreshes += ls.lsa.refreshes;
    out.lsa_sets_applied += ls.lsa.sets_applied;
    out.lsa_pages_recalled += ls.lsa.pages_recalled;
    out.lsa_stalls += ls.lsa.stalls;
    out.lsa_stall_seconds += ls.lsa.stall_seconds;
    out.lsa_fallbacks += ls.lsa.fallback;
    out.lsa_churn_jaccard_sum += ls.lsa.churn_jaccard_sum;
    out.lsa_churn_count += ls.lsa.churn_count;
    out.lsa_visible_pages += ls.visible_pages;
    out.lsa_total_pages += ls.total_pages;
    out.lsa_agreement_sum += ls.agreement_sum;
    out.lsa_agreement_count += ls.agreement_count;
  }
  return out;
}

void Scheduler::Loop() {
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    if (!StepOnce(l)) cv_.wait(l);
  }
}

// One forward pass over every session with work. Runs the model outside the lock.
bool Scheduler::StepOnce(std::unique_lock<std::mutex>& lock) {
  std::vector<Work> work;
  int64_t budget = options_.step_token_budget;
  for (auto& [id, sp] : sessions_) {
    Session& s = *sp;
    if (!s.broken.ok()) continue;
    if (!s.pending.empty()) {
      const int64_t take = std::min<int64_t>(options_.prefill_chunk, static_cast<int64_t>(s.pending.size()));
      // Sampled tokens always go; a prompt chunk waits for a later step when the budget is spent
      // (but never when nothing else would run).
      if (!s.sampled_pending && take > budget && !work.empty()) continue;
      if (!s.sampled_pending) budget -= take;
      std::vector<int32_t> toks(s.pending.begin(), s.pending.begin() + take);
      s.pending.erase(s.pending.begin(), s.pending.begin() + take);
      // A decode step feeds just the sampled token; a chunk with prompt tokens is a prefill.
      const bool decode = s.sampled_pending && take == 1;
      work.push_back({id, &s, std::move(toks), s.pending.empty() && s.generating, decode});
      s.sampled_pending = false;
    } else if (s.generating && s.has_logits) {
      work.push_back({id, &s, {}, true, false});  // logits already current: sample without a forward
    }
  }
  if (work.empty()) return false;
  for (Work& w : work) w.s->in_flight = !w.tokens.empty();
  busy_ = true;
  lock.unlock();
  const absl::Status st = RunForward(work);
  lock.lock();
  FinishStepLocked(work);
  for (Work& w : work) {
    Session& s = *w.s;
    s.in_flight = false;
    if (!w.tokens.empty() && !w.skipped) s.has_logits = true;
    if (w.skipped) {  // nothing consumed: the tokens wait for a retry
      s.pending.insert(s.pending.begin(), w.tokens.begin(), w.tokens.end());
      s.sampled_pending = w.decode;
      s.has_logits = false;
      s.broken = absl::UnavailableError(absl::StrCat("KV pages of the session could not be recalled (retry): ", w.recall_error.message()));
      if (s.generating) {
        s.generating = false;
        s.on_token(-1, true, std::string(s.broken.message()));
      }
      continue;
    }
    absl::Status sst = st;
    if (sst.ok() && s.state->residency.missing_rows > 0)
      sst = absl::InternalError(absl::StrCat("LSA: ", s.state->residency.missing_rows, " selected KV rows were not in memory"));
    if (!sst.ok()) {
      if (s.generating) {
        s.generating = false;
        s.on_token(-1, true, std::string(sst.message()));
      }
      continue;
    }
    if (!w.sample_after || !s.generating) continue;
    const int32_t tok = model::SampleToken(s.logits, s.params.sampling, s.sampled_steps++);
    ++s.produced;
    const bool stop = std::find(s.params.stop_ids.begin(), s.params.stop_ids.end(), tok) != s.params.stop_ids.end();
    const bool done = stop || s.produced >= s.params.max_tokens;
    s.pending.push_back(tok);  // fed at the next step (the session's KV then includes it)
    s.sampled_pending = true;
    s.has_logits = false;
    if (done) s.generating = false;
    s.on_token(tok, done, stop ? "stop" : done ? "length" : "");
  }
  return true;
}

void Scheduler::FinishStepLocked(const std::vector<Work>& work) {
  busy_ = false;
  cv_.notify_all();
  stats_.steps++;
  uint64_t rows = 0;
  for (const Work& w : work) {
    rows += w.tokens.size();
    if (w.s->lsa) w.s->lsa_seen = ReadLsa(*w.s);
    if (!w.skipped) (w.decode ? stats_.decode_tokens : stats_.prefill_tokens) += w.tokens.size();
  }
  stats_.max_batch_rows = std::max(stats_.max_batch_rows, rows);
}

}  // namespace flashmem::server

namespace flashmem::server {

absl::Status Scheduler::RunForward(std::vector<Work>& work) {
  std::vector<model::BatchItem> batch;
  for (Work& w : work) {
    if (w.tokens.empty()) continue;
    if (w.s->lsa) w.s->lsa->BeforeStep(*w.s->state, w.decode);
    if (w.skipped) continue;  // a follower: the leader could not recall this session's pages
    if (w.s->paged) {
      if (absl::Status pst = options_.pager->EnsureVisible(w.id); !pst.ok()) {
        if (options_.follower)  // the leader ran this session: skipping it here would split the group
          return absl::InternalError(absl::StrCat("group step: session ", w.id, "'s pages: ", pst.message()));
        w.skipped = true;
        w.recall_error = pst;
        continue;
      }
    }
    batch.push_back({w.s->state.get(), w.tokens, &w.s->logits, nullptr});
  }
  absl::Status st;
  if (options_.group) {
    std::vector<GroupStepItem> items;
    for (const Work& w : work)
      if (!w.tokens.empty()) items.push_back({w.id, w.tokens, w.decode, w.skipped});
    st = options_.group->Step(items, options_.pager ? options_.pager->TakeAcked() : std::vector<kv::AckedPage>());
  }
  if (st.ok() && !batch.empty()) st = model_.Forward(batch);
  for (Work& w : work)
    if (!w.tokens.empty() && w.s->lsa && !w.skipped) w.s->lsa->AfterStep(*w.s->state, w.decode);
  if (options_.pager) options_.pager->AfterStep();
  return st;
}

absl::Status Scheduler::FollowStep(const std::vector<GroupStepItem>& items, const std::vector<kv::AckedPage>& acked) {
  if (options_.pager) options_.pager->MarkCommitted(acked);
  std::vector<Work> work;
  {
    std::unique_lock<std::mutex> l(mu_);
    for (const GroupStepItem& it : items) {
      auto found = sessions_.find(it.session);
      if (found == sessions_.end())
        return absl::InternalError(absl::StrCat("group step: unknown session ", it.session));
      for (int32_t t : it.tokens)
        if (t < 0 || t >= model_.args().vocab_size)
          return absl::InvalidArgumentError(absl::StrCat("group step: token ", t, " is outside the vocabulary"));
      Work w{it.session, found->second.get(), it.tokens, false, it.decode};
      w.skipped = it.skipped;
      work.push_back(std::move(w));
    }
    busy_ = true;
  }
  const absl::Status st = RunForward(work);
  std::lock_guard<std::mutex> l(mu_);
  FinishStepLocked(work);
  return st;
}

}  // namespace flashmem::server
