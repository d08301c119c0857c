// The same-node fast path (DESIGN.md §1): memtier's RAM tier is made of memfd segments; a local
// client asks memtier's Unix socket for them, receives the fds (SCM_RIGHTS) and maps them
// read-only. A recall then reads pages straight from memtier's memory (on a GPU worker: one DMA
// or gather kernel after cudaHostRegisterReadOnly), with the xxh3 checksum deciding whether the
// bytes it read are the page (a slot reused by eviction shows as a mismatch, never as data).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace flashmem::memtier {

struct SharedChunk {
  int fd = -1;
  uint64_t bytes = 0;
};

// Serves the chunk fds on a Unix socket. Request: u32 first chunk index. Reply: one message per
// chunk from there on (u64 bytes + the fd), then a message with bytes = 0 and no fd.
class ChunkShareServer {
 public:
  static absl::StatusOr<std::unique_ptr<ChunkShareServer>> Start(const std::string& path,
                                                                std::function<std::vector<SharedChunk>()> chunks);
  ~ChunkShareServer();
  const std::string& path() const { return path_; }

 private:
  ChunkShareServer() = default;
  void Serve();
  void Handle(int fd);
  std::string path_;
  int listen_fd_ = -1;
  std::atomic<bool> stop_{false};
  std::function<std::vector<SharedChunk>()> chunks_;
  std::thread thread_;
};

// A client's read-only mappings of memtier's chunks.
class MappedChunks {
 public:
  static absl::StatusOr<std::unique_ptr<MappedChunks>> Attach(const std::string& path);
  ~MappedChunks();
  // Pointer to [offset, offset + bytes) of chunk `index`, fetching newly added chunks when needed.
  absl::StatusOr<const uint8_t*> Range(uint32_t index, uint64_t offset, uint64_t bytes);
  size_t size() const { return maps_.size(); }

 private:
  MappedChunks() = default;
  absl::Status FetchFrom(uint32_t first);
  std::string path_;
  struct Map {
    const uint8_t* base;
    uint64_t bytes;
  };
  std::vector<Map> maps_;
};

}  // namespace flashmem::memtier
