// The CUDA backend's class, internal to kernels/cuda: NewCudaBackend (cuda_backend.h) makes one.
// Its members are defined in three files: cuda_backend.cu (staging and transfers, resident
// weights, norms, RoPE, mHC), backend_linear.cu (Linear and the routed experts) and
// backend_attention.cu (sparse attention, the KV reserve, index scores, top-k).
#pragma once

#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <span>
#include <limits>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/host_gather.h"
#include "kernels/cuda/op_phases.h"
#include "kernels/activation_pool.h"
#include "kernels/kv_reserve.h"

namespace flashmem::kernels::cuda::internal {

inline absl::Status CudaError(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("CUDA ", what, ": ", cudaGetErrorString(e)));
}

#define FM_CUDA_TRY(expr, what)                           \
  do {                                                    \
    absl::Status fm_st_ = CudaError((expr), what);        \
    if (!fm_st_.ok()) return fm_st_;                      \
  } while (0)

constexpr size_t kAlign = 256;
// Fast mode runs an FP8 Linear of this many rows or more on the bf16 tensor cores (dequantized
// weight): kernel_bench on the H200, 4096 x 4096, GEMV against tensor cores + activation quant:
// 4 rows 50.9 / 26.7 µs, 8 rows 85.3 / 25.0 µs, 16 rows 19.3 + 7 µs; at 1 and 2 rows cuBLASLt
// finds no algorithm and the GEMV (24.2, 32.6 µs) is the only path.
constexpr int64_t kTensorCoreMinRows = 4;
// The most rows of one FP4 expert that RoutedExperts runs in its grouped launch (each 8 rows one
// more pass over the expert's weights; past this, one launch per matrix costs less).
constexpr int64_t kGroupedFp4Rows = 64;
inline size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
// A held buffer's device twin: its bytes and an alignment unit more, so a kernel that reads an array
// in place with vector loads past its end (as it may in the staging buffer's padding) stays inside.
inline size_t TwinBytes(size_t bytes) { return AlignUp(bytes) + kAlign; }

// The arrays of one op: inputs copied up in one transfer, device-only scratch, outputs copied back.
// An input or output wholly inside a held buffer (Backend::HoldOnDevice) may instead be read or
// written in place in the buffer's device twin (RunLocked decides, Dev::at resolves): so a kernel
// must not write an input it was not asked to download into, nor write past an output's bytes.
class Frame {
 public:
  size_t In(const void* src, size_t bytes) {
    const size_t off = in_end_;
    ins_.push_back({src, off, bytes, false});
    in_end_ = AlignUp(in_end_ + bytes);
    return off;
  }
  // An input the kernels read as the continuation of the previous one's array (the rows of a
  // batch's queries, each its own host slice, one array on the device): read in place only if the
  // whole array is, with the frame's layout.
  size_t InContinued(const void* src, size_t bytes) {
    const size_t off = In(src, bytes);
    if (ins_.size() > 1) ins_.back().continues = true;
    return off;
  }
  // Scratch and outputs live after every input; offsets are relative to the scratch start and
  // resolved by Base() once all inputs are known.
  size_t Scratch(size_t bytes) {
    const size_t off = scratch_end_;
    scratch_end_ = AlignUp(scratch_end_ + bytes);
    scratch_.push_back({off, bytes});
    return kScratchTag | off;
  }
  void Download(size_t off, void* dst, size_t bytes) { outs_.push_back({dst, off, bytes}); }
  size_t Resolve(size_t off) const { return (off & kScratchTag) ? in_end_ + (off & ~kScratchTag) : off; }
  // An op without outputs whose results reach the host later by its own copies (WriteRecords'
  // write-backs): it need not wait for its kernels either.
  void DeliverLater() { deliver_later_ = true; }
  bool delivers_later() const { return deliver_later_; }
  size_t total() const { return in_end_ + scratch_end_; }
  size_t in_bytes() const { return in_end_; }

  struct Copy {
    const void* host;
    size_t off, bytes;
    bool continues;  // InContinued
  };
  struct Back {
    void* host;
    size_t off, bytes;
  };
  struct Slot {  // a Scratch, offset resolved
    size_t off, bytes;
  };
  const std::vector<Copy>& ins() const { return ins_; }
  const std::vector<Back>& outs() const { return outs_; }
  std::vector<Slot> scratch() const {
    std::vector<Slot> v;
    for (const Slot& s : scratch_) v.push_back({in_end_ + s.off, s.bytes});
    return v;
  }

 private:
  static constexpr size_t kScratchTag = size_t{1} << 62;
  std::vector<Copy> ins_;
  std::vector<Back> outs_;
  std::vector<Slot> scratch_;  // offsets relative to the scratch start
  size_t in_end_ = 0, scratch_end_ = 0;
  bool deliver_later_ = false;
};

// Device pointers of a frame's arrays during a launch: in the staging buffer, or in place in a
// held buffer's twin for the ranges RunLocked redirected.
struct Dev {
  struct Redirect {
    size_t off, bytes;  // resolved frame range
    char* dev;          // where it lies instead
  };
  char* base;
  const Frame* frame;
  const std::vector<Redirect>* redirects = nullptr;
  template <typename T = float>
  T* at(size_t off) const {
    const size_t r = frame->Resolve(off);
    if (redirects)
      for (const Redirect& x : *redirects)
        if (r >= x.off && r < x.off + x.bytes) return reinterpret_cast<T*>(x.dev + (r - x.off));
    return reinterpret_cast<T*>(base + r);
  }
};

struct Resident {
  void* mem = nullptr;
  int64_t bytes = 0;
  uint64_t fingerprint = 0;
  uint64_t last_use = 0;
  DeviceWeight weight;
  bool watched = false;  // an ExpertTable points at it: freeing it bumps resident_epoch_
};

// A fingerprint of an array from its size and up to `samples` (<= 64) sampled values: a host
// buffer freed and reused at the same address by other data is noticed and uploaded again.
// Weights also carry an identity (WeightIdentity) and sample 8 values: each sample of a big
// weight is a cache and TLB miss (64 + 64 for values and scales took ~6.4 µs a weight, and a
// batch-1 step of flash-shape's 8 layers uses ~250 weights).
inline uint64_t Fingerprint(const float* p, size_t count, uint64_t seed, size_t samples = 64) {
  float sample[64];
  const size_t m = std::min<size_t>(std::min<size_t>(samples, 64), count);
  for (size_t i = 0; i < m; ++i) sample[i] = p[count <= m || m < 2 ? i : (i * (count - 1)) / (m - 1)];
  return XXH3_64bits_withSeed(sample, m * sizeof(float), seed ^ count);
}

class CudaBackendImpl final : public Backend {
 public:
  CudaBackendImpl(int device, cudaStream_t stream, int64_t budget, bool exact, bool fp8_tc, int64_t kv_reserve_bytes,
                  int64_t min_hold_bytes, bool held_in_place)
      : min_hold_bytes_(min_hold_bytes),
        device_(device),
        stream_(stream),
        budget_(budget),
        exact_(exact),
        fp8_tc_(!exact && fp8_tc),
        kv_reserve_bytes_(kv_reserve_bytes < 0 ? budget / 4 : kv_reserve_bytes) {
    // Diagnostics: FLASHMEM_CUDA_FAST_PATHS (comma list of gemv, lt, dense, attn, index, hc; default all) narrows
    // which fast-mode paths run, to tell which one moves a result.
    if (const char* p = std::getenv("FLASHMEM_CUDA_FAST_PATHS")) {
      const std::string s = p;
      fast_gemv_ = s.find("gemv") != std::string::npos;
      fast_lt_ = s.find("lt") != std::string::npos;
      fast_dense_ = s.find("dense") != std::string::npos;
      fast_attention_ = s.find("attn") != std::string::npos;
      fast_index_ = s.find("index") != std::string::npos;
      fast_hc_ = s.find("hc") != std::string::npos;
    }
    // Diagnostics: FLASHMEM_CUDA_FUSED=0 runs LinearGroups, LinearThen and the attention rows'
    // `then` as separate ops (the Backend defaults), to measure what running them together saves.
    if (const char* p = std::getenv("FLASHMEM_CUDA_FUSED")) fused_ = std::string(p) != "0";
    // FLASHMEM_CUDA_HOLD=0 ignores HoldOnDevice (every op moves its arrays over PCIe), to measure
    // what the held residual stream saves.
    if (const char* p = std::getenv("FLASHMEM_CUDA_HOLD")) hold_ = std::string(p) != "0";
    // FLASHMEM_CUDA_DEVICE_ROUTING=0 routes every MoE layer on the host (the logits come back), to
    // measure what routing on the device saves.
    if (const char* p = std::getenv("FLASHMEM_CUDA_DEVICE_ROUTING")) device_routing_ = std::string(p) != "0";
    // FLASHMEM_CUDA_PACKED_KEYS=0 keeps the indexer's keys as fp32 rows in the reserve (fast mode
    // reads their MXFP4 twins otherwise), to measure it.
    if (const char* p = std::getenv("FLASHMEM_CUDA_PACKED_KEYS")) packed_keys_ = std::string(p) != "0";
    // FLASHMEM_CUDA_DEVICE_RECORDS=0 sends the window's rows to the host to be encoded there (the
    // default WriteRecords), to measure what encoding them on the device saves.
    if (const char* p = std::getenv("FLASHMEM_CUDA_DEVICE_RECORDS")) device_records_ = std::string(p) != "0";
    // FLASHMEM_CUDA_DEVICE_POOLING=0 brings the compressors' projections back to pool them on the
    // host (the default PoolSteps), to measure what pooling on the device saves.
    if (const char* p = std::getenv("FLASHMEM_CUDA_DEVICE_POOLING")) device_pooling_ = std::string(p) != "0";
    // FLASHMEM_CUDA_ASYNC=0 makes every op wait for its kernels, as before ops on held buffers
    // returned at once.
    if (const char* p = std::getenv("FLASHMEM_CUDA_ASYNC")) async_ = std::string(p) != "0";
    // FLASHMEM_CUDA_IN_PLACE=0 copies held ranges between their twins and the staging buffer around
    // every op, as before the kernels read and wrote them in place (InPlaceLocked).
    in_place_ = held_in_place;
    if (const char* p = std::getenv("FLASHMEM_CUDA_IN_PLACE")) in_place_ = std::string(p) != "0";
    // FLASHMEM_CUDA_MIN_HOLD=BYTES overrides CudaBackendOptions::min_hold_bytes, to measure the
    // threshold (a value that is not a whole number >= 0 is ignored).
    if (const char* p = std::getenv("FLASHMEM_CUDA_MIN_HOLD")) {
      char* end = nullptr;
      const long long v = std::strtoll(p, &end, 10);
      if (end != p && *end == '\0' && v >= 0) min_hold_bytes_ = v;
    }
  }
  ~CudaBackendImpl() override {
    (void)cudaSetDevice(device_);
    (void)cudaStreamSynchronize(stream_);  // ops that returned without waiting
    if (staged_) (void)cudaEventDestroy(staged_);
    for (auto& [key, r] : resident_) (void)cudaFree(r.mem);
    for (const Held& h : held_) (void)cudaFree(h.dev);
    for (const auto& [bytes, mem] : spare_twins_) (void)cudaFree(mem);
    if (route_done_) (void)cudaFree(route_done_);
    for (const auto& [host, ring] : rings_) (void)cudaFree(ring.dev);
    for (DeviceReserve* r : {&records_, &keys_})
      if (r->dev) (void)cudaFree(r->dev);
    if (dev_) (void)cudaFree(dev_);
    if (host_) (void)cudaFreeHost(host_);
    if (writeback_) (void)cudaFreeHost(writeback_);
    (void)cudaStreamDestroy(stream_);
  }

  const char* name() const override { return exact_ ? "cuda" : (fp8_tc_ ? "cuda-fast-fp8" : "cuda-fast"); }

  absl::Status Health() const override;
  HeldTraffic Traffic() const {
    absl::MutexLock lock(&mu_);
    return traffic_;
  }

  absl::Status Prepare(const WeightMatrix& w) const override;

  void Linear(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out) const override;

  // x staged once; per group its columns gathered on the device, the group's Linear (the path
  // LinearLocked takes, so the same values), its rows placed in y's columns; y back once.
  void LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y, Rounding out) const override;

  // y's ops run on the device before y comes back: one round trip instead of one per op.
  void LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                  std::span<const RowOp> then) const override;

  // x staged once, every job's Linear (the path LinearLocked takes) and row ops in one frame: one
  // wait for the outputs that come back to the host, none when every output is held.
  void LinearMany(std::span<const LinearJob> jobs, const float* x, int64_t n) const override;

  // The head's logits stay on the device; only each row's pick comes back.
  void LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const override;

  void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) const override;

  void HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const override;

  void Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims, const float* cos,
            const float* sin, int64_t rows_per_angle, bool inverse) const override;

  void Fp8RoundTrip(float* x, int64_t n, int64_t block) const override { RoundTripOp(x, n, block, true); }
  void Fp4RoundTrip(float* x, int64_t n, int64_t block) const override { RoundTripOp(x, n, block, false); }

  void Hadamard(float* x, int64_t rows, int64_t dim) const override;

  void SparseAttention(const float* q, int64_t heads, int64_t dim, std::span<const float* const> kv_rows,
                       const float* sink, float softmax_scale, float* out) const override;

  // The records as the worker holds them (584 B an entry against 2,048 for an fp32 row) staged
  // into one page of `valid` entries — data, then scales: the paged layout — and attended in
  // place: exact mode by the paged kernel that runs SparseAttention's numerics (bit for bit the
  // same result); fast mode, where the heads fill the warpgroup MMA's 64 rows, by the tensor-core
  // kernel (sums reordered, within bf16 rounding; splits of the slots fill the SMs). Slots of
  // another shape, or fp32 rows (a stream that fell back), take the decoding default.
  void SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims,
                              std::span<const KvSlot> slots, const float* sink, float softmax_scale,
                              float* out) const override;

  // Every row's records staged into one page (data, then scales: the paged layout), the rows'
  // slot lists padded to the longest with masked slots, and one launch for the batch.
  void SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim, int64_t rope_dims,
                           const float* sink, float softmax_scale) const override;

  void IndexScores(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                   float* scores) const override;

  KvReserveStats ReserveStats() const override;

  // Every row in one launch when all keys can come from the reserve; else row by row.
  void IndexScoresBatch(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim) const override {
    if (!ScoreFromReserve(rows, heads, dim)) Backend::IndexScoresBatch(rows, heads, dim);
  }

  // Fast mode scores key runs on the tensor cores (kernels/cuda/index_scores_mma.cu) for the head
  // counts and dims its kernel takes.
  bool IndexScoresOnTensorCores(int64_t heads, int64_t dim) const {
    return !exact_ && fast_index_ && cuda::IndexScoresMmaSupports(heads, dim);
  }

  // Fast mode: scores and top-k in one round trip (ScoreFromReserve with a ListSelect) when every
  // list has k or more entries and the keys come from the reserve; otherwise the two ops.
  std::vector<std::vector<int32_t>> IndexTopKBatch(std::span<const IndexSelectRow> rows, int64_t heads, int64_t dim,
                                                   int64_t k) const override;

  // Rows of equal length k or more, padded with -inf to the longest (a pad ranks after every
  // score, -inf ones included, since ties go to the lower index): one radix select for all of
  // them, once the batch has kTopKMinKeys scores. Otherwise row by row.
  std::vector<std::vector<int32_t>> TopKBatch(std::span<const std::span<const float>> scores,
                                              int64_t k) const override;

  // Radix select on the device (cuda::TopK): the same list as the host's heap select. Below
  // kTopKMinKeys keys the op's fixed cost (staging round trip plus ~30 µs of kernel) is about
  // the host's own time — an estimate from kernel_bench, not a measured crossover — and past
  // kTopKMaxK winners one block cannot sort them: both stay on the host.
  static constexpr int64_t kTopKMinKeys = 4096;
  std::vector<int32_t> TopK(std::span<const float> scores, int64_t k) const override;

  void IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                     float* logits) const override;

  void HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc, int64_t dim,
             int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb) const override;

  // The row ops (the sublayer's RMSNorm) on y before it comes back.
  void HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                 int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb,
                 std::span<const RowOp> then) const override;
  // The chain in one call (one staging frame, one wait).
  void RowOps(float* x, int64_t values, std::span<const RowOp> ops) const override;

  void HcPost(const float* fx, const float* residual, const float* post, const float* comb, int64_t n, int hc,
              int64_t dim, float* out) const override;

  void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc, int64_t dim,
              float norm_eps, float hc_eps, float* y) const override;

  void RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim, float swiglu_limit,
                     float* y) const override;

  // Fast mode, one rank holding every expert, up to kGroupedFp4Rows tokens: routed and grouped on
  // the device (backend_moe.cu) — the picks and weights as the host's, the sum bit for bit the
  // host-routed RoutedExperts' given the same picks. Otherwise (or FLASHMEM_CUDA_DEVICE_ROUTING=0)
  // the default: the logits come back and the host routes.
  void RoutedMoE(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit, float* y,
                 int32_t* ids, float* weights) const override;

  void RoundBf16(const float* x, int64_t n, float* y) const override;

  // Records encoded where the rows are (cuda::EncodeFp8Records: the host encoder's bytes), into
  // the reserve's copy of each page (placed as the call's write: no patch from the host) and into
  // a page-locked write-back buffer that reaches the host pages at the next op that waits, or at
  // FinishWrites (backend_records.cu). FLASHMEM_CUDA_DEVICE_RECORDS=0 takes the default.
  void WriteRecords(std::span<const RecordWrite> writes, int64_t dim, int64_t rope_dims) const override;
  // The steps run where the projections are held (cuda::PoolSteps: the host's bits), on the
  // backend's copies of the rings (kept while their versions match), the rows written into each
  // ring sent to the host ring like WriteRecords' records (backend_pooling.cu). Otherwise, or
  // FLASHMEM_CUDA_DEVICE_POOLING=0, the default on the host.
  void PoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) const override;
  int64_t DevicePoolSteps() const {
    absl::MutexLock lock(&mu_);
    return device_pool_steps_;
  }
  void FinishWrites() const override;
  int64_t DeviceWaits() const override {
    absl::MutexLock lock(&mu_);
    return waits_;
  }

  // Held buffers (Backend::HoldOnDevice) live in device twins: RunLocked reads an op's input from
  // the twin when the twin is current and writes an output wholly inside a held buffer to it,
  // device to device, instead of over PCIe. Honoured by every op's staged inputs and outputs;
  // an op's host-side work reads the host buffer, so hold only what goes to staged ops (the
  // model's op-to-op activations: docs/architecture.md, "Held buffers"). The Backend defaults
  // this backend falls back to that read an input on the host (LinearGroups without
  // FLASHMEM_CUDA_FUSED) bring it back first (SyncForHost).
  void HoldOnDevice(float* p, int64_t count) const override;
  void SyncToHost(float* p) const override;
  void ReleaseFromDevice(float* p, bool keep) const override;

 private:
  struct Held {
    char* host = nullptr;
    size_t bytes = 0;
    char* dev = nullptr;         // the twin
    bool host_current = true;    // p's memory holds the latest values
    bool dev_current = false;    // the twin does
    bool Contains(const char* p, size_t n) const { return p >= host && p + n <= host + bytes; }
    bool Overlaps(const char* p, size_t n) const { return p < host + bytes && host < p + n; }
  };
  // The held buffer [p, p + bytes) lies wholly inside, or nullptr.
  Held* HeldContaining(const void* p, size_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Brings every held buffer that [p, p + bytes) overlaps without lying inside back to the host;
  // `written`: the range is about to be written on the host side, so their twins go stale.
  absl::Status SyncCrossingLocked(const void* p, size_t bytes, bool written) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status SyncHeldLocked(Held& h) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropHeldLocked(size_t i) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The frame ranges an op's kernels read or write in place in held buffers' twins (see the
  // definition for the rules); in_place / out_place mark the inputs and outputs they cover.
  std::vector<Dev::Redirect> InPlaceLocked(const Frame& f, std::span<Held* const> in_held,
                                           std::span<Held* const> out_held, std::vector<char>* in_place,
                                           std::vector<char>* out_place) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Before host code reads [p, p + bytes): every held buffer it overlaps comes back to the host.
  void SyncForHost(const void* p, size_t bytes) const;

  void Fail(const absl::Status& st) const {
    if (!st.ok() && health_.ok()) health_ = st;
  }

  using LaunchFn = std::function<cudaError_t(Dev)>;
  using FillFn = std::function<void(char*)>;

  // The KV reserve: device copies of the pages slots name (KvSlot::page), one array of page slots
  // for the main KV's records and one for the indexer's keys (fast mode: their MXFP4 twins,
  // KeyRun::packed, 4,352 bytes a page; else fp32 rows, 32 KB a page), each half of the reserve's
  // budget, allocated on first use from the budget not in use then (weights are never evicted
  // for it). A call Places its pages; those the reserve lacks — new, or written since their copy —
  // are gathered into the pinned buffer, go up with the op's inputs and are scattered into their
  // slots by one kernel before the op's kernel reads the reserve in place.
  struct DeviceReserve {
    KvReserve book;
    uint8_t* dev = nullptr;
    bool tried = false;
  };

  // The reserve for pages of `page_bytes`; false when there is none (turned off, too little
  // budget left, the allocation failed) or it holds pages of another size.
  bool ReserveLocked(DeviceReserve& r, int64_t page_bytes, int64_t page_entries) const;

  // The uploads and patches a book planned, as a frame's inputs (their slots; the patches'
  // offsets and sizes) and its first scratch (their bytes, filled on the host: the whole pages,
  // then the patches each at a 16-byte boundary): staged before any other Scratch of the frame.
  struct Uploads {
    std::vector<const uint8_t*> src;
    std::vector<int32_t> slot;
    std::vector<const uint8_t*> patch_src;      // the changed bytes in the host page
    std::vector<int64_t> patch_from, patch_to;  // bytes within the staged area; within the reserve
    std::vector<int32_t> patch_bytes;
    int64_t patch_area = 0;  // bytes
    size_t dslot = 0, dup = 0, dfrom = 0, dto = 0, dbytes = 0;
    int64_t staged_bytes(int64_t page_bytes) const {
      return static_cast<int64_t>(src.size()) * page_bytes + patch_area;
    }
  };
  static Uploads StageUploads(const DeviceReserve& r, Frame& f);

  // An op over reserve pages: the planned pages up with the inputs and into their slots, then
  // `op`. On failure the plan is forgotten (its copies may not have landed).
  absl::Status RunWithUploadsLocked(DeviceReserve& r, const Frame& f, const Uploads& u, const LaunchFn& op) const;

  // Whether entries [entry, entry + count) of `page` can be read from a reserve of pages of
  // `entry_bytes` an entry: in memory, in range, and of the one page size of this op
  // (`page_entries`, taken from its first page).
  static bool ReservablePage(const KvPage* page, int64_t entry, int64_t count, int64_t entry_bytes,
                             int64_t* page_entries);

  // The arrays of an attention over paged records, in a frame the staging and the reserve paths
  // share: every row's queries, the entry numbers idx [rows, n] and the sink as inputs; after the
  // caller's first scratch (the pages it fills, AttentionInputs then that then AttentionOutputs),
  // the outputs — each row's copied back to its `out` — and the tensor-core workspace.
  struct AttentionArrays {
    size_t dq = 0, di = 0, dsink = 0, dout = 0, dws = 0;
  };
  static AttentionArrays AttentionInputs(Frame& f, std::span<const AttentionRow> rows, int64_t heads,
                                         const std::vector<int32_t>& idx, const float* sink);
  void AttentionOutputs(Frame& f, std::span<const AttentionRow> rows, int64_t heads, int64_t n,
                        AttentionArrays* a) const;
  // Fast mode: the tensor-core kernels (the warpgroup MMA's for whole groups of 64 heads, the
  // few-heads kernel for a tensor-parallel shard's).
  bool TensorCoreAttention(int64_t /*heads*/) const { return !exact_ && fast_attention_; }
  // The paged kernel over `pages` (page_entries records a page) for the frame's rows.
  cudaError_t AttentionKernel(Dev d, const AttentionArrays& a, int64_t b, int64_t heads, const uint8_t* pages,
                              int64_t page_entries, int64_t n, float softmax_scale) const;

  // Attention over the records reserve (records only, each naming its page; the caller checked
  // the shapes), one launch for every row. False (nothing done) when a slot has no page, there
  // is no reserve, or this call's pages do not fit in it: the caller stages.
  bool AttendFromReserve(std::span<const AttentionRow> rows, int64_t heads, const float* sink,
                         float softmax_scale) const;

  // Every row's keys from the keys reserve, scored in one launch; false (nothing done) when a run
  // has no rows or names no page of entries x dim floats, or they do not fit: the caller stages.
  // Host work and upload are per run (a page's keys), not per key: the kernel's per-key index
  // arrays are expanded on the device (at a batch of 64 and 64K tokens, 1M keys: 8 MB of them).
  //
  // With `select` (fast mode only: the tensor-core kernel writes each run where its keys sit),
  // the scores land in lists of select->length a row, -inf where no run is, and the radix select
  // picks each list's top k on the device: only the picks come back (and the lists rows ask for),
  // not every score to be sent up again for top-k.
  struct ListSelect {
    std::span<const IndexSelectRow> rows;
    int64_t length = 0;  // the longest list; shorter ones are padded with -inf
    int64_t k = 0;
    std::vector<int32_t>* picked = nullptr;  // [rows, k]
  };
  bool ScoreFromReserve(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim,
                        const ListSelect* select = nullptr) const;

  void Launch(const Frame& f, const LaunchFn& launch, const FillFn& fill = nullptr, size_t fill_bytes = 0) const;

  // Inputs (and the first `fill_bytes` of scratch, written by `fill` straight into the pinned
  // buffer) up in one copy, launch, outputs back, sync.
  absl::Status RunLocked(const Frame& f, const LaunchFn& launch, const FillFn& fill = nullptr,
                         size_t fill_bytes = 0) const;

  // Makes room for `bytes` more within the budget, evicting the least recently used residents.
  absl::Status Reserve(int64_t bytes, const char* what) const;

  absl::StatusOr<Resident*> Upload(const void* key, uint64_t fp, const void* const* parts, const size_t* sizes,
                                   int nparts, const char* what) const;

  absl::StatusOr<const DeviceWeight*> WeightOnDevice(const WeightMatrix& w) const;

  absl::StatusOr<const float*> ArrayOnDevice(const float* p, size_t count) const;

  absl::Status LinearManyLocked(std::span<const LinearJob> jobs, const float* x, int64_t n) const;
  absl::Status LinearLocked(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                            std::span<const RowOp> then) const;

  absl::Status LinearArgmaxLocked(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const;

  absl::Status LinearGroupsLocked(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y,
                                  Rounding out) const;

  // RowOps on a frame's device array: their angle arrays (RoPE) as the frame's inputs, checked.
  struct RowOpInputs {
    std::vector<size_t> cos, sin;  // per op; RoPE only
    std::vector<size_t> weight;    // per op; RmsNorm only
  };
  // `field`: the ops' name in the caller's API, for the errors ("then", "ops").
  static absl::StatusOr<RowOpInputs> StageRowOps(Frame& f, std::span<const RowOp> ops, int64_t values,
                                                 const char* field = "then");
  cudaError_t EnqueueRowOps(Dev d, float* y, int64_t values, std::span<const RowOp> ops, const RowOpInputs& in) const;

  // The attention rows' `then` on the frame's outputs (AttentionOutputs: [rows, heads, 512] end to
  // end). Rows whose ops differ only in their angles — a decode step's — take one launch per op,
  // their angles sent end to end; otherwise each row's ops run on its own output.
  struct AttentionRowOps {
    bool merged = false;
    std::vector<RowOp> ops;                      // merged: the rows' ops, angles from `angles`
    std::vector<std::vector<float>> angles;      // merged: per op, cos then sin, row after row
    std::vector<RowOpInputs> inputs;             // merged: one; else one per row
  };
  static absl::StatusOr<AttentionRowOps> StageAttentionRowOps(Frame& f, std::span<const AttentionRow> rows,
                                                              int64_t heads);
  cudaError_t EnqueueAttentionRowOps(Dev d, const AttentionArrays& a, std::span<const AttentionRow> rows, int64_t heads,
                                     const AttentionRowOps& p) const;

  // Device scratch of one EnqueueLinear of up to `ld` rows against k inputs.
  struct LinearScratch {
    size_t qx, qs, qb, q8;
    struct Ptrs {
      float *qx, *qs;
      __nv_bfloat16* qb;
      uint8_t* q8;
    };
    Ptrs At(Dev d) const { return {d.at(qx), d.at(qs), d.at<__nv_bfloat16>(qb), d.at<uint8_t>(q8)}; }
  };
  static LinearScratch AddLinearScratch(Frame& f, int64_t ld, int64_t k) {
    return {f.Scratch(ld * k * 4), f.Scratch(ld * (k / 128 + 1) * 4), f.Scratch(ld * k * 2), f.Scratch(ld * k)};
  }

  // Fast mode runs a dense weight whose values are all bf16 on cuBLASLt's bf16 GEMM (x rounded to
  // bf16: the model's inputs to them, RMSNorm outputs and attention outputs, are bf16 already;
  // fp32 sums in another order): a big one (the head, wo_a's groups) always — below
  // kTensorCoreMinRows rows on cuda::DenseGemv (DenseGemvRuns) — a small one (the router, the
  // compressors' projections, the indexer's head weights) from kTensorCoreMinRows rows — the
  // exact kernel walks k in the CPU's order and took ~255 µs at 64 rows on the H200.
  bool DenseOnTensorCores(const DeviceWeight& w, int64_t n) const;
  // The rows EnqueueLinear may write for n tokens: ld = n rounded up to 4 where a cuBLASLt path may
  // run (it multiplies the padded rows), n where only the GEMV or the exact kernel can. The output
  // slot is sized by it, so a held output can be written in place when nothing past n is written.
  int64_t LinearRowsWritten(const DeviceWeight& w, int64_t n) const {
    const int64_t ld = (n + 3) / 4 * 4;
    return (!exact_ && n >= kTensorCoreMinRows) || (DenseOnTensorCores(w, n) && !DenseGemvRuns(w, n)) ? ld : n;
  }
  // A dense weight DenseOnTensorCores sends to cuBLASLt below its 4-row minimum (the head, wo_a's
  // groups at batch 1-3) runs cuda::DenseGemv instead: the same bf16 operands, n rows, one launch
  // for all of a LinearGroups' groups.
  bool DenseGemvRuns(const DeviceWeight& w, int64_t n) const {
    return n < kTensorCoreMinRows && DenseOnTensorCores(w, n) && cuda::DenseGemvSupports(w.cols, w.cols);
  }
  // y = x · wᵀ for weights w of one shape, each on its k columns of x's rows (G · k a row) into its
  // m of y's (G · m): x to bf16 in xb (n · G · k values), then one cuda::DenseGemv launch.
  cudaError_t EnqueueDenseGemv(std::span<const DeviceWeight* const> w, const float* x, int64_t n, __nv_bfloat16* xb,
                               float* y, Rounding out) const;

  // y = x · wᵀ on the device (x: n rows; y: room for ld ≥ n rows, n · rows written), enqueued on
  // the stream; every Linear takes this path choice. Exact mode: the bit-exact kernel. Fast mode,
  // quantized weights with k % 128 == 0: from 4 tokens an FP8 weight runs on the bf16 tensor cores
  // on exactly dequantized operands (or, fast-fp8, cuBLASLt's FP8 tensor cores); otherwise the
  // decode GEMV. Dense bf16 weights: cuBLASLt bf16 where DenseOnTensorCores says so, else the exact
  // kernel. A shape cuBLASLt refuses falls through to the next.
  cudaError_t EnqueueLinear(const DeviceWeight& w, const float* x, int64_t n, int64_t ld, float* y, Rounding out,
                            const LinearScratch::Ptrs& s) const;

  // One expert's part of a routed-experts call: its work, its weights on the device, its rows and
  // its buffers in the staging frame.
  struct ExpertPlan {
    const ExpertWork* e;
    const DeviceWeight *w1, *w3, *w2;
    int64_t m, ld, inter;
    size_t rows, wts, xs, gate, up, h, out;
    bool weighted;
  };

  // The whole routed-expert layer in one staging round trip: x and y up once, every expert's
  // gather, w1/w3, SwiGLU, w2 and scatter-add on the device in expert order, y back.
  absl::Status RoutedExpertsLocked(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                                   float limit, float* y) const;

  // The grouped form of RoutedExpertsLocked (fast mode, decode-sized): the experts' rows laid end
  // to end, one gather, one act_quant, one grouped GEMV for w1 and w3, one SwiGLU, one act_quant,
  // one grouped GEMV for w2, then one scatter-add summing each token's rows in expert order (the
  // order of the fp32 sum).
  // `plans`: the non-empty experts, validated, weights on the device (RoutedExpertsLocked).
  absl::Status RoutedExpertsGroupedLocked(std::span<const ExpertPlan> plans, const float* x, int64_t n, int64_t dim,
                                          float limit, float* y, WeightFormat format) const;

  // The grouped experts' device arrays in a frame, for M rows (every expert's rows end to end):
  // the gathered tokens, their act_quant (qx, qs), w1's and w3's outputs, SwiGLU's, its act_quant,
  // w2's outputs.
  struct GroupedExpertArrays {
    size_t xs, qx, qs, g, u, h, qh, qhs, out;
  };
  static GroupedExpertArrays AddGroupedExpertArrays(Frame& f, int64_t M, int64_t dim, int64_t inter);
  // The shape of a grouped launch: M rows of n tokens; `groups` groups a matrix in the table (w1's
  // and w3's, then w2's); tile_n sizes the token tiles (LinearDecodeGrouped's max_n).
  struct GroupedLaunch {
    int64_t M, n, groups, dim, inter, tile_n;
    bool fp8;
    cuda::GemvInputs up_in, down_in;
    float limit;
  };
  // The grouped experts once their rows are grouped (rows and their weights [M], each token's
  // places offsets / order, the table [3][groups]): the rows of x gathered, act_quant, every w1 and
  // w3 in one launch, SwiGLU, act_quant, every w2, the ordered scatter-add into y.
  cudaError_t EnqueueGroupedExperts(Dev d, const GroupedExpertArrays& a, const GroupedLaunch& l, const float* x,
                                    const int32_t* rows, const float* row_weights, const int32_t* offsets,
                                    const int32_t* order, const cuda::GemvGroup* tab, float* y) const;

  // A routed layer's experts as the device routing reads them: every local expert's w1, w3 and w2
  // as grouped-GEMV groups (cuda::ExpertGroupLayout::templates), on the device. Built once a
  // layer, kept while none of the device copies it points at (Resident::watched) has been freed
  // (resident_epoch_) and its
  // matrices are the same ones; a use marks their copies used, as WeightOnDevice would.
  struct ExpertTable {
    std::vector<const WeightMatrix*> mats;  // [3][experts]: w1, w3, w2
    std::vector<uint64_t> identities;       // theirs when built
    std::vector<Resident*> residents;       // their device copies
    std::vector<cuda::GemvGroup> templates;
    Resident* dev = nullptr;                // the templates' device copy
    uint64_t epoch = 0;
    WeightFormat format = WeightFormat::kDense;
    int64_t inter = 0;
    bool scale_bytes = false;
    bool routable = false;  // one format, intermediate size and scale form: one grouped launch takes them
  };
  absl::StatusOr<const ExpertTable*> ExpertTableLocked(const MoeRouter& r) const;
  // The device routing (RoutedMoE); false, nothing done, when the shape is not one it takes.
  absl::StatusOr<bool> RoutedMoELocked(const MoeRouter& r, const float* x, int64_t n, int64_t dim, float limit,
                                       float* y, int32_t* ids, float* weights) const;

  // A bf16-rounded Linear on device arrays (the path LinearLocked would take): x [m][k], y with
  // room for ld >= m rows (the tensor-core path writes ld); qx/qs/qb quantization scratch.
  void RoundTripOp(float* x, int64_t n, int64_t block, bool fp8) const;

  // WriteRecords' records on their way to the host pages: each write's record, flag and (off the
  // grid) row in the page-locked write-back buffer, copied there by the stream.
  struct PendingRecord {
    RecordSink* sink;
    int64_t index;
    uint8_t *data, *scales;  // in the host page
    size_t record, flag, row;  // offsets in the write-back buffer
  };
  // PoolSteps' rows on their way to the host rings: each step's kv row and scores (at `at` in the
  // write-back buffer) into its ring's `slot`, then (shift) the block's rows moved to the previous
  // block's, as the host's step does.
  struct PendingRing {
    float *kv, *score;
    int64_t slot, width, ratio;
    bool shift;
    size_t at;
  };
  // The device's copy of a host ring (PoolRing): its kv rows then its scores, trusted while
  // `version` is the host ring's.
  struct DeviceRing {
    float* dev = nullptr;
    size_t bytes = 0;
    uint64_t version = 0;
    uint64_t last_use = 0;
  };
  // PoolSteps on the device; false (nothing done) when the call is not one it runs there.
  absl::StatusOr<bool> PoolOnDeviceLocked(std::span<const PoolStep> steps, const PoolShape& shape) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A device buffer of `bytes` for a ring, within the rings' share of the budget: an evicted ring's
  // (least recently used, not used since `since`), or a new one; null when there is no room.
  float* RingBufferLocked(size_t bytes, uint64_t since) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `area` bytes of the page-locked write-back buffer for an op's results on their way to the host
  // (their offset in *at): when full, the pending ones are applied first (a wait) and the buffer
  // grows, so a step's write-backs soon fit without one.
  absl::Status WritebackAreaLocked(size_t area, size_t* at) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waits for the stream if anything is pending, then applies it (ApplyWritesLocked).
  absl::Status FlushWritesLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The pending records into their host pages (the stream has passed their copies): records on
  // the grid copied in, then rows off it through their sinks' WriteOnHost.
  void ApplyWritesLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the host bytes a reserve's planned uploads and patches read include a page with a
  // pending record (then FlushWritesLocked first).
  bool UploadsReadPendingLocked(const DeviceReserve& r) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void KeyScoring(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                  float* out, bool logits) const;

  int64_t min_hold_bytes_;  // CudaBackendOptions::min_hold_bytes (FLASHMEM_CUDA_MIN_HOLD)
  const int device_;
  const cudaStream_t stream_;
  const int64_t budget_;
  const bool exact_;
  const bool fp8_tc_;  // fast-fp8: FP8 tensor cores from 16 tokens (else bf16 ones on dequantized weights)
  const int64_t kv_reserve_bytes_;
  bool fast_gemv_ = true, fast_lt_ = true, fast_dense_ = true, fast_attention_ = true, fast_index_ = true, fast_hc_ = true,
       fused_ = true;
  mutable LtContext lt_;
  mutable absl::Mutex mu_;
  mutable absl::Status health_;
  mutable void* dev_ = nullptr;   // staging, device side
  mutable void* host_ = nullptr;  // staging, pinned host side
  mutable size_t capacity_ = 0;
  mutable int64_t used_ = 0;
  mutable uint64_t clock_ = 0;
  mutable uint64_t op_clock_ = 1;  // clock_ at the start of the op in progress
  mutable absl::node_hash_map<const void*, Resident> resident_;  // node map: stable pointers
  mutable uint64_t resident_epoch_ = 0;  // bumped whenever a watched resident is freed (ExpertTable's check)
  mutable unsigned* route_done_ = nullptr;  // cuda::RouteAndGroup's counter (4 bytes, zeroed once)
  mutable absl::node_hash_map<const void*, ExpertTable> expert_tables_;  // by MoeRouter::experts.data()
  bool device_routing_ = true;  // FLASHMEM_CUDA_DEVICE_ROUTING
  bool packed_keys_ = true;     // FLASHMEM_CUDA_PACKED_KEYS
  mutable std::vector<Held> held_;                                 // a few: a step's op-to-op activations
  bool hold_ = true;                                               // FLASHMEM_CUDA_HOLD
  // An op whose every output is held returns without waiting for its kernels (RunLocked): its
  // uploads out of the staging buffer may then still be in flight, until `staged_` fires; the
  // next op that writes the staging buffer waits for it. FLASHMEM_CUDA_ASYNC=0: every op waits.
  bool async_ = true;
  bool in_place_ = true;  // CudaBackendOptions::held_in_place, FLASHMEM_CUDA_IN_PLACE
  mutable HeldTraffic traffic_ ABSL_GUARDED_BY(mu_);
  mutable cudaEvent_t staged_ = nullptr;
  mutable bool staging_in_flight_ = false;
  mutable std::vector<std::pair<size_t, char*>> spare_twins_;      // twins of released holds, reused
  mutable DeviceReserve records_, keys_;  // the KV reserve: main KV records, indexer keys
  bool device_records_ = true;            // FLASHMEM_CUDA_DEVICE_RECORDS
  mutable int64_t waits_ = 0;             // DeviceWaits: stream synchronizations
  mutable char* writeback_ = nullptr;     // page-locked: WriteRecords' results on their way
  mutable size_t writeback_capacity_ = 0, writeback_used_ = 0;
  mutable std::vector<PendingRecord> pending_records_;
  mutable absl::flat_hash_set<const uint8_t*> pending_pages_;  // KvPage::bytes of their pages
  mutable std::vector<PendingRing> pending_rings_;
  mutable absl::flat_hash_set<const float*> pending_ring_hosts_;  // their rings' kv arrays
  mutable absl::flat_hash_map<const float*, DeviceRing> rings_;  // by the host ring's kv array
  mutable int64_t ring_bytes_ = 0;          // device memory the rings hold (at most budget_ / 16)
  mutable int64_t device_pool_steps_ = 0;   // steps PoolSteps ran on the device
  bool device_pooling_ = true;              // FLASHMEM_CUDA_DEVICE_POOLING
  const std::unique_ptr<OpPhases> phases_ = OpPhases::FromEnv();  // FLASHMEM_CUDA_PHASES (diagnostics)
  mutable const std::type_info* phase_op_ = nullptr;  // the op a wrapping launch runs (RunWithUploadsLocked)
};

}  // namespace flashmem::kernels::cuda::internal
