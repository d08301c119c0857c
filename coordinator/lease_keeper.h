// A component's membership in the coordinator's registry: registers (address, kind), then sends
// heartbeats at the interval the coordinator asks for, registering again when the coordinator
// restarted (NOT_FOUND) — used by workers and memtiers alike.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"
#include "coordinator.grpc.pb.h"

namespace flashmem::coordinator {

// Components of a cluster start in any order (Kubernetes gives none): a component started before
// its coordinator waits this long for it to accept connections before giving up.
inline constexpr std::chrono::milliseconds kDefaultStartupWait{60000};

class LeaseKeeper {
 public:
  // Registers synchronously (errors name the coordinator), first waiting up to `startup_wait` for
  // the coordinator to accept connections; `fill` adds load figures to each heartbeat.
  static absl::StatusOr<std::unique_ptr<LeaseKeeper>> Start(
      const std::string& coordinator, std::shared_ptr<grpc::ChannelCredentials> creds, const std::string& address,
      v1::ComponentKind kind, std::function<void(v1::HeartbeatRequest*)> fill = nullptr,
      std::chrono::milliseconds startup_wait = kDefaultStartupWait);
  // The same with a whole registration (tensor-parallel ranks add their group, rank and size).
  static absl::StatusOr<std::unique_ptr<LeaseKeeper>> Start(
      const std::string& coordinator, std::shared_ptr<grpc::ChannelCredentials> creds, v1::RegisterRequest registration,
      std::function<void(v1::HeartbeatRequest*)> fill = nullptr,
      std::chrono::milliseconds startup_wait = kDefaultStartupWait);
  ~LeaseKeeper();

 private:
  LeaseKeeper() = default;
  void Loop();
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  v1::RegisterRequest request_;
  v1::RegisterResponse registered_;
  std::function<void(v1::HeartbeatRequest*)> fill_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace flashmem::coordinator
