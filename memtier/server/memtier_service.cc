#include "memtier/server/memtier_service.h"

#include <atomic>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace flashmem::memtier {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

PageKey KeyOf(const v1::PageId& id) { return {id.session(), id.layer(), id.page()}; }

}  // namespace

MemTierService::MemTierService(PageStore& store, ucx::Worker& worker, CopyPool& copies, uint64_t epoch, std::string ucx_listen,
                               ServiceLimits limits)
    : store_(store), worker_(worker), copies_(copies), epoch_(epoch), ucx_listen_(std::move(ucx_listen)), limits_(limits) {}

grpc::Status MemTierService::GetEndpoint(grpc::ServerContext*, const v1::Empty*, v1::EndpointResponse* out) {
  out->set_ucx_listen(ucx_listen_);
  out->set_epoch(epoch_);
  return grpc::Status::OK;
}

uint64_t MemTierService::clients() const {
  absl::MutexLock l(&mu_);
  return clients_.size();
}

grpc::Status MemTierService::OpenSession(grpc::ServerContext*, const v1::SessionRequest* r, v1::SessionResponse*) {
  return ToGrpc(store_.OpenSession(r->session()));
}
grpc::Status MemTierService::CloseSession(grpc::ServerContext*, const v1::SessionRequest* r, v1::SessionResponse*) {
  return ToGrpc(store_.CloseSession(r->session()));
}
grpc::Status MemTierService::DropSession(grpc::ServerContext*, const v1::SessionRequest* r, v1::SessionResponse*) {
  return ToGrpc(store_.DropSession(r->session()));
}

grpc::Status MemTierService::Connect(grpc::ServerContext*, const v1::ConnectRequest* r, v1::ConnectResponse* out) {
  Timed timed{this, "Connect"};
  if (r->buffer_bytes() == 0 || r->buffer_address() == 0)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "connect: buffer_address and buffer_bytes must be set");
  if (r->buffer_address() + r->buffer_bytes() < r->buffer_address())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "connect: buffer range overflows");
  auto peer = !r->ucx_client_address().empty()
                  ? worker_.TakeAccepted(r->ucx_client_address(), r->rkey(), r->buffer_address(), r->buffer_bytes(),
                                         std::chrono::milliseconds(2000))
                  : worker_.Connect(r->worker_address(), r->rkey(), r->buffer_address(), r->buffer_bytes());
  if (!peer.ok()) return ToGrpc(absl::Status(peer.status().code(), absl::StrCat("connect: ", peer.status().message())));
  auto c = std::make_shared<Client>();
  c->peer = std::move(*peer);
  c->base = r->buffer_address();
  c->bytes = r->buffer_bytes();
  absl::MutexLock l(&mu_);
  const uint64_t id = next_client_++;
  clients_[id] = std::move(c);
  out->set_client_id(id);
  out->set_epoch(epoch_);
  out->set_store_id(store_.rocks().identity());
  return grpc::Status::OK;
}

absl::StatusOr<std::shared_ptr<MemTierService::Client>> MemTierService::Authorize(uint64_t client_id, uint64_t epoch) {
  if (epoch != epoch_)
    return absl::FailedPreconditionError(absl::StrCat("stale epoch ", epoch, " (memtier restarted, now ", epoch_, "): reconnect"));
  absl::MutexLock l(&mu_);
  auto it = clients_.find(client_id);
  if (it == clients_.end()) return absl::FailedPreconditionError(absl::StrCat("unknown client ", client_id, ": connect first"));
  if (it->second->peer->failed()) {
    clients_.erase(it);  // an endpoint error invalidates the peer's registration
    return absl::UnavailableError(absl::StrCat("client ", client_id, ": UCX endpoint failed; reconnect"));
  }
  return it->second;
}

void MemTierService::DropClient(uint64_t client_id) {
  absl::MutexLock l(&mu_);
  clients_.erase(client_id);
}

absl::Status MemTierService::CheckSlots(const google::protobuf::RepeatedPtrField<v1::PageSlot>& pages, uint64_t session,
                                        const Client& c, uint64_t* total) const {
  if (pages.size() > static_cast<int>(limits_.max_pages_per_request))
    return absl::InvalidArgumentError(absl::StrCat("pages: ", pages.size(), " pages exceed the limit of ", limits_.max_pages_per_request, " per request"));
  *total = 0;
  for (int i = 0; i < pages.size(); ++i) {
    const v1::PageSlot& p = pages[i];
    if (p.id().session() != session)
      return absl::InvalidArgumentError(absl::StrCat("pages[", i, "].id.session ", p.id().session(), " != request session ", session));
    if (p.length() == 0 || p.length() > store_.options().max_page_bytes)
      return absl::InvalidArgumentError(absl::StrCat("pages[", i, "].length ", p.length(), " outside [1, ", store_.options().max_page_bytes, "]"));
    if (p.offset() > c.bytes || p.length() > c.bytes - p.offset())
      return absl::InvalidArgumentError(absl::StrCat("pages[", i, "]: [", p.offset(), ", +", p.length(), ") is outside the registered buffer of ", c.bytes, " bytes"));
    *total += p.length();
    if (*total > limits_.max_request_bytes)
      return absl::InvalidArgumentError(absl::StrCat("pages: more than ", limits_.max_request_bytes, " bytes in one request"));
  }
  return absl::OkStatus();
}

absl::Status MemTierService::Transfer(Client& c, std::span<const ucx::RmaOp> ops, bool put) {
  std::vector<uint8_t*> mapped(ops.size());
  bool all_mapped = !c.peer->failed();
  for (size_t i = 0; all_mapped && i < ops.size(); ++i)
    all_mapped = (mapped[i] = c.peer->Mapped(ops[i].remote_addr, ops[i].bytes)) != nullptr;
  if (all_mapped) {  // plain copies: no endpoint involved, so a client's requests may overlap
    copies_.ForEach(ops.size(), [&](size_t i) {
      if (put) std::memcpy(mapped[i], ops[i].local, ops[i].bytes);
      else std::memcpy(ops[i].local, mapped[i], ops[i].bytes);
    });
    std::atomic_thread_fence(std::memory_order_seq_cst);  // every copy lands before the reply is sent
    return absl::OkStatus();
  }
  absl::MutexLock l(&c.mu);
  absl::Status st = put ? c.peer->PutBatch(ops) : c.peer->GetBatch(ops);
  if (st.ok() && put) st = c.peer->Flush();
  return st;
}

grpc::Status MemTierService::Commit(grpc::ServerContext*, const v1::CommitRequest* r, v1::CommitResponse* out) {
  Timed timed{this, "Commit"};
  auto c = Authorize(r->client_id(), r->epoch());
  if (!c.ok()) return ToGrpc(c.status());
  if (!store_.HasSession(r->session())) return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("commit: unknown session ", r->session()));
  uint64_t total = 0;
  if (auto s = CheckSlots(r->pages(), r->session(), **c, &total); !s.ok()) return ToGrpc(s);
  std::vector<uint8_t> staging(total);
  std::vector<PageWrite> writes;
  std::vector<ucx::RmaOp> ops;
  uint64_t at = 0;
  for (const v1::PageSlot& p : r->pages()) {
    ops.push_back({staging.data() + at, p.length(), (*c)->base + p.offset()});
    writes.push_back({KeyOf(p.id()), std::span<const uint8_t>(staging.data() + at, p.length()), p.checksum()});
    at += p.length();
  }
  if (auto s = Transfer(**c, ops, /*put=*/false); !s.ok()) {
    if (absl::IsUnavailable(s)) DropClient(r->client_id());
    return ToGrpc(s);
  }
  if (auto s = store_.Commit(r->session(), writes); !s.ok()) return ToGrpc(s);
  out->set_committed(static_cast<uint32_t>(writes.size()));
  return grpc::Status::OK;
}

grpc::Status MemTierService::Recall(grpc::ServerContext*, const v1::RecallRequest* r, v1::RecallResponse* out) {
  Timed timed{this, "Recall"};
  auto c = Authorize(r->client_id(), r->epoch());
  if (!c.ok()) return ToGrpc(c.status());
  if (!store_.HasSession(r->session())) return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("recall: unknown session ", r->session()));
  uint64_t total = 0;
  if (auto s = CheckSlots(r->pages(), r->session(), **c, &total); !s.ok()) return ToGrpc(s);
  // Pages are written straight from their pinned RAM slots (pages RAM cannot hold go through a
  // staging copy), then the pins are released.
  std::vector<ucx::RmaOp> ops;
  std::vector<RamSlot> pinned;
  std::vector<std::vector<uint8_t>> staged;
  auto unpin = [&] {
    for (const RamSlot& s : pinned) store_.Unpin(s);
  };
  for (int i = 0; i < r->pages_size(); ++i) {
    const v1::PageSlot& p = r->pages(i);
    PageMeta meta;
    const uint8_t* src = nullptr;
    auto pin = store_.Pin(KeyOf(p.id()));
    if (pin.ok()) {
      pinned.push_back(pin->slot);
      meta = pin->meta;
      src = pin->data;
    } else if (absl::IsResourceExhausted(pin.status())) {
      staged.emplace_back(p.length());
      auto m = store_.Recall(KeyOf(p.id()), staged.back());
      if (!m.ok()) pin = m.status(); else { meta = *m; src = staged.back().data(); }
    }
    if (!src) {
      unpin();
      return ToGrpc(absl::Status(pin.status().code(), absl::StrCat("pages[", i, "]: ", pin.status().message())));
    }
    if (meta.length > p.length()) {
      unpin();
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("pages[", i, "]: page of ", meta.length, " bytes does not fit the ", p.length(), " bytes given"));
    }
    ops.push_back({const_cast<uint8_t*>(src), meta.length, (*c)->base + p.offset()});
    v1::PageSlot* o = out->add_pages();
    *o->mutable_id() = p.id();
    o->set_offset(p.offset());
    o->set_length(meta.length);
    o->set_checksum(meta.checksum);
  }
  const absl::Status st = Transfer(**c, ops, /*put=*/true);
  unpin();
  if (absl::IsUnavailable(st)) DropClient(r->client_id());
  return ToGrpc(st);
}

grpc::Status MemTierService::Locate(grpc::ServerContext*, const v1::LocateRequest* r, v1::LocateResponse* out) {
  Timed timed{this, "Locate"};
  ExpireLeases();
  if (r->pages_size() > static_cast<int>(limits_.max_pages_per_request))
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("locate: ", r->pages_size(), " pages exceed the limit"));
  if (r->lease_ms() > kMaxLeaseMs)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("locate: lease_ms ", r->lease_ms(), " exceeds ", kMaxLeaseMs));
  if (!store_.HasSession(r->session())) return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("locate: unknown session ", r->session()));
  const bool lease = r->lease_ms() > 0;
  std::vector<PageKey> keys;
  keys.reserve(r->pages_size());
  for (int i = 0; i < r->pages_size(); ++i) {
    if (r->pages(i).session() != r->session())
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("pages[", i, "].session != request session"));
    keys.push_back(KeyOf(r->pages(i)));
  }
  // Leased: pinned, so their slots are neither freed nor reused until the lease ends.
  std::vector<PageStore::Location> located;
  if (absl::Status st = store_.LocateMany(keys, lease, &located); !st.ok())
    return ToGrpc(absl::Status(st.code(), absl::StrCat("pages[", located.size(), "]: ", st.message())));
  Lease held{r->session(), {}, std::chrono::steady_clock::now() + std::chrono::milliseconds(r->lease_ms())};
  for (int i = 0; i < r->pages_size(); ++i) {
    const PageStore::Location& loc = located[i];
    v1::PageLocation* o = out->add_pages();
    *o->mutable_id() = r->pages(i);
    o->set_chunk(loc.slot.chunk);
    o->set_offset(loc.slot.offset);
    o->set_length(loc.meta.length);
    o->set_checksum(loc.meta.checksum);
    if (lease) held.slots.push_back(loc.slot);
  }
  if (lease) {
    absl::MutexLock l(&leases_mu_);
    uint64_t id = 0;  // mixed with the epoch: a restarted memtier does not honour an old id
    while (id == 0 || leases_.contains(id)) id = (epoch_ << 20) ^ ++next_lease_;
    out->set_lease(id);
    leases_[id] = std::move(held);
  }
  return grpc::Status::OK;
}

grpc::Status MemTierService::Release(grpc::ServerContext*, const v1::ReleaseRequest* r, v1::SessionResponse*) {
  Timed timed{this, "Release"};
  ExpireLeases();
  Lease lease;
  {
    absl::MutexLock l(&leases_mu_);
    auto it = leases_.find(r->lease());
    if (it == leases_.end() || it->second.session != r->session())
      return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("release: no lease ", r->lease(), " of session ", r->session(), " (ended or expired)"));
    lease = std::move(it->second);
    leases_.erase(it);
  }
  store_.UnpinMany(lease.slots);
  return grpc::Status::OK;
}

void MemTierService::ExpireLeases() {
  std::vector<Lease> ended;
  {
    absl::MutexLock l(&leases_mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = leases_.begin(); it != leases_.end();) {
      if (it->second.expires <= now) {
        ended.push_back(std::move(it->second));
        leases_.erase(it++);
      } else {
        ++it;
      }
    }
  }
  for (const Lease& lease : ended) store_.UnpinMany(lease.slots);
}

uint64_t MemTierService::leased_pages() const {
  absl::MutexLock l(&leases_mu_);
  uint64_t n = 0;
  for (const auto& [id, lease] : leases_) n += lease.slots.size();
  return n;
}

grpc::Status MemTierService::Prefetch(grpc::ServerContext*, const v1::PrefetchRequest* r, v1::PrefetchResponse* out) {
  Timed timed{this, "Prefetch"};
  if (r->candidates_size() > static_cast<int>(limits_.max_pages_per_request))
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("prefetch: ", r->candidates_size(), " candidates exceed the limit"));
  std::vector<PageKey> keys;
  for (const auto& id : r->candidates()) keys.push_back(KeyOf(id));
  auto n = store_.Prefetch(r->session(), keys, std::chrono::steady_clock::now() + std::chrono::milliseconds(r->deadline_ms()));
  if (!n.ok()) return ToGrpc(n.status());
  out->set_promoted(static_cast<uint32_t>(*n));
  return grpc::Status::OK;
}

grpc::Status MemTierService::PutState(grpc::ServerContext*, const v1::PutStateRequest* r, v1::SessionResponse*) {
  Timed timed{this, "PutState"};
  const auto* b = reinterpret_cast<const uint8_t*>(r->blob().data());
  return ToGrpc(store_.PutState(r->session(), r->version(), std::span<const uint8_t>(b, r->blob().size())));
}

grpc::Status MemTierService::GetState(grpc::ServerContext*, const v1::SessionRequest* r, v1::GetStateResponse* out) {
  Timed timed{this, "GetState"};
  auto s = store_.GetState(r->session());
  if (!s.ok()) return ToGrpc(s.status());
  out->set_version(s->version);
  out->set_blob(std::string(s->bytes.begin(), s->bytes.end()));
  return grpc::Status::OK;
}

grpc::Status MemTierService::ListPages(grpc::ServerContext*, const v1::SessionRequest* r, grpc::ServerWriter<v1::PageInfo>* w) {
  auto pages = store_.ListPages(r->session());
  if (!pages.ok()) return ToGrpc(pages.status());
  for (const PageInfo& p : *pages) {
    v1::PageInfo info;
    info.mutable_id()->set_session(p.key.session);
    info.mutable_id()->set_layer(p.key.layer);
    info.mutable_id()->set_page(p.key.page);
    info.set_length(p.meta.length);
    info.set_checksum(p.meta.checksum);
    info.set_in_ram(p.in_ram);
    info.set_bad(p.bad);
    if (!w->Write(info)) break;
  }
  return grpc::Status::OK;
}

grpc::Status MemTierService::Stats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse* out) {
  const StoreCounters c = store_.counters();
  const RamTierStats ram = store_.ram_stats();
  out->set_epoch(epoch_);
  out->set_pages_total(c.pages_total);
  out->set_bytes_total(c.bytes_total);
  out->set_pages_in_ram(c.pages_in_ram);
  out->set_bytes_in_ram(c.bytes_in_ram);
  out->set_ram_capacity_bytes(ram.capacity_bytes);
  out->set_pinned_bytes(ram.pinned_bytes);
  out->set_pin_seconds(ram.pin_seconds);
  out->set_ram_hits(c.ram_hits);
  out->set_ram_misses(c.ram_misses);
  out->set_promotions(c.promotions);
  out->set_evictions(c.evictions);
  out->set_checksum_failures(c.checksum_failures);
  out->set_commits(c.commits);
  out->set_clients(clients());
  return grpc::Status::OK;
}

}  // namespace flashmem::memtier
