#include "memtier/transport/ucx.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <ucp/api/ucp.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace flashmem::memtier::ucx {
namespace {

absl::Status FromUcs(ucs_status_t s, absl::string_view what) {
  if (s == UCS_OK) return absl::OkStatus();
  const std::string msg = absl::StrCat(what, ": ", ucs_status_string(s));
  switch (s) {
    case UCS_ERR_UNREACHABLE: case UCS_ERR_CONNECTION_RESET: case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_REJECTED: case UCS_ERR_CANCELED:
      return absl::UnavailableError(msg);
    case UCS_ERR_INVALID_PARAM: case UCS_ERR_INVALID_ADDR:
      return absl::InvalidArgumentError(msg);
    default:
      return absl::InternalError(msg);
  }
}

absl::StatusOr<sockaddr_storage> ParseHostPort(const std::string& host_port) {
  const auto colon = host_port.rfind(':');
  if (colon == std::string::npos) return absl::InvalidArgumentError(absl::StrCat("address '", host_port, "' is not host:port"));
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string host = host_port.substr(0, colon), port = host_port.substr(colon + 1);
  if (getaddrinfo(host.empty() ? "0.0.0.0" : host.c_str(), port.c_str(), &hints, &res) != 0 || !res)
    return absl::InvalidArgumentError(absl::StrCat("address '", host_port, "' does not resolve"));
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
  freeaddrinfo(res);
  return ss;
}

std::string SockaddrString(const sockaddr_storage& ss) {
  char ip[INET6_ADDRSTRLEN] = {};
  if (ss.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
    return absl::StrCat(ip, ":", ntohs(a->sin_port));
  }
  const auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
  inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
  return absl::StrCat(ip, ":", ntohs(a->sin6_port));
}

// Force-closes an endpoint without waiting for the peer.
void CloseEndpoint(ucp_ep_h ep, ucp_worker_h worker, bool wait) {
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  rp.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* req = ucp_ep_close_nbx(ep, &rp);
  if (!UCS_PTR_IS_PTR(req)) return;
  if (wait)
    while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(worker);
  ucp_request_free(req);
}

}  // namespace

// ---- Region ------------------------------------------------------------------------------------

Region::~Region() {
  if (memh_) ucp_mem_unmap(ctx_, memh_);
}

// ---- Worker ------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create() {
  std::unique_ptr<Worker> w(new Worker());
  ucp_config_t* config = nullptr;
  if (auto s = FromUcs(ucp_config_read(nullptr, nullptr, &config), "ucp_config_read"); !s.ok()) return s;
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 1;
  ucs_status_t st = ucp_init(&params, config, &w->ctx_);
  ucp_config_release(config);
  if (auto s = FromUcs(st, "ucp_init"); !s.ok()) return s;
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_MULTI;
  if (auto s = FromUcs(ucp_worker_create(w->ctx_, &wp, &w->worker_), "ucp_worker_create"); !s.ok()) return s;
  if (auto s = FromUcs(ucp_worker_get_efd(w->worker_, &w->event_fd_), "ucp_worker_get_efd"); !s.ok()) return s;
  ucp_address_t* addr = nullptr;
  size_t len = 0;
  if (auto s = FromUcs(ucp_worker_get_address(w->worker_, &addr, &len), "ucp_worker_get_address"); !s.ok()) return s;
  w->address_.assign(reinterpret_cast<const char*>(addr), len);
  ucp_worker_release_address(w->worker_, addr);
  w->progress_ = std::thread([p = w.get()] { p->ProgressLoop(); });
  return w;
}

Worker::~Worker() {
  {
    std::lock_guard<std::mutex> l(accepted_mu_);
    for (auto& [addr, ep] : accepted_) CloseEndpoint(ep, worker_, false);
    accepted_.clear();
    for (ucp_ep_h ep : outgoing_) CloseEndpoint(ep, worker_, false);
    outgoing_.clear();
  }
  if (listener_) ucp_listener_destroy(listener_);
  stop_.store(true);
  if (worker_) ucp_worker_signal(worker_);
  if (progress_.joinable()) progress_.join();
  if (worker_) ucp_worker_destroy(worker_);
  if (ctx_) ucp_cleanup(ctx_);
}

void Worker::Progress() { ucp_worker_progress(worker_); }


// Drives the worker for operations others post to it (RMA emulated with active messages over
// tcp needs the target to progress), sleeping on the event fd when there is nothing to do.
void Worker::ProgressLoop() {
  while (!stop_.load()) {
    while (ucp_worker_progress(worker_) != 0) {
    }
    const ucs_status_t s = ucp_worker_arm(worker_);
    if (s == UCS_ERR_BUSY) continue;
    pollfd pfd{event_fd_, POLLIN, 0};
    ::poll(&pfd, 1, 10);
  }
}

absl::Status Worker::PackRkey(ucp_context_h ctx, Region* r) {
  void* packed = nullptr;
  size_t len = 0;
  if (auto s = FromUcs(ucp_rkey_pack(ctx, r->memh_, &packed, &len), "ucp_rkey_pack"); !s.ok()) return s;
  r->rkey_.assign(static_cast<const char*>(packed), len);
  ucp_rkey_buffer_release(packed);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Region>> Worker::Map(void* base, uint64_t bytes) {
  std::unique_ptr<Region> r(new Region());
  r->ctx_ = ctx_;
  r->base_ = base;
  r->bytes_ = bytes;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = base;
  mp.length = bytes;
  if (auto s = FromUcs(ucp_mem_map(ctx_, &mp, &r->memh_), "ucp_mem_map"); !s.ok()) return s;
  if (auto s = PackRkey(ctx_, r.get()); !s.ok()) return s;
  return r;
}

absl::StatusOr<std::unique_ptr<Region>> Worker::Allocate(uint64_t bytes) {
  std::unique_ptr<Region> r(new Region());
  r->ctx_ = ctx_;
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
  mp.address = nullptr;
  mp.length = bytes;
  mp.flags = UCP_MEM_MAP_ALLOCATE;
  if (auto s = FromUcs(ucp_mem_map(ctx_, &mp, &r->memh_), "ucp_mem_map(ALLOCATE)"); !s.ok()) return s;
  ucp_mem_attr_t attr{};
  attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
  if (auto s = FromUcs(ucp_mem_query(r->memh_, &attr), "ucp_mem_query"); !s.ok()) return s;
  r->base_ = attr.address;
  r->bytes_ = bytes;
  if (auto s = PackRkey(ctx_, r.get()); !s.ok()) return s;
  return r;
}

void Worker::OnConnRequest(ucp_conn_request_h req, void* arg) {
  auto* w = static_cast<Worker*>(arg);
  ucp_conn_request_attr_t attr{};
  attr.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
  if (ucp_conn_request_query(req, &attr) != UCS_OK) {
    ucp_listener_reject(w->listener_, req);
    return;
  }
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
  ep.conn_request = req;
  ucp_ep_h h = nullptr;
  if (ucp_ep_create(w->worker_, &ep, &h) != UCS_OK) return;
  std::lock_guard<std::mutex> l(w->accepted_mu_);
  w->accepted_[SockaddrString(attr.client_address)] = h;
}

absl::StatusOr<std::string> Worker::Listen(const std::string& host_port) {
  auto addr = ParseHostPort(host_port);
  if (!addr.ok()) return addr.status();
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*addr);
  lp.sockaddr.addrlen = sizeof(sockaddr_in);
  lp.conn_handler.cb = &Worker::OnConnRequest;
  lp.conn_handler.arg = this;
  if (auto s = FromUcs(ucp_listener_create(worker_, &lp, &listener_), absl::StrCat("--ucx-listen ", host_port)); !s.ok()) return s;
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (auto s = FromUcs(ucp_listener_query(listener_, &la), "ucp_listener_query"); !s.ok()) return s;
  return SockaddrString(la.sockaddr);
}

absl::StatusOr<std::string> Worker::ConnectTo(const std::string& host_port) {
  auto addr = ParseHostPort(host_port);
  if (!addr.ok()) return addr.status();
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
  ep.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  ep.sockaddr.addr = reinterpret_cast<const sockaddr*>(&*addr);
  ep.sockaddr.addrlen = sizeof(sockaddr_in);
  ucp_ep_h h = nullptr;
  if (auto s = FromUcs(ucp_ep_create(worker_, &ep, &h), absl::StrCat("UCX connect to ", host_port)); !s.ok()) return s;
  // A flush completes once the connection is wired up.
  ucp_request_param_t rp{};
  void* req = ucp_ep_flush_nbx(h, &rp);
  if (UCS_PTR_IS_ERR(req)) return FromUcs(UCS_PTR_STATUS(req), absl::StrCat("UCX connect to ", host_port));
  if (req) {
    ucs_status_t st;
    while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS) ucp_worker_progress(worker_);
    ucp_request_free(req);
    if (st != UCS_OK) return FromUcs(st, absl::StrCat("UCX connect to ", host_port));
  }
  ucp_ep_attr_t attr{};
  attr.field_mask = UCP_EP_ATTR_FIELD_LOCAL_SOCKADDR;
  if (auto s = FromUcs(ucp_ep_query(h, &attr), "ucp_ep_query"); !s.ok()) return s;
  std::lock_guard<std::mutex> l(accepted_mu_);
  outgoing_.push_back(h);
  return SockaddrString(attr.local_sockaddr);
}

absl::StatusOr<std::unique_ptr<Peer>> Worker::TakeAccepted(const std::string& client_address, const std::string& packed_rkey,
                                                           uint64_t remote_base, uint64_t remote_bytes,
                                                           std::chrono::milliseconds wait) {
  if (packed_rkey.empty()) return absl::InvalidArgumentError("empty packed rkey");
  const auto deadline = std::chrono::steady_clock::now() + wait;
  ucp_ep_h ep = nullptr;
  for (;;) {
    {
      std::lock_guard<std::mutex> l(accepted_mu_);
      auto it = accepted_.find(client_address);
      if (it != accepted_.end()) {
        ep = it->second;
        accepted_.erase(it);
      }
    }
    if (ep || std::chrono::steady_clock::now() >= deadline) break;
    Progress();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!ep) return absl::NotFoundError(absl::StrCat("no UCX connection from ", client_address, ": connect to --ucx-listen first"));
  std::unique_ptr<Peer> p(new Peer());
  p->worker_ = this;
  p->ep_ = ep;
  p->remote_base_ = remote_base;
  p->remote_bytes_ = remote_bytes;
  p->peer_failure_detection_ = false;
  if (auto s = FromUcs(ucp_ep_rkey_unpack(p->ep_, packed_rkey.data(), &p->rkey_), "ucp_ep_rkey_unpack"); !s.ok())
    return absl::InvalidArgumentError(s.message());
  p->MapRemote();
  return p;
}

absl::StatusOr<std::unique_ptr<Peer>> Worker::Connect(const std::string& address, const std::string& packed_rkey,
                                                      uint64_t remote_base, uint64_t remote_bytes) {
  if (address.size() < 8) return absl::InvalidArgumentError(absl::StrCat("UCX worker address of ", address.size(), " bytes is malformed"));
  if (packed_rkey.empty()) return absl::InvalidArgumentError("empty packed rkey");
  std::unique_ptr<Peer> p(new Peer());
  p->worker_ = this;
  p->remote_base_ = remote_base;
  p->remote_bytes_ = remote_bytes;
  ucp_ep_params_t ep{};
  ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
  ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
  ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  ep.err_handler.cb = reinterpret_cast<ucp_err_handler_cb_t>(&Peer::OnError);
  ep.err_handler.arg = p.get();
  // Shared-memory transports have no peer-failure detection: there the endpoint is created
  // without it, and a dead same-node peer is noticed by the control plane (gRPC) instead.
  if (ucp_ep_create(worker_, &ep, &p->ep_) != UCS_OK) {
    ep.field_mask &= ~(UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER);
    if (auto s = FromUcs(ucp_ep_create(worker_, &ep, &p->ep_), "ucp_ep_create"); !s.ok()) return s;
    p->peer_failure_detection_ = false;
  }
  if (auto s = FromUcs(ucp_ep_rkey_unpack(p->ep_, packed_rkey.data(), &p->rkey_), "ucp_ep_rkey_unpack"); !s.ok())
    return absl::InvalidArgumentError(s.message());
  p->MapRemote();
  return p;
}

// ---- Peer --------------------------------------------------------------------------------------

void Peer::MapRemote() {
  void* ptr = nullptr;
  if (remote_bytes_ > 0 && ucp_rkey_ptr(rkey_, remote_base_, &ptr) == UCS_OK) mapped_base_ = static_cast<uint8_t*>(ptr);
}

uint8_t* Peer::Mapped(uint64_t remote_addr, uint64_t bytes) const {
  if (!mapped_base_ || !CheckRange(remote_addr, bytes).ok()) return nullptr;
  return mapped_base_ + (remote_addr - remote_base_);
}

void Peer::OnError(void* arg, ucp_ep_h, int) { static_cast<Peer*>(arg)->failed_.store(true); }

Peer::~Peer() {
  if (rkey_) ucp_rkey_destroy(rkey_);
  if (!ep_) return;
  // Settled before the force close: UCX 1.13 asserts (ucp_request.c "got REP message") when an
  // endpoint whose wireup is still in flight is force-closed, as when a process ends right after
  // a peer connected. A flush completes once the wireup has; bounded, so a dead peer cannot hold
  // the close (an unfinished request is released by UCX when the close fails it).
  if (!failed_.load()) {
    ucp_request_param_t rp{};
    void* req = ucp_ep_flush_nbx(ep_, &rp);
    if (UCS_PTR_IS_PTR(req)) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
      while (ucp_request_check_status(req) == UCS_INPROGRESS && std::chrono::steady_clock::now() < deadline)
        worker_->Progress();
      ucp_request_free(req);
    }
  }
  CloseEndpoint(ep_, worker_->raw(), true);
}

absl::Status Peer::CheckRange(uint64_t remote_addr, uint64_t bytes) const {
  if (failed_.load()) return absl::UnavailableError("UCX endpoint failed: the peer must reconnect");
  if (remote_addr < remote_base_ || bytes > remote_bytes_ || remote_addr - remote_base_ > remote_bytes_ - bytes)
    return absl::InvalidArgumentError(absl::StrCat("remote range [", remote_addr, ", +", bytes, ") is outside the registered buffer"));
  return absl::OkStatus();
}

absl::Status Peer::Wait(void* request, const char* what) {
  if (request == nullptr) return absl::OkStatus();  // completed in place
  if (UCS_PTR_IS_ERR(request)) {
    failed_.store(true);
    return FromUcs(UCS_PTR_STATUS(request), what);
  }
  ucs_status_t s;
  while ((s = ucp_request_check_status(request)) == UCS_INPROGRESS) worker_->Progress();
  ucp_request_free(request);
  if (s != UCS_OK) failed_.store(true);
  return FromUcs(s, what);
}

absl::Status Peer::Batch(std::span<const RmaOp> ops, bool put) {
  for (const RmaOp& op : ops)
    if (auto s = CheckRange(op.remote_addr, op.bytes); !s.ok()) return s;
  std::vector<void*> reqs;
  reqs.reserve(ops.size());
  absl::Status first_error;
  for (const RmaOp& op : ops) {
    ucp_request_param_t rp{};
    void* r = put ? ucp_put_nbx(ep_, op.local, op.bytes, op.remote_addr, rkey_, &rp)
                  : ucp_get_nbx(ep_, op.local, op.bytes, op.remote_addr, rkey_, &rp);
    if (UCS_PTR_IS_ERR(r)) {
      first_error = FromUcs(UCS_PTR_STATUS(r), put ? "ucp_put_nbx" : "ucp_get_nbx");
      failed_.store(true);
      break;
    }
    if (r) reqs.push_back(r);
  }
  for (void* r : reqs) {
    absl::Status s = Wait(r, put ? "ucp_put_nbx" : "ucp_get_nbx");
    if (first_error.ok()) first_error = s;
  }
  return first_error;
}

absl::Status Peer::PutBatch(std::span<const RmaOp> ops) { return Batch(ops, true); }
absl::Status Peer::GetBatch(std::span<const RmaOp> ops) { return Batch(ops, false); }

absl::Status Peer::Put(const void* local, uint64_t bytes, uint64_t remote_addr) {
  if (auto s = CheckRange(remote_addr, bytes); !s.ok()) return s;
  ucp_request_param_t rp{};
  return Wait(ucp_put_nbx(ep_, local, bytes, remote_addr, rkey_, &rp), "ucp_put_nbx");
}

absl::Status Peer::Get(void* local, uint64_t bytes, uint64_t remote_addr) {
  if (auto s = CheckRange(remote_addr, bytes); !s.ok()) return s;
  ucp_request_param_t rp{};
  return Wait(ucp_get_nbx(ep_, local, bytes, remote_addr, rkey_, &rp), "ucp_get_nbx");
}

absl::Status Peer::Flush() {
  if (failed_.load()) return absl::UnavailableError("UCX endpoint failed: the peer must reconnect");
  ucp_request_param_t rp{};
  return Wait(ucp_ep_flush_nbx(ep_, &rp), "ucp_ep_flush_nbx");
}

}  // namespace flashmem::memtier::ucx
