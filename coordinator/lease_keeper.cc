#include "coordinator/lease_keeper.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/grpc_wait.h"

namespace flashmem::coordinator {

absl::StatusOr<std::unique_ptr<LeaseKeeper>> LeaseKeeper::Start(
    const std::string& coordinator, std::shared_ptr<grpc::ChannelCredentials> creds, const std::string& address,
    v1::ComponentKind kind, std::function<void(v1::HeartbeatRequest*)> fill, std::chrono::milliseconds startup_wait) {
  v1::RegisterRequest r;
  r.set_address(address);
  r.set_kind(kind);
  return Start(coordinator, std::move(creds), std::move(r), std::move(fill), startup_wait);
}

absl::StatusOr<std::unique_ptr<LeaseKeeper>> LeaseKeeper::Start(
    const std::string& coordinator, std::shared_ptr<grpc::ChannelCredentials> creds, v1::RegisterRequest registration,
    std::function<void(v1::HeartbeatRequest*)> fill, std::chrono::milliseconds startup_wait) {
  std::unique_ptr<LeaseKeeper> k(new LeaseKeeper());
  auto channel = grpc::CreateCustomChannel(coordinator, std::move(creds), flashmem::QuickReconnectArgs());
  // Not ready yet (started before the coordinator, or it restarts): the Register below then
  // reports the connection's own error.
  flashmem::WaitUntilConnected(*channel, startup_wait, absl::StrCat("the coordinator at ", coordinator));
  k->stub_ = v1::Coordinator::NewStub(channel);
  k->request_ = std::move(registration);
  k->fill_ = std::move(fill);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (auto st = k->stub_->Register(&ctx, k->request_, &k->registered_); !st.ok())
    return absl::UnavailableError(absl::StrCat("--coordinator ", coordinator, ": ", st.error_message()));
  k->thread_ = std::thread([p = k.get()] { p->Loop(); });
  return k;
}

LeaseKeeper::~LeaseKeeper() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void LeaseKeeper::Loop() {
  uint64_t id = registered_.worker_id();
  const auto period = std::chrono::milliseconds(registered_.heartbeat_ms());
  while (!stop_.load()) {
    std::this_thread::sleep_for(period);
    v1::HeartbeatRequest hb;
    hb.set_worker_id(id);
    if (fill_) fill_(&hb);
    v1::HeartbeatResponse hr;
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + period);
    if (stub_->Heartbeat(&c, hb, &hr).error_code() == grpc::StatusCode::NOT_FOUND) {  // coordinator restarted
      grpc::ClientContext rc;
      rc.set_deadline(std::chrono::system_clock::now() + period);
      v1::RegisterResponse again;
      if (stub_->Register(&rc, request_, &again).ok()) id = again.worker_id();
    }
  }
}

}  // namespace flashmem::coordinator
