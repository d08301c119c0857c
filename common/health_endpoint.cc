#include "common/health_endpoint.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"

namespace flashmem {

absl::StatusOr<std::unique_ptr<HealthEndpoint>> HealthEndpoint::Start(const std::string& listen) {
  if (listen.empty() || listen.rfind(':') == std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat("--health-listen '", listen, "': want host:port"));
  // The default health service is process-wide; it must be on before this server is built.
  grpc::EnableDefaultHealthCheckService(true);
  std::unique_ptr<HealthEndpoint> h(new HealthEndpoint());
  grpc::ServerBuilder b;
  b.AddListeningPort(listen, grpc::InsecureServerCredentials(), &h->port_);
  // A server needs a service of its own to start; every other method answers UNIMPLEMENTED.
  b.RegisterCallbackGenericService(h->unimplemented_.get());
  h->server_ = b.BuildAndStart();
  if (!h->server_ || h->port_ == 0)
    return absl::UnavailableError(absl::StrCat("--health-listen ", listen, ": cannot listen"));
  h->SetServing(false);
  return h;
}

absl::StatusOr<std::unique_ptr<HealthEndpoint>> HealthEndpoint::StartIfSet(const std::string& listen) {
  if (listen.empty()) return std::unique_ptr<HealthEndpoint>();
  return Start(listen);
}

HealthEndpoint::HealthEndpoint() : unimplemented_(std::make_unique<grpc::CallbackGenericService>()) {}

HealthEndpoint::~HealthEndpoint() {
  if (!server_) return;
  SetServing(false);
  server_->Shutdown();
}

void HealthEndpoint::SetServing(bool serving) {
  if (auto* hs = server_->GetHealthCheckService()) hs->SetServingStatus(serving);
}

}  // namespace flashmem
