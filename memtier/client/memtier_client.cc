#include "memtier/client/memtier_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/grpc_wait.h"
#include "common/status.h"
#include "memtier.grpc.pb.h"
#include "memtier/transport/copy_pool.h"
#include "memtier/transport/local_share.h"
#include "memtier/transport/ucx.h"

namespace flashmem::memtier {

struct MemTierClient::Rpc {
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::MemTier::Stub> stub;
};

namespace {

absl::Status FromGrpc(const grpc::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

void SetId(v1::PageId* id, const PageKey& k) {
  id->set_session(k.session);
  id->set_layer(k.layer);
  id->set_page(k.page);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MemTierClient>> MemTierClient::Connect(const MemTierClientOptions& options) {
  if (options.buffer_bytes == 0) return absl::InvalidArgumentError("buffer_bytes must be positive");
  std::unique_ptr<MemTierClient> c(new MemTierClient(options));
  c->rpc_ = std::make_unique<Rpc>();
  grpc::ChannelArguments args = QuickReconnectArgs();  // memtier restarted: found again within ~1 s
  args.SetMaxReceiveMessageSize(64 << 20);
  c->rpc_->channel = grpc::CreateCustomChannel(
      options.target, options.credentials ? options.credentials : grpc::InsecureChannelCredentials(), args);
  c->rpc_->stub = v1::MemTier::NewStub(c->rpc_->channel);
  if (options.connect_wait.count() > 0)  // not up in time: Register reports the connection's error
    WaitUntilConnected(*c->rpc_->channel, options.connect_wait, "memtier at " + options.target);
  FM_ASSIGN_OR_RETURN(c->worker_, ucx::Worker::Create());
  // UCX-allocated: on shared memory memtier then reaches the buffer directly.
  FM_ASSIGN_OR_RETURN(c->region_, c->worker_->Allocate(options.buffer_bytes));
  c->buffer_ = std::span<uint8_t>(static_cast<uint8_t*>(c->region_->base()), options.buffer_bytes);
  c->copies_ = std::make_unique<CopyPool>(options.copy_threads > 0 ? options.copy_threads : CopyPool::DefaultThreads(2));
  {
    absl::MutexLock l(&c->mu_);
    FM_RETURN_IF_ERROR(c->Register());
  }
  c->async_ = std::thread([p = c.get()] { p->AsyncLoop(); });
  return c;
}

MemTierClient::MemTierClient(const MemTierClientOptions& o) : options_(o) {}

MemTierClient::~MemTierClient() {
  {
    std::lock_guard<std::mutex> l(qmu_);
    stop_ = true;
  }
  qcv_.notify_all();
  if (async_.joinable()) async_.join();
}

uint64_t MemTierClient::epoch() const {
  absl::MutexLock l(&mu_);
  return epoch_;
}

std::string MemTierClient::store_id() const {
  absl::MutexLock l(&mu_);
  return store_id_;
}

absl::Status MemTierClient::Register() {
  v1::ConnectRequest req;
  {  // memtier's UCX listener: connect by sockaddr, then name our end of that connection
    v1::Empty empty;
    v1::EndpointResponse ep;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    FM_RETURN_IF_ERROR(FromGrpc(rpc_->stub->GetEndpoint(&ctx, empty, &ep), "get endpoint"));
    if (!ep.ucx_listen().empty()) {
      std::string addr = ep.ucx_listen();
      if (absl::StartsWith(addr, "0.0.0.0:")) addr = options_.target.substr(0, options_.target.rfind(':')) + addr.substr(7);
      // Without a sockaddr-capable transport (UCX_TLS lacking tcp) memtier connects to our
      // worker address instead.
      auto local = worker_->ConnectTo(addr);
      if (local.ok()) req.set_ucx_client_address(*local);
    }
  }
  req.set_worker_address(worker_->address());
  req.set_rkey(region_->packed_rkey());
  req.set_buffer_address(reinterpret_cast<uint64_t>(buffer_.data()));
  req.set_buffer_bytes(buffer_.size());
  req.set_client_name(options_.name);
  v1::ConnectResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  FM_RETURN_IF_ERROR(FromGrpc(rpc_->stub->Connect(&ctx, req, &resp), "connect"));
  client_id_ = resp.client_id();
  epoch_ = resp.epoch();
  store_id_ = resp.store_id();
  return absl::OkStatus();
}

template <typename F>
absl::Status MemTierClient::WithReconnect(F&& call) {
  auto backoff = options_.backoff_initial;
  absl::Status st;
  for (int attempt = 0;; ++attempt) {
    st = call(client_id_, epoch_);
    const bool retry = absl::IsUnavailable(st) ||
                       (absl::IsFailedPrecondition(st) && (absl::StrContains(st.message(), "stale epoch") ||
                                                           absl::StrContains(st.message(), "unknown client")));
    if (!retry || attempt >= options_.reconnect_attempts) return st;
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(2000));
    if (Register().ok()) ++reconnects_;
  }
}

template <typename Method>
absl::Status MemTierClient::SessionCall(Method method, uint64_t session, const char* what) {
  absl::MutexLock l(&mu_);
  return WithReconnect([&](uint64_t, uint64_t) {
    v1::SessionRequest req;
    req.set_session(session);
    v1::SessionResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    return FromGrpc((rpc_->stub.get()->*method)(&ctx, req, &resp), what);
  });
}

absl::Status MemTierClient::OpenSession(uint64_t session) {
  return SessionCall(&v1::MemTier::Stub::OpenSession, session, "open session");
}
absl::Status MemTierClient::CloseSession(uint64_t session) {
  return SessionCall(&v1::MemTier::Stub::CloseSession, session, "close session");
}
absl::Status MemTierClient::DropSession(uint64_t session) {
  return SessionCall(&v1::MemTier::Stub::DropSession, session, "drop session");
}

absl::Status MemTierClient::Commit(uint64_t session, std::span<const PageToCommit> pages) {
  uint64_t total = 0;
  for (const auto& p : pages) total += p.bytes.size();
  if (total > buffer_.size())
    return absl::InvalidArgumentError(absl::StrCat("commit of ", total, " bytes exceeds the registered buffer (", buffer_.size(), ")"));
  absl::MutexLock l(&mu_);
  v1::CommitRequest req;
  req.set_session(session);
  uint64_t at = 0;
  for (const auto& p : pages) {
    std::memcpy(buffer_.data() + at, p.bytes.data(), p.bytes.size());
    v1::PageSlot* s = req.add_pages();
    SetId(s->mutable_id(), p.key);
    s->set_offset(at);
    s->set_length(static_cast<uint32_t>(p.bytes.size()));
    s->set_checksum(PageChecksum(p.bytes));  // the writer's checksum
    at += p.bytes.size();
  }
  return WithReconnect([&](uint64_t id, uint64_t epoch) {
    req.set_client_id(id);
    req.set_epoch(epoch);
    v1::CommitResponse resp;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    return FromGrpc(rpc_->stub->Commit(&ctx, req, &resp), "commit");
  });
}

std::future<absl::Status> MemTierClient::CommitAsync(uint64_t session, std::span<const PageToCommit> pages, size_t max_queued) {
  Queued q;
  q.session = session;
  for (const auto& p : pages) {
    q.keys.push_back(p.key);
    q.bytes.emplace_back(p.bytes.begin(), p.bytes.end());
  }
  std::future<absl::Status> f = q.done.get_future();
  std::unique_lock<std::mutex> l(qmu_);
  qcv_.wait(l, [&] { return queue_.size() < std::max<size_t>(1, max_queued) || stop_; });  // back-pressure
  queue_.push_back(std::move(q));
  qcv_.notify_all();
  return f;
}

void MemTierClient::AsyncLoop() {
  for (;;) {
    Queued q;
    {
      std::unique_lock<std::mutex> l(qmu_);
      qcv_.wait(l, [&] { return !queue_.empty() || stop_; });
      if (queue_.empty()) return;
      q = std::move(queue_.front());
      queue_.pop_front();
      qcv_.notify_all();
    }
    std::vector<PageToCommit> pages;
    for (size_t i = 0; i < q.keys.size(); ++i) pages.push_back({q.keys[i], q.bytes[i]});
    q.done.set_value(Commit(q.session, pages));
  }
}

namespace {

// Every call on the queue has completed; a queue is drained before it is destroyed.
void ShutDown(grpc::CompletionQueue& cq) {
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

// Pages [keys, rooms) laid out back to back from `base` in the registered buffer.
v1::RecallRequest RecallRequestFor(uint64_t session, std::span<const PageKey> keys, std::span<const uint32_t> rooms,
                                   uint64_t base) {
  v1::RecallRequest req;
  req.set_session(session);
  uint64_t at = base;
  for (size_t i = 0; i < keys.size(); ++i) {
    v1::PageSlot* s = req.add_pages();
    SetId(s->mutable_id(), keys[i]);
    s->set_offset(at);
    s->set_length(rooms[i]);
    at += rooms[i];
  }
  return req;
}

}  // namespace

absl::Status MemTierClient::Deliver(const v1::RecallRequest& req, const v1::RecallResponse& resp,
                                    std::span<const PageKey> keys, std::span<const uint32_t> rooms,
                                    std::span<PageToRecall> dsts, std::vector<std::span<const uint8_t>>* views) {
  if (resp.pages_size() != static_cast<int>(keys.size()))
    return absl::InternalError(absl::StrCat("recall: memtier answered ", resp.pages_size(), " pages for ", keys.size()));
  views->assign(keys.size(), {});
  for (size_t i = 0; i < keys.size(); ++i) {
    const v1::PageSlot& s = resp.pages(static_cast<int>(i));
    if (s.length() > rooms[i])
      return absl::InternalError(absl::StrCat("recall: memtier answered ", s.length(), " bytes for page ", ToString(keys[i]), " given ", rooms[i]));
    (*views)[i] = std::span<const uint8_t>(buffer_.data() + req.pages(static_cast<int>(i)).offset(), s.length());
  }
  // Verify each page (and copy it out while it is in this core's cache).
  std::vector<char> bad(keys.size(), 0);
  copies_->ForEach(keys.size(), [&](size_t i) {
    const std::span<const uint8_t> got = (*views)[i];
    bad[i] = PageChecksum(got) != resp.pages(static_cast<int>(i)).checksum();
    if (!bad[i] && !dsts.empty()) {
      std::memcpy(dsts[i].dst.data(), got.data(), got.size());
      dsts[i].length = static_cast<uint32_t>(got.size());
    }
  });
  for (size_t i = 0; i < keys.size(); ++i)
    if (bad[i]) return absl::DataLossError(absl::StrCat("recall: page ", ToString(keys[i]), " failed its checksum after transfer"));
  return absl::OkStatus();
}

absl::Status MemTierClient::RecallOne(uint64_t session, std::span<const PageKey> keys, std::span<const uint32_t> rooms,
                                      const Landed& landed) {
  v1::RecallRequest req = RecallRequestFor(session, keys, rooms, 0);
  v1::RecallResponse resp;
  FM_RETURN_IF_ERROR(WithReconnect([&](uint64_t id, uint64_t epoch) {
    req.set_client_id(id);
    req.set_epoch(epoch);
    resp.Clear();
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    return FromGrpc(rpc_->stub->Recall(&ctx, req, &resp), "recall");
  }));
  return landed(req, resp);
}

absl::Status MemTierClient::RecallPipelined(uint64_t session, std::span<const PageKey> keys,
                                            std::span<const uint32_t> rooms, const BatchLanded& landed) {
  uint64_t largest = 0;
  for (uint32_t r : rooms) largest = std::max<uint64_t>(largest, r);
  if (largest > buffer_.size())
    return absl::InvalidArgumentError(absl::StrCat("recall: a page of up to ", largest, " bytes exceeds the registered buffer (", buffer_.size(), ")"));
  // Batches of consecutive pages, each filling at most one part of the buffer.
  const int wanted = std::max(1, options_.recall_in_flight);
  const int parts = largest * wanted <= buffer_.size() ? wanted : 1;
  const uint64_t part_bytes = buffer_.size() / parts;
  std::vector<std::pair<size_t, size_t>> batches;  // [first, last)
  for (size_t first = 0; first < keys.size();) {
    size_t last = first;
    for (uint64_t bytes = 0; last < keys.size() && bytes + rooms[last] <= part_bytes;) bytes += rooms[last++];
    batches.emplace_back(first, last);
    first = last;
  }
  auto one = [&](size_t i) {  // one batch through the reconnecting path
    const auto [first, last] = batches[i];
    return RecallOne(session, keys.subspan(first, last - first), rooms.subspan(first, last - first),
                     [&](const v1::RecallRequest& req, const v1::RecallResponse& resp) { return landed(first, last, req, resp); });
  };
  if (batches.size() <= 1 || parts == 1) {
    for (size_t i = 0; i < batches.size(); ++i) FM_RETURN_IF_ERROR(one(i));
    return absl::OkStatus();
  }
  // Up to `parts` batches in flight, each in its own part of the buffer; a landed batch is
  // checked and handed over while the next ones move. Completions are taken from a completion
  // queue on this thread (no callback thread to hand each one over: on a VM every thread
  // wake-up costs tens of microseconds). Batches that fail for a reason a reconnect may cure
  // are redone one at a time through the reconnecting path.
  struct Call {
    grpc::ClientContext ctx;
    v1::RecallRequest req;
    v1::RecallResponse resp;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::RecallResponse>> reader;
    size_t batch = 0;
  };
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<Call>> lanes(parts);
  size_t next = 0, running = 0;
  auto launch = [&](int lane) {
    auto c = std::make_unique<Call>();
    c->batch = next++;
    const auto [first, last] = batches[c->batch];
    c->req = RecallRequestFor(session, keys.subspan(first, last - first), rooms.subspan(first, last - first), lane * part_bytes);
    c->req.set_client_id(client_id_);
    c->req.set_epoch(epoch_);
    c->ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    c->reader = rpc_->stub->AsyncRecall(&c->ctx, c->req, &cq);
    c->reader->Finish(&c->resp, &c->status, reinterpret_cast<void*>(static_cast<intptr_t>(lane)));
    lanes[lane] = std::move(c);
    ++running;
  };
  for (int lane = 0; lane < parts && next < batches.size(); ++lane) launch(lane);
  absl::Status first_error;
  std::vector<size_t> redo;
  while (running > 0) {
    void* tag = nullptr;
    bool ok = false;
    if (!cq.Next(&tag, &ok)) return absl::InternalError("recall: completion queue shut down");
    const int lane = static_cast<int>(reinterpret_cast<intptr_t>(tag));
    std::unique_ptr<Call> c = std::move(lanes[lane]);
    --running;
    absl::Status st = ok ? FromGrpc(c->status, "recall") : absl::UnavailableError("recall: request not delivered");
    if (st.ok()) st = landed(batches[c->batch].first, batches[c->batch].second, c->req, c->resp);
    if (!st.ok()) {
      if (absl::IsUnavailable(st) || absl::IsFailedPrecondition(st) || absl::IsDeadlineExceeded(st)) redo.push_back(c->batch);
      else if (first_error.ok()) first_error = st;
    }
    if (first_error.ok() && next < batches.size()) launch(lane);
  }
  ShutDown(cq);
  FM_RETURN_IF_ERROR(first_error);
  for (size_t i : redo) FM_RETURN_IF_ERROR(one(i));
  return absl::OkStatus();
}

absl::Status MemTierClient::Recall(uint64_t session, std::span<PageToRecall> pages) {
  std::vector<PageKey> keys;
  std::vector<uint32_t> rooms;
  for (const auto& p : pages) {
    keys.push_back(p.key);
    rooms.push_back(static_cast<uint32_t>(p.dst.size()));
  }
  absl::MutexLock l(&mu_);
  std::vector<std::span<const uint8_t>> views;
  return RecallPipelined(session, keys, rooms, [&](size_t first, size_t last, const v1::RecallRequest& req, const v1::RecallResponse& resp) {
    return Deliver(req, resp, std::span(keys).subspan(first, last - first), std::span(rooms).subspan(first, last - first),
                   pages.subspan(first, last - first), &views);
  });
}

absl::Status MemTierClient::RecallStream(uint64_t session, std::span<const PageKey> keys, uint32_t room,
                                         const BatchConsumer& consume) {
  std::vector<uint32_t> rooms(keys.size(), room);
  absl::MutexLock l(&mu_);
  std::vector<std::span<const uint8_t>> views;
  return RecallPipelined(session, keys, rooms, [&](size_t first, size_t last, const v1::RecallRequest& req, const v1::RecallResponse& resp) {
    FM_RETURN_IF_ERROR(Deliver(req, resp, keys.subspan(first, last - first), std::span(rooms).subspan(first, last - first), {}, &views));
    return consume(first, views);
  });
}

absl::Status MemTierClient::AttachLocal(const std::string& shm_socket) {
  FM_ASSIGN_OR_RETURN(auto m, MappedChunks::Attach(shm_socket));
  absl::MutexLock l(&mu_);
  local_ = std::move(m);
  return absl::OkStatus();
}

absl::Status MemTierClient::LocatePipelined(uint64_t session, std::span<const PageKey> keys, uint32_t lease_ms,
                                            const Located& handle) {
  // The Locate round trip hides behind the previous piece's byte work. Pieces are a quarter of the
  // request (at least 64 pages: a Locate costs ~0.1 ms) and at most 1,024 pages (memtier refuses
  // more than its max_pages_per_request, 65,536 by default).
  const size_t piece = std::clamp<size_t>((keys.size() + 3) / 4, 64, 1024);
  const size_t pieces = (keys.size() + piece - 1) / piece;
  struct Call {
    grpc::ClientContext ctx, release_ctx;
    v1::LocateRequest req;
    v1::LocateResponse resp;
    v1::ReleaseRequest release;
    v1::SessionResponse released;
    grpc::Status status, release_status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::LocateResponse>> reader;
    std::unique_ptr<grpc::ClientAsyncResponseReader<v1::SessionResponse>> release_reader;
  };
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<Call>> calls(pieces);
  size_t next = 0, running = 0;
  auto tag = [](size_t t) { return reinterpret_cast<void*>(static_cast<intptr_t>(t)); };
  auto launch = [&] {
    auto& c = calls[next];
    c = std::make_unique<Call>();
    c->req.set_session(session);
    c->req.set_lease_ms(lease_ms);
    for (size_t i = next * piece; i < std::min(keys.size(), (next + 1) * piece); ++i) SetId(c->req.add_pages(), keys[i]);
    c->ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    c->reader = rpc_->stub->AsyncLocate(&c->ctx, c->req, &cq);
    c->reader->Finish(&c->resp, &c->status, tag(next));
    ++next;
    ++running;
  };
  auto release = [&](size_t p) {  // the piece's lease, without waiting for the answer here
    Call& c = *calls[p];
    if (c.resp.lease() == 0) {
      calls[p].reset();
      return;
    }
    c.release.set_session(session);
    c.release.set_lease(c.resp.lease());
    c.release_ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
    c.release_reader = rpc_->stub->AsyncRelease(&c.release_ctx, c.release, &cq);
    c.release_reader->Finish(&c.released, &c.release_status, tag(pieces + p));
    ++running;
  };
  for (int k = 0; k < 2 && next < pieces; ++k) launch();
  absl::Status first_error;
  while (running > 0) {
    void* t = nullptr;
    bool ok = false;
    if (!cq.Next(&t, &ok)) return absl::InternalError("locate: completion queue shut down");
    --running;
    const size_t done = static_cast<size_t>(reinterpret_cast<intptr_t>(t));
    if (done >= pieces) {  // a release answered
      // NOT_FOUND: the lease had ended before the batch was released — its consumer ran longer
      // than lease_ms, so memtier may have reused slots it was reading. Other failures (memtier
      // gone) leave the lease to expire there.
      if (ok && calls[done - pieces]->release_status.error_code() == grpc::StatusCode::NOT_FOUND && first_error.ok())
        first_error = absl::AbortedError(absl::StrCat("recall: a batch's lease ended before it was consumed (lease_ms ",
                                                      lease_ms, "); its views may have changed under the consumer"));
      calls[done - pieces].reset();
      continue;
    }
    const absl::Status st = ok ? FromGrpc(calls[done]->status, "locate") : absl::UnavailableError("locate: request not delivered");
    if (!st.ok()) {
      if (first_error.ok()) first_error = st;
      calls[done].reset();
      continue;
    }
    if (first_error.ok() && next < pieces) launch();
    if (first_error.ok()) first_error = handle(done * piece, std::min(piece, keys.size() - done * piece), calls[done]->resp);
    release(done);
  }
  ShutDown(cq);
  return first_error;
}

absl::Status MemTierClient::RecallLocal(uint64_t session, std::span<PageToRecall> pages, int* fallbacks) {
  if (fallbacks) *fallbacks = 0;
  std::vector<PageToRecall> retry;
  {
    absl::MutexLock l(&mu_);
    if (!local_) return absl::FailedPreconditionError("RecallLocal: AttachLocal first");
    std::vector<PageKey> keys;
    for (const auto& p : pages) keys.push_back(p.key);
    // Each piece is copied out of memtier's memory and verified on the pool while the next is
    // located; pages whose slot changed under us are recalled over UCX afterwards.
    FM_RETURN_IF_ERROR(LocatePipelined(session, keys, 0, [&](size_t first, size_t count, const v1::LocateResponse& resp) -> absl::Status {
      const std::span<PageToRecall> mine = pages.subspan(first, count);
      if (resp.pages_size() != static_cast<int>(mine.size()))
        return absl::InternalError(absl::StrCat("locate: memtier answered ", resp.pages_size(), " pages for ", mine.size()));
      std::vector<const uint8_t*> src(mine.size());
      for (size_t i = 0; i < mine.size(); ++i) {
        const v1::PageLocation& loc = resp.pages(static_cast<int>(i));
        if (loc.length() > mine[i].dst.size())
          return absl::InvalidArgumentError(absl::StrCat("recall: page ", ToString(mine[i].key), " (", loc.length(), " bytes) does not fit its buffer"));
        FM_ASSIGN_OR_RETURN(src[i], local_->Range(loc.chunk(), loc.offset(), loc.length()));
      }
      std::vector<char> changed(mine.size(), 0);
      copies_->ForEach(mine.size(), [&](size_t i) {
        const v1::PageLocation& loc = resp.pages(static_cast<int>(i));
        std::memcpy(mine[i].dst.data(), src[i], loc.length());
        changed[i] = PageChecksum(std::span<const uint8_t>(mine[i].dst.data(), loc.length())) != loc.checksum();
        if (!changed[i]) mine[i].length = loc.length();
      });
      for (size_t i = 0; i < mine.size(); ++i)
        if (changed[i]) retry.push_back(mine[i]);
      return absl::OkStatus();
    }));
  }
  if (retry.empty()) return absl::OkStatus();
  if (fallbacks) *fallbacks = static_cast<int>(retry.size());
  FM_RETURN_IF_ERROR(Recall(session, retry));
  for (auto& p : pages)
    for (const auto& r : retry)
      if (r.key == p.key) p.length = r.length;
  return absl::OkStatus();
}

absl::Status MemTierClient::RecallLocalView(uint64_t session, std::span<const PageKey> keys, const BatchConsumer& consume) {
  absl::MutexLock l(&mu_);
  if (!local_) return absl::FailedPreconditionError("RecallLocalView: AttachLocal first");
  const uint32_t lease_ms = std::max<uint32_t>(1, options_.lease_ms);
  std::vector<std::span<const uint8_t>> views;
  return LocatePipelined(session, keys, lease_ms, [&](size_t first, size_t count, const v1::LocateResponse& resp) -> absl::Status {
    if (resp.pages_size() != static_cast<int>(count) || resp.lease() == 0)
      return absl::InternalError(absl::StrCat("locate: memtier answered ", resp.pages_size(), " pages for ", count, resp.lease() == 0 ? " without a lease" : ""));
    views.assign(count, {});
    for (size_t i = 0; i < count; ++i) {
      const v1::PageLocation& loc = resp.pages(static_cast<int>(i));
      FM_ASSIGN_OR_RETURN(const uint8_t* p, local_->Range(loc.chunk(), loc.offset(), loc.length()));
      views[i] = std::span<const uint8_t>(p, loc.length());
    }
    std::vector<char> bad(count, 0);
    copies_->ForEach(count, [&](size_t i) { bad[i] = PageChecksum(views[i]) != resp.pages(static_cast<int>(i)).checksum(); });
    for (size_t i = 0; i < count; ++i)
      if (bad[i]) return absl::DataLossError(absl::StrCat("recall: page ", ToString(keys[first + i]), " failed its checksum in memtier's memory"));
    return consume(first, views);
  });
}

absl::StatusOr<uint32_t> MemTierClient::Prefetch(uint64_t session, std::span<const PageKey> ranked, uint32_t deadline_ms) {
  v1::PrefetchRequest req;
  req.set_session(session);
  req.set_deadline_ms(deadline_ms);
  for (const PageKey& k : ranked) SetId(req.add_candidates(), k);
  v1::PrefetchResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  FM_RETURN_IF_ERROR(FromGrpc(rpc_->stub->Prefetch(&ctx, req, &resp), "prefetch"));
  return resp.promoted();
}

absl::Status MemTierClient::PutState(uint64_t session, uint64_t version, std::span<const uint8_t> blob) {
  v1::PutStateRequest req;
  req.set_session(session);
  req.set_version(version);
  req.set_blob(std::string(blob.begin(), blob.end()));
  v1::SessionResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  return FromGrpc(rpc_->stub->PutState(&ctx, req, &resp), "put state");
}

absl::StatusOr<std::pair<uint64_t, std::vector<uint8_t>>> MemTierClient::GetState(uint64_t session) {
  v1::SessionRequest req;
  req.set_session(session);
  v1::GetStateResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  FM_RETURN_IF_ERROR(FromGrpc(rpc_->stub->GetState(&ctx, req, &resp), "get state"));
  return std::make_pair(resp.version(), std::vector<uint8_t>(resp.blob().begin(), resp.blob().end()));
}

absl::StatusOr<RemoteStats> MemTierClient::Stats() {
  v1::StatsRequest req;
  v1::StatsResponse r;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  FM_RETURN_IF_ERROR(FromGrpc(rpc_->stub->Stats(&ctx, req, &r), "stats"));
  RemoteStats s;
  s.epoch = r.epoch();
  s.pages_total = r.pages_total();
  s.pages_in_ram = r.pages_in_ram();
  s.evictions = r.evictions();
  s.promotions = r.promotions();
  s.checksum_failures = r.checksum_failures();
  s.ram_hits = r.ram_hits();
  s.ram_misses = r.ram_misses();
  s.pinned_bytes = r.pinned_bytes();
  return s;
}

}  // namespace flashmem::memtier
