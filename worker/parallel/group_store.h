// The rendezvous store of a worker group, served by its leader over gRPC (proto GroupStore).
// GroupStoreServer runs on rank 0; every rank reads and writes through a GroupStoreClient, which
// is the gloo::rendezvous::Store that Gloo's full-mesh connect uses.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "gloo/rendezvous/store.h"

namespace flashmem::parallel {

class GroupStoreServer {
 public:
  // Listens on `address` ("host:port"; port 0 picks one, see address()).
  static absl::StatusOr<std::unique_ptr<GroupStoreServer>> Start(const std::string& address);
  ~GroupStoreServer();
  std::string address() const;  // host:port actually bound

 private:
  struct Impl;
  explicit GroupStoreServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class GroupStoreClient final : public gloo::rendezvous::Store {
 public:
  // `timeout` bounds every set/get/wait, including waiting for the leader to come up.
  GroupStoreClient(const std::string& leader_address, absl::Duration timeout);
  ~GroupStoreClient() override;

  // gloo::rendezvous::Store (throws gloo::IoException on failure, as Gloo expects of a store).
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;

  absl::Status Set(const std::string& key, const std::string& value);
  absl::StatusOr<std::string> Get(const std::string& key, absl::Duration wait);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  absl::Duration timeout_;
};

}  // namespace flashmem::parallel
