#include "common/grpc_wait.h"

#include <algorithm>

#include "spdlog/spdlog.h"

namespace flashmem {

grpc::ChannelArguments QuickReconnectArgs() {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return args;
}

bool WaitUntilConnected(grpc::Channel& channel, std::chrono::milliseconds wait, const std::string& what) {
  using Clock = std::chrono::system_clock;
  const auto start = Clock::now();
  const auto first = std::min<std::chrono::milliseconds>(wait, std::chrono::seconds(1));
  if (channel.WaitForConnected(start + first)) return true;
  if (wait <= first) return false;
  spdlog::info("waiting up to {} s for {} to accept connections", wait.count() / 1000.0, what);
  const bool ok = channel.WaitForConnected(start + wait);
  if (ok) {
    spdlog::info("{} is up after {:.1f} s", what, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return ok;
}

}  // namespace flashmem
