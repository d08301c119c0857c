// A plaintext gRPC listener that serves only grpc.health.v1, for probes that cannot speak TLS (the
// kubelet's gRPC probe) and for processes without a gRPC server of their own (a tensor-parallel
// follower). Every binary takes it as `--health-listen host:port`; its status is NOT_SERVING until
// the process says it serves, and again once it stops.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace grpc {
class CallbackGenericService;
class Server;
}

namespace flashmem {

class HealthEndpoint {
 public:
  // Listens on `listen` (port 0: any free port); errors name the flag.
  static absl::StatusOr<std::unique_ptr<HealthEndpoint>> Start(const std::string& listen);
  // Start when `listen` is set; null when it is empty (the flag's default: off).
  static absl::StatusOr<std::unique_ptr<HealthEndpoint>> StartIfSet(const std::string& listen);
  ~HealthEndpoint();

  // The status answered for the whole server ("") and for `service_name` checks alike.
  void SetServing(bool serving);
  int port() const { return port_; }

 private:
  HealthEndpoint();
  std::unique_ptr<grpc::CallbackGenericService> unimplemented_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

// Registers --health-listen on a CLI11 app (templated so this header does not need CLI11).
template <typename App>
void AddHealthFlag(App& app, std::string& listen) {
  app.add_option("--health-listen", listen,
                 "plaintext grpc.health.v1 address host:port for probes that cannot speak TLS (empty: off; the main listener answers health checks too)");
}

}  // namespace flashmem
