#include "worker/server/session_service.h"

#include <chrono>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"

namespace flashmem::server {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

std::string RandomHex(int bytes) {
  static std::random_device rd;
  static std::mutex mu;
  std::lock_guard<std::mutex> l(mu);
  std::string s;
  const char* hex = "0123456789abcdef";
  for (int i = 0; i < bytes; ++i) {
    const unsigned v = rd() & 0xff;
    s.push_back(hex[v >> 4]);
    s.push_back(hex[v & 15]);
  }
  return s;
}

}  // namespace

SessionServiceImpl::SessionServiceImpl(Scheduler& scheduler, const tokenizer::Tokenizer* tok, int64_t vocab_size,
                                       SessionServiceOptions options, memtier::MemTierClient* memtier)
    : scheduler_(scheduler), tok_(tok), vocab_size_(vocab_size), options_(options), memtier_(memtier) {}

namespace {

// memtier keys sessions by u64: the session id is 16 hex digits.
absl::StatusOr<uint64_t> MemtierKey(const std::string& id) {
  uint64_t v = 0;
  if (id.size() != 16) return absl::InvalidArgumentError(absl::StrCat("session id '", id, "' is not 16 hex digits"));
  for (char c : id) {
    const int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("session id '", id, "' is not 16 hex digits"));
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  return v;
}

template <typename T>
void Put(std::string* out, const T& v) { out->append(reinterpret_cast<const char*>(&v), sizeof v); }

template <typename T>
bool Get(absl::string_view* in, T* v) {
  if (in->size() < sizeof *v) return false;
  std::memcpy(v, in->data(), sizeof *v);
  in->remove_prefix(sizeof *v);
  return true;
}

// A snapshot's version: the owner generation (one per adoption) above this bit, the owner's
// snapshot count below it.
constexpr int kOwnerShift = 40;

// A failed snapshot as the client sees it: a stale copy (ABORTED) is final, anything else is
// memtier being unreachable (UNAVAILABLE: retry, or let the coordinator move the session).
grpc::Status SnapshotError(const absl::Status& st) {
  if (absl::IsAborted(st)) return ToGrpc(st);
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, absl::StrCat("snapshot to memtier: ", st.message()));
}

}  // namespace

absl::Status SessionServiceImpl::Persist(const std::string& id, Session& s) {
  if (!memtier_) return absl::OkStatus();
  auto snap = scheduler_.Snapshot(s.scheduler_id);
  if (!snap.ok()) return snap.status();
  auto key = MemtierKey(id);
  if (!key.ok()) return key.status();
  // [token][defaults][log][scheduler snapshot]
  std::string blob;
  Put(&blob, static_cast<uint32_t>(s.token.size()));
  blob += s.token;
  Put(&blob, s.defaults.temperature);
  Put(&blob, s.defaults.top_p);
  Put(&blob, s.defaults.seed);
  Put(&blob, s.appends);
  Put(&blob, static_cast<uint64_t>(s.generated.size()));
  blob.append(reinterpret_cast<const char*>(s.generated.data()), s.generated.size() * 4);
  blob += *snap;
  absl::Status st = memtier_->PutState(*key, ++s.version, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(blob.data()), blob.size()));
  if (absl::IsAborted(st)) {  // another worker adopted the session: this copy is stale, drop it
    {
      std::lock_guard<std::mutex> l(mu_);
      sessions_.erase(id);
    }
    (void)scheduler_.CloseSession(s.scheduler_id);
    return absl::AbortedError(absl::StrCat("session '", id, "' moved to another worker (memtier refused this worker's snapshot: ",
                                           st.message(), "); this copy is dropped"));
  }
  return st;
}

absl::StatusOr<std::pair<uint64_t, uint64_t>> SessionServiceImpl::Adopt(const std::string& id) {
  if (!memtier_) return absl::FailedPreconditionError("adopt: this worker runs without --memtier");
  auto key = MemtierKey(id);
  if (!key.ok()) return key.status();
  auto st = memtier_->GetState(*key);
  if (!st.ok()) return st.status();
  absl::string_view in(reinterpret_cast<const char*>(st->second.data()), st->second.size());
  auto s = std::make_shared<Session>();
  uint32_t tlen = 0;
  uint64_t n = 0;
  if (!Get(&in, &tlen) || in.size() < tlen) return absl::DataLossError("adopt: snapshot header truncated");
  s->token = std::string(in.substr(0, tlen));
  in.remove_prefix(tlen);
  if (!Get(&in, &s->defaults.temperature) || !Get(&in, &s->defaults.top_p) || !Get(&in, &s->defaults.seed) ||
      !Get(&in, &s->appends) || !Get(&in, &n))
    return absl::DataLossError("adopt: snapshot header truncated");
  if (n > in.size() / 4)  // n * 4 could wrap: a corrupt count must not size an allocation
    return absl::DataLossError(absl::StrCat("adopt: snapshot claims ", n, " generated tokens, it holds ", in.size() / 4));
  s->generated.resize(n);
  std::memcpy(s->generated.data(), in.data(), n * 4);
  in.remove_prefix(n * 4);
  auto sid = scheduler_.Restore(in, *key);
  if (!sid.ok()) return sid.status();
  s->scheduler_id = *sid;
  // Ownership: an adoption starts the next owner generation in the version's top bits and claims
  // it at once by re-writing the snapshot. A previous owner that is still running (cut off by the
  // network, not dead) then has every later snapshot refused, and cannot roll the session back.
  s->version = ((st->first >> kOwnerShift) + 1) << kOwnerShift;
  if (auto claim = memtier_->PutState(*key, s->version, st->second); !claim.ok()) {
    (void)scheduler_.CloseSession(*sid);
    return absl::Status(claim.code(), absl::StrCat("adopt: claiming the session in memtier: ", claim.message()));
  }
  uint64_t length = 0;
  (void)scheduler_.WithState(*sid, [&](const model::SessionState& state, uint64_t) { length = state.position; });
  std::lock_guard<std::mutex> l(mu_);
  sessions_[id] = s;
  return std::make_pair(length, static_cast<uint64_t>(n));
}

grpc::Status WorkerAdminImpl::AdoptSession(grpc::ServerContext*, const v1::AdoptSessionRequest* r, v1::AdoptSessionResponse* out) {
  auto res = sessions_.Adopt(r->session_id());
  if (!res.ok()) return grpc::Status(static_cast<grpc::StatusCode>(res.status().code()), std::string(res.status().message()));
  out->set_length(res->first);
  out->set_generated(res->second);
  return grpc::Status::OK;
}

grpc::Status SessionServiceImpl::Authorize(grpc::ServerContext* ctx, const std::string& id, std::shared_ptr<Session>* out) {
  std::shared_ptr<Session> s;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("unknown session '", id, "'"));
    s = it->second;
  }
  const auto md = ctx->client_metadata().find("authorization");
  const std::string want = "Bearer " + s->token;
  if (md == ctx->client_metadata().end() || std::string(md->second.data(), md->second.size()) != want)
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "missing or wrong bearer token for this session");
  *out = std::move(s);
  return grpc::Status::OK;
}

grpc::Status SessionServiceImpl::CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest* r,
                                               v1::CreateSessionResponse* out) {
  model::SamplingOptions d{r->defaults().temperature(), r->defaults().top_p() == 0 ? 1.0f : r->defaults().top_p(), r->defaults().seed()};
  if (auto st = model::ValidateSampling(d); !st.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("defaults: ", st.message()));
  const std::string sid = RandomHex(8);
  SessionOptions so;
  so.lsa_mode = r->lsa() == v1::LSA_DENSE ? lsa::LsaMode::kOff : lsa::LsaMode::kAuto;
  so.lsa_overrides = r->lsa_options();
  if (memtier_) {
    auto key = MemtierKey(sid);
    if (auto st = memtier_->OpenSession(*key); !st.ok())
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, absl::StrCat("memtier: ", st.message()));
    so.memtier_key = *key;
  }
  auto id = scheduler_.CreateSession(so);
  if (!id.ok()) return ToGrpc(id.status());
  auto s = std::make_shared<Session>();
  s->scheduler_id = *id;
  s->token = RandomHex(16);
  s->defaults = d;
  {
    std::lock_guard<std::mutex> l(mu_);
    sessions_[sid] = s;
  }
  out->set_session_id(sid);
  out->set_token(s->token);
  return grpc::Status::OK;
}

grpc::Status SessionServiceImpl::Append(grpc::ServerContext* ctx, const v1::AppendRequest* r,
                                        grpc::ServerWriter<v1::AppendProgress>* w) {
  std::shared_ptr<Session> s;
  if (auto st = Authorize(ctx, r->session_id(), &s); !st.ok()) return st;
  std::vector<int32_t> ids;
  if (r->add_bos()) ids.push_back(0);
  if (r->has_token_ids()) {
    for (int i = 0; i < r->token_ids().ids_size(); ++i) {
      const int32_t t = r->token_ids().ids(i);
      if (t < 0 || t >= vocab_size_)
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("token_ids.ids[", i, "] = ", t, " is outside the vocabulary"));
      ids.push_back(t);
    }
  } else {
    if (!tok_) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "text input: the model has no tokenizer.json; send token_ids");
    if (static_cast<int64_t>(r->text().size()) > options_.max_prompt_tokens * 16)
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "text: prompt too large");
    auto enc = tok_->Encode(r->text());
    if (!enc.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("text: ", enc.status().message()));
    ids.insert(ids.end(), enc->begin(), enc->end());
  }
  if (static_cast<int64_t>(ids.size()) > options_.max_prompt_tokens)
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, absl::StrCat("prompt of ", ids.size(), " tokens exceeds the limit of ", options_.max_prompt_tokens));
  std::lock_guard<std::mutex> sl(s->mu);
  const uint64_t total = ids.size();
  if (r->append_seq() != 0) {
    if (r->append_seq() <= s->appends) {  // already applied: a retry
      v1::AppendProgress p;
      p.set_total(total);
      p.set_consumed(total);
      w->Write(p);
      return grpc::Status::OK;
    }
    if (r->append_seq() != s->appends + 1)
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("append_seq ", r->append_seq(), ": the session has applied ", s->appends, " appends"));
  }
  if (auto st = scheduler_.Append(s->scheduler_id, std::move(ids)); !st.ok()) return ToGrpc(st);
  // Progress until every token of this append has entered a forward pass.
  for (;;) {
    auto pending = scheduler_.Pending(s->scheduler_id);
    if (!pending.ok()) return ToGrpc(pending.status());
    v1::AppendProgress p;
    p.set_total(total);
    p.set_consumed(total - std::min<uint64_t>(total, static_cast<uint64_t>(*pending)));
    w->Write(p);
    if (*pending <= 0) break;
    if (ctx->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "append cancelled");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ++s->appends;
  if (auto st = Persist(r->session_id(), *s); !st.ok())
    return SnapshotError(st);
  return grpc::Status::OK;
}

grpc::Status SessionServiceImpl::Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* r,
                                          grpc::ServerWriter<v1::GeneratedToken>* w) {
  std::shared_ptr<Session> s;
  if (auto st = Authorize(ctx, r->session_id(), &s); !st.ok()) return st;
  if (r->max_tokens() == 0 || r->max_tokens() > options_.max_generate_tokens)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("max_tokens ", r->max_tokens(), " must be in [1, ", options_.max_generate_tokens, "]"));
  std::lock_guard<std::mutex> sl(s->mu);
  // Resumption: re-deliver what this session already generated from resume_from on.
  if (r->resume_from() > 0) {
    if (r->resume_from() > s->generated.size())
      return grpc::Status(grpc::StatusCode::OUT_OF_RANGE, absl::StrCat("resume_from ", r->resume_from(), " is beyond the ", s->generated.size(), " tokens generated"));
    for (uint64_t i = r->resume_from(); i < s->generated.size(); ++i) {
      v1::GeneratedToken g;
      g.set_id(s->generated[i]);
      g.set_index(i);
      g.set_last(i + 1 == s->generated.size());
      w->Write(g);
    }
    return grpc::Status::OK;
  }
  GenerateParams p;
  p.max_tokens = r->max_tokens();
  p.sampling = r->has_sampling() ? model::SamplingOptions{r->sampling().temperature(), r->sampling().top_p() == 0 ? 1.0f : r->sampling().top_p(), r->sampling().seed()}
                                 : s->defaults;
  p.stop_ids.assign(r->stop_ids().begin(), r->stop_ids().end());
  struct Event {
    int32_t token;
    bool done;
    std::string reason;
  };
  auto q = std::make_shared<std::pair<std::mutex, std::condition_variable>>();
  auto events = std::make_shared<std::deque<Event>>();
  auto push = [q, events](int32_t t, bool done, const std::string& reason) {
    std::lock_guard<std::mutex> l(q->first);
    events->push_back({t, done, reason});
    q->second.notify_all();
  };
  if (auto st = scheduler_.Generate(s->scheduler_id, p, push); !st.ok()) return ToGrpc(st);
  std::unique_ptr<tokenizer::Tokenizer::StreamDecoder> dec;
  if (tok_) dec = std::make_unique<tokenizer::Tokenizer::StreamDecoder>(*tok_);
  std::string text_so_far;
  auto last = std::chrono::steady_clock::now();
  bool first = true;
  for (;;) {
    Event e;
    {
      std::unique_lock<std::mutex> l(q->first);
      if (!q->second.wait_for(l, std::chrono::milliseconds(200), [&] { return !events->empty(); })) {
        if (ctx->IsCancelled()) {
          (void)scheduler_.StopGeneration(s->scheduler_id);
          return grpc::Status(grpc::StatusCode::CANCELLED, "generate cancelled");
        }
        continue;
      }
      e = events->front();
      events->pop_front();
    }
    if (e.token < 0) return grpc::Status(grpc::StatusCode::INTERNAL, absl::StrCat("generation failed: ", e.reason));
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    if (first && on_first_token_) on_first_token_(dt);
    if (!first && on_inter_token_) on_inter_token_(dt);
    first = false;
    last = now;
    v1::GeneratedToken g;
    g.set_id(e.token);
    g.set_index(s->generated.size());
    s->generated.push_back(e.token);
    std::string reason = e.reason;
    bool done = e.done;
    if (dec && e.token < tok_->vocab_size()) {
      auto piece = dec->Push(e.token);
      if (piece.ok()) {
        g.set_text(*piece);
        text_so_far += *piece;
      }
    }
    for (const std::string& stop : r->stop_strings())
      if (!done && !stop.empty() && absl::StrContains(text_so_far, stop)) {
        (void)scheduler_.StopGeneration(s->scheduler_id);
        done = true;
        reason = "stop";
      }
    g.set_last(done);
    if (done) g.set_finish_reason(reason);
    if (done) {  // durable before the client sees the end: another worker can take over from here
      if (auto st = Persist(r->session_id(), *s); !st.ok()) {
        // The session has moved past this token already: the client gets it (not as the end,
        // which is not durable), then the error — dropping it made a retry skip it.
        g.set_last(false);
        g.clear_finish_reason();
        (void)w->Write(g);
        return SnapshotError(st);
      }
    }
    if (!w->Write(g)) {
      (void)scheduler_.StopGeneration(s->scheduler_id);
      return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    }
    if (done) return grpc::Status::OK;
  }
}

grpc::Status SessionServiceImpl::GetSession(grpc::ServerContext* ctx, const v1::SessionRef* r, v1::SessionInfo* out) {
  std::shared_ptr<Session> s;
  if (auto st = Authorize(ctx, r->session_id(), &s); !st.ok()) return st;
  out->set_session_id(r->session_id());
  auto st = scheduler_.WithState(s->scheduler_id, [&](const model::SessionState& state, uint64_t) {
    out->set_length(state.position);
    uint64_t bytes = 0, dense = 0, evicted = 0;
    auto pages = [&](const kv::EntryPages& e) {
      for (int64_t p = 0; p < e.num_pages(); ++p) {
        const uint64_t b = std::min<int64_t>(kv::kEntriesPerPage, e.size() - p * kv::kEntriesPerPage) * e.entry_bytes();
        dense += b;
        if (e.resident(p)) bytes += b; else ++evicted;
      }
    };
    for (const auto& l : state.layers) {
      bytes += l.window.memory_bytes();
      dense += l.window.memory_bytes();
      pages(l.compressed);
      pages(l.index_keys);
    }
    out->set_kv_bytes_worker(bytes);
    out->set_kv_bytes_dense(dense);
    out->set_kv_pages_evicted(evicted);
  });
  if (!st.ok()) return ToGrpc(st);
  if (options_.pager) out->set_kv_pages_in_memtier(options_.pager->session_stats(s->scheduler_id).committed_pages);
  if (auto ls = scheduler_.LsaStats(s->scheduler_id); ls.ok() && ls->enabled) {
    v1::LsaInfo* li = out->mutable_lsa();
    li->set_enabled(true);
    li->set_refreshes(ls->lsa.refreshes);
    li->set_sets_applied(ls->lsa.sets_applied);
    li->set_visible_pages(ls->visible_pages);
    li->set_total_pages(ls->total_pages);
    li->set_pages_recalled(ls->lsa.pages_recalled);
    li->set_churn_jaccard(ls->lsa.churn_count ? ls->lsa.churn_jaccard_sum / ls->lsa.churn_count : 1.0);
    li->set_stalls(ls->lsa.stalls);
    li->set_stall_ms(ls->lsa.stall_seconds * 1e3);
    li->set_fallback(ls->lsa.fallback);
    li->set_level2_agreement(ls->level2_agreement);
  }
  out->set_generated(s->generated.size());
  out->set_state("idle");
  out->set_worker_prefill_tokens(scheduler_.stats().prefill_tokens);
  return grpc::Status::OK;
}

grpc::Status SessionServiceImpl::CloseSession(grpc::ServerContext* ctx, const v1::SessionRef* r, v1::CloseSessionResponse*) {
  std::shared_ptr<Session> s;
  if (auto st = Authorize(ctx, r->session_id(), &s); !st.ok()) return st;
  (void)scheduler_.StopGeneration(s->scheduler_id);
  if (auto st = scheduler_.CloseSession(s->scheduler_id); !st.ok()) return ToGrpc(st);
  std::lock_guard<std::mutex> l(mu_);
  sessions_.erase(r->session_id());
  return grpc::Status::OK;
}

}  // namespace flashmem::server
