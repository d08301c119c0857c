#include "worker/server/group_control.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace flashmem::server {

GroupControlService::GroupControlService(std::string group, int size, std::function<void(const absl::Status&)> on_lost)
    : group_(std::move(group)), size_(size), on_lost_(std::move(on_lost)), followers_(size > 1 ? size - 1 : 0) {}

GroupControlService::~GroupControlService() { Shutdown(); }

absl::Status GroupControlService::WaitForFollowers(absl::Duration timeout) {
  absl::MutexLock l(&mu_);
  auto all = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    for (const Follower& f : followers_)
      if (!f.joined) return false;
    return true;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&all), timeout)) {
    std::string missing;
    for (size_t i = 0; i < followers_.size(); ++i)
      if (!followers_[i].joined) absl::StrAppend(&missing, missing.empty() ? "" : ", ", i + 1);
    return absl::DeadlineExceededError(absl::StrCat("tensor-parallel group '", group_, "': rank(s) ", missing,
                                                    " did not follow the leader within ", absl::FormatDuration(timeout)));
  }
  return health_;
}

void GroupControlService::Shutdown() {
  absl::MutexLock l(&mu_);
  shutdown_ = true;
}

absl::Status GroupControlService::Health() const {
  absl::MutexLock l(&mu_);
  return health_;
}

void GroupControlService::Lost(int rank, const std::string& why) {
  absl::Status st;
  {
    absl::MutexLock l(&mu_);
    if (shutdown_ || followers_[rank - 1].gone) return;
    followers_[rank - 1].gone = true;
    followers_[rank - 1].queue.clear();
    if (!health_.ok()) return;
    health_ = absl::UnavailableError(absl::StrCat("tensor-parallel group '", group_, "' lost rank ", rank, ": ", why));
    st = health_;
  }
  spdlog::error("{}", std::string(st.message()));
  if (on_lost_) on_lost_(st);
}

grpc::Status GroupControlService::Follow(grpc::ServerContext* ctx, const v1::FollowRequest* req,
                                         grpc::ServerWriter<v1::GroupOp>* writer) {
  if (req->group() != group_)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("follow: group '", req->group(), "' is not this leader's group '", group_, "'"));
  if (req->size() != static_cast<uint32_t>(size_))
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("follow: size ", req->size(), " differs from the leader's --tp-size ", size_));
  if (req->rank() < 1 || req->rank() >= static_cast<uint32_t>(size_))
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("follow: rank ", req->rank(), " is not a follower rank of a group of ", size_));
  const int rank = static_cast<int>(req->rank());
  {
    absl::MutexLock l(&mu_);
    Follower& f = followers_[rank - 1];
    if (f.joined)  // a rank joins once: its place in the collectives cannot be taken over
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          absl::StrCat("follow: rank ", rank, " of group '", group_, "' has already joined"));
    if (shutdown_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "follow: the leader is shutting down");
    f.joined = true;
  }
  v1::GroupOp hello;  // seq 0, no op: the leader accepted this rank
  if (!writer->Write(hello)) {
    Lost(rank, "its stream closed at the start");
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "follow: stream closed");
  }
  spdlog::info("group '{}': rank {} follows", group_, rank);
  for (;;) {
    std::shared_ptr<const v1::GroupOp> op;
    {
      absl::MutexLock l(&mu_);
      Follower& f = followers_[rank - 1];
      auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !f.queue.empty() || shutdown_ || f.gone; };
      // Wake up now and then to notice a cancelled stream (the follower died with nothing to send).
      mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(200));
      if (f.gone) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "follow: the group is broken");
      if (shutdown_ && f.queue.empty()) return grpc::Status::OK;
      if (!f.queue.empty()) {
        op = f.queue.front();
        f.queue.pop_front();
      }
    }
    if (ctx->IsCancelled()) {
      Lost(rank, "its stream was cancelled (the process is gone)");
      return grpc::Status(grpc::StatusCode::CANCELLED, "follow: cancelled");
    }
    if (op && !writer->Write(*op)) {
      Lost(rank, "a write to its stream failed (the process is gone)");
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "follow: write failed");
    }
  }
}

void GroupControlService::Push(v1::GroupOp op) {
  absl::MutexLock l(&mu_);
  op.set_seq(++seq_);
  auto shared = std::make_shared<const v1::GroupOp>(std::move(op));
  for (Follower& f : followers_)
    if (!f.gone) f.queue.push_back(shared);
}

void GroupControlService::Created(uint64_t id, const SessionOptions& o, int64_t lsa_phase) {
  v1::GroupOp op;
  auto* c = op.mutable_create();
  c->set_session(id);
  c->set_lsa_mode(static_cast<int32_t>(o.lsa_mode));
  c->set_lsa_overrides(o.lsa_overrides);
  c->set_memtier_key(o.memtier_key);
  c->set_lsa_phase(lsa_phase);
  Push(std::move(op));
}

void GroupControlService::Restored(uint64_t id, absl::string_view snapshot, uint64_t memtier_key, int64_t lsa_phase) {
  v1::GroupOp op;
  auto* r = op.mutable_restore();
  r->set_session(id);
  r->set_snapshot(std::string(snapshot));
  r->set_memtier_key(memtier_key);
  r->set_lsa_phase(lsa_phase);
  Push(std::move(op));
}

void GroupControlService::Closed(uint64_t id) {
  v1::GroupOp op;
  op.mutable_close()->set_session(id);
  Push(std::move(op));
}

absl::Status GroupControlService::Step(const std::vector<GroupStepItem>& items, const std::vector<kv::AckedPage>& acked) {
  if (absl::Status st = Health(); !st.ok()) return st;
  v1::GroupOp op;
  auto* s = op.mutable_step();
  for (const GroupStepItem& it : items) {
    auto* m = s->add_items();
    m->set_session(it.session);
    m->mutable_tokens()->Add(it.tokens.begin(), it.tokens.end());
    m->set_decode(it.decode);
    m->set_skipped(it.skipped);
  }
  v1::GroupOp::Acked* run = nullptr;  // consecutive pages of one stream share a record
  for (const kv::AckedPage& a : acked) {
    if (!run || run->session() != a.session || run->stream() != a.stream) {
      run = s->add_acked();
      run->set_session(a.session);
      run->set_stream(a.stream);
    }
    run->add_pages(a.page);
  }
  Push(std::move(op));
  return absl::OkStatus();
}

namespace {

absl::Status Apply(const v1::GroupOp& op, Scheduler& scheduler) {
  switch (op.op_case()) {
    case v1::GroupOp::kCreate: {
      const auto& c = op.create();
      if (c.lsa_mode() < 0 || c.lsa_mode() > static_cast<int32_t>(lsa::LsaMode::kForceDense))
        return absl::InvalidArgumentError(absl::StrCat("group op create: lsa_mode ", c.lsa_mode(), " is unknown"));
      SessionOptions so;
      so.lsa_mode = static_cast<lsa::LsaMode>(c.lsa_mode());
      so.lsa_overrides = c.lsa_overrides();
      so.memtier_key = c.memtier_key();
      return scheduler.FollowCreate(c.session(), so, c.lsa_phase());
    }
    case v1::GroupOp::kRestore: {
      const auto& r = op.restore();
      return scheduler.FollowRestore(r.session(), r.snapshot(), r.memtier_key(), r.lsa_phase());
    }
    case v1::GroupOp::kClose:
      return scheduler.CloseSession(op.close().session());
    case v1::GroupOp::kStep: {
      std::vector<GroupStepItem> items;
      for (const auto& m : op.step().items())
        items.push_back({m.session(), std::vector<int32_t>(m.tokens().begin(), m.tokens().end()), m.decode(), m.skipped()});
      std::vector<kv::AckedPage> acked;
      for (const auto& a : op.step().acked())
        for (int64_t p : a.pages()) acked.push_back({a.session(), a.stream(), p});
      return scheduler.FollowStep(items, acked);
    }
    case v1::GroupOp::OP_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError("group op: no operation");
}

}  // namespace

absl::Status FollowLeader(const FollowOptions& o, Scheduler& scheduler, const std::function<void()>& on_following) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(std::numeric_limits<int>::max());  // restores carry whole snapshots
  auto channel = grpc::CreateCustomChannel(o.leader, o.credentials ? o.credentials : grpc::InsecureChannelCredentials(), args);
  auto stub = v1::GroupControl::NewStub(channel);
  grpc::ClientContext ctx;
  v1::FollowRequest req;
  req.set_group(o.group);
  req.set_rank(static_cast<uint32_t>(o.rank));
  req.set_size(static_cast<uint32_t>(o.size));
  auto reader = stub->Follow(&ctx, req);
  v1::GroupOp op;
  if (!reader->Read(&op) || op.seq() != 0 || op.op_case() != v1::GroupOp::OP_NOT_SET) {
    const grpc::Status st = reader->Finish();
    return absl::UnavailableError(absl::StrCat("tensor-parallel group '", o.group, "': the leader at ", o.leader,
                                               " did not accept rank ", o.rank, ": ", st.error_message()));
  }
  if (on_following) on_following();
  uint64_t expect = 1;
  while (reader->Read(&op)) {
    if (op.seq() != expect)
      return absl::DataLossError(absl::StrCat("group op ", op.seq(), " arrived where ", expect, " was due"));
    ++expect;
    if (absl::Status st = Apply(op, scheduler); !st.ok()) {
      ctx.TryCancel();  // the leader sees this rank gone
      return absl::InternalError(absl::StrCat("tensor-parallel rank ", o.rank, " cannot follow op ", op.seq(), ": ",
                                              st.message()));
    }
  }
  const grpc::Status st = reader->Finish();
  if (st.ok()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat("tensor-parallel group '", o.group, "': the leader's stream ended: ",
                                             st.error_message()));
}

}  // namespace flashmem::server
