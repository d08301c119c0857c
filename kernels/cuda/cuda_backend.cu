#include "kernels/cuda/cuda_backend.h"

#include <utility>

#include "kernels/cuda/backend_impl.h"
#include "kernels/cuda/fp4_layout.h"

namespace flashmem::kernels::cuda {

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

namespace internal {

absl::Status CudaBackendImpl::Health() const {
  absl::MutexLock lock(&mu_);
  return health_;
}

absl::Status CudaBackendImpl::Prepare(const WeightMatrix& w) const {
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return health_;
  op_clock_ = clock_ + 1;
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  return WeightOnDevice(w).status();
}

// The norm's weight is a model parameter: kept on the device (ArrayOnDevice) rather than staged
// and uploaded with every call, as HcPre's and HcHead's parameters are.
void CudaBackendImpl::RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) const {
  absl::MutexLock lock(&mu_);
  if (!health_.ok() || n == 0) return;
  op_clock_ = clock_ + 1;
  auto dw = ArrayOnDevice(weight, static_cast<size_t>(dim));
  if (!dw.ok()) return Fail(dw.status());
  Frame f;
  const size_t dx = f.In(x, n * dim * 4), dy = f.Scratch(n * dim * 4);
  f.Download(dy, y, n * dim * 4);
  Fail(RunLocked(f, [&](Dev d) { return cuda::RmsNorm(d.at(dx), *dw, n, dim, eps, d.at(dy), stream_); }));
}

void CudaBackendImpl::HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const {
  Frame f;
  const size_t dq = f.In(q, heads * dim * 4);
  f.Download(dq, q, heads * dim * 4);
  Launch(f, [&](Dev d) { return cuda::HeadRmsNormBf16(d.at(dq), heads, dim, eps, stream_); });
}

void CudaBackendImpl::Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims, const float* cos,
                           const float* sin, int64_t rows_per_angle, bool inverse) const {
  if (rows == 0) return;
  Frame f;
  const size_t bytes = ((rows - 1) * stride + offset + rope_dims) * 4;
  const size_t angles = (rows + rows_per_angle - 1) / rows_per_angle * (rope_dims / 2) * 4;
  const size_t dx = f.In(x, bytes), dc = f.In(cos, angles), ds = f.In(sin, angles);
  f.Download(dx, x, bytes);
  Launch(f, [&](Dev d) {
    return cuda::Rope(d.at(dx), rows, stride, offset, rope_dims, d.at(dc), d.at(ds), rows_per_angle, inverse,
                      stream_);
  });
}

void CudaBackendImpl::Hadamard(float* x, int64_t rows, int64_t dim) const {
  Frame f;
  const size_t dx = f.In(x, rows * dim * 4);
  f.Download(dx, x, rows * dim * 4);
  Launch(f, [&](Dev d) { return cuda::Hadamard(d.at(dx), rows, dim, stream_); });
}

void CudaBackendImpl::HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                            int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
                            float* comb) const {
  HcPreThen(x, n, fn, base, scale, hc, dim, iters, norm_eps, hc_eps, y, post, comb, {});
}

void CudaBackendImpl::HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale,
                                int hc, int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
                                float* comb, std::span<const RowOp> then) const {
  if (!fused_ && !then.empty()) return Backend::HcPreThen(x, n, fn, base, scale, hc, dim, iters, norm_eps, hc_eps, y,
                                                          post, comb, then);
  absl::MutexLock lock(&mu_);
  if (!health_.ok() || n == 0) return;
  op_clock_ = clock_ + 1;
  const int mix = (2 + hc) * hc;
  auto dfn = ArrayOnDevice(fn, static_cast<size_t>(mix) * hc * dim);
  if (!dfn.ok()) return Fail(dfn.status());
  auto dbase = ArrayOnDevice(base, static_cast<size_t>(mix));
  if (!dbase.ok()) return Fail(dbase.status());
  auto dscale = ArrayOnDevice(scale, 3);
  if (!dscale.ok()) return Fail(dscale.status());
  Frame f;
  const size_t dx = f.In(x, n * hc * dim * 4);
  const size_t dy = f.Scratch(n * dim * 4), dp = f.Scratch(n * hc * 4), dc = f.Scratch(n * hc * hc * 4);
  // Fast mode: the mixes' sums split over blocks (one block per token, the exact kernel's, leaves
  // most SMs idle and waits on its loads).
  const int64_t splits = !exact_ && fast_hc_ ? cuda::HcPreFastSplits(n, hc, dim) : 0;
  const size_t dpart = f.Scratch(std::max<int64_t>(splits, 1) * n * (mix + 1) * 4);
  absl::StatusOr<RowOpInputs> ops = StageRowOps(f, then, n * dim);
  if (!ops.ok()) return Fail(ops.status());
  f.Download(dy, y, n * dim * 4);
  f.Download(dp, post, n * hc * 4);
  f.Download(dc, comb, n * hc * hc * 4);
  Fail(RunLocked(f, [&](Dev d) {
    const cudaError_t e =
        splits > 0 ? cuda::HcPreFast(d.at(dx), n, *dfn, *dbase, *dscale, hc, dim, iters, norm_eps, hc_eps, d.at(dpart),
                                     d.at(dy), d.at(dp), d.at(dc), stream_)
                   : cuda::HcPre(d.at(dx), n, *dfn, *dbase, *dscale, hc, dim, iters, norm_eps, hc_eps, d.at(dy),
                                 d.at(dp), d.at(dc), stream_);
    return e != cudaSuccess ? e : EnqueueRowOps(d, d.at(dy), n * dim, then, *ops);
  }));
}

void CudaBackendImpl::RowOps(float* x, int64_t values, std::span<const RowOp> ops) const {
  if (!fused_) return Backend::RowOps(x, values, ops);
  absl::MutexLock lock(&mu_);
  if (!health_.ok() || values == 0 || ops.empty()) return;
  op_clock_ = clock_ + 1;
  Frame f;
  const size_t dx = f.In(x, values * 4);
  absl::StatusOr<RowOpInputs> in = StageRowOps(f, ops, values, "ops");
  if (!in.ok()) return Fail(in.status());
  f.Download(dx, x, values * 4);
  Fail(RunLocked(f, [&](Dev d) { return EnqueueRowOps(d, d.at(dx), values, ops, *in); }));
}

void CudaBackendImpl::HcPost(const float* fx, const float* residual, const float* post, const float* comb, int64_t n,
                             int hc, int64_t dim, float* out) const {
  if (n == 0) return;
  Frame f;
  const size_t df = f.In(fx, n * dim * 4), dr = f.In(residual, n * hc * dim * 4), dp = f.In(post, n * hc * 4),
               dc = f.In(comb, n * hc * hc * 4), dout = f.Scratch(n * hc * dim * 4);
  f.Download(dout, out, n * hc * dim * 4);
  Launch(f, [&](Dev d) {
    return cuda::HcPost(d.at(df), d.at(dr), d.at(dp), d.at(dc), n, hc, dim, d.at(dout), stream_);
  });
}

void CudaBackendImpl::RoundBf16(const float* x, int64_t n, float* y) const {
  if (n <= 0) return;
  Frame f;
  const size_t dx = f.In(x, n * 4), dy = f.Scratch(n * 4);
  f.Download(dy, y, n * 4);
  Launch(f, [&](Dev d) { return cuda::RoundBf16(d.at(dx), n, d.at(dy), stream_); });
}

void CudaBackendImpl::HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc,
                             int64_t dim, float norm_eps, float hc_eps, float* y) const {
  if (n == 0) return;
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return;
  op_clock_ = clock_ + 1;
  auto dfn = ArrayOnDevice(fn, static_cast<size_t>(hc) * hc * dim);
  if (!dfn.ok()) return Fail(dfn.status());
  Frame f;
  const size_t dx = f.In(x, n * hc * dim * 4), db = f.In(base, hc * 4), dy = f.Scratch(n * dim * 4);
  f.Download(dy, y, n * dim * 4);
  Fail(RunLocked(f, [&](Dev d) {
    return cuda::HcHead(d.at(dx), n, *dfn, d.at(db), scale, hc, dim, norm_eps, hc_eps, d.at(dy), stream_);
  }));
}

absl::Status CudaBackendImpl::Reserve(int64_t bytes, const char* what) const {
  while (used_ + bytes > budget_) {
    // Residents touched by the op in progress (last_use >= op_clock_) stay: it is about to use them.
    auto lru = resident_.end();
    for (auto it = resident_.begin(); it != resident_.end(); ++it)
      if (it->second.last_use < op_clock_ && (lru == resident_.end() || it->second.last_use < lru->second.last_use))
        lru = it;
    if (lru == resident_.end()) break;
    (void)cudaFree(lru->second.mem);
    used_ -= lru->second.bytes;
    if (lru->second.watched) ++resident_epoch_;
    resident_.erase(lru);
  }
  if (used_ + bytes > budget_)
    return absl::ResourceExhaustedError(absl::StrCat("CUDA device ", device_, ": ", what, " needs ", bytes,
                                                     " bytes, over the device memory budget of ", budget_,
                                                     " bytes (", used_, " in use)"));
  return absl::OkStatus();
}

absl::StatusOr<Resident*> CudaBackendImpl::Upload(const void* key, uint64_t fp, const void* const* parts,
                                                  const size_t* sizes, int nparts, const char* what) const {
  auto it = resident_.find(key);
  if (it != resident_.end()) {
    if (it->second.fingerprint == fp) {
      it->second.last_use = ++clock_;
      return &it->second;
    }
    (void)cudaFree(it->second.mem);
    used_ -= it->second.bytes;
    if (it->second.watched) ++resident_epoch_;
    resident_.erase(it);
  }
  size_t total = 0;
  for (int i = 0; i < nparts; ++i) total += AlignUp(sizes[i]);
  FM_RETURN_IF_ERROR(Reserve(static_cast<int64_t>(total), what));
  Resident r;
  FM_CUDA_TRY(cudaMalloc(&r.mem, total), "cudaMalloc(weights)");
  size_t off = 0;
  // On the backend's stream, then synchronized: a plain cudaMemcpy from pageable memory returns
  // before its DMA lands and does not order with a non-blocking stream, so the first kernel to
  // use the weight could read it half written.
  cudaError_t e = cudaSuccess;
  for (int i = 0; i < nparts && e == cudaSuccess; ++i) {
    e = cudaMemcpyAsync(static_cast<char*>(r.mem) + off, parts[i], sizes[i], cudaMemcpyHostToDevice, stream_);
    off += AlignUp(sizes[i]);
  }
  if (e == cudaSuccess) e = cudaStreamSynchronize(stream_);
  if (e != cudaSuccess) {
    (void)cudaFree(r.mem);
    return CudaError(e, "copy weights to device");
  }
  r.bytes = static_cast<int64_t>(total);
  r.fingerprint = fp;
  r.last_use = ++clock_;
  used_ += r.bytes;
  return &(resident_[key] = r);
}

absl::StatusOr<const DeviceWeight*> CudaBackendImpl::WeightOnDevice(const WeightMatrix& w) const {
  constexpr size_t kSamples = 8;  // the identity tells matrices apart; the samples catch gross in-place changes
  const uint64_t id = w.identity.id();
  const uint64_t seed = XXH3_64bits_withSeed(&id, sizeof id, static_cast<uint64_t>(w.format) * 131 + w.rows);
  uint64_t fp = Fingerprint(w.values.data(), w.values.size(), seed, kSamples);
  if (!w.scales.empty()) fp ^= Fingerprint(w.scales.data(), w.scales.size(), 7, kSamples) * 3;
  auto it = resident_.find(w.values.data());
  if (it != resident_.end() && it->second.fingerprint == fp) {
    it->second.last_use = ++clock_;
    return &it->second.weight;
  }
  EncodedWeight enc = EncodeWeight(w);
  // Fast mode keeps FP8 weights twice more: in cuBLASLt's FP8 form (fp8_tensor_cores) or
  // dequantized to bf16 for the precise tensor-core path.
  const bool fp8 = !exact_ && w.format == WeightFormat::kFp8Block128;
  const std::vector<float> lt_scales = fp8 && fp8_tc_ ? BlockScalesForLt(w) : std::vector<float>();
  const std::vector<uint16_t> deq = fp8 && !fp8_tc_ ? DequantizeFp8ToBf16(w) : std::vector<uint16_t>();
  // FP4 in fast mode also keeps its scales as E8M0 bytes (+1/16 of the codes' bytes) and its codes
  // in the decode layout (fp4_layout.h): what the decode GEMV reads. Only with the GEMV on: without
  // it the exact kernel reads the codes.
  const std::vector<uint8_t> exps = !exact_ && fast_gemv_ ? cuda::ScaleExponents(w) : std::vector<uint8_t>();
  if (!exps.empty()) enc.values = cuda::Fp4CodesInDecodeLayout(enc.values);
  const void* parts[5] = {enc.values.data(), w.scales.data(), lt_scales.data(), deq.data(), exps.data()};
  const size_t sizes[5] = {enc.values.size(), w.scales.size() * 4, lt_scales.size() * 4, deq.size() * 2, exps.size()};
  FM_ASSIGN_OR_RETURN(Resident * r, Upload(w.values.data(), fp, parts, sizes, w.scales.empty() ? 1 : 5, "a weight"));
  DeviceWeight& dw = r->weight;
  dw.format = w.format;
  dw.rows = w.rows;
  dw.cols = w.cols;
  dw.dense_bf16 = enc.dense_bf16;
  dw.values = r->mem;
  dw.scales = w.scales.empty() ? nullptr : reinterpret_cast<const float*>(static_cast<char*>(r->mem) + AlignUp(sizes[0]));
  dw.scale_cols = w.format == WeightFormat::kDense ? 0 : w.scale_cols();
  char* part3 = static_cast<char*>(r->mem) + AlignUp(sizes[0]) + AlignUp(sizes[1]);
  dw.lt_scales = lt_scales.empty() ? nullptr : reinterpret_cast<const float*>(part3);
  dw.dequant_bf16 = deq.empty() ? nullptr : part3 + AlignUp(sizes[2]);
  dw.scale_exps = exps.empty() ? nullptr : reinterpret_cast<const uint8_t*>(part3 + AlignUp(sizes[2]) + AlignUp(sizes[3]));
  return &dw;
}

absl::StatusOr<const float*> CudaBackendImpl::ArrayOnDevice(const float* p, size_t count) const {
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  const void* parts[1] = {p};
  const size_t sizes[1] = {count * 4};
  FM_ASSIGN_OR_RETURN(Resident * r, Upload(p, Fingerprint(p, count, 1), parts, sizes, 1, "a parameter array"));
  return static_cast<const float*>(r->mem);
}

void CudaBackendImpl::RoundTripOp(float* x, int64_t n, int64_t block, bool fp8) const {
  Frame f;
  const size_t dx = f.In(x, n * 4);
  f.Download(dx, x, n * 4);
  Launch(f, [&](Dev d) { return cuda::RoundTrip(d.at(dx), n, block, fp8, stream_); });
}

}  // namespace internal

namespace {

using internal::CudaBackendImpl;
using internal::CudaError;

// The process's activation memory becomes page-locked blocks (kernels/activation_pool.h), up to
// `bytes` (0: none), unless a pool is installed already. FLASHMEM_CUDA_PINNED=0 leaves the heap, to
// measure what the direct copies save.
void InstallPinnedActivations(int64_t bytes) {
  if (bytes == 0 || InstalledActivationPool()) return;
  if (const char* p = std::getenv("FLASHMEM_CUDA_PINNED"); p && std::string(p) == "0") return;
  ActivationPoolOptions o;
  o.capacity_bytes = static_cast<size_t>(bytes);
  // Portable: page-locked for every device's context, so any backend of the process copies from it.
  auto* pool = new ActivationPool(
      [](size_t n) -> void* {
        void* p = nullptr;
        return cudaHostAlloc(&p, n, cudaHostAllocPortable) == cudaSuccess ? p : nullptr;
      },
      [](void* p, size_t) { (void)cudaFreeHost(p); }, o);
  if (!InstallActivationPool(pool)) delete pool;  // another thread installed one first
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> NewCudaBackend(const CudaBackendOptions& options) {
  const int count = DeviceCount();
  if (count == 0) return absl::FailedPreconditionError("no CUDA device is visible (driver missing or no GPU)");
  if (options.device < 0 || options.device >= count)
    return absl::InvalidArgumentError(
        absl::StrCat("device: cuda:", options.device, " does not exist (", count, " CUDA devices visible)"));
  if (options.memory_budget_bytes < 0)
    return absl::InvalidArgumentError("memory_budget_bytes must be >= 0");
  FM_RETURN_IF_ERROR(CudaError(cudaSetDevice(options.device), "cudaSetDevice"));
  size_t free_b = 0, total_b = 0;
  FM_RETURN_IF_ERROR(CudaError(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo"));
  int64_t budget = options.memory_budget_bytes;
  if (budget == 0) budget = std::max<int64_t>(static_cast<int64_t>(free_b) - (int64_t{1} << 30), int64_t{256} << 20);
  if (budget > static_cast<int64_t>(free_b))
    return absl::InvalidArgumentError(absl::StrCat("memory_budget_bytes: ", budget, " exceeds the ", free_b,
                                                   " bytes free on cuda:", options.device));
  if (options.pinned_activation_bytes < 0)
    return absl::InvalidArgumentError(absl::StrCat("pinned_activation_bytes: ", options.pinned_activation_bytes, " < 0"));
  if (options.min_hold_bytes < 0)
    return absl::InvalidArgumentError(absl::StrCat("min_hold_bytes: ", options.min_hold_bytes, " < 0"));
  InstallPinnedActivations(options.pinned_activation_bytes);
  cudaStream_t stream = nullptr;
  FM_RETURN_IF_ERROR(CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  return std::unique_ptr<Backend>(new CudaBackendImpl(options.device, stream, budget, options.exact,
                                                       options.fp8_tensor_cores, options.kv_reserve_bytes,
                                                       options.min_hold_bytes, options.held_in_place));
}

HeldTraffic HeldTrafficOf(const Backend& backend) {
  const auto* impl = dynamic_cast<const internal::CudaBackendImpl*>(&backend);
  return impl ? impl->Traffic() : HeldTraffic{};
}

int64_t DevicePoolStepsOf(const Backend& backend) {
  const auto* impl = dynamic_cast<const internal::CudaBackendImpl*>(&backend);
  return impl ? impl->DevicePoolSteps() : 0;
}

}  // namespace flashmem::kernels::cuda
