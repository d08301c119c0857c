// A component's membership in the coordinator's registry: registers (address, kind), then sends
// heartbeats at the interval the coordinator asks for, registering again when the coordinator
// restarted (NOT_FOUND) — used by workers and memtiers alike.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/security/credentials.h>

#include "absl/status/statusor.h"
#include "coordinator.grpc.pb.h"

namespace flashmem::coordinator {

class LeaseKeeper {
 public:
  // Registers synchronously (errors name the coordinator); `fill` adds load figures to each heartbeat.
  static absl::StatusOr<std::unique_ptr<LeaseKeeper>> Start(
      const std::string& coordinator, std::shared_ptr<grpc::ChannelCredentials> creds, const std::string& address,
      v1::ComponentKind kind, std::function<void(v1::HeartbeatRequest*)> fill = nullptr);
  // The same with a whole registration (tensor-parallel ranks add their group, rank and size).
  static absl::StatusOr<std::unique_ptr<LeaseKeeper>> Start(
      const std::string& coordinator, std::shared_ptr<grpc::ChannelCredentials> creds, v1::RegisterRequest registration,
      std::function<void(v1::HeartbeatRequest*)> fill = nullptr);
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
