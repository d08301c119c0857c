#include "memtier/store/ram_tier.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace flashmem::memtier {
namespace {

// cudaHostRegister through the runtime loaded at run time: memtier needs no CUDA to build or
// run, and pins its chunks when a device is there.
class CudaPinner {
 public:
  static CudaPinner& Get() {
    static CudaPinner p;
    return p;
  }
  bool available() const { return register_ != nullptr && devices_ > 0; }
  const std::string& why_not() const { return why_not_; }
  bool Register(void* p, size_t n) { return register_ && register_(p, n, 0) == 0; }
  void Unregister(void* p) {
    if (unregister_) unregister_(p);
  }

 private:
  CudaPinner() {
    void* h = nullptr;
    for (const char* name : {"libcudart.so", "libcudart.so.13", "libcudart.so.12"})
      if ((h = dlopen(name, RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) {
      why_not_ = "no CUDA runtime (libcudart) found";
      return;
    }
    auto count = reinterpret_cast<int (*)(int*)>(dlsym(h, "cudaGetDeviceCount"));
    register_ = reinterpret_cast<int (*)(void*, size_t, unsigned)>(dlsym(h, "cudaHostRegister"));
    unregister_ = reinterpret_cast<int (*)(void*)>(dlsym(h, "cudaHostUnregister"));
    if (!count || count(&devices_) != 0) devices_ = 0;
    if (devices_ == 0) why_not_ = "no CUDA device";
  }
  int (*register_)(void*, size_t, unsigned) = nullptr;
  int (*unregister_)(void*) = nullptr;
  int devices_ = 0;
  std::string why_not_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<RamTier>> RamTier::Create(const RamTierOptions& options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes > (1ull << 30))
    return absl::InvalidArgumentError(absl::StrCat("ram chunk_bytes ", options.chunk_bytes, " must be in (0, 1 GiB]"));
  if (options.capacity_bytes == 0) return absl::InvalidArgumentError("--ram-bytes must be positive");
  return std::unique_ptr<RamTier>(new RamTier(options));
}

RamTier::~RamTier() {
  absl::MutexLock l(&mu_);
  for (auto& c : chunks_) {
    if (c.pinned) CudaPinner::Get().Unregister(c.base);
    ::munmap(c.base, c.bytes);
    ::close(c.fd);
  }
}

absl::Status RamTier::AddChunk(uint32_t size_class) {
  // A chunk holds whole slots of one class; small classes share the configured chunk size.
  const uint64_t bytes = std::max<uint64_t>(options_.chunk_bytes / size_class, 1) * size_class;
  if (bytes > (1ull << 30)) return absl::InvalidArgumentError(absl::StrCat("page of ", size_class, " bytes exceeds the 1 GiB chunk limit"));
  const int fd = memfd_create("flashmem-ram-chunk", MFD_CLOEXEC);
  if (fd < 0) return absl::ResourceExhaustedError(absl::StrCat("memfd_create: ", std::strerror(errno)));
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    ::close(fd);
    return absl::ResourceExhaustedError(absl::StrCat("ftruncate memfd to ", bytes, ": ", std::strerror(errno)));
  }
  // Not populated up front: faulting in a whole chunk inside a commit costs the commit's tail
  // latency (measured: p99 192 ms with 256 MiB chunks); pages fault in as slots are first used.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    ::close(fd);
    return absl::ResourceExhaustedError(absl::StrCat("mmap ", bytes, " bytes: ", std::strerror(errno)));
  }
  RamChunkInfo c{fd, bytes, static_cast<uint8_t*>(p), false};
  if (options_.pin) {
    CudaPinner& pinner = CudaPinner::Get();
    if (pinner.available()) {
      const auto t0 = std::chrono::steady_clock::now();
      c.pinned = pinner.Register(p, bytes);
      pin_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    if (!c.pinned && !warned_unpinned_) {
      spdlog::warn("memtier RAM tier: chunks stay unpinned ({})", pinner.available() ? "cudaHostRegister failed" : pinner.why_not());
      warned_unpinned_ = true;
    }
  }
  chunks_.push_back(c);
  return absl::OkStatus();
}

absl::StatusOr<RamSlot> RamTier::Allocate(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("cannot allocate an empty page");
  const uint32_t cls = SizeClass(bytes);
  absl::MutexLock l(&mu_);
  if (used_ + cls > options_.capacity_bytes)
    return absl::ResourceExhaustedError(absl::StrCat("RAM tier full: ", used_, " + ", cls, " > ", options_.capacity_bytes, " bytes"));
  ClassState* st = nullptr;
  for (auto& [c, s] : classes_)
    if (c == cls) st = &s;
  if (!st) st = &classes_.emplace_back(cls, ClassState{}).second;
  RamSlot slot;
  if (!st->free.empty()) {
    slot = st->free.back();
    st->free.pop_back();
  } else {
    if (st->carving_chunk < 0 || st->next + cls > chunks_[st->carving_chunk].bytes) {
      if (auto s = AddChunk(cls); !s.ok()) return s;
      st->carving_chunk = static_cast<int64_t>(chunks_.size()) - 1;
      st->next = 0;
    }
    slot = RamSlot{static_cast<uint32_t>(st->carving_chunk), st->next, cls};
    st->next += cls;
  }
  used_ += cls;
  return slot;
}

void RamTier::Free(const RamSlot& slot) {
  absl::MutexLock l(&mu_);
  for (auto& [c, s] : classes_)
    if (c == slot.capacity) s.free.push_back(slot);
  used_ -= slot.capacity;
}

uint8_t* RamTier::Data(const RamSlot& slot) const {
  absl::MutexLock l(&mu_);
  return chunks_[slot.chunk].base + slot.offset;
}

uint64_t RamTier::used_bytes() const {
  absl::MutexLock l(&mu_);
  return used_;
}

bool RamTier::PinningAvailable(std::string* why_not) {
  CudaPinner& p = CudaPinner::Get();
  if (why_not) *why_not = p.why_not();
  return p.available();
}

RamTierStats RamTier::stats() const {
  absl::MutexLock l(&mu_);
  RamTierStats s;
  s.capacity_bytes = options_.capacity_bytes;
  s.used_bytes = used_;
  s.pin_seconds = pin_seconds_;
  s.chunks = chunks_.size();
  for (const auto& c : chunks_) {
    s.mapped_bytes += c.bytes;
    if (c.pinned) s.pinned_bytes += c.bytes;
  }
  return s;
}

std::vector<RamChunkInfo> RamTier::chunks() const {
  absl::MutexLock l(&mu_);
  return chunks_;
}

}  // namespace flashmem::memtier
