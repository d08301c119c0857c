#include "memtier/store/rocks_tier.h"

#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace flashmem::memtier {
namespace {

absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat(what, ": ", s.ToString()));
  if (s.IsCorruption()) return absl::DataLossError(absl::StrCat(what, ": ", s.ToString()));
  return absl::InternalError(absl::StrCat(what, ": ", s.ToString()));
}

std::string EncodeMeta(const PageMeta& m) {
  std::string v(12, '\0');
  std::memcpy(v.data(), &m.length, 4);
  std::memcpy(v.data() + 4, &m.checksum, 8);
  return v;
}

bool DecodeMeta(const rocksdb::Slice& v, PageMeta* m) {
  if (v.size() != 12) return false;
  std::memcpy(&m->length, v.data(), 4);
  std::memcpy(&m->checksum, v.data() + 4, 8);
  return true;
}

rocksdb::Slice AsSlice(std::span<const uint8_t> b) { return rocksdb::Slice(reinterpret_cast<const char*>(b.data()), b.size()); }

}  // namespace

absl::StatusOr<std::unique_ptr<RocksTier>> RocksTier::Open(const RocksTierOptions& options) {
  if (options.path.empty()) return absl::InvalidArgumentError("--data-dir: empty path");
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("--data-dir ", options.path, ": ", ec.message()));
  std::unique_ptr<RocksTier> t(new RocksTier());
  t->options_ = options;
  rocksdb::DBOptions db_opts;
  db_opts.create_if_missing = true;
  db_opts.create_missing_column_families = true;
  db_opts.manual_wal_flush = false;
  rocksdb::ColumnFamilyOptions pages_opts;
  pages_opts.enable_blob_files = true;
  pages_opts.min_blob_size = options.min_blob_size;
  pages_opts.enable_blob_garbage_collection = true;
  pages_opts.blob_file_size = 256ull << 20;
  pages_opts.write_buffer_size = 64ull << 20;
  std::vector<rocksdb::ColumnFamilyDescriptor> cfs = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {"pages", pages_opts},
      {"meta", rocksdb::ColumnFamilyOptions()},
      {"state", rocksdb::ColumnFamilyOptions()},
      {"sessions", rocksdb::ColumnFamilyOptions()},
  };
  rocksdb::DB* db = nullptr;
  auto s = rocksdb::DB::Open(db_opts, options.path, cfs, &t->handles_, &db);
  if (!s.ok()) return FromRocks(s, absl::StrCat("open RocksDB at ", options.path));
  t->db_.reset(db);
  t->pages_ = t->handles_[1];
  t->meta_ = t->handles_[2];
  t->state_ = t->handles_[3];
  t->sessions_ = t->handles_[4];
  if (auto st = t->db_->GetDbIdentity(t->identity_); !st.ok()) return FromRocks(st, "RocksDB identity");
  return t;
}

RocksTier::~RocksTier() {
  if (db_) {
    for (auto* h : handles_) (void)db_->DestroyColumnFamilyHandle(h);
    (void)db_->Close();
  }
}

absl::Status RocksTier::PutPages(std::span<const PageWrite> pages) {
  rocksdb::WriteBatch batch;
  for (const PageWrite& p : pages) {
    const std::string key = EncodePageKey(p.key);
    auto s = batch.Put(pages_, key, AsSlice(p.bytes));
    if (s.ok()) s = batch.Put(meta_, key, EncodeMeta({static_cast<uint32_t>(p.bytes.size()), p.checksum}));
    if (!s.ok()) return FromRocks(s, "batch put");
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_wal;
  return FromRocks(db_->Write(wo, &batch), "commit pages");
}

absl::Status RocksTier::GetPage(const PageKey& key, const PageMeta& meta, std::span<uint8_t> dst) const {
  rocksdb::PinnableSlice v;
  // Page values carry their own xxh3 checksum, verified below: RocksDB's per-blob CRC would be a
  // second pass over the same bytes. The block cache keeps its default fill: the values live in
  // blob files (no blob cache is configured, so a promoted page's bytes never enter it), and what
  // it caches is the SST blocks of blob indexes — without them every Get re-read and
  // re-decompressed a data block (perf profile of a promotion: 28% of its time).
  rocksdb::ReadOptions ro;
  ro.verify_checksums = false;
  auto s = db_->Get(ro, pages_, EncodePageKey(key), &v);
  if (!s.ok()) return FromRocks(s, absl::StrCat("read page ", ToString(key)));
  if (v.size() != meta.length)
    return absl::DataLossError(absl::StrCat("page ", ToString(key), ": stored length ", v.size(), " != committed ", meta.length));
  if (dst.size() < v.size()) return absl::InvalidArgumentError(absl::StrCat("page ", ToString(key), ": buffer too small"));
  std::memcpy(dst.data(), v.data(), v.size());
  if (PageChecksum(dst.first(v.size())) != meta.checksum)
    return absl::DataLossError(absl::StrCat("page ", ToString(key), ": checksum mismatch on read from RocksDB"));
  return absl::OkStatus();
}

absl::Status RocksTier::DeletePages(std::span<const PageKey> keys) {
  rocksdb::WriteBatch batch;
  for (const PageKey& k : keys) {
    const std::string key = EncodePageKey(k);
    (void)batch.Delete(pages_, key);
    (void)batch.Delete(meta_, key);
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_wal;
  return FromRocks(db_->Write(wo, &batch), "delete pages");
}

absl::Status RocksTier::DropSession(uint64_t session) {
  const std::string begin = EncodeSessionPrefix(session);
  const std::string end = session == UINT64_MAX ? std::string(kPageKeyBytes + 1, '\xff') : EncodeSessionPrefix(session + 1);
  rocksdb::WriteBatch batch;
  auto s = batch.DeleteRange(pages_, begin, end);
  if (s.ok()) s = batch.DeleteRange(meta_, begin, end);
  if (s.ok()) s = batch.Delete(state_, begin);
  if (s.ok()) s = batch.Delete(sessions_, begin);
  if (!s.ok()) return FromRocks(s, "drop session");
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_wal;
  return FromRocks(db_->Write(wo, &batch), absl::StrCat("drop session ", session));
}

absl::Status RocksTier::ForEachPage(const std::function<void(const PageKey&, const PageMeta&)>& fn) const {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), meta_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    PageKey k;
    PageMeta m;
    if (!DecodePageKey(absl::string_view(it->key().data(), it->key().size()), &k) || !DecodeMeta(it->value(), &m))
      return absl::DataLossError("page metadata record with a malformed key or value");
    fn(k, m);
  }
  return FromRocks(it->status(), "scan page metadata");
}

absl::Status RocksTier::PutSession(uint64_t session) {
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_wal;
  return FromRocks(db_->Put(wo, sessions_, EncodeSessionPrefix(session), ""), "register session");
}

absl::StatusOr<std::vector<uint64_t>> RocksTier::ListSessions() const {
  std::vector<uint64_t> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), sessions_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (it->key().size() != 8) return absl::DataLossError("malformed session registry key");
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<uint8_t>(it->key()[i]);
    out.push_back(v);
  }
  if (auto st = FromRocks(it->status(), "scan sessions"); !st.ok()) return st;
  return out;
}

absl::Status RocksTier::PutState(uint64_t session, const StateBlob& blob) {
  std::string v(16, '\0');
  const uint64_t sum = PageChecksum(blob.bytes);
  std::memcpy(v.data(), &blob.version, 8);
  std::memcpy(v.data() + 8, &sum, 8);
  v.append(reinterpret_cast<const char*>(blob.bytes.data()), blob.bytes.size());
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync_wal;
  return FromRocks(db_->Put(wo, state_, EncodeSessionPrefix(session), v), "put state blob");
}

absl::StatusOr<StateBlob> RocksTier::GetState(uint64_t session) const {
  std::string v;
  auto s = db_->Get(rocksdb::ReadOptions(), state_, EncodeSessionPrefix(session), &v);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("session ", session, " has no state blob"));
  if (!s.ok()) return FromRocks(s, "get state blob");
  if (v.size() < 16) return absl::DataLossError(absl::StrCat("session ", session, ": state blob record truncated"));
  StateBlob b;
  uint64_t sum;
  std::memcpy(&b.version, v.data(), 8);
  std::memcpy(&sum, v.data() + 8, 8);
  b.bytes.assign(v.begin() + 16, v.end());
  if (PageChecksum(b.bytes) != sum) return absl::DataLossError(absl::StrCat("session ", session, ": state blob checksum mismatch"));
  return b;
}

absl::Status RocksTier::CorruptPageForTesting(const PageKey& key, std::span<const uint8_t> bytes) {
  return FromRocks(db_->Put(rocksdb::WriteOptions(), pages_, EncodePageKey(key), AsSlice(bytes)), "corrupt page");
}

}  // namespace flashmem::memtier
