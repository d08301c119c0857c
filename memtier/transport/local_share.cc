#include "memtier/transport/local_share.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace flashmem::memtier {
namespace {

absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(a.sun_path))
    return absl::InvalidArgumentError(absl::StrCat("unix socket path '", path, "' is empty or longer than ", sizeof(a.sun_path) - 1, " bytes"));
  std::memcpy(a.sun_path, path.data(), path.size());
  return a;
}

bool SendChunk(int sock, uint64_t bytes, int fd) {
  iovec iov{&bytes, sizeof bytes};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  return ::sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(sizeof bytes);
}

// One reply message: bytes, and the fd it carried (-1 when none).
bool RecvChunk(int sock, uint64_t* bytes, int* fd) {
  iovec iov{bytes, sizeof *bytes};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  if (::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != static_cast<ssize_t>(sizeof *bytes)) return false;
  *fd = -1;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) std::memcpy(fd, CMSG_DATA(c), sizeof(int));
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ChunkShareServer>> ChunkShareServer::Start(
    const std::string& path, std::function<std::vector<SharedChunk>()> chunks) {
  auto addr = UnixAddress(path);
  if (!addr.ok()) return addr.status();
  std::unique_ptr<ChunkShareServer> s(new ChunkShareServer());
  s->path_ = path;
  s->chunks_ = std::move(chunks);
  ::unlink(path.c_str());  // a stale socket of an earlier run
  s->listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s->listen_fd_ < 0 || ::bind(s->listen_fd_, reinterpret_cast<sockaddr*>(&*addr), sizeof *addr) != 0 ||
      ::listen(s->listen_fd_, 64) != 0)
    return absl::UnavailableError(absl::StrCat("--shm-socket ", path, ": ", std::strerror(errno)));
  s->thread_ = std::thread([p = s.get()] { p->Serve(); });
  return s;
}

ChunkShareServer::~ChunkShareServer() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  ::unlink(path_.c_str());
}

void ChunkShareServer::Serve() {
  while (!stop_.load()) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    Handle(fd);
    ::close(fd);
  }
}

void ChunkShareServer::Handle(int fd) {
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 1000) <= 0) return;  // idle clients are dropped; they reconnect
    uint32_t first = 0;
    if (::recv(fd, &first, sizeof first, MSG_WAITALL) != static_cast<ssize_t>(sizeof first)) return;
    const std::vector<SharedChunk> chunks = chunks_();
    for (size_t i = first; i < chunks.size(); ++i)
      if (!SendChunk(fd, chunks[i].bytes, chunks[i].fd)) return;
    if (!SendChunk(fd, 0, -1)) return;
  }
}

absl::StatusOr<std::unique_ptr<MappedChunks>> MappedChunks::Attach(const std::string& path) {
  std::unique_ptr<MappedChunks> m(new MappedChunks());
  m->path_ = path;
  if (auto s = m->FetchFrom(0); !s.ok()) return s;
  return m;
}

MappedChunks::~MappedChunks() {
  for (const Map& m : maps_) ::munmap(const_cast<uint8_t*>(m.base), m.bytes);
}

absl::Status MappedChunks::FetchFrom(uint32_t first) {
  auto addr = UnixAddress(path_);
  if (!addr.ok()) return addr.status();
  const int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0 || ::connect(sock, reinterpret_cast<sockaddr*>(&*addr), sizeof *addr) != 0) {
    if (sock >= 0) ::close(sock);
    return absl::UnavailableError(absl::StrCat("memtier shm socket ", path_, ": ", std::strerror(errno)));
  }
  absl::Status st;
  if (::send(sock, &first, sizeof first, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof first)) {
    st = absl::UnavailableError("memtier shm socket: send failed");
  }
  while (st.ok()) {
    uint64_t bytes = 0;
    int fd = -1;
    if (!RecvChunk(sock, &bytes, &fd)) {
      st = absl::UnavailableError("memtier shm socket: connection closed mid-reply");
      break;
    }
    if (bytes == 0) break;
    if (fd < 0) {
      st = absl::DataLossError("memtier shm socket: a chunk arrived without its fd");
      break;
    }
    void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (p == MAP_FAILED) {
      st = absl::ResourceExhaustedError(absl::StrCat("mmap of a ", bytes, "-byte memtier chunk: ", std::strerror(errno)));
      break;
    }
    maps_.push_back({static_cast<const uint8_t*>(p), bytes});
  }
  ::close(sock);
  return st;
}

absl::StatusOr<const uint8_t*> MappedChunks::Range(uint32_t index, uint64_t offset, uint64_t bytes) {
  if (index >= maps_.size()) {
    if (auto s = FetchFrom(static_cast<uint32_t>(maps_.size())); !s.ok()) return s;
    if (index >= maps_.size()) return absl::NotFoundError(absl::StrCat("memtier has no chunk ", index));
  }
  const Map& m = maps_[index];
  if (offset > m.bytes || bytes > m.bytes - offset)
    return absl::InvalidArgumentError(absl::StrCat("range [", offset, ", +", bytes, ") outside chunk ", index, " of ", m.bytes, " bytes"));
  return m.base + offset;
}

}  // namespace flashmem::memtier
