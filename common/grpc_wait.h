// Waiting for a gRPC peer that may not be up yet. The components of a cluster start in any order
// (Kubernetes gives none), so a worker or memtier started before the service it depends on waits
// for it instead of exiting with "connection refused".
#pragma once

#include <chrono>
#include <string>

#include <grpcpp/channel.h>
#include <grpcpp/support/channel_arguments.h>

namespace flashmem {

// Channel arguments for a dependency that may come up (or come back) at any moment: gRPC's
// reconnect backoff grows to 120 s by default; capped at 1 s, a peer that starts is found within
// about a second.
grpc::ChannelArguments QuickReconnectArgs();

// Waits up to `wait` for `channel` to connect, logging once (naming `what`) when it is not
// connected within the first second. Returns whether it connected; the caller's next RPC then
// either runs or reports the connection's own error.
bool WaitUntilConnected(grpc::Channel& channel, std::chrono::milliseconds wait, const std::string& what);

}  // namespace flashmem
