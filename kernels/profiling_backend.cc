#include "kernels/profiling_backend.h"

#include <chrono>

#include "absl/strings/str_format.h"

namespace flashmem::kernels {

const char* OpName(OpKind op) {
  static constexpr const char* kNames[] = {"Linear", "RmsNorm", "HeadRmsNormBf16", "Rope", "Fp8RoundTrip",
                                           "Fp4RoundTrip", "Hadamard", "SparseAttention", "IndexScores",
                                           "TopK", "IndexTopK", "IndexerLogits", "HcPre", "HcPost", "HcHead", "RoutedExperts",
                                           "RoundBf16", "RowOps", "RoutedMoE", "WriteRecords", "PoolSteps"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<int>(OpKind::kCount));
  return kNames[static_cast<int>(op)];
}

namespace {
// Times one forwarded call.
class Timer {
 public:
  Timer() : t0_(std::chrono::steady_clock::now()) {}
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }

 private:
  std::chrono::steady_clock::time_point t0_;
};
}  // namespace

void ProfilingBackend::Record(OpKind op, double seconds, uint64_t items) const {
  absl::MutexLock lock(&mu_);
  OpStats& s = stats_[static_cast<int>(op)];
  s.calls++;
  s.seconds += seconds;
  s.items += items;
}

OpStats ProfilingBackend::Stats(OpKind op) const {
  absl::MutexLock lock(&mu_);
  return stats_[static_cast<int>(op)];
}

void ProfilingBackend::Reset() {
  absl::MutexLock lock(&mu_);
  stats_ = {};
}

std::string ProfilingBackend::Report() const {
  absl::MutexLock lock(&mu_);
  double total = 0;
  for (const OpStats& s : stats_) total += s.seconds;
  std::string out = absl::StrFormat("%-16s %9s %11s %10s %7s %12s\n", "op", "calls", "total ms", "us/call", "share",
                                    "items/call");
  for (int i = 0; i < static_cast<int>(OpKind::kCount); ++i) {
    const OpStats& s = stats_[i];
    if (s.calls == 0) continue;
    absl::StrAppendFormat(&out, "%-16s %9d %11.2f %10.1f %6.1f%% %12.1f\n", OpName(static_cast<OpKind>(i)), s.calls,
                          s.seconds * 1e3, s.seconds * 1e6 / s.calls, total > 0 ? 100 * s.seconds / total : 0,
                          static_cast<double>(s.items) / s.calls);
  }
  absl::StrAppendFormat(&out, "%-16s %9s %11.2f\n", "all ops", "", total * 1e3);
  return out;
}

void ProfilingBackend::Linear(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out) const {
  Timer t;
  inner_.Linear(w, x, n, y, out);
  Record(OpKind::kLinear, t.seconds(), n);
}
// Counted as one Linear.
void ProfilingBackend::LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y,
                                    Rounding out) const {
  Timer t;
  inner_.LinearGroups(w, x, n, y, out);
  Record(OpKind::kLinear, t.seconds(), n);
}
// Counted as one Linear: the projections go to the device in one call.
void ProfilingBackend::LinearMany(std::span<const LinearJob> jobs, const float* x, int64_t n) const {
  Timer t;
  inner_.LinearMany(jobs, x, n);
  Record(OpKind::kLinear, t.seconds(), n);
}
// Counted as a Linear (the ops after it ride in the same call).
void ProfilingBackend::LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const {
  Timer t;
  inner_.LinearArgmax(w, x, n, index);
  Record(OpKind::kLinear, t.seconds(), n);
}
void ProfilingBackend::LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                                  std::span<const RowOp> then) const {
  Timer t;
  inner_.LinearThen(w, x, n, y, out, then);
  Record(OpKind::kLinear, t.seconds(), n);
}
void ProfilingBackend::RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) const {
  Timer t;
  inner_.RmsNorm(x, weight, n, dim, eps, y);
  Record(OpKind::kRmsNorm, t.seconds(), n);
}
void ProfilingBackend::HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const {
  Timer t;
  inner_.HeadRmsNormBf16(q, heads, dim, eps);
  Record(OpKind::kHeadRmsNorm, t.seconds(), heads);
}
void ProfilingBackend::Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims,
                            const float* cos, const float* sin, int64_t rows_per_angle, bool inverse) const {
  Timer t;
  inner_.Rope(x, rows, stride, offset, rope_dims, cos, sin, rows_per_angle, inverse);
  Record(OpKind::kRope, t.seconds(), rows);
}
void ProfilingBackend::Fp8RoundTrip(float* x, int64_t n, int64_t block) const {
  Timer t;
  inner_.Fp8RoundTrip(x, n, block);
  Record(OpKind::kFp8RoundTrip, t.seconds(), n / block);
}
void ProfilingBackend::Fp4RoundTrip(float* x, int64_t n, int64_t block) const {
  Timer t;
  inner_.Fp4RoundTrip(x, n, block);
  Record(OpKind::kFp4RoundTrip, t.seconds(), n / block);
}
void ProfilingBackend::Hadamard(float* x, int64_t rows, int64_t dim) const {
  Timer t;
  inner_.Hadamard(x, rows, dim);
  Record(OpKind::kHadamard, t.seconds(), rows);
}
void ProfilingBackend::SparseAttention(const float* q, int64_t heads, int64_t dim,
                                       std::span<const float* const> kv_rows, const float* sink, float softmax_scale,
                                       float* out) const {
  Timer t;
  inner_.SparseAttention(q, heads, dim, kv_rows, sink, softmax_scale, out);
  Record(OpKind::kSparseAttention, t.seconds(), kv_rows.size());
}
void ProfilingBackend::SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims,
                                              std::span<const KvSlot> slots, const float* sink, float softmax_scale,
                                              float* out) const {
  Timer t;
  inner_.SparseAttentionRecords(q, heads, dim, rope_dims, slots, sink, softmax_scale, out);
  Record(OpKind::kSparseAttention, t.seconds(), slots.size());  // decoding included
}
void ProfilingBackend::SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim,
                                           int64_t rope_dims, const float* sink, float softmax_scale) const {
  Timer t;
  inner_.SparseAttentionRows(rows, heads, dim, rope_dims, sink, softmax_scale);
  size_t slots = 0;
  for (const AttentionRow& r : rows) slots += r.slots.size();
  Record(OpKind::kSparseAttention, t.seconds(), slots);  // one call for the batch; its slots summed
}
void ProfilingBackend::IndexScores(const float* q, const float* w, int64_t heads, int64_t dim,
                                   std::span<const float* const> keys, float* scores) const {
  Timer t;
  inner_.IndexScores(q, w, heads, dim, keys, scores);
  Record(OpKind::kIndexScores, t.seconds(), keys.size());
}
void ProfilingBackend::WriteRecords(std::span<const RecordWrite> writes, int64_t dim, int64_t rope_dims) const {
  Timer t;
  inner_.WriteRecords(writes, dim, rope_dims);
  Record(OpKind::kWriteRecords, t.seconds(), writes.size());
}
void ProfilingBackend::PoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) const {
  Timer t;
  inner_.PoolSteps(steps, shape);
  Record(OpKind::kPoolSteps, t.seconds(), steps.size());
}
void ProfilingBackend::IndexScoresBatch(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim) const {
  Timer t;
  inner_.IndexScoresBatch(rows, heads, dim);
  size_t keys = 0;
  for (const IndexScoreRow& r : rows)
    for (const KeyRun& run : r.keys) keys += static_cast<size_t>(run.count);
  Record(OpKind::kIndexScores, t.seconds(), keys);  // one call for the batch; its keys summed
}
std::vector<std::vector<int32_t>> ProfilingBackend::TopKBatch(std::span<const std::span<const float>> scores,
                                                              int64_t k) const {
  Timer t;
  std::vector<std::vector<int32_t>> out = inner_.TopKBatch(scores, k);
  size_t n = 0;
  for (std::span<const float> s : scores) n += s.size();
  Record(OpKind::kTopK, t.seconds(), n);
  return out;
}
std::vector<std::vector<int32_t>> ProfilingBackend::IndexTopKBatch(std::span<const IndexSelectRow> rows, int64_t heads,
                                                                   int64_t dim, int64_t k) const {
  Timer t;
  std::vector<std::vector<int32_t>> out = inner_.IndexTopKBatch(rows, heads, dim, k);
  size_t keys = 0;
  for (const IndexSelectRow& r : rows)
    for (const KeyRun& run : r.keys) keys += static_cast<size_t>(run.count);
  Record(OpKind::kIndexTopK, t.seconds(), keys);  // scores and top-k of the batch in one call
  return out;
}
std::vector<int32_t> ProfilingBackend::TopK(std::span<const float> scores, int64_t k) const {
  Timer t;
  std::vector<int32_t> out = inner_.TopK(scores, k);
  Record(OpKind::kTopK, t.seconds(), scores.size());
  return out;
}
void ProfilingBackend::IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim,
                                     std::span<const float* const> keys, float* logits) const {
  Timer t;
  inner_.IndexerLogits(q, w, heads, dim, keys, logits);
  Record(OpKind::kIndexerLogits, t.seconds(), keys.size());
}
void ProfilingBackend::HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale,
                             int hc, int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
                             float* comb) const {
  Timer t;
  inner_.HcPre(x, n, fn, base, scale, hc, dim, iters, norm_eps, hc_eps, y, post, comb);
  Record(OpKind::kHcPre, t.seconds(), n);
}
// Counted as one HcPre (the ops after it ride in the same call).
void ProfilingBackend::HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale,
                                 int hc, int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
                                 float* comb, std::span<const RowOp> then) const {
  Timer t;
  inner_.HcPreThen(x, n, fn, base, scale, hc, dim, iters, norm_eps, hc_eps, y, post, comb, then);
  Record(OpKind::kHcPre, t.seconds(), n);
}
void ProfilingBackend::RowOps(float* x, int64_t values, std::span<const RowOp> ops) const {
  Timer t;
  inner_.RowOps(x, values, ops);
  Record(OpKind::kRowOps, t.seconds(), ops.empty() || ops[0].width <= 0 ? 0 : values / ops[0].width);
}
void ProfilingBackend::HcPost(const float* f, const float* residual, const float* post, const float* comb,
                              int64_t n, int hc, int64_t dim, float* out) const {
  Timer t;
  inner_.HcPost(f, residual, post, comb, n, hc, dim, out);
  Record(OpKind::kHcPost, t.seconds(), n);
}
void ProfilingBackend::HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc,
                              int64_t dim, float norm_eps, float hc_eps, float* y) const {
  Timer t;
  inner_.HcHead(x, n, fn, base, scale, hc, dim, norm_eps, hc_eps, y);
  Record(OpKind::kHcHead, t.seconds(), n);
}

void ProfilingBackend::RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                                     float swiglu_limit, float* y) const {
  Timer t;
  inner_.RoutedExperts(experts, x, n, dim, swiglu_limit, y);
  uint64_t pairs = 0;
  for (const ExpertWork& e : experts) pairs += e.rows.size();
  Record(OpKind::kRoutedExperts, t.seconds(), pairs);
}

void ProfilingBackend::RoutedMoE(const MoeRouter& router, const float* x, int64_t n, int64_t dim,
                                 float swiglu_limit, float* y, int32_t* ids, float* weights) const {
  Timer t;
  inner_.RoutedMoE(router, x, n, dim, swiglu_limit, y, ids, weights);
  Record(OpKind::kRoutedMoE, t.seconds(), static_cast<uint64_t>(n * router.k));  // token-expert pairs
}

void ProfilingBackend::RoundBf16(const float* x, int64_t n, float* y) const {
  Timer t;
  inner_.RoundBf16(x, n, y);
  Record(OpKind::kRoundBf16, t.seconds(), n);
}

}  // namespace flashmem::kernels
