#include "kernels/cuda/cuda_backend.h"

#include <cuda_runtime.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <functional>
#include <limits>
#include <vector>

#include "absl/container/node_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/host_gather.h"
#include "kernels/activation_pool.h"
#include "kernels/kv_reserve.h"

namespace flashmem::kernels::cuda {

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

namespace {

absl::Status CudaError(cudaError_t e, const char* what) {
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
size_t AlignUp(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// The arrays of one op: inputs copied up in one transfer, device-only scratch, outputs copied back.
class Frame {
 public:
  size_t In(const void* src, size_t bytes) {
    const size_t off = in_end_;
    ins_.push_back({src, off, bytes});
    in_end_ = AlignUp(in_end_ + bytes);
    return off;
  }
  // Scratch and outputs live after every input; offsets are relative to the scratch start and
  // resolved by Base() once all inputs are known.
  size_t Scratch(size_t bytes) {
    const size_t off = scratch_end_;
    scratch_end_ = AlignUp(scratch_end_ + bytes);
    return kScratchTag | off;
  }
  void Download(size_t off, void* dst, size_t bytes) { outs_.push_back({dst, off, bytes}); }
  size_t Resolve(size_t off) const { return (off & kScratchTag) ? in_end_ + (off & ~kScratchTag) : off; }
  size_t total() const { return in_end_ + scratch_end_; }
  size_t in_bytes() const { return in_end_; }

  struct Copy {
    const void* host;
    size_t off, bytes;
  };
  struct Back {
    void* host;
    size_t off, bytes;
  };
  const std::vector<Copy>& ins() const { return ins_; }
  const std::vector<Back>& outs() const { return outs_; }

 private:
  static constexpr size_t kScratchTag = size_t{1} << 62;
  std::vector<Copy> ins_;
  std::vector<Back> outs_;
  size_t in_end_ = 0, scratch_end_ = 0;
};

// Device pointers of a frame's arrays during a launch.
struct Dev {
  char* base;
  const Frame* frame;
  template <typename T = float>
  T* at(size_t off) const { return reinterpret_cast<T*>(base + frame->Resolve(off)); }
};

struct Resident {
  void* mem = nullptr;
  int64_t bytes = 0;
  uint64_t fingerprint = 0;
  uint64_t last_use = 0;
  DeviceWeight weight;
};

// A fingerprint of an array from its size and up to 64 sampled values: a host buffer freed and
// reused at the same address by other data is noticed and uploaded again.
uint64_t Fingerprint(const float* p, size_t count, uint64_t seed) {
  float sample[64];
  const size_t m = std::min<size_t>(64, count);
  for (size_t i = 0; i < m; ++i) sample[i] = p[count <= 64 ? i : (i * (count - 1)) / 63];
  return XXH3_64bits_withSeed(sample, m * sizeof(float), seed ^ count);
}

class CudaBackendImpl final : public Backend {
 public:
  CudaBackendImpl(int device, cudaStream_t stream, int64_t budget, bool exact, bool fp8_tc, int64_t kv_reserve_bytes)
      : device_(device),
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
  }
  ~CudaBackendImpl() override {
    (void)cudaSetDevice(device_);
    for (auto& [key, r] : resident_) (void)cudaFree(r.mem);
    for (DeviceReserve* r : {&records_, &keys_})
      if (r->dev) (void)cudaFree(r->dev);
    if (dev_) (void)cudaFree(dev_);
    if (host_) (void)cudaFreeHost(host_);
    (void)cudaStreamDestroy(stream_);
  }

  const char* name() const override { return exact_ ? "cuda" : (fp8_tc_ ? "cuda-fast-fp8" : "cuda-fast"); }

  absl::Status Health() const override {
    absl::MutexLock lock(&mu_);
    return health_;
  }

  absl::Status Prepare(const WeightMatrix& w) const override {
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return health_;
    op_clock_ = clock_ + 1;
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    return WeightOnDevice(w).status();
  }

  void Linear(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out) const override {
    absl::MutexLock lock(&mu_);
    op_clock_ = clock_ + 1;
    Fail(LinearLocked(w, x, n, y, out, {}));
  }

  // x staged once; per group its columns gathered on the device, the group's Linear (the path
  // LinearLocked takes, so the same values), its rows placed in y's columns; y back once.
  void LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y, Rounding out) const override {
    if (!fused_) return Backend::LinearGroups(w, x, n, y, out);
    absl::MutexLock lock(&mu_);
    op_clock_ = clock_ + 1;
    Fail(LinearGroupsLocked(w, x, n, y, out));
  }

  // y's ops run on the device before y comes back: one round trip instead of one per op.
  void LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                  std::span<const RowOp> then) const override {
    if (!fused_) return Backend::LinearThen(w, x, n, y, out, then);
    absl::MutexLock lock(&mu_);
    op_clock_ = clock_ + 1;
    Fail(LinearLocked(w, x, n, y, out, then));
  }

  // The head's logits stay on the device; only each row's pick comes back.
  void LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const override {
    absl::MutexLock lock(&mu_);
    op_clock_ = clock_ + 1;
    Fail(LinearArgmaxLocked(w, x, n, index));
  }

  void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) const override {
    Frame f;
    const size_t dx = f.In(x, n * dim * 4), dw = f.In(weight, dim * 4), dy = f.Scratch(n * dim * 4);
    f.Download(dy, y, n * dim * 4);
    Launch(f, [&](Dev d) { return cuda::RmsNorm(d.at(dx), d.at(dw), n, dim, eps, d.at(dy), stream_); });
  }

  void HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const override {
    Frame f;
    const size_t dq = f.In(q, heads * dim * 4);
    f.Download(dq, q, heads * dim * 4);
    Launch(f, [&](Dev d) { return cuda::HeadRmsNormBf16(d.at(dq), heads, dim, eps, stream_); });
  }

  void Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims, const float* cos,
            const float* sin, int64_t rows_per_angle, bool inverse) const override {
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

  void Fp8RoundTrip(float* x, int64_t n, int64_t block) const override { RoundTripOp(x, n, block, true); }
  void Fp4RoundTrip(float* x, int64_t n, int64_t block) const override { RoundTripOp(x, n, block, false); }

  void Hadamard(float* x, int64_t rows, int64_t dim) const override {
    Frame f;
    const size_t dx = f.In(x, rows * dim * 4);
    f.Download(dx, x, rows * dim * 4);
    Launch(f, [&](Dev d) { return cuda::Hadamard(d.at(dx), rows, dim, stream_); });
  }

  void SparseAttention(const float* q, int64_t heads, int64_t dim, std::span<const float* const> kv_rows,
                       const float* sink, float softmax_scale, float* out) const override {
    const int64_t n = static_cast<int64_t>(kv_rows.size());
    // Gather the candidate rows into one contiguous upload; null rows stay masked (-1).
    std::vector<int32_t> idx(n, -1);
    int64_t valid = 0;
    for (int64_t j = 0; j < n; ++j)
      if (kv_rows[j]) idx[j] = static_cast<int32_t>(valid++);
    Frame f;
    const size_t dq = f.In(q, heads * dim * 4), di = f.In(idx.data(), n * 4), dsink = f.In(sink, heads * 4);
    const size_t dkv = f.Scratch(valid * dim * 4), dout = f.Scratch(heads * dim * 4);
    f.Download(dout, out, heads * dim * 4);
    Launch(
        f,
        [&](Dev d) {
          return cuda::SparseAttention(d.at(dq), 1, heads, dim, d.at(dkv), d.at<int32_t>(di), n, d.at(dsink),
                                       softmax_scale, d.at(dout), stream_);
        },
        [&](char* host_scratch) {  // rows go straight into the pinned buffer
          GatherRows(kv_rows, dim, idx.data(), reinterpret_cast<float*>(host_scratch + f.Resolve(dkv) - f.in_bytes()),
                     /*zero_null=*/false);
        },
        valid * dim * 4);
  }

  // The records as the worker holds them (584 B an entry against 2,048 for an fp32 row) staged
  // into one page of `valid` entries — data, then scales: the paged layout — and attended in
  // place: exact mode by the paged kernel that runs SparseAttention's numerics (bit for bit the
  // same result); fast mode, where the heads fill the warpgroup MMA's 64 rows, by the tensor-core
  // kernel (sums reordered, within bf16 rounding; splits of the slots fill the SMs). Slots of
  // another shape, or fp32 rows (a stream that fell back), take the decoding default.
  void SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims,
                              std::span<const KvSlot> slots, const float* sink, float softmax_scale,
                              float* out) const override {
    const AttentionRow row{q, slots, out};
    SparseAttentionRows(std::span<const AttentionRow>(&row, 1), heads, dim, rope_dims, sink, softmax_scale);
  }

  // Every row's records staged into one page (data, then scales: the paged layout), the rows'
  // slot lists padded to the longest with masked slots, and one launch for the batch.
  void SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim, int64_t rope_dims,
                           const float* sink, float softmax_scale) const override {
    const bool records = dim == cuda::kRecordDim && rope_dims == cuda::kRecordRope &&
                         std::none_of(rows.begin(), rows.end(), [](const AttentionRow& r) {
                           return std::any_of(r.slots.begin(), r.slots.end(), [](const KvSlot& s) { return s.row != nullptr; });
                         });
    if (!records) {  // the decoding default, row by row (not Backend::SparseAttentionRows: it calls back here)
      for (const AttentionRow& r : rows) {
        Backend::SparseAttentionRecords(r.q, heads, dim, rope_dims, r.slots, sink, softmax_scale, r.out);
        ApplyRowOps(*this, r.out, heads * dim, r.then);
      }
      return;
    }
    const int64_t b = static_cast<int64_t>(rows.size());
    if (b == 0) return;
    if (!fused_ && std::any_of(rows.begin(), rows.end(), [](const AttentionRow& r) { return !r.then.empty(); })) {
      std::vector<AttentionRow> plain(rows.begin(), rows.end());
      for (AttentionRow& r : plain) r.then = {};
      SparseAttentionRows(plain, heads, dim, rope_dims, sink, softmax_scale);
      for (const AttentionRow& r : rows) ApplyRowOps(*this, r.out, heads * dim, r.then);
      return;
    }
    if (AttendFromReserve(rows, heads, sink, softmax_scale)) return;
    int64_t n = 1;  // a row with no slots attends the sink alone, as one with only masked slots
    for (const AttentionRow& r : rows) n = std::max<int64_t>(n, static_cast<int64_t>(r.slots.size()));
    std::vector<int32_t> idx(b * n, -1);
    std::vector<const uint8_t*> data(b * n, nullptr), scales(b * n, nullptr);  // the records, as idx
    int64_t valid = 0;
    for (int64_t i = 0; i < b; ++i)
      for (size_t j = 0; j < rows[i].slots.size(); ++j)
        if (const KvSlot& s = rows[i].slots[j]; s.record) {
          const int64_t at = i * n + static_cast<int64_t>(j);
          idx[at] = static_cast<int32_t>(valid++);
          data[at] = s.record;
          scales[at] = s.scales;
        }
    // One page of them; the tensor-core kernel reads the page in 16-byte pieces (an even count).
    const int64_t entries = std::max<int64_t>((valid + 1) / 2 * 2, 2);
    Frame f;
    AttentionArrays a = AttentionInputs(f, rows, heads, idx, sink);
    const size_t dpage = f.Scratch(entries * cuda::kRecordBytes);
    AttentionOutputs(f, rows, heads, n, &a);
    auto ops = StageAttentionRowOps(f, rows, heads);
    if (!ops.ok()) {
      absl::MutexLock lock(&mu_);
      return Fail(ops.status());
    }
    Launch(
        f,
        [&](Dev d) {
          const cudaError_t e = AttentionKernel(d, a, b, heads, d.at<uint8_t>(dpage), entries, n, softmax_scale);
          return e != cudaSuccess ? e : EnqueueAttentionRowOps(d, a, rows, heads, *ops);
        },
        [&](char* host_scratch) {  // records straight into the pinned buffer (over the host's cores)
          GatherRecords(data, scales, idx.data(), entries,
                        reinterpret_cast<uint8_t*>(host_scratch + f.Resolve(dpage) - f.in_bytes()));
        },
        entries * cuda::kRecordBytes);
  }

  void IndexScores(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                   float* scores) const override {
    KeyScoring(q, w, heads, dim, keys, scores, /*logits=*/false);
  }

  KvReserveStats ReserveStats() const override {
    absl::MutexLock lock(&mu_);
    auto kind = [](const DeviceReserve& r) {
      KvReserveStats::Kind k;
      if (!r.dev) return k;
      k.slots = r.book.slots();
      k.held = r.book.used();
      k.hits = r.book.hits();
      k.uploads = r.book.uploaded();
      k.bytes = r.book.slots() * r.book.page_bytes();
      return k;
    };
    return {kind(records_), kind(keys_)};
  }

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
                                                   int64_t k) const override {
    const int64_t b = static_cast<int64_t>(rows.size());
    int64_t length = 0, shortest = INT64_MAX;
    for (int64_t i = 0; i < b; ++i) {
      const IndexSelectRow& r = rows[i];
      length = std::max(length, r.length);
      shortest = std::min(shortest, r.length);
      bool inside = r.at.size() == r.keys.size();
      for (size_t j = 0; inside && j < r.keys.size(); ++j)
        inside = r.at[j] >= 0 && r.keys[j].count >= 0 && r.at[j] + r.keys[j].count <= r.length;
      if (!inside) {  // the kernel would write outside the row's list
        absl::MutexLock lock(&mu_);
        Fail(absl::InvalidArgumentError(absl::StrCat("IndexTopKBatch: rows[", i, "]: ", r.at.size(), " run starts for ",
                                                     r.keys.size(), " runs, or a run outside its list of ", r.length)));
        return std::vector<std::vector<int32_t>>(b);
      }
    }
    const bool fused = IndexScoresOnTensorCores(heads, dim) && b > 0 && k >= 1 &&
                       k <= cuda::kTopKMaxK && shortest >= k && b * length <= INT32_MAX;
    if (fused) {
      std::vector<IndexScoreRow> score_rows(b);
      for (int64_t i = 0; i < b; ++i) score_rows[i] = {rows[i].q, rows[i].w, rows[i].keys, nullptr};
      std::vector<int32_t> picked;
      const ListSelect select{rows, length, k, &picked};
      if (ScoreFromReserve(score_rows, heads, dim, &select)) {
        std::vector<std::vector<int32_t>> out(b);
        if (picked.size() != static_cast<size_t>(b * k)) return out;  // a failed backend did nothing
        for (int64_t i = 0; i < b; ++i) out[i].assign(picked.begin() + i * k, picked.begin() + (i + 1) * k);
        return out;
      }
    }
    return Backend::IndexTopKBatch(rows, heads, dim, k);
  }

  // Rows of equal length k or more, padded with -inf to the longest (a pad ranks after every
  // score, -inf ones included, since ties go to the lower index): one radix select for all of
  // them, once the batch has kTopKMinKeys scores. Otherwise row by row.
  std::vector<std::vector<int32_t>> TopKBatch(std::span<const std::span<const float>> scores,
                                              int64_t k) const override {
    const int64_t b = static_cast<int64_t>(scores.size());
    int64_t n_max = 0, n_min = INT64_MAX;
    for (std::span<const float> s : scores) {
      n_max = std::max<int64_t>(n_max, static_cast<int64_t>(s.size()));
      n_min = std::min<int64_t>(n_min, static_cast<int64_t>(s.size()));
    }
    if (b < 2 || k < 1 || k > cuda::kTopKMaxK || n_min < k || b * n_max < kTopKMinKeys)
      return Backend::TopKBatch(scores, k);
    std::vector<float> padded(b * n_max, -std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < b; ++i) std::copy(scores[i].begin(), scores[i].end(), padded.begin() + i * n_max);
    std::vector<int32_t> flat(b * k);
    Frame f;
    const size_t ds = f.In(padded.data(), padded.size() * 4), dout = f.Scratch(b * k * 4);
    f.Download(dout, flat.data(), b * k * 4);
    Launch(f, [&](Dev d) { return cuda::TopK(d.at(ds), b, n_max, k, d.at<int32_t>(dout), stream_); });
    std::vector<std::vector<int32_t>> out(b);
    for (int64_t i = 0; i < b; ++i) out[i].assign(flat.begin() + i * k, flat.begin() + (i + 1) * k);
    return out;
  }

  // Radix select on the device (cuda::TopK): the same list as the host's heap select. Below
  // kTopKMinKeys keys the op's fixed cost (staging round trip plus ~30 µs of kernel) is about
  // the host's own time — an estimate from kernel_bench, not a measured crossover — and past
  // kTopKMaxK winners one block cannot sort them: both stay on the host.
  static constexpr int64_t kTopKMinKeys = 4096;
  std::vector<int32_t> TopK(std::span<const float> scores, int64_t k) const override {
    const int64_t n = static_cast<int64_t>(scores.size());
    k = std::clamp<int64_t>(k, 0, n);
    if (n < kTopKMinKeys || k == 0 || k > cuda::kTopKMaxK) return TopKIndices(scores, k);
    std::vector<int32_t> out(k);
    Frame f;
    const size_t ds = f.In(scores.data(), n * 4), dout = f.Scratch(k * 4);
    f.Download(dout, out.data(), k * 4);
    Launch(f, [&](Dev d) { return cuda::TopK(d.at(ds), 1, n, k, d.at<int32_t>(dout), stream_); });
    return out;
  }

  void IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                     float* logits) const override {
    KeyScoring(q, w, heads, dim, keys, logits, /*logits=*/true);
  }

  void HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc, int64_t dim,
             int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb) const override {
    absl::MutexLock lock(&mu_);
    if (!health_.ok() || n == 0) return;
    op_clock_ = clock_ + 1;
    const int mix = (2 + hc) * hc;
    auto dfn = ArrayOnDevice(fn, static_cast<size_t>(mix) * hc * dim);
    if (!dfn.ok()) return Fail(dfn.status());
    Frame f;
    const size_t dx = f.In(x, n * hc * dim * 4), db = f.In(base, mix * 4), ds = f.In(scale, 3 * 4);
    const size_t dy = f.Scratch(n * dim * 4), dp = f.Scratch(n * hc * 4), dc = f.Scratch(n * hc * hc * 4);
    // Fast mode: the mixes' sums split over blocks (one block per token, the exact kernel's, leaves
    // most SMs idle and waits on its loads).
    const int64_t splits = !exact_ && fast_hc_ ? cuda::HcPreFastSplits(n, hc, dim) : 0;
    const size_t dpart = f.Scratch(std::max<int64_t>(splits, 1) * n * (mix + 1) * 4);
    f.Download(dy, y, n * dim * 4);
    f.Download(dp, post, n * hc * 4);
    f.Download(dc, comb, n * hc * hc * 4);
    Fail(RunLocked(f, [&](Dev d) {
      if (splits > 0)
        return cuda::HcPreFast(d.at(dx), n, *dfn, d.at(db), d.at(ds), hc, dim, iters, norm_eps, hc_eps, d.at(dpart),
                               d.at(dy), d.at(dp), d.at(dc), stream_);
      return cuda::HcPre(d.at(dx), n, *dfn, d.at(db), d.at(ds), hc, dim, iters, norm_eps, hc_eps, d.at(dy), d.at(dp),
                         d.at(dc), stream_);
    }));
  }

  void HcPost(const float* fx, const float* residual, const float* post, const float* comb, int64_t n, int hc,
              int64_t dim, float* out) const override {
    if (n == 0) return;
    Frame f;
    const size_t df = f.In(fx, n * dim * 4), dr = f.In(residual, n * hc * dim * 4), dp = f.In(post, n * hc * 4),
                 dc = f.In(comb, n * hc * hc * 4), dout = f.Scratch(n * hc * dim * 4);
    f.Download(dout, out, n * hc * dim * 4);
    Launch(f, [&](Dev d) {
      return cuda::HcPost(d.at(df), d.at(dr), d.at(dp), d.at(dc), n, hc, dim, d.at(dout), stream_);
    });
  }

  void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc, int64_t dim,
              float norm_eps, float hc_eps, float* y) const override {
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

  void RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim, float swiglu_limit,
                     float* y) const override {
    absl::MutexLock lock(&mu_);
    if (!health_.ok() || n == 0 || experts.empty()) return;
    op_clock_ = clock_ + 1;
    Fail(RoutedExpertsLocked(experts, x, n, dim, swiglu_limit, y));
  }

 private:
  void Fail(const absl::Status& st) const {
    if (!st.ok() && health_.ok()) health_ = st;
  }

  using LaunchFn = std::function<cudaError_t(Dev)>;
  using FillFn = std::function<void(char*)>;

  // The KV reserve: device copies of the pages slots name (KvSlot::page), one array of page slots
  // for the main KV's records and one for the indexer's fp32 keys, each half of the reserve's
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
  bool ReserveLocked(DeviceReserve& r, int64_t page_bytes, int64_t page_entries) const {
    if (r.dev) return r.book.page_bytes() == page_bytes;
    if (r.tried) return false;
    r.tried = true;
    const int64_t bytes = std::min(kv_reserve_bytes_ / 2, budget_ - used_);
    // Entry numbers are int32 in the kernels.
    const int64_t slots = std::min<int64_t>(bytes / page_bytes, INT32_MAX / page_entries);
    if (slots < 2) return false;
    if (cudaMalloc(&r.dev, static_cast<size_t>(slots * page_bytes)) != cudaSuccess) {
      (void)cudaGetLastError();  // not sticky: the op stages instead
      r.dev = nullptr;
      return false;
    }
    used_ += slots * page_bytes;
    r.book = KvReserve(slots, page_bytes);
    return true;
  }

  // The uploads a book planned, as a frame's inputs (their slots) and its first scratch (their
  // bytes, filled on the host): staged before any other Scratch of the frame.
  struct Uploads {
    std::vector<const uint8_t*> src;
    std::vector<int32_t> slot;
    size_t dslot = 0, dup = 0;
  };
  static Uploads StageUploads(const DeviceReserve& r, Frame& f) {
    Uploads u;
    for (const KvReserve::Upload& p : r.book.uploads()) {
      u.src.push_back(p.bytes);
      u.slot.push_back(static_cast<int32_t>(p.slot));
    }
    u.dslot = f.In(u.slot.data(), u.slot.size() * 4);
    u.dup = f.Scratch(u.src.size() * r.book.page_bytes());
    return u;
  }

  // An op over reserve pages: the planned pages up with the inputs and into their slots, then
  // `op`. On failure the plan is forgotten (its copies may not have landed).
  absl::Status RunWithUploadsLocked(DeviceReserve& r, const Frame& f, const Uploads& u, const LaunchFn& op) const {
    const int64_t page_bytes = r.book.page_bytes(), ups = static_cast<int64_t>(u.src.size());
    const absl::Status st = RunLocked(
        f,
        [&](Dev d) {
          const cudaError_t e =
              cuda::ScatterPages(d.at<uint8_t>(u.dup), ups, page_bytes, d.at<int32_t>(u.dslot), r.dev, stream_);
          return e != cudaSuccess ? e : op(d);
        },
        [&](char* host_scratch) {
          GatherPagesHost(u.src, page_bytes, reinterpret_cast<uint8_t*>(host_scratch + f.Resolve(u.dup) - f.in_bytes()));
        },
        ups * page_bytes);
    if (!st.ok()) r.book.Abort();
    return st;
  }

  // Whether entries [entry, entry + count) of `page` can be read from a reserve of pages of
  // `entry_bytes` an entry: in memory, in range, and of the one page size of this op
  // (`page_entries`, taken from its first page).
  static bool ReservablePage(const KvPage* page, int64_t entry, int64_t count, int64_t entry_bytes,
                             int64_t* page_entries) {
    if (!page || !page->bytes || entry < 0 || count < 0 || entry + count > page->entries) return false;
    if (*page_entries == 0) *page_entries = page->entries;
    return page->entries == *page_entries && page->size == *page_entries * entry_bytes;
  }

  // The arrays of an attention over paged records, in a frame the staging and the reserve paths
  // share: every row's queries, the entry numbers idx [rows, n] and the sink as inputs; after the
  // caller's first scratch (the pages it fills, AttentionInputs then that then AttentionOutputs),
  // the outputs — each row's copied back to its `out` — and the tensor-core workspace.
  struct AttentionArrays {
    size_t dq = 0, di = 0, dsink = 0, dout = 0, dws = 0;
  };
  static AttentionArrays AttentionInputs(Frame& f, std::span<const AttentionRow> rows, int64_t heads,
                                         const std::vector<int32_t>& idx, const float* sink) {
    const int64_t row_bytes = heads * cuda::kRecordDim * 4;
    static_assert(cuda::kRecordDim * 4 % kAlign == 0, "q rows of one frame lie end to end");
    AttentionArrays a;
    a.dq = f.In(rows[0].q, row_bytes);
    for (size_t i = 1; i < rows.size(); ++i) f.In(rows[i].q, row_bytes);
    a.di = f.In(idx.data(), idx.size() * 4);
    a.dsink = f.In(sink, heads * 4);
    return a;
  }
  void AttentionOutputs(Frame& f, std::span<const AttentionRow> rows, int64_t heads, int64_t n,
                        AttentionArrays* a) const {
    const int64_t b = static_cast<int64_t>(rows.size()), row_bytes = heads * cuda::kRecordDim * 4;
    a->dout = f.Scratch(b * row_bytes);
    if (TensorCoreAttention(heads)) a->dws = f.Scratch(cuda::PagedSparseAttentionFp8FastWorkspace(b, heads, n));
    for (int64_t i = 0; i < b; ++i) f.Download(a->dout + i * row_bytes, rows[i].out, row_bytes);
  }
  // Fast mode, where the heads fill the warpgroup MMA's 64 rows: the tensor-core kernel.
  bool TensorCoreAttention(int64_t heads) const {
    return !exact_ && fast_attention_ && heads % cuda::kFastAttentionHeads == 0;
  }
  // The paged kernel over `pages` (page_entries records a page) for the frame's rows.
  cudaError_t AttentionKernel(Dev d, const AttentionArrays& a, int64_t b, int64_t heads, const uint8_t* pages,
                              int64_t page_entries, int64_t n, float softmax_scale) const {
    if (TensorCoreAttention(heads))
      return cuda::PagedSparseAttentionFp8Fast(d.at(a.dq), b, heads, pages, page_entries, d.at<int32_t>(a.di), n,
                                               d.at(a.dsink), softmax_scale, d.at(a.dout), d.at<void>(a.dws), stream_);
    return cuda::PagedSparseAttentionFp8(d.at(a.dq), b, heads, pages, page_entries, d.at<int32_t>(a.di), n,
                                         d.at(a.dsink), softmax_scale, d.at(a.dout), stream_);
  }

  // Attention over the records reserve (records only, each naming its page; the caller checked
  // the shapes), one launch for every row. False (nothing done) when a slot has no page, there
  // is no reserve, or this call's pages do not fit in it: the caller stages.
  bool AttendFromReserve(std::span<const AttentionRow> rows, int64_t heads, const float* sink,
                         float softmax_scale) const {
    int64_t page_entries = 0;
    const int64_t b = static_cast<int64_t>(rows.size());
    int64_t n = 1;
    for (const AttentionRow& r : rows) {
      n = std::max<int64_t>(n, static_cast<int64_t>(r.slots.size()));
      for (const KvSlot& s : r.slots)
        if (s.record && !ReservablePage(s.page, s.entry, 1, cuda::kRecordBytes, &page_entries)) return false;
    }
    if (page_entries == 0) return false;  // nothing but masked slots: the staging path is as cheap
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return true;  // a failed backend does nothing (as Launch)
    if (!ReserveLocked(records_, page_entries * cuda::kRecordBytes, page_entries)) return false;
    op_clock_ = clock_ + 1;
    std::vector<int32_t> idx(b * n, -1);
    records_.book.Begin();
    for (int64_t i = 0; i < b; ++i) {
      const KvPage* last = nullptr;  // the window's slots come a page at a time: placed once
      int64_t slot = -1;
      for (size_t j = 0; j < rows[i].slots.size(); ++j) {
        const KvSlot& s = rows[i].slots[j];
        if (!s.record) continue;
        if (s.page != last) {
          slot = records_.book.Place(*s.page);
          if (slot < 0) {
            records_.book.Abort();
            return false;
          }
          last = s.page;
        }
        idx[i * n + static_cast<int64_t>(j)] = static_cast<int32_t>(slot * page_entries + s.entry);
      }
    }
    Frame f;
    AttentionArrays a = AttentionInputs(f, rows, heads, idx, sink);
    const Uploads up = StageUploads(records_, f);
    AttentionOutputs(f, rows, heads, n, &a);
    auto ops = StageAttentionRowOps(f, rows, heads);
    if (!ops.ok()) {
      records_.book.Abort();
      Fail(ops.status());
      return true;
    }
    Fail(RunWithUploadsLocked(records_, f, up, [&](Dev d) {
      const cudaError_t e = AttentionKernel(d, a, b, heads, records_.dev, page_entries, n, softmax_scale);
      return e != cudaSuccess ? e : EnqueueAttentionRowOps(d, a, rows, heads, *ops);
    }));
    return true;
  }

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
                        const ListSelect* select = nullptr) const {
    int64_t n = 0, page_entries = 0;
    for (const IndexScoreRow& r : rows)
      for (const KeyRun& run : r.keys) {
        if (!run.rows || !ReservablePage(run.page, run.entry, run.count, dim * 4, &page_entries)) return false;
        n += run.count;
      }
    if (n == 0) return false;
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return true;
    if (!ReserveLocked(keys_, page_entries * dim * 4, page_entries)) return false;
    op_clock_ = clock_ + 1;
    std::vector<int32_t> first, query, start, count;  // per run
    keys_.book.Begin();
    int64_t k = 0;
    for (size_t i = 0; i < rows.size(); ++i)
      for (const KeyRun& run : rows[i].keys) {
        if (run.count == 0) continue;
        const int64_t slot = keys_.book.Place(*run.page);
        if (slot < 0) {
          keys_.book.Abort();
          return false;
        }
        first.push_back(static_cast<int32_t>(slot * page_entries + run.entry));
        query.push_back(static_cast<int32_t>(i));
        const int64_t r = static_cast<int64_t>(&run - rows[i].keys.data());
        start.push_back(static_cast<int32_t>(select ? i * select->length + select->rows[i].at[r] : k));
        count.push_back(static_cast<int32_t>(run.count));
        k += run.count;
      }
    const int64_t runs = static_cast<int64_t>(first.size());
    // The rows' queries [rows][heads * dim] go up as they are (slices of one activation buffer: one
    // transfer) when a row fills whole alignment units; else gathered here first.
    const size_t q_bytes = static_cast<size_t>(heads * dim) * 4;
    const bool q_in_place = q_bytes % kAlign == 0;
    std::vector<float> q(q_in_place ? 0 : rows.size() * heads * dim), w(rows.size() * heads);
    for (size_t i = 0; i < rows.size(); ++i) {
      if (!q_in_place) std::copy_n(rows[i].q, heads * dim, q.begin() + i * heads * dim);
      std::copy_n(rows[i].w, heads, w.begin() + i * heads);
    }
    Frame f;
    size_t dq = 0;
    if (q_in_place)
      for (size_t i = 0; i < rows.size(); ++i) {
        const size_t off = f.In(rows[i].q, q_bytes);
        if (i == 0) dq = off;
      }
    else
      dq = f.In(q.data(), q.size() * 4);
    const size_t dw = f.In(w.data(), w.size() * 4),
                 dfirst = f.In(first.data(), runs * 4), dquery = f.In(query.data(), runs * 4),
                 dstart = f.In(start.data(), runs * 4), dcount = f.In(count.data(), runs * 4);
    const Uploads up = StageUploads(keys_, f);
    // Fast mode: the tensor cores straight over the runs; exact: per-key arrays for the CPU-order kernel.
    const bool mma = IndexScoresOnTensorCores(heads, dim);
    const int64_t b = static_cast<int64_t>(rows.size()), outs = select ? b * select->length : n;
    const size_t dout = f.Scratch(outs * 4), dr = mma ? 0 : f.Scratch(n * 4), dqo = mma ? 0 : f.Scratch(n * 4);
    size_t dpicked = 0;
    if (select) {
      dpicked = f.Scratch(b * select->k * 4);
      select->picked->resize(b * select->k);
      f.Download(dpicked, select->picked->data(), b * select->k * 4);
      for (int64_t i = 0; i < b; ++i)
        if (select->rows[i].list)
          f.Download(dout + i * select->length * 4, select->rows[i].list, select->rows[i].length * 4);
    } else {
      int64_t at = 0;
      for (const IndexScoreRow& r : rows) {
        int64_t row_keys = 0;
        for (const KeyRun& run : r.keys) row_keys += run.count;
        if (row_keys > 0) f.Download(dout + at * 4, r.scores, row_keys * 4);
        at += row_keys;
      }
    }
    const float* base = reinterpret_cast<const float*>(keys_.dev);
    Fail(RunWithUploadsLocked(keys_, f, up, [&](Dev d) {
      if (select) {
        cudaError_t e = cuda::FillFloats(d.at(dout), outs, -std::numeric_limits<float>::infinity(), stream_);
        if (e == cudaSuccess)
          e = cuda::IndexScoresRunsMma(d.at(dq), d.at(dw), heads, dim, base, d.at<int32_t>(dfirst),
                                       d.at<int32_t>(dquery), d.at<int32_t>(dstart), d.at<int32_t>(dcount), runs,
                                       d.at(dout), stream_);
        return e != cudaSuccess ? e
                                : cuda::TopK(d.at(dout), b, select->length, select->k, d.at<int32_t>(dpicked), stream_);
      }
      if (mma)
        return cuda::IndexScoresRunsMma(d.at(dq), d.at(dw), heads, dim, base, d.at<int32_t>(dfirst),
                                        d.at<int32_t>(dquery), d.at<int32_t>(dstart), d.at<int32_t>(dcount), runs,
                                        d.at(dout), stream_);
      const cudaError_t e = cuda::ExpandKeyRuns(d.at<int32_t>(dfirst), d.at<int32_t>(dquery), d.at<int32_t>(dstart),
                                                d.at<int32_t>(dcount), runs, d.at<int32_t>(dr), d.at<int32_t>(dqo), stream_);
      return e != cudaSuccess ? e
                              : cuda::IndexScoresRows(d.at(dq), d.at(dw), heads, dim, base, d.at<int32_t>(dr),
                                                      d.at<int32_t>(dqo), n, d.at(dout), stream_);
    }));
    return true;
  }

  void Launch(const Frame& f, const LaunchFn& launch, const FillFn& fill = nullptr, size_t fill_bytes = 0) const {
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return;
    op_clock_ = clock_ + 1;
    Fail(RunLocked(f, launch, fill, fill_bytes));
  }

  // Inputs (and the first `fill_bytes` of scratch, written by `fill` straight into the pinned
  // buffer) up in one copy, launch, outputs back, sync.
  absl::Status RunLocked(const Frame& f, const LaunchFn& launch, const FillFn& fill = nullptr,
                         size_t fill_bytes = 0) const {
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    const size_t total = std::max<size_t>(f.total(), kAlign);
    if (total > capacity_) {
      const size_t want = std::max(total, capacity_ * 2);
      if (dev_) (void)cudaFree(dev_);
      if (host_) (void)cudaFreeHost(host_);
      dev_ = nullptr;
      host_ = nullptr;
      used_ -= static_cast<int64_t>(capacity_);
      capacity_ = 0;
      FM_RETURN_IF_ERROR(Reserve(static_cast<int64_t>(want), "staging buffer"));
      FM_CUDA_TRY(cudaMalloc(&dev_, want), "cudaMalloc(staging)");
      FM_CUDA_TRY(cudaMallocHost(&host_, want), "cudaMallocHost(staging)");
      capacity_ = want;
      used_ += static_cast<int64_t>(want);
    }
    // Inputs and outputs in page-locked activation memory (kernels/activation_pool.h) go straight
    // between the caller's buffer and the device; the rest through the staging buffer.
    const ActivationPool* pinned = InstalledActivationPool();
    auto direct = [&](const void* p, size_t bytes) { return pinned && bytes > 0 && pinned->Contains(p, bytes); };
    std::vector<char> in_direct(f.ins().size()), out_direct(f.outs().size());  // looked up once each
    for (size_t i = 0; i < f.ins().size(); ++i) in_direct[i] = direct(f.ins()[i].host, f.ins()[i].bytes);
    for (size_t i = 0; i < f.outs().size(); ++i) out_direct[i] = direct(f.outs()[i].host, f.outs()[i].bytes);
    char* h = static_cast<char*>(host_);
    char* dev = static_cast<char*>(dev_);
    std::vector<HostCopy> copies;
    copies.reserve(std::max(f.ins().size(), f.outs().size()));
    for (size_t i = 0; i < f.ins().size(); ++i)
      if (!in_direct[i]) copies.push_back({h + f.ins()[i].off, f.ins()[i].host, f.ins()[i].bytes});
    CopyAll(copies);
    if (fill) fill(h + f.in_bytes());
    // One transfer per run of arrays adjacent on both sides (a batch's attention rows are slices
    // of one activation buffer: 64 rows' queries are one copy, not 64 at ~2.7 µs each). A staged
    // input's transfer takes its alignment padding along, so adjacent staged inputs merge too. A run
    // stays inside one host allocation: two pool blocks can lie end to end, and a copy across
    // both fails (invalid argument).
    struct Transfer {
      char* dst;
      const char* src;
      size_t bytes;
      bool pinned;  // the host side is a pool block (else the staging buffer)
    };
    auto add = [&](std::vector<Transfer>& v, void* dst, const void* src, size_t bytes, bool is_pinned, bool up) {
      char* d = static_cast<char*>(dst);
      const char* s = static_cast<const char*>(src);
      if (bytes == 0) return;
      if (!v.empty()) {
        Transfer& t = v.back();
        const bool adjacent = t.dst + t.bytes == d && t.src + t.bytes == s && t.pinned == is_pinned;
        if (adjacent && (!is_pinned || pinned->Contains(up ? t.src : t.dst, t.bytes + bytes))) {
          t.bytes += bytes;
          return;
        }
      }
      v.push_back({d, s, bytes, is_pinned});
    };
    std::vector<Transfer> ups, downs;
    for (size_t i = 0; i < f.ins().size(); ++i) {
      const Frame::Copy& c = f.ins()[i];
      if (in_direct[i]) {
        add(ups, dev + c.off, c.host, c.bytes, true, true);
      } else {
        const size_t end = i + 1 < f.ins().size() ? f.ins()[i + 1].off : f.in_bytes();
        add(ups, dev + c.off, h + c.off, end - c.off, false, true);
      }
    }
    add(ups, dev + f.in_bytes(), h + f.in_bytes(), fill_bytes, false, true);
    for (const Transfer& t : ups)
      FM_CUDA_TRY(cudaMemcpyAsync(t.dst, t.src, t.bytes, cudaMemcpyHostToDevice, stream_), "copy to device");
    FM_CUDA_TRY(launch(Dev{dev, &f}), "kernel launch");
    for (size_t i = 0; i < f.outs().size(); ++i) {
      const Frame::Back& b = f.outs()[i];
      add(downs, out_direct[i] ? b.host : h + f.Resolve(b.off), dev + f.Resolve(b.off), b.bytes, out_direct[i], false);
    }
    for (const Transfer& t : downs)
      FM_CUDA_TRY(cudaMemcpyAsync(t.dst, t.src, t.bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    FM_CUDA_TRY(cudaStreamSynchronize(stream_), "stream synchronize");
    copies.clear();
    for (size_t i = 0; i < f.outs().size(); ++i) {
      const Frame::Back& b = f.outs()[i];
      if (!out_direct[i]) copies.push_back({b.host, h + f.Resolve(b.off), b.bytes});
    }
    CopyAll(copies);
    return absl::OkStatus();
  }

  // Makes room for `bytes` more within the budget, evicting the least recently used residents.
  absl::Status Reserve(int64_t bytes, const char* what) const {
    while (used_ + bytes > budget_) {
      // Residents touched by the op in progress (last_use >= op_clock_) stay: it is about to use them.
      auto lru = resident_.end();
      for (auto it = resident_.begin(); it != resident_.end(); ++it)
        if (it->second.last_use < op_clock_ && (lru == resident_.end() || it->second.last_use < lru->second.last_use))
          lru = it;
      if (lru == resident_.end()) break;
      (void)cudaFree(lru->second.mem);
      used_ -= lru->second.bytes;
      resident_.erase(lru);
    }
    if (used_ + bytes > budget_)
      return absl::ResourceExhaustedError(absl::StrCat("CUDA device ", device_, ": ", what, " needs ", bytes,
                                                       " bytes, over the device memory budget of ", budget_,
                                                       " bytes (", used_, " in use)"));
    return absl::OkStatus();
  }

  absl::StatusOr<Resident*> Upload(const void* key, uint64_t fp, const void* const* parts, const size_t* sizes,
                                   int nparts, const char* what) const {
    auto it = resident_.find(key);
    if (it != resident_.end()) {
      if (it->second.fingerprint == fp) {
        it->second.last_use = ++clock_;
        return &it->second;
      }
      (void)cudaFree(it->second.mem);
      used_ -= it->second.bytes;
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

  absl::StatusOr<const DeviceWeight*> WeightOnDevice(const WeightMatrix& w) const {
    uint64_t fp = Fingerprint(w.values.data(), w.values.size(), static_cast<uint64_t>(w.format) * 131 + w.rows);
    if (!w.scales.empty()) fp ^= Fingerprint(w.scales.data(), w.scales.size(), 7) * 3;
    auto it = resident_.find(w.values.data());
    if (it != resident_.end() && it->second.fingerprint == fp) {
      it->second.last_use = ++clock_;
      return &it->second.weight;
    }
    const EncodedWeight enc = EncodeWeight(w);
    // Fast mode keeps FP8 weights twice more: in cuBLASLt's FP8 form (fp8_tensor_cores) or
    // dequantized to bf16 for the precise tensor-core path.
    const bool fp8 = !exact_ && w.format == WeightFormat::kFp8Block128;
    const std::vector<float> lt_scales = fp8 && fp8_tc_ ? BlockScalesForLt(w) : std::vector<float>();
    const std::vector<uint16_t> deq = fp8 && !fp8_tc_ ? DequantizeFp8ToBf16(w) : std::vector<uint16_t>();
    // FP4 in fast mode also keeps its scales as E8M0 bytes (+1/16 of the codes' bytes): what the
    // decode GEMV reads.
    const std::vector<uint8_t> exps = !exact_ ? cuda::ScaleExponents(w) : std::vector<uint8_t>();
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

  absl::StatusOr<const float*> ArrayOnDevice(const float* p, size_t count) const {
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    const void* parts[1] = {p};
    const size_t sizes[1] = {count * 4};
    FM_ASSIGN_OR_RETURN(Resident * r, Upload(p, Fingerprint(p, count, 1), parts, sizes, 1, "a parameter array"));
    return static_cast<const float*>(r->mem);
  }

  absl::Status LinearLocked(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                            std::span<const RowOp> then) const {
    if (!health_.ok() || n == 0) return absl::OkStatus();
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    FM_ASSIGN_OR_RETURN(const DeviceWeight* dw, WeightOnDevice(w));
    const int64_t k = w.cols, m = w.rows, ld = (n + 3) / 4 * 4;
    Frame f;
    const size_t dx = f.In(x, n * k * 4), dy = f.Scratch(ld * m * 4);
    FM_ASSIGN_OR_RETURN(const RowOpInputs ops, StageRowOps(f, then, n * m));
    const LinearScratch s = AddLinearScratch(f, ld, k);
    f.Download(dy, y, n * m * 4);
    return RunLocked(f, [&](Dev d) {
      const cudaError_t e = EnqueueLinear(*dw, d.at(dx), n, ld, d.at(dy), out, s.At(d));
      return e != cudaSuccess ? e : EnqueueRowOps(d, d.at(dy), n * m, then, ops);
    });
  }

  absl::Status LinearArgmaxLocked(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const {
    if (!health_.ok() || n == 0) return absl::OkStatus();
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    FM_ASSIGN_OR_RETURN(const DeviceWeight* dw, WeightOnDevice(w));
    const int64_t k = w.cols, m = w.rows, ld = (n + 3) / 4 * 4;
    Frame f;
    const size_t dx = f.In(x, n * k * 4), dy = f.Scratch(ld * m * 4), didx = f.Scratch(n * 4);
    const LinearScratch s = AddLinearScratch(f, ld, k);
    f.Download(didx, index, n * 4);
    return RunLocked(f, [&](Dev d) {
      const cudaError_t e = EnqueueLinear(*dw, d.at(dx), n, ld, d.at(dy), Rounding::kNone, s.At(d));
      return e != cudaSuccess ? e : cuda::ArgmaxRows(d.at(dy), n, m, d.at<int32_t>(didx), stream_);
    });
  }

  absl::Status LinearGroupsLocked(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y,
                                  Rounding out) const {
    if (!health_.ok() || n == 0 || w.empty()) return absl::OkStatus();
    const int64_t G = static_cast<int64_t>(w.size()), k = w[0].cols, m = w[0].rows, ld = (n + 3) / 4 * 4;
    for (int64_t g = 1; g < G; ++g)
      if (w[g].rows != m || w[g].cols != k)
        return absl::InvalidArgumentError(absl::StrCat("LinearGroups: w[", g, "] is [", w[g].rows, ", ", w[g].cols,
                                                       "], w[0] [", m, ", ", k, "]"));
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    std::vector<const DeviceWeight*> dw(G);
    for (int64_t g = 0; g < G; ++g) {
      FM_ASSIGN_OR_RETURN(dw[g], WeightOnDevice(w[g]));
    }
    // Dense bf16 groups on the tensor cores: x to bf16 once, each group's GEMM reading its columns
    // and writing its outputs in place (cuBLASLt with leading dimensions G*k and G*m), one bf16
    // rounding at the end — instead of gathering and placing every group's columns. cuBLASLt's
    // algorithms assume 256-byte aligned operands: groups whose offsets are not take the path below.
    bool strided = (k * 2) % 256 == 0 && (m * 4) % 256 == 0;
    for (int64_t g = 0; g < G; ++g) strided = strided && DenseOnTensorCores(*dw[g], n);
    if (strided) {
      Frame f;
      const size_t dx = f.In(x, n * G * k * 4), xb = f.Scratch(ld * G * k * 2), dy = f.Scratch(ld * G * m * 4);
      f.Download(dy, y, n * G * m * 4);
      bool refused = false;
      const absl::Status st = RunLocked(f, [&](Dev d) {
        auto* xbf = d.at<__nv_bfloat16>(xb);
        cudaError_t e = cuda::F32ToBf16Rows(d.at(dx), n, G * k, ld, xbf, stream_);
        for (int64_t g = 0; g < G && e == cudaSuccess; ++g)
          e = cuda::LinearBf16Lt(lt_, *dw[g], xbf + g * k, ld, d.at(dy) + g * m, stream_, G * k, G * m);
        refused = e == cudaErrorNotSupported;
        if (refused) return cudaSuccess;  // nothing written that the path below does not rewrite
        return e != cudaSuccess || out != Rounding::kBf16 ? e : cuda::RoundToBf16(d.at(dy), ld * G * m, stream_);
      });
      if (!st.ok() || !refused) return st;
    }
    Frame f;
    const size_t dx = f.In(x, n * G * k * 4), xg = f.Scratch(ld * k * 4), yg = f.Scratch(ld * m * 4),
                 dy = f.Scratch(n * G * m * 4);
    const LinearScratch s = AddLinearScratch(f, ld, k);
    f.Download(dy, y, n * G * m * 4);
    return RunLocked(f, [&](Dev d) {
      for (int64_t g = 0; g < G; ++g) {
        cudaError_t e = cudaMemcpy2DAsync(d.at(xg), k * 4, d.at(dx) + g * k, G * k * 4, k * 4, n, cudaMemcpyDeviceToDevice,
                                          stream_);
        if (e == cudaSuccess) e = EnqueueLinear(*dw[g], d.at(xg), n, ld, d.at(yg), out, s.At(d));
        if (e == cudaSuccess)
          e = cudaMemcpy2DAsync(d.at(dy) + g * m, G * m * 4, d.at(yg), m * 4, m * 4, n, cudaMemcpyDeviceToDevice, stream_);
        if (e != cudaSuccess) return e;
      }
      return cudaSuccess;
    });
  }

  // RowOps on a frame's device array: their angle arrays (RoPE) as the frame's inputs, checked.
  struct RowOpInputs {
    std::vector<size_t> cos, sin;  // per op; RoPE only
  };
  static absl::StatusOr<RowOpInputs> StageRowOps(Frame& f, std::span<const RowOp> ops, int64_t values) {
    RowOpInputs in;
    in.cos.resize(ops.size());
    in.sin.resize(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      const RowOp& op = ops[i];
      if (op.width <= 0 || values % op.width != 0)
        return absl::InvalidArgumentError(
            absl::StrCat("then[", i, "].width = ", op.width, " does not divide the op's ", values, " values"));
      if (op.kind == RowOp::Kind::kHadamard && (op.width & (op.width - 1)) != 0)
        return absl::InvalidArgumentError(absl::StrCat("then[", i, "].width = ", op.width, ": Hadamard needs a power of two"));
      if (op.kind != RowOp::Kind::kRope) continue;
      if (op.rope_dims <= 0 || op.rope_dims % 2 != 0 || op.offset < 0 || op.offset + op.rope_dims > op.width ||
          op.rows_per_angle <= 0 || !op.cos || !op.sin)
        return absl::InvalidArgumentError(absl::StrCat("then[", i, "]: RoPE of ", op.rope_dims, " dims at offset ", op.offset,
                                                       " in rows of ", op.width, ", ", op.rows_per_angle,
                                                       " rows an angle set, needs its cos and sin"));
      const int64_t rows = values / op.width;
      const size_t angles = (rows + op.rows_per_angle - 1) / op.rows_per_angle * (op.rope_dims / 2) * 4;
      in.cos[i] = f.In(op.cos, angles);
      in.sin[i] = f.In(op.sin, angles);
    }
    return in;
  }
  cudaError_t EnqueueRowOps(Dev d, float* y, int64_t values, std::span<const RowOp> ops, const RowOpInputs& in) const {
    for (size_t i = 0; i < ops.size(); ++i) {
      const RowOp& op = ops[i];
      const int64_t rows = values / op.width;
      cudaError_t e = cudaSuccess;
      switch (op.kind) {
        case RowOp::Kind::kHeadRmsNormBf16: e = cuda::HeadRmsNormBf16(y, rows, op.width, op.eps, stream_); break;
        case RowOp::Kind::kRope:
          e = cuda::Rope(y, rows, op.width, op.offset, op.rope_dims, d.at(in.cos[i]), d.at(in.sin[i]), op.rows_per_angle,
                         op.inverse, stream_);
          break;
        case RowOp::Kind::kHadamard: e = cuda::Hadamard(y, rows, op.width, stream_); break;
        case RowOp::Kind::kFp4RoundTrip: e = cuda::RoundTrip(y, values, op.width, /*fp8=*/false, stream_); break;
      }
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }

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
                                                              int64_t heads) {
    const int64_t per_row = heads * cuda::kRecordDim;
    AttentionRowOps p;
    bool any = false, same = true;
    for (const AttentionRow& r : rows) {
      any = any || !r.then.empty();
      same = same && r.then.size() == rows[0].then.size();
    }
    if (!any) return p;
    for (size_t i = 0; same && i < rows[0].then.size(); ++i) {
      const RowOp& a = rows[0].then[i];
      for (const AttentionRow& r : rows) {
        const RowOp& b = r.then[i];
        same = same && b.kind == a.kind && b.width == a.width && b.eps == a.eps && b.offset == a.offset &&
               b.rope_dims == a.rope_dims && b.rows_per_angle == a.rows_per_angle && b.inverse == a.inverse;
      }
      if (a.kind == RowOp::Kind::kRope)
        same = same && a.width > 0 && a.rows_per_angle > 0 && per_row % a.width == 0 && (per_row / a.width) % a.rows_per_angle == 0;
    }
    if (!same) {
      for (const AttentionRow& r : rows) {
        FM_ASSIGN_OR_RETURN(RowOpInputs in, StageRowOps(f, r.then, per_row));
        p.inputs.push_back(std::move(in));
      }
      return p;
    }
    p.merged = true;
    p.ops.assign(rows[0].then.begin(), rows[0].then.end());
    p.angles.resize(p.ops.size());
    for (size_t i = 0; i < p.ops.size(); ++i) {
      const RowOp& op = p.ops[i];
      if (op.kind != RowOp::Kind::kRope || !op.cos || !op.sin) continue;
      const int64_t count = per_row / op.width / op.rows_per_angle * (op.rope_dims / 2);  // a row's angles
      std::vector<float>& a = p.angles[i];
      a.resize(2 * count * rows.size());
      for (size_t j = 0; j < rows.size(); ++j) {
        std::copy_n(rows[j].then[i].cos, count, a.begin() + j * count);
        std::copy_n(rows[j].then[i].sin, count, a.begin() + (rows.size() + j) * count);
      }
      p.ops[i].cos = a.data();
      p.ops[i].sin = a.data() + count * rows.size();
    }
    FM_ASSIGN_OR_RETURN(RowOpInputs in, StageRowOps(f, p.ops, per_row * static_cast<int64_t>(rows.size())));
    p.inputs.push_back(std::move(in));
    return p;
  }
  cudaError_t EnqueueAttentionRowOps(Dev d, const AttentionArrays& a, std::span<const AttentionRow> rows, int64_t heads,
                                     const AttentionRowOps& p) const {
    const int64_t per_row = heads * cuda::kRecordDim;
    if (p.merged) return EnqueueRowOps(d, d.at(a.dout), per_row * static_cast<int64_t>(rows.size()), p.ops, p.inputs[0]);
    for (size_t j = 0; j < p.inputs.size(); ++j)
      if (cudaError_t e = EnqueueRowOps(d, d.at(a.dout) + j * per_row, per_row, rows[j].then, p.inputs[j]); e != cudaSuccess)
        return e;
    return cudaSuccess;
  }

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
  // fp32 sums in another order): a big one (the head, wo_a's groups) always, a small one (the
  // router, the compressors' projections, the indexer's head weights) from kTensorCoreMinRows
  // rows — the exact kernel walks k in the CPU's order and took ~255 µs at 64 rows on the H200.
  bool DenseOnTensorCores(const DeviceWeight& w, int64_t n) const {
    return !exact_ && fast_dense_ && w.format == WeightFormat::kDense && w.dense_bf16 &&
           (w.rows * w.cols >= (int64_t{1} << 22) || n >= kTensorCoreMinRows);
  }

  // y = x · wᵀ on the device (x: n rows; y: room for ld ≥ n rows, n · rows written), enqueued on
  // the stream; every Linear takes this path choice. Exact mode: the bit-exact kernel. Fast mode,
  // quantized weights with k % 128 == 0: from 4 tokens an FP8 weight runs on the bf16 tensor cores
  // on exactly dequantized operands (or, fast-fp8, cuBLASLt's FP8 tensor cores); otherwise the
  // decode GEMV. Dense bf16 weights: cuBLASLt bf16 where DenseOnTensorCores says so, else the exact
  // kernel. A shape cuBLASLt refuses falls through to the next.
  cudaError_t EnqueueLinear(const DeviceWeight& w, const float* x, int64_t n, int64_t ld, float* y, Rounding out,
                            const LinearScratch::Ptrs& s) const {
    const int64_t k = w.cols, m = w.rows;
    const bool quantized = w.format != WeightFormat::kDense;
    auto rounded = [&](cudaError_t e) {
      return e != cudaSuccess || out != Rounding::kBf16 ? e : cuda::RoundToBf16(y, n * m, stream_);
    };
    if (!exact_ && quantized && k % 128 == 0) {
      if (fast_lt_ && w.format == WeightFormat::kFp8Block128 && n >= kTensorCoreMinRows && w.dequant_bf16) {
        DeviceWeight view;
        view.rows = m;
        view.cols = k;
        view.dense_bf16 = true;
        view.values = w.dequant_bf16;
        cudaError_t e = cuda::QuantizeActivationsBf16(x, n, k, ld, s.qb, stream_);
        if (e == cudaSuccess) e = cuda::LinearBf16Lt(lt_, view, s.qb, ld, y, stream_);
        if (e != cudaErrorNotSupported) return rounded(e);
      }
      if (fast_lt_ && w.format == WeightFormat::kFp8Block128 && n >= 16 && w.lt_scales) {
        // FP8 tensor cores (fast-fp8): ~14 bits kept while summing a 128-block (relative error ~1e-4
        // against fp32 sums), which moved dsv4-tiny-c's golden caches past their tolerance.
        cudaError_t e = cuda::QuantizeActivationsFp8(x, n, k, s.q8, s.qs, ld, stream_);
        if (e == cudaSuccess) e = cuda::LinearFp8Lt(lt_, w, w.lt_scales, s.q8, s.qs, ld, y, cuda::LtOutput::kF32, stream_);
        if (e != cudaErrorNotSupported) return rounded(e);
      }
      if (fast_gemv_) {
        const cudaError_t e = cuda::QuantizeActivations(x, n, k, s.qx, s.qs, stream_);
        return e != cudaSuccess ? e : cuda::LinearDecode(w, s.qx, s.qs, n, y, out, stream_);
      }
    }
    if (DenseOnTensorCores(w, n)) {
      cudaError_t e = cuda::F32ToBf16Rows(x, n, k, ld, s.qb, stream_);
      if (e == cudaSuccess) e = cuda::LinearBf16Lt(lt_, w, s.qb, ld, y, stream_);
      if (e != cudaErrorNotSupported) return rounded(e);
    }
    if (!quantized) return cuda::Linear(w, x, x, n, y, out, stream_);
    const cudaError_t e = cuda::QuantizeActivations(x, n, k, s.qx, s.qs, stream_);
    return e != cudaSuccess ? e : cuda::Linear(w, s.qx, s.qs, n, y, out, stream_);
  }

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
                                   float limit, float* y) const {
    FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
    std::vector<ExpertPlan> plans;
    Frame f;
    const size_t dx = f.In(x, n * dim * 4), dy = f.In(y, n * dim * 4);
    int64_t max_ld = 0, max_k = dim;
    for (size_t i = 0; i < experts.size(); ++i) {
      const ExpertWork& e = experts[i];
      if (e.rows.empty()) continue;
      if (!e.w1 || !e.w2 || !e.w3 || e.w1->cols != dim || e.w3->cols != dim || e.w3->rows != e.w1->rows ||
          e.w2->rows != dim || e.w2->cols != e.w1->rows || (!e.weights.empty() && e.weights.size() != e.rows.size()))
        return absl::InvalidArgumentError(absl::StrCat("RoutedExperts: experts[", i, "] has inconsistent shapes"));
      for (int32_t r : e.rows)
        if (r < 0 || r >= n) return absl::InvalidArgumentError(absl::StrCat("RoutedExperts: experts[", i, "].rows has ", r));
      ExpertPlan p;
      p.e = &e;
      FM_ASSIGN_OR_RETURN(p.w1, WeightOnDevice(*e.w1));
      FM_ASSIGN_OR_RETURN(p.w3, WeightOnDevice(*e.w3));
      FM_ASSIGN_OR_RETURN(p.w2, WeightOnDevice(*e.w2));
      p.m = static_cast<int64_t>(e.rows.size());
      p.ld = (p.m + 3) / 4 * 4;
      p.inter = e.w1->rows;
      p.rows = f.In(e.rows.data(), p.m * 4);
      p.weighted = !e.weights.empty();
      p.wts = p.weighted ? f.In(e.weights.data(), p.m * 4) : 0;
      plans.push_back(p);
      max_ld = std::max(max_ld, p.ld);
      max_k = std::max(max_k, p.inter);
    }
    if (plans.empty()) return absl::OkStatus();
    // Decode-sized layers in fast mode: every expert's w1 and w3 in one grouped GEMV launch, then
    // every w2 (all experts of one quantized format). FP8 experts up to 16 rows each (from 16 rows
    // one expert's matrices go faster through the tensor cores, EnqueueLinear); FP4 experts up to
    // kGroupedFp4Rows (EnqueueLinear would run the same GEMV kernel, one launch per matrix: at
    // 16 experts x 24 rows, a batch of 64, that was 1.7 ms a layer).
    bool grouped = !exact_ && fast_gemv_ && dim % 128 == 0;
    for (const ExpertPlan& p : plans)
      grouped = grouped && p.m <= (p.w1->format == WeightFormat::kFp4Group32 ? kGroupedFp4Rows : 16) &&
                p.inter % 128 == 0 && p.inter == plans[0].inter &&
                p.w1->format != WeightFormat::kDense &&
                p.w1->format == plans[0].w1->format && p.w3->format == p.w1->format && p.w2->format == p.w1->format;
    if (grouped) return RoutedExpertsGroupedLocked(plans, x, n, dim, limit, y, plans[0].w1->format);
    for (ExpertPlan& p : plans) {
      p.xs = f.Scratch(p.ld * dim * 4);
      p.gate = f.Scratch(p.ld * p.inter * 4);
      p.up = f.Scratch(p.ld * p.inter * 4);
      p.h = f.Scratch(p.ld * p.inter * 4);
      p.out = f.Scratch(p.ld * dim * 4);
    }
    const LinearScratch scratch = AddLinearScratch(f, max_ld, max_k);
    f.Download(dy, y, n * dim * 4);
    return RunLocked(f, [&](Dev d) {
      for (const ExpertPlan& p : plans) {
        const int32_t* rows = d.at<int32_t>(p.rows);
        cudaError_t e = cuda::GatherRows(d.at(dx), rows, p.m, dim, d.at(p.xs), stream_);
        auto linear = [&](const DeviceWeight& w, const float* in, float* out) {
          return EnqueueLinear(w, in, p.m, p.ld, out, Rounding::kBf16, scratch.At(d));
        };
        if (e == cudaSuccess) e = linear(*p.w1, d.at(p.xs), d.at(p.gate));
        if (e == cudaSuccess) e = linear(*p.w3, d.at(p.xs), d.at(p.up));
        if (e == cudaSuccess)
          e = cuda::SwiGlu(d.at(p.gate), d.at(p.up), p.m, p.inter, p.weighted ? d.at(p.wts) : nullptr, limit, d.at(p.h),
                           stream_);
        if (e == cudaSuccess) e = linear(*p.w2, d.at(p.h), d.at(p.out));
        if (e == cudaSuccess) e = cuda::ScatterAddRows(d.at(p.out), rows, p.m, dim, d.at(dy), stream_);
        if (e != cudaSuccess) return e;
      }
      return cudaSuccess;
    });
  }

  // The grouped form of RoutedExpertsLocked (fast mode, decode-sized): the experts' rows laid end
  // to end, one gather, one act_quant, one grouped GEMV for w1 and w3, one SwiGLU, one act_quant,
  // one grouped GEMV for w2, then one scatter-add summing each token's rows in expert order (the
  // order of the fp32 sum).
  // `plans`: the non-empty experts, validated, weights on the device (RoutedExpertsLocked).
  absl::Status RoutedExpertsGroupedLocked(std::span<const ExpertPlan> plans, const float* x, int64_t n, int64_t dim,
                                          float limit, float* y, WeightFormat format) const {
    // The experts' rows end to end: plans[i]'s start at first[i]; one intermediate size (the
    // caller checked).
    std::vector<int64_t> first;
    std::vector<int32_t> rows;
    std::vector<float> wts;
    const int64_t inter = plans[0].inter;
    int64_t max_m = 0;
    for (const ExpertPlan& p : plans) {
      const ExpertWork& e = *p.e;
      first.push_back(static_cast<int64_t>(rows.size()));
      rows.insert(rows.end(), e.rows.begin(), e.rows.end());
      for (size_t r = 0; r < e.rows.size(); ++r) wts.push_back(e.weights.empty() ? 1.0f : e.weights[r]);  // x * 1 == x
      max_m = std::max(max_m, p.m);
    }
    const int64_t M = static_cast<int64_t>(rows.size()), E = static_cast<int64_t>(plans.size());
    const bool fp8 = format == WeightFormat::kFp8Block128;
    // FP4 on the tensor cores reads each launch's scale bytes when every one of its weights has
    // them, and its tokens as f16 in the MMA's order (QuantizeActivationsMmaF16).
    bool up_bytes = !fp8, down_bytes = !fp8;
    for (const ExpertPlan& p : plans) {
      up_bytes = up_bytes && p.w1->scale_exps && p.w3->scale_exps;
      down_bytes = down_bytes && p.w2->scale_exps;
    }
    const cuda::GemvInputs up_in{up_bytes, !fp8 && cuda::GroupedFp4OnTensorCores(max_m, dim, up_bytes)};
    const cuda::GemvInputs down_in{down_bytes, !fp8 && cuda::GroupedFp4OnTensorCores(max_m, inter, down_bytes)};
    Frame f;
    std::vector<int32_t> offsets, order;  // each token's rows in expert order: one scatter-add launch
    cuda::OrderRowsByTarget(rows, n, &offsets, &order);
    const size_t dx = f.In(x, n * dim * 4), dy = f.In(y, n * dim * 4), drows = f.In(rows.data(), M * 4),
                 dwts = f.In(wts.data(), M * 4), doff = f.In(offsets.data(), (n + 1) * 4),
                 dord = f.In(order.data(), M * 4);
    const size_t table_bytes = 3 * E * sizeof(cuda::GemvGroup);
    const size_t dtab = f.Scratch(table_bytes);  // first scratch: filled on the host (fill below)
    const size_t xs = f.Scratch(M * dim * 4), qx = f.Scratch(M * dim * 4), qs = f.Scratch(M * (dim / 128) * 4),
                 g = f.Scratch(M * inter * 4), u = f.Scratch(M * inter * 4), h = f.Scratch(M * inter * 4),
                 qh = f.Scratch(M * inter * 4), qhs = f.Scratch(M * (inter / 128) * 4), out = f.Scratch(M * dim * 4);
    f.Download(dy, y, n * dim * 4);
    auto table = [&](char* host_scratch) {  // device pointers: dev_ is allocated before the fill
      char* base = static_cast<char*>(dev_);
      auto at = [&](size_t off) { return reinterpret_cast<float*>(base + f.Resolve(off)); };
      auto* t = reinterpret_cast<cuda::GemvGroup*>(host_scratch + f.Resolve(dtab) - f.in_bytes());
      for (int64_t i = 0; i < E; ++i) {
        const ExpertPlan& p = plans[i];
        const int64_t r0 = first[i];
        // Token rows from r0 on: fp32 grid values, or f16 ones in the same scratch (GemvInputs).
        auto group = [&](const DeviceWeight* w, size_t q, size_t qsc, int64_t k, float* yo) {
          return cuda::GemvGroup{static_cast<const uint8_t*>(w->values), w->scales, w->scale_cols, w->rows, k,
                                 at(q) + r0 * k, at(qsc) + r0 * (k / 128), p.m, yo, w->scale_exps,
                                 reinterpret_cast<const uint16_t*>(at(q)) + r0 * k};
        };
        t[i] = group(p.w1, qx, qs, dim, at(g) + r0 * inter);
        t[E + i] = group(p.w3, qx, qs, dim, at(u) + r0 * inter);
        t[2 * E + i] = group(p.w2, qh, qhs, inter, at(out) + r0 * dim);
      }
    };
    return RunLocked(
        f,
        [&](Dev d) {
          const auto* tab = d.at<cuda::GemvGroup>(dtab);
          cudaError_t e = cuda::GatherRows(d.at(dx), d.at<int32_t>(drows), M, dim, d.at(xs), stream_);
          auto quantize = [&](size_t in, int64_t k, size_t q, size_t qsc, bool f16) {
            return f16 ? cuda::QuantizeActivationsMmaF16(d.at(in), M, k, d.at<uint16_t>(q), d.at(qsc), stream_)
                       : cuda::QuantizeActivations(d.at(in), M, k, d.at(q), d.at(qsc), stream_);
          };
          if (e == cudaSuccess) e = quantize(xs, dim, qx, qs, up_in.f16_activations);
          if (e == cudaSuccess)
            e = cuda::LinearDecodeGrouped(tab, static_cast<int>(2 * E), inter, max_m, dim, fp8, Rounding::kBf16, stream_, up_in);
          if (e == cudaSuccess) e = cuda::SwiGlu(d.at(g), d.at(u), M, inter, d.at(dwts), limit, d.at(h), stream_);
          if (e == cudaSuccess) e = quantize(h, inter, qh, qhs, down_in.f16_activations);
          if (e == cudaSuccess)
            e = cuda::LinearDecodeGrouped(tab + 2 * E, static_cast<int>(E), dim, max_m, inter, fp8, Rounding::kBf16,
                                          stream_, down_in);
          if (e == cudaSuccess)
            e = cuda::ScatterAddOrdered(d.at(out), d.at<int32_t>(doff), d.at<int32_t>(dord), n, dim, d.at(dy), stream_);
          return e;
        },
        table, table_bytes);
  }

  // A bf16-rounded Linear on device arrays (the path LinearLocked would take): x [m][k], y with
  // room for ld >= m rows (the tensor-core path writes ld); qx/qs/qb quantization scratch.
  void RoundTripOp(float* x, int64_t n, int64_t block, bool fp8) const {
    Frame f;
    const size_t dx = f.In(x, n * 4);
    f.Download(dx, x, n * 4);
    Launch(f, [&](Dev d) { return cuda::RoundTrip(d.at(dx), n, block, fp8, stream_); });
  }

  void KeyScoring(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                  float* out, bool logits) const {
    const int64_t n = static_cast<int64_t>(keys.size());
    if (n == 0) return;
    std::vector<uint8_t> valid(n);
    for (int64_t t = 0; t < n; ++t) valid[t] = keys[t] != nullptr;
    Frame f;
    const size_t dq = f.In(q, heads * dim * 4), dw = f.In(w, heads * 4), dv = f.In(valid.data(), n);
    const size_t dk = f.Scratch(n * dim * 4), dout = f.Scratch(n * 4);
    f.Download(dout, out, n * 4);
    Launch(
        f,
        [&](Dev d) {
          return logits ? cuda::IndexerLogits(d.at(dq), d.at(dw), heads, dim, d.at(dk), d.at<uint8_t>(dv), n,
                                              d.at(dout), stream_)
                        : cuda::IndexScores(d.at(dq), d.at(dw), heads, dim, d.at(dk), n, d.at(dout), stream_);
        },
        [&](char* host_scratch) {
          GatherRows(keys, dim, nullptr, reinterpret_cast<float*>(host_scratch + f.Resolve(dk) - f.in_bytes()),
                     /*zero_null=*/true);
        },
        n * dim * 4);
  }

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
  mutable DeviceReserve records_, keys_;  // the KV reserve: main KV records, indexer keys
};

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
  InstallPinnedActivations(options.pinned_activation_bytes);
  cudaStream_t stream = nullptr;
  FM_RETURN_IF_ERROR(CudaError(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  return std::unique_ptr<Backend>(new CudaBackendImpl(options.device, stream, budget, options.exact,
                                                       options.fp8_tensor_cores, options.kv_reserve_bytes));
}

}  // namespace flashmem::kernels::cuda
