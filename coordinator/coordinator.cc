#include "coordinator/coordinator.h"

#include <cstring>

#include <grpcpp/grpcpp.h>

#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "rocksdb/db.h"
#include "spdlog/spdlog.h"

namespace flashmem::coordinator {
namespace {

grpc::Status Err(grpc::StatusCode c, const std::string& m) { return grpc::Status(c, m); }
grpc::Status FromAbsl(const absl::Status& s) {
  return s.ok() ? grpc::Status::OK : grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// The client's bearer token travels on to the worker.
void ForwardAuth(grpc::ServerContext* in, grpc::ClientContext* out) {
  const auto it = in->client_metadata().find("authorization");
  if (it != in->client_metadata().end()) out->AddMetadata("authorization", std::string(it->second.data(), it->second.size()));
}

// Errors that mean "the worker is gone" rather than "the request is wrong".
bool WorkerLost(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE || s.error_code() == grpc::StatusCode::CANCELLED ||
         s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED || s.error_code() == grpc::StatusCode::UNKNOWN ||
         s.error_code() == grpc::StatusCode::INTERNAL;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Open(const CoordinatorOptions& o) {
  std::unique_ptr<Coordinator> c(new Coordinator());
  c->options_ = o;
  std::error_code ec;
  std::filesystem::create_directories(o.data_dir, ec);
  rocksdb::Options ro;
  ro.create_if_missing = true;
  rocksdb::DB* db = nullptr;
  auto s = rocksdb::DB::Open(ro, o.data_dir, &db);
  if (!s.ok()) return absl::UnavailableError(absl::StrCat("--data-dir ", o.data_dir, ": ", s.ToString()));
  c->db_.reset(db);
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    const std::string k = it->key().ToString();
    if (k.rfind("appends/", 0) == 0) {
      uint64_t n = 0;
      if (it->value().size() == 8) std::memcpy(&n, it->value().data(), 8);
      c->appends_[k.substr(8)] = n;
    } else {
      c->routes_[k] = it->value().ToString();
    }
  }
  spdlog::info("coordinator: {} sessions in the table", c->routes_.size());
  c->reaper_ = std::thread([p = c.get()] { p->ReassignLost(); });
  return c;
}

Coordinator::~Coordinator() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  stop_cv_.notify_all();
  if (reaper_.joinable()) reaper_.join();
}

uint64_t Coordinator::failovers() const {
  std::lock_guard<std::mutex> l(mu_);
  return failovers_;
}

Coordinator::Stats Coordinator::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  Stats s;
  s.sessions = routes_.size();
  for (const auto& [id, w] : workers_) {
    if (w.rank) continue;  // a group counts once, as its leader
    (w.memtier ? s.memtiers : s.workers)++;
    (w.memtier ? s.memtiers_live : s.workers_live) += Live(w);
  }
  s.failovers = failovers_;
  s.appends = appends_relayed_;
  s.generates = generates_;
  s.tokens = tokens_relayed_;
  return s;
}

std::shared_ptr<grpc::ChannelCredentials> Coordinator::WorkerCredentials() const {
  return options_.worker_credentials ? options_.worker_credentials : grpc::InsecureChannelCredentials();
}

bool Coordinator::LeaseHolds(const Worker& w) const {
  return std::chrono::steady_clock::now() - w.last_seen < options_.lease;
}

bool Coordinator::LiveAt(const std::string& address) const {
  const Worker* w = SessionWorkerAt(address);
  return w && Live(*w);
}

bool Coordinator::Live(const Worker& w) const {
  if (!LeaseHolds(w)) return false;
  if (w.tp_size <= 1 || w.rank) return true;
  for (uint32_t r = 1; r < w.tp_size; ++r) {
    bool found = false;
    for (const auto& [id, o] : workers_)
      found |= o.rank && o.group == w.group && o.tp_rank == r && o.tp_size == w.tp_size && LeaseHolds(o);
    if (!found) return false;
  }
  return true;
}

const Coordinator::Worker* Coordinator::SessionWorkerAt(const std::string& address) const {
  for (const auto& [id, w] : workers_)
    if (TakesSessions(w) && w.address == address) return &w;
  return nullptr;
}

grpc::Status Coordinator::Register(grpc::ServerContext*, const v1::RegisterRequest* r, v1::RegisterResponse* out) {
  if (r->address().empty()) return Err(grpc::StatusCode::INVALID_ARGUMENT, "register: address is empty");
  if (r->kind() != v1::WORKER && r->kind() != v1::MEMTIER && r->kind() != v1::WORKER_RANK)
    return Err(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("register: kind ", static_cast<int>(r->kind()), " is unknown"));
  const uint32_t tp_size = std::max<uint32_t>(r->tp_size(), 1);
  if (tp_size > 64) return Err(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("register: tp_size ", tp_size, " is over 64"));
  if (tp_size > 1 || r->kind() == v1::WORKER_RANK) {
    if (r->group().empty() || r->group().size() > 128)
      return Err(grpc::StatusCode::INVALID_ARGUMENT, "register: a tensor-parallel rank needs a group name of 1-128 bytes");
    if (r->tp_rank() >= tp_size)
      return Err(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("register: tp_rank ", r->tp_rank(), " is not below tp_size ", tp_size));
    if ((r->tp_rank() == 0) != (r->kind() == v1::WORKER))
      return Err(grpc::StatusCode::INVALID_ARGUMENT, "register: rank 0 of a group registers as WORKER, the others as WORKER_RANK");
  }
  if (r->memtier_store().size() > 128)
    return Err(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("register: memtier_store of ", r->memtier_store().size(), " bytes (at most 128)"));
  std::lock_guard<std::mutex> l(mu_);
  uint64_t id = 0;
  const bool memtier = r->kind() == v1::MEMTIER, rank = r->kind() == v1::WORKER_RANK;
  for (auto& [wid, w] : workers_)
    if (w.address == r->address() && w.memtier == memtier && w.rank == rank) id = wid;  // restarted on the same address
  if (id == 0) id = next_worker_++;
  Worker& w = workers_[id];
  w.address = r->address();
  w.memtier = memtier;
  w.rank = rank;
  w.group = r->group();
  w.tp_rank = r->tp_rank();
  w.tp_size = tp_size;
  w.memtier_store = r->memtier_store();
  w.last_seen = std::chrono::steady_clock::now();
  out->set_worker_id(id);
  out->set_heartbeat_ms(static_cast<uint32_t>(options_.heartbeat.count()));
  out->set_lease_ms(static_cast<uint32_t>(options_.lease.count()));
  if (rank) {  // never dialled
    spdlog::info("coordinator: group '{}' rank {}/{} ({})", w.group, w.tp_rank, w.tp_size, id);
    return grpc::Status::OK;
  }
  if (!channels_.count(w.address)) channels_[w.address] = grpc::CreateChannel(w.address, WorkerCredentials());
  w.channel = channels_[w.address];
  spdlog::info("coordinator: {} {} at {}{}", memtier ? "memtier" : "worker", id, w.address,
               tp_size > 1 ? absl::StrCat(" (leader of group '", w.group, "', ", tp_size, " ranks)") : "");
  return grpc::Status::OK;
}

grpc::Status Coordinator::Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* r, v1::HeartbeatResponse*) {
  std::lock_guard<std::mutex> l(mu_);
  auto it = workers_.find(r->worker_id());
  if (it == workers_.end()) return Err(grpc::StatusCode::NOT_FOUND, absl::StrCat("unknown worker ", r->worker_id(), ": register again"));
  it->second.last_seen = std::chrono::steady_clock::now();
  it->second.sessions = r->sessions();
  it->second.kv_bytes = r->kv_bytes();
  return grpc::Status::OK;
}

absl::StatusOr<uint64_t> Coordinator::PickWorker(const std::string& avoid, uint32_t prefer_tp, const std::string& store) {
  // Least loaded: fewest active sessions, then least KV in memory (ties: lowest id). A moving
  // session goes to a group of its old group's size when there is one: the same partition sums
  // in the same order, so its tokens stay identical to an uninterrupted run.
  for (const bool same_size : {true, false}) {
    if (same_size && prefer_tp == 0) continue;
    uint64_t best = 0;
    std::pair<uint32_t, uint64_t> best_load{UINT32_MAX, UINT64_MAX};
    for (auto& [id, w] : workers_)
      if (TakesSessions(w) && Live(w) && w.address != avoid && (!same_size || w.tp_size == prefer_tp) &&
          (store.empty() || w.memtier_store == store) &&
          std::make_pair(w.sessions, w.kv_bytes) < best_load) {
        best = id;
        best_load = {w.sessions, w.kv_bytes};
      }
    if (best != 0) return best;
  }
  return absl::UnavailableError(store.empty() ? std::string("no live worker")
                                               : absl::StrCat("no live worker of memtier store ", store, " (where the session's pages are)"));
}

absl::Status Coordinator::SaveRoute(const std::string& session_id, const std::string& address) {
  routes_[session_id] = address;
  auto s = db_->Put(rocksdb::WriteOptions(), session_id, address);
  return s.ok() ? absl::OkStatus() : absl::InternalError(s.ToString());
}

absl::StatusOr<std::pair<std::string, std::shared_ptr<grpc::Channel>>> Coordinator::Route(const std::string& sid, bool force_move) {
  std::unique_lock<std::mutex> l(mu_);
  const auto route_start = std::chrono::steady_clock::now();
  for (;;) {
    // One move of a session at a time: whoever finds it moving waits, then takes the new route.
    moved_cv_.wait(l, [&] { return !moving_.count(sid); });
    auto r = routes_.find(sid);
    if (r == routes_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", sid, "'"));
    const std::string old = r->second;
    bool move = force_move || !LiveAt(old);
    if (force_move) {
      // Moving a session whose worker still holds its lease would serve it twice: wait the lease out.
      const auto deadline = std::chrono::steady_clock::now() + options_.lease + options_.heartbeat;
      while (LiveAt(old) && std::chrono::steady_clock::now() < deadline) {
        l.unlock();
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        l.lock();
      }
      if (moving_.count(sid) || !routes_.count(sid) || routes_[sid] != old) {  // moved meanwhile
        force_move = false;
        continue;
      }
      move = !LiveAt(old);  // it came back: keep it there
    }
    if (!move) {
      if (!channels_.count(old)) channels_[old] = grpc::CreateChannel(old, WorkerCredentials());
      return std::make_pair(old, channels_[old]);
    }
    moving_.insert(sid);
    auto done = [&](auto result) {
      moving_.erase(sid);
      moved_cv_.notify_all();
      return result;
    };
    const Worker* old_worker = SessionWorkerAt(old);
    auto id = PickWorker(old, old_worker ? old_worker->tp_size : 1, old_worker ? old_worker->memtier_store : "");
    if (!id.ok()) return done(absl::StatusOr<std::pair<std::string, std::shared_ptr<grpc::Channel>>>(id.status()));
    const Worker& w = workers_[*id];
    auto channel = w.channel;
    const std::string addr = w.address;
    l.unlock();
    auto admin = v1::WorkerAdmin::NewStub(channel);
    v1::AdoptSessionRequest req;
    req.set_session_id(sid);
    v1::AdoptSessionResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    const grpc::Status st = admin->AdoptSession(&ctx, req, &resp);
    l.lock();
    if (!st.ok())
      return done(absl::StatusOr<std::pair<std::string, std::shared_ptr<grpc::Channel>>>(
          absl::UnavailableError(absl::StrCat("adopting session ", sid, " on ", addr, ": ", st.error_message()))));
    failovers_++;
    if (on_resume_) on_resume_(std::chrono::duration<double>(std::chrono::steady_clock::now() - route_start).count());
    if (auto s2 = SaveRoute(sid, addr); !s2.ok())
      return done(absl::StatusOr<std::pair<std::string, std::shared_ptr<grpc::Channel>>>(s2));
    spdlog::warn("coordinator: session {} moved from {} to {}", sid, old, addr);
    return done(absl::StatusOr<std::pair<std::string, std::shared_ptr<grpc::Channel>>>(std::make_pair(addr, channel)));
  }
}

void Coordinator::ReassignLost() {
  std::unique_lock<std::mutex> l(mu_);
  while (!stop_) {
    stop_cv_.wait_for(l, options_.heartbeat, [&] { return stop_; });
    if (stop_) break;
    // Sessions on registered workers whose lease ran out move now, not at their next call.
    std::vector<std::string> lost;
    for (const auto& [sid, addr] : routes_) {
      if (moving_.count(sid)) continue;
      const Worker* w = SessionWorkerAt(addr);
      if (w && !Live(*w)) lost.push_back(sid);
    }
    if (lost.empty()) continue;
    l.unlock();
    for (const std::string& sid : lost) {
      auto r = Route(sid, false);
      if (!r.ok()) spdlog::warn("coordinator: session {} stays on a lost worker for now: {}", sid, std::string(r.status().message()));
    }
    l.lock();
  }
}

grpc::Status Coordinator::CreateSession(grpc::ServerContext*, const v1::CreateSessionRequest* r, v1::CreateSessionResponse* out) {
  std::shared_ptr<grpc::Channel> ch;
  std::string addr;
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto pick = PickWorker();
    if (!pick.ok()) return FromAbsl(pick.status());
    id = *pick;
    ch = workers_[id].channel;
    addr = workers_[id].address;
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  const grpc::Status st = v1::SessionService::NewStub(ch)->CreateSession(&ctx, *r, out);
  if (!st.ok()) return st;
  std::lock_guard<std::mutex> l(mu_);
  workers_[id].sessions++;  // until its next heartbeat says otherwise
  return FromAbsl(SaveRoute(out->session_id(), addr));
}

Coordinator::LeaseWatch::LeaseWatch(Coordinator& c, std::string address, grpc::ClientContext* call)
    : thread_([this, &c, address = std::move(address), call] {
        std::unique_lock<std::mutex> l(mu_);
        while (!cv_.wait_for(l, c.options_.heartbeat, [&] { return stopped_; })) {
          bool live;
          {
            std::lock_guard<std::mutex> cl(c.mu_);
            live = c.LiveAt(address);
          }
          if (!live) {
            lapsed_ = true;
            call->TryCancel();
            return;
          }
        }
      }) {}

bool Coordinator::LeaseWatch::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopped_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  return lapsed_;
}

Coordinator::LeaseWatch::~LeaseWatch() { Stop(); }

// Runs a server stream on the session's worker and relays it. When the worker is lost, the
// session moves (AdoptSession on another worker, from its last snapshot) and the stream runs
// again; `relay` sees each attempt's messages with their index within the attempt.
template <typename Msg, typename Start, typename Relay>
grpc::Status Coordinator::WithFailover(grpc::ServerContext* ctx, const std::string& sid, const char* what, Start start,
                                       Relay relay) {
  bool moved = false;
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto route = Route(sid, moved);
    if (!route.ok()) return FromAbsl(route.status());
    grpc::ClientContext cctx;
    ForwardAuth(ctx, &cctx);
    auto stub = v1::SessionService::NewStub(route->second);
    // A worker cut off by the network sends no reset: its stream just goes quiet. Its lease
    // tells: once it runs out the call is cancelled and the session moves like after a crash.
    LeaseWatch watch(*this, route->first, &cctx);
    auto reader = start(*stub, &cctx);
    Msg m;
    for (size_t i = 0; reader->Read(&m); ++i)
      if (grpc::Status st = relay(m, i); !st.ok()) return st;
    const grpc::Status st = reader->Finish();
    if (!watch.Stop() && (st.ok() || !WorkerLost(st))) return st;
    moved = true;
  }
  return Err(grpc::StatusCode::UNAVAILABLE, absl::StrCat(what, ": workers keep failing"));
}

grpc::Status Coordinator::Append(grpc::ServerContext* ctx, const v1::AppendRequest* r, grpc::ServerWriter<v1::AppendProgress>* w) {
  // The append carries its index in the session: a retry on another worker (whose snapshot may
  // already hold it, when the first worker died after its snapshot but before answering) is not
  // applied twice.
  v1::AppendRequest req = *r;
  if (req.append_seq() == 0) {
    std::lock_guard<std::mutex> l(mu_);
    req.set_append_seq(appends_[r->session_id()] + 1);
  }
  const grpc::Status st = WithFailover<v1::AppendProgress>(
      ctx, r->session_id(), "append",
      [&](v1::SessionService::Stub& stub, grpc::ClientContext* c) { return stub.Append(c, req); },
      [&](const v1::AppendProgress& p, size_t) {
        w->Write(p);
        return grpc::Status::OK;
      });
  if (st.ok()) {
    std::lock_guard<std::mutex> l(mu_);
    appends_relayed_++;
    uint64_t& n = appends_[r->session_id()];
    n = std::max(n, req.append_seq());
    std::string v(8, '\0');
    std::memcpy(v.data(), &n, 8);
    if (auto s = db_->Put(rocksdb::WriteOptions(), "appends/" + r->session_id(), v); !s.ok())
      return Err(grpc::StatusCode::INTERNAL, absl::StrCat("session table: ", s.ToString()));
  }
  return st;
}

grpc::Status Coordinator::Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* r, grpc::ServerWriter<v1::GeneratedToken>* w) {
  std::vector<int32_t> delivered;
  {
    std::lock_guard<std::mutex> l(mu_);
    generates_++;
  }
  const auto start = std::chrono::steady_clock::now();
  auto last = start;
  return WithFailover<v1::GeneratedToken>(
      ctx, r->session_id(), "generate",
      [&](v1::SessionService::Stub& stub, grpc::ClientContext* c) { return stub.Generate(c, *r); },
      [&](const v1::GeneratedToken& t, size_t seen) {
        if (seen < delivered.size()) {  // replay after a failover: the client has these already
          if (t.id() != delivered[seen])
            return Err(grpc::StatusCode::INTERNAL, absl::StrCat("failover replay diverged at token ", seen));
          return grpc::Status::OK;
        }
        delivered.push_back(t.id());
        const auto now = std::chrono::steady_clock::now();
        if (delivered.size() == 1 && on_first_token_) on_first_token_(std::chrono::duration<double>(now - start).count());
        if (delivered.size() > 1 && on_inter_token_) on_inter_token_(std::chrono::duration<double>(now - last).count());
        last = now;
        {
          std::lock_guard<std::mutex> l(mu_);
          tokens_relayed_++;
        }
        return w->Write(t) ? grpc::Status::OK : Err(grpc::StatusCode::CANCELLED, "client went away");
      });
}

grpc::Status Coordinator::GetSession(grpc::ServerContext* ctx, const v1::SessionRef* r, v1::SessionInfo* out) {
  auto route = Route(r->session_id(), false);
  if (!route.ok()) return FromAbsl(route.status());
  grpc::ClientContext cctx;
  ForwardAuth(ctx, &cctx);
  const grpc::Status st = v1::SessionService::NewStub(route->second)->GetSession(&cctx, *r, out);
  out->set_served_by(route->first);
  return st;
}

grpc::Status Coordinator::CloseSession(grpc::ServerContext* ctx, const v1::SessionRef* r, v1::CloseSessionResponse* out) {
  auto route = Route(r->session_id(), false);
  if (!route.ok()) return FromAbsl(route.status());
  grpc::ClientContext cctx;
  ForwardAuth(ctx, &cctx);
  const grpc::Status st = v1::SessionService::NewStub(route->second)->CloseSession(&cctx, *r, out);
  if (!st.ok()) return st;
  std::lock_guard<std::mutex> l(mu_);
  routes_.erase(r->session_id());
  appends_.erase(r->session_id());
  (void)db_->Delete(rocksdb::WriteOptions(), r->session_id());
  (void)db_->Delete(rocksdb::WriteOptions(), "appends/" + r->session_id());
  return grpc::Status::OK;
}

}  // namespace flashmem::coordinator
