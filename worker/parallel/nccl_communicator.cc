#include "worker/parallel/nccl_communicator.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

#ifdef FLASHMEM_HAVE_CUDA
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "absl/synchronization/mutex.h"
#include "worker/parallel/group_store.h"
#include "worker/parallel/host_threads.h"
#endif

namespace flashmem::parallel {

#ifndef FLASHMEM_HAVE_CUDA

absl::StatusOr<std::unique_ptr<Communicator>> ConnectNcclGroup(const GroupOptions&, int) {
  return absl::UnimplementedError("--tp-size > 1 on a CUDA device: this build has no CUDA (NCCL)");
}

#else

namespace {

// The NCCL entry points used here, resolved once from libnccl.so.2.
#define FM_NCCL_FUNCTIONS(X) \
  X(ncclGetUniqueId) X(ncclCommInitRank) X(ncclCommDestroy) X(ncclAllReduce) X(ncclAllGather) X(ncclBroadcast) X(ncclCommAbort) X(ncclGetErrorString)

struct NcclApi {
#define FM_NCCL_MEMBER(f) decltype(&::f) f = nullptr;
  FM_NCCL_FUNCTIONS(FM_NCCL_MEMBER)
#undef FM_NCCL_MEMBER
};

const NcclApi* LoadNccl(std::string* error) {
  static NcclApi api;
  static std::string load_error;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libnccl.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      load_error = std::string("cannot load libnccl: ") + (e ? e : "unknown error");
      return;
    }
#define FM_NCCL_LOOKUP(f)                                       \
  api.f = reinterpret_cast<decltype(api.f)>(dlsym(lib, #f));    \
  if (!api.f && load_error.empty()) load_error = "libnccl lacks " #f;
    FM_NCCL_FUNCTIONS(FM_NCCL_LOOKUP)
#undef FM_NCCL_LOOKUP
  });
  if (!load_error.empty()) {
    *error = load_error;
    return nullptr;
  }
  return &api;
}

class NcclCommunicator final : public CommunicatorBase {
 public:
  NcclCommunicator(const NcclApi& api, int rank, int size, int device, ncclComm_t comm, cudaStream_t stream,
                   std::unique_ptr<GroupStoreServer> server)
      : CommunicatorBase(rank, size), api_(api), device_(device), comm_(comm), stream_(stream),
        server_(std::move(server)) {}
  ~NcclCommunicator() override {
    (void)cudaSetDevice(device_);
    if (buf_) (void)cudaFree(buf_);
    if (!aborted_.load()) api_.ncclCommDestroy(comm_);  // an aborted communicator is released already
    (void)cudaStreamDestroy(stream_);
  }

  void Abort() const override {
    if (aborted_.exchange(true)) return;
    (void)api_.ncclCommAbort(comm_);  // a collective in flight returns an error (the sticky health)
  }

  void AllReduceSum(float* data, int64_t n) const override {
    if (n == 0) return;
    Collective([&] {
      return Run(data, n, data, n, [&](float* d) {
        return api_.ncclAllReduce(d, d, static_cast<size_t>(n), ncclFloat32, ncclSum, comm_, stream_);
      });
    });
  }

  void AllGather(const float* local, int64_t n, float* out) const override {
    if (n == 0) return;
    Collective([&] {
      return Run(local, n, out, n * size(), [&](float* d) {
        return api_.ncclAllGather(d + rank() * n, d, static_cast<size_t>(n), ncclFloat32, comm_, stream_);
      });
    });
  }

  absl::Status AllGatherDevice(const void* local, int64_t bytes, void* out, void* cuda_stream) const override {
    if (bytes == 0) return absl::OkStatus();
    if (aborted_.load()) return AbortedError();
    return Checked(api_.ncclAllGather(local, out, static_cast<size_t>(bytes), ncclUint8, comm_,
                                      static_cast<cudaStream_t>(cuda_stream)));
  }

  absl::Status BroadcastDevice(void* data, int64_t bytes, int root, void* cuda_stream) const override {
    if (bytes == 0) return absl::OkStatus();
    if (aborted_.load()) return AbortedError();
    return Checked(api_.ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_,
                                      static_cast<cudaStream_t>(cuda_stream)));
  }

 private:
  absl::Status AbortedError() const {
    return absl::UnavailableError(absl::StrCat("tensor-parallel NCCL group (rank ", rank(), " of ", size(),
                                               "): aborted after a rank was lost"));
  }
  absl::Status Checked(ncclResult_t r) const {
    if (r == ncclSuccess) return absl::OkStatus();
    return absl::UnavailableError(absl::StrCat("tensor-parallel NCCL collective (rank ", rank(), " of ", size(),
                                               "): ", api_.ncclGetErrorString(r)));
  }
  // in (n_in floats) up into the device buffer (at rank * n_in for an all-gather), the
  // collective, out (n_out floats) back.
  template <typename F>
  absl::Status Run(const float* in, int64_t n_in, float* out, int64_t n_out, F&& collective) const {
    if (aborted_.load()) return AbortedError();
    if (cudaSetDevice(device_) != cudaSuccess) return absl::InternalError("NCCL rank: cudaSetDevice failed");
    const size_t bytes = static_cast<size_t>(std::max(n_in, n_out)) * sizeof(float);
    if (bytes > capacity_) {
      if (buf_) (void)cudaFree(buf_);
      buf_ = nullptr;
      capacity_ = 0;
      if (cudaMalloc(&buf_, bytes) != cudaSuccess) return absl::ResourceExhaustedError("NCCL rank: cudaMalloc failed");
      capacity_ = bytes;
    }
    float* d = static_cast<float*>(buf_);
    const int64_t at = n_out > n_in ? rank() * n_in : 0;
    cudaError_t e = cudaMemcpyAsync(d + at, in, n_in * sizeof(float), cudaMemcpyHostToDevice, stream_);
    if (e != cudaSuccess) return absl::InternalError(absl::StrCat("NCCL rank: copy up: ", cudaGetErrorString(e)));
    if (absl::Status st = Checked(collective(d)); !st.ok()) return st;
    e = cudaMemcpyAsync(out, d, n_out * sizeof(float), cudaMemcpyDeviceToHost, stream_);
    if (e == cudaSuccess) e = cudaStreamSynchronize(stream_);
    if (e != cudaSuccess) return absl::InternalError(absl::StrCat("NCCL rank: copy back: ", cudaGetErrorString(e)));
    return absl::OkStatus();
  }

  const NcclApi& api_;
  const int device_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  std::unique_ptr<GroupStoreServer> server_;  // rank 0 only
  mutable std::atomic<bool> aborted_{false};
  mutable void* buf_ = nullptr;  // guarded by Collective's lock
  mutable size_t capacity_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> ConnectNcclGroup(const GroupOptions& o, int device) {
  if (o.size == 1) return ConnectGlooGroup(o);  // a group of one: no communication at all
  std::string error;
  const NcclApi* api = LoadNccl(&error);
  if (!api) return absl::FailedPreconditionError(absl::StrCat("tensor parallel on CUDA: ", error));
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/1);  // always (issue 8; the GPU machines need NVLink multicast off)
  std::unique_ptr<GroupStoreServer> server;
  auto joined = JoinGroupStore(o, &server);
  if (!joined.ok()) return joined.status();
  const std::string leader = *joined;
  GroupStoreClient store(leader, o.timeout);
  const std::string key = absl::StrCat("flashmem/", o.group, "/nccl-unique-id");
  ncclUniqueId id;
  if (o.rank == 0) {
    if (const ncclResult_t r = api->ncclGetUniqueId(&id); r != ncclSuccess)
      return absl::UnavailableError(absl::StrCat("ncclGetUniqueId: ", api->ncclGetErrorString(r)));
    if (absl::Status st = store.Set(key, std::string(id.internal, sizeof id.internal)); !st.ok()) return st;
  } else {
    auto v = store.Get(key, o.timeout);
    if (!v.ok())
      return absl::UnavailableError(absl::StrCat("tensor-parallel group '", o.group, "': rank ", o.rank,
                                                 " got no NCCL id from the leader at ", leader, ": ", v.status().message()));
    if (v->size() != sizeof id.internal)
      return absl::DataLossError(absl::StrCat("NCCL unique id from the leader: ", v->size(), " bytes, expected ",
                                              sizeof id.internal));
    std::copy(v->begin(), v->end(), id.internal);
  }
  if (cudaSetDevice(device) != cudaSuccess)
    return absl::InvalidArgumentError(absl::StrCat("--device cuda:", device, ": cannot select it"));
  ncclComm_t comm = nullptr;
  if (const ncclResult_t r = api->ncclCommInitRank(&comm, o.size, id, o.rank); r != ncclSuccess)
    return absl::UnavailableError(absl::StrCat("tensor-parallel group '", o.group, "': ncclCommInitRank (rank ", o.rank,
                                               " of ", o.size, "): ", api->ncclGetErrorString(r)));
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    api->ncclCommDestroy(comm);
    return absl::InternalError("NCCL rank: cudaStreamCreate failed");
  }
  return std::unique_ptr<Communicator>(new NcclCommunicator(*api, o.rank, o.size, device, comm, stream, std::move(server)));
}

#endif  // FLASHMEM_HAVE_CUDA

absl::StatusOr<std::unique_ptr<Communicator>> ConnectGroup(const GroupOptions& options, const std::string& device) {
  int ordinal = 0;
  if (device != "cpu" &&
      (device.rfind("cuda:", 0) != 0 || !absl::SimpleAtoi(absl::string_view(device).substr(5), &ordinal) || ordinal < 0))
    return absl::InvalidArgumentError(absl::StrCat("--device '", device, "': expected cpu or cuda:N"));
  // A group's ranks share one node (placement puts them there): each takes its share of the cores.
  ShareHostThreads(options.size);
  if (device == "cpu") return ConnectGlooGroup(options);
  return ConnectNcclGroup(options, ordinal);
}

}  // namespace flashmem::parallel
