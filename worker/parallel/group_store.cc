#include "worker/parallel/group_store.h"

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "parallel.grpc.pb.h"
#include "gloo/common/error.h"

namespace flashmem::parallel {
namespace {

// Bounds on what a rank may store: Gloo publishes one address blob per rank pair, a few hundred
// bytes each, so these only stop a confused or hostile client from filling the leader's memory.
constexpr size_t kMaxKeyBytes = 1024;
constexpr size_t kMaxValueBytes = 1 << 20;
constexpr size_t kMaxEntries = 65536;
constexpr uint32_t kMaxWaitMs = 600'000;

class StoreService final : public v1::GroupStore::Service {
 public:
  grpc::Status Set(grpc::ServerContext*, const v1::StoreSetRequest* req, v1::StoreSetResponse*) override {
    if (req->key().empty() || req->key().size() > kMaxKeyBytes)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("key: must be 1..", kMaxKeyBytes, " bytes, got ", req->key().size()));
    if (req->value().size() > kMaxValueBytes)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("value: at most ", kMaxValueBytes, " bytes, got ", req->value().size()));
    absl::MutexLock lock(&mu_);
    if (!map_.contains(req->key()) && map_.size() >= kMaxEntries)
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, absl::StrCat("store full: ", kMaxEntries, " keys"));
    map_[req->key()] = req->value();
    return grpc::Status::OK;
  }

  grpc::Status Get(grpc::ServerContext* ctx, const v1::StoreGetRequest* req, v1::StoreGetResponse* resp) override {
    if (req->key().empty() || req->key().size() > kMaxKeyBytes)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat("key: must be 1..", kMaxKeyBytes, " bytes, got ", req->key().size()));
    const absl::Time deadline = absl::Now() + absl::Milliseconds(std::min(req->wait_ms(), kMaxWaitMs));
    absl::MutexLock lock(&mu_);
    auto present = [&] { return map_.contains(req->key()); };
    while (!present() && !ctx->IsCancelled())
      if (mu_.AwaitWithDeadline(absl::Condition(&present), std::min(deadline, absl::Now() + absl::Seconds(1))) ||
          absl::Now() >= deadline)
        break;
    auto it = map_.find(req->key());
    if (it == map_.end())
      return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                          absl::StrCat("key '", req->key(), "' not set within ", req->wait_ms(), " ms"));
    resp->set_value(it->second);
    return grpc::Status::OK;
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::string> map_ ABSL_GUARDED_BY(mu_);
};

absl::Status FromGrpc(const grpc::Status& s, const std::string& what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), absl::StrCat(what, ": ", s.error_message()));
}

}  // namespace

struct GroupStoreServer::Impl {
  StoreService service;
  std::unique_ptr<grpc::Server> server;
  std::string host;
  int port = 0;
};

GroupStoreServer::GroupStoreServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GroupStoreServer::~GroupStoreServer() {
  if (impl_->server) impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}
std::string GroupStoreServer::address() const { return absl::StrCat(impl_->host, ":", impl_->port); }

absl::StatusOr<std::unique_ptr<GroupStoreServer>> GroupStoreServer::Start(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0)
    return absl::InvalidArgumentError(absl::StrCat("--tp-leader '", address, "': expected host:port"));
  auto impl = std::make_unique<Impl>();
  grpc::ServerBuilder b;
  b.AddListeningPort(address, grpc::InsecureServerCredentials(), &impl->port);
  b.SetMaxReceiveMessageSize(static_cast<int>(kMaxValueBytes + kMaxKeyBytes + 1024));
  b.RegisterService(&impl->service);
  impl->server = b.BuildAndStart();
  if (!impl->server || impl->port == 0)
    return absl::UnavailableError(absl::StrCat("--tp-leader ", address, ": the group leader cannot listen there"));
  impl->host = address.substr(0, colon);
  return std::unique_ptr<GroupStoreServer>(new GroupStoreServer(std::move(impl)));
}

struct GroupStoreClient::Impl {
  std::string leader;
  std::unique_ptr<v1::GroupStore::Stub> stub;
};

GroupStoreClient::GroupStoreClient(const std::string& leader_address, absl::Duration timeout)
    : impl_(std::make_unique<Impl>()), timeout_(timeout) {
  impl_->leader = leader_address;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(kMaxValueBytes + 1024));
  impl_->stub = v1::GroupStore::NewStub(
      grpc::CreateCustomChannel(leader_address, grpc::InsecureChannelCredentials(), args));
}
GroupStoreClient::~GroupStoreClient() = default;

absl::Status GroupStoreClient::Set(const std::string& key, const std::string& value) {
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(true);  // the leader may still be starting
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout_));
  v1::StoreSetRequest req;
  req.set_key(key);
  req.set_value(value);
  v1::StoreSetResponse resp;
  return FromGrpc(impl_->stub->Set(&ctx, req, &resp), absl::StrCat("group store at ", impl_->leader, ": set '", key, "'"));
}

absl::StatusOr<std::string> GroupStoreClient::Get(const std::string& key, absl::Duration wait) {
  grpc::ClientContext ctx;
  ctx.set_wait_for_ready(true);
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + wait + absl::Seconds(5)));
  v1::StoreGetRequest req;
  req.set_key(key);
  req.set_wait_ms(static_cast<uint32_t>(std::min<int64_t>(absl::ToInt64Milliseconds(wait), kMaxWaitMs)));
  v1::StoreGetResponse resp;
  const grpc::Status s = impl_->stub->Get(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s, absl::StrCat("group store at ", impl_->leader, ": get '", key, "'"));
  return resp.value();
}

void GroupStoreClient::set(const std::string& key, const std::vector<char>& data) {
  const absl::Status st = Set(key, std::string(data.begin(), data.end()));
  if (!st.ok()) throw gloo::IoException(std::string(st.message()));
}

std::vector<char> GroupStoreClient::get(const std::string& key) {
  auto v = Get(key, timeout_);
  if (!v.ok()) throw gloo::IoException(std::string(v.status().message()));
  return std::vector<char>(v->begin(), v->end());
}

void GroupStoreClient::wait(const std::vector<std::string>& keys) {
  wait(keys, std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout_)));
}

void GroupStoreClient::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) {
  const absl::Time deadline = absl::Now() + absl::FromChrono(timeout);
  for (const std::string& k : keys) {
    auto v = Get(k, std::max(absl::ZeroDuration(), deadline - absl::Now()));
    if (!v.ok()) throw gloo::IoException(std::string(v.status().message()));
  }
}

}  // namespace flashmem::parallel
