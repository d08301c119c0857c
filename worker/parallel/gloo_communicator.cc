#include "worker/parallel/gloo_communicator.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gloo/allgather.h"
#include "gloo/allreduce.h"
#include "gloo/math.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/transport/tcp/device.h"
#include "worker/parallel/group_store.h"

namespace flashmem::parallel {
namespace {

class SingleRank final : public CommunicatorBase {
 public:
  SingleRank() : CommunicatorBase(0, 1) {}
  void AllReduceSum(float*, int64_t) const override {}
  void AllGather(const float* local, int64_t n, float* out) const override { std::copy_n(local, n, out); }
};

class GlooCommunicator final : public CommunicatorBase {
 public:
  GlooCommunicator(int rank, int size, std::unique_ptr<GroupStoreServer> server,
                   std::shared_ptr<gloo::rendezvous::Context> ctx, absl::Duration timeout)
      : CommunicatorBase(rank, size), server_(std::move(server)), ctx_(std::move(ctx)),
        timeout_(absl::ToChronoMilliseconds(timeout)) {}

  void AllReduceSum(float* data, int64_t n) const override {
    Run("all-reduce", [&] {
      gloo::AllreduceOptions opts(ctx_);
      opts.setOutput(data, static_cast<size_t>(n));
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      opts.setTag(tag_++);
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
    });
  }

  void AllGather(const float* local, int64_t n, float* out) const override {
    Run("all-gather", [&] {
      gloo::AllgatherOptions opts(ctx_);
      opts.setInput(const_cast<float*>(local), static_cast<size_t>(n));
      opts.setOutput(out, static_cast<size_t>(n) * size());
      opts.setTag(tag_++);
      opts.setTimeout(timeout_);
      gloo::allgather(opts);
    });
  }

 private:
  // Gloo reports failures (a dead peer, a timeout) by throwing.
  template <typename F>
  void Run(const char* what, F&& f) const {
    Collective([&]() -> absl::Status {
      try {
        f();
        return absl::OkStatus();
      } catch (const std::exception& e) {
        return absl::UnavailableError(
            absl::StrCat("tensor-parallel ", what, " (rank ", rank(), " of ", size(), "): ", e.what()));
      }
    });
  }

  std::unique_ptr<GroupStoreServer> server_;  // rank 0 only
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  const std::chrono::milliseconds timeout_;
  mutable uint32_t tag_ = 0;  // guarded by Collective's lock
};

}  // namespace

absl::StatusOr<std::string> JoinGroupStore(const GroupOptions& o, std::unique_ptr<GroupStoreServer>* server) {
  if (o.size < 1) return absl::InvalidArgumentError(absl::StrCat("--tp-size ", o.size, ": must be >= 1"));
  if (o.rank < 0 || o.rank >= o.size)
    return absl::InvalidArgumentError(absl::StrCat("--tp-rank ", o.rank, ": must be in [0, ", o.size, ")"));
  if (o.size > 1 && o.leader_address.empty())
    return absl::InvalidArgumentError("--tp-leader: a group of more than one rank needs the leader's host:port");
  if (o.size == 1 || o.rank != 0) return o.leader_address;
  auto s = GroupStoreServer::Start(o.leader_address);
  if (!s.ok()) return s.status();
  *server = std::move(*s);
  return (*server)->address();
}

absl::StatusOr<std::unique_ptr<Communicator>> ConnectGlooGroup(const GroupOptions& o) {
  std::unique_ptr<GroupStoreServer> server;
  auto joined = JoinGroupStore(o, &server);
  if (!joined.ok()) return joined.status();
  if (o.size == 1) return std::unique_ptr<Communicator>(new SingleRank());
  const std::string leader = *joined;
  try {
    GroupStoreClient client(leader, o.timeout);
    gloo::rendezvous::PrefixStore store(absl::StrCat("flashmem/", o.group, "/"), client);
    gloo::transport::tcp::attr attr;
    attr.hostname = o.host;
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(o.rank, o.size);
    ctx->setTimeout(absl::ToChronoMilliseconds(o.timeout));
    ctx->connectFullMesh(store, dev);
    return std::unique_ptr<Communicator>(new GlooCommunicator(o.rank, o.size, std::move(server), std::move(ctx), o.timeout));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("tensor-parallel group '", o.group, "': rank ", o.rank, " of ", o.size,
                                               " could not connect through the leader at ", leader, ": ", e.what()));
  }
}

}  // namespace flashmem::parallel
