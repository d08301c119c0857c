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

class SingleRank final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  absl::Status Health() const override { return absl::OkStatus(); }
  void AllReduceSum(float*, int64_t) const override {}
  void AllGather(const float* local, int64_t n, float* out) const override { std::copy_n(local, n, out); }
};

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(int rank, int size, std::unique_ptr<GroupStoreServer> server,
                   std::shared_ptr<gloo::rendezvous::Context> ctx, absl::Duration timeout)
      : rank_(rank), size_(size), server_(std::move(server)), ctx_(std::move(ctx)),
        timeout_(absl::ToChronoMilliseconds(timeout)) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  absl::Status Health() const override {
    absl::MutexLock lock(&mu_);
    return health_;
  }

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
      opts.setOutput(out, static_cast<size_t>(n) * size_);
      opts.setTag(tag_++);
      opts.setTimeout(timeout_);
      gloo::allgather(opts);
    });
  }

 private:
  template <typename F>
  void Run(const char* what, F&& f) const {
    absl::MutexLock lock(&mu_);  // one collective at a time, in the same order on every rank
    if (!health_.ok()) return;
    try {
      f();
    } catch (const std::exception& e) {
      health_ = absl::UnavailableError(absl::StrCat("tensor-parallel ", what, " (rank ", rank_, " of ", size_,
                                                    "): ", e.what()));
    }
  }

  const int rank_, size_;
  std::unique_ptr<GroupStoreServer> server_;  // rank 0 only
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  const std::chrono::milliseconds timeout_;
  mutable absl::Mutex mu_;
  mutable absl::Status health_;
  mutable uint32_t tag_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> ConnectGlooGroup(const GroupOptions& o) {
  if (o.size < 1) return absl::InvalidArgumentError(absl::StrCat("--tp-size ", o.size, ": must be >= 1"));
  if (o.rank < 0 || o.rank >= o.size)
    return absl::InvalidArgumentError(absl::StrCat("--tp-rank ", o.rank, ": must be in [0, ", o.size, ")"));
  if (o.size == 1) return std::unique_ptr<Communicator>(new SingleRank());
  if (o.leader_address.empty())
    return absl::InvalidArgumentError("--tp-leader: a group of more than one rank needs the leader's host:port");
  std::unique_ptr<GroupStoreServer> server;
  std::string leader = o.leader_address;
  if (o.rank == 0) {
    auto s = GroupStoreServer::Start(o.leader_address);
    if (!s.ok()) return s.status();
    server = std::move(*s);
    leader = server->address();
  }
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
