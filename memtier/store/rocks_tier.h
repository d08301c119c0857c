// RocksTier: the durable tier. RocksDB with integrated BlobDB for page values and the WAL on;
// a commit is one WriteBatch (page values + their metadata), so an acknowledged page is in the
// WAL (fsync'd when sync_wal). Keys are big-endian (session, layer, page): a session is one
// key range, dropped with DeleteRange. Page metadata lives in its own column family so the page
// index is rebuilt on restart without reading a single page value.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "memtier/store/page_key.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
}  // namespace rocksdb

namespace flashmem::memtier {

struct RocksTierOptions {
  std::string path;             // data directory (created if missing)
  bool sync_wal = false;        // fsync the WAL before acknowledging a commit
  uint64_t min_blob_size = 4096;  // values at least this large go to blob files
};

struct PageMeta {
  uint32_t length = 0;
  uint64_t checksum = 0;
};

struct PageWrite {
  PageKey key;
  std::span<const uint8_t> bytes;
  uint64_t checksum = 0;
};

struct StateBlob {
  uint64_t version = 0;
  std::vector<uint8_t> bytes;
};

class RocksTier {
 public:
  static absl::StatusOr<std::unique_ptr<RocksTier>> Open(const RocksTierOptions& options);
  ~RocksTier();

  // Atomically writes the pages and their metadata (one WriteBatch, WAL on).
  absl::Status PutPages(std::span<const PageWrite> pages);
  // Reads a page into dst (at least meta.length bytes) and verifies its length and checksum
  // against `meta`; a mismatch is DATA_LOSS (dst then holds no usable data).
  absl::Status GetPage(const PageKey& key, const PageMeta& meta, std::span<uint8_t> dst) const;
  absl::Status DeletePages(std::span<const PageKey> keys);
  absl::Status DropSession(uint64_t session);
  // Visits the metadata of every stored page (index rebuild on restart).
  absl::Status ForEachPage(const std::function<void(const PageKey&, const PageMeta&)>& fn) const;

  // The registry of open sessions (survives restarts).
  absl::Status PutSession(uint64_t session);
  absl::StatusOr<std::vector<uint64_t>> ListSessions() const;

  absl::Status PutState(uint64_t session, const StateBlob& blob);
  // NOT_FOUND when the session has no state blob.
  absl::StatusOr<StateBlob> GetState(uint64_t session) const;

  // The RocksDB identity of this data directory (its IDENTITY file): stable across restarts.
  const std::string& identity() const { return identity_; }

  // Overwrites a stored page value without touching its metadata (tests of corruption).
  absl::Status CorruptPageForTesting(const PageKey& key, std::span<const uint8_t> bytes);

 private:
  RocksTier() = default;
  RocksTierOptions options_;
  std::string identity_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;  // default, pages, meta, state, sessions
  rocksdb::ColumnFamilyHandle* pages_ = nullptr;
  rocksdb::ColumnFamilyHandle* meta_ = nullptr;
  rocksdb::ColumnFamilyHandle* state_ = nullptr;
  rocksdb::ColumnFamilyHandle* sessions_ = nullptr;
};

}  // namespace flashmem::memtier
