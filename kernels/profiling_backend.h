// A Backend that forwards every op to another backend and records, per op, how many calls it
// made, how long they took (wall time: a device backend synchronizes inside each op, so this is
// what the model's caller waits for) and how many rows/keys they touched. `flashmem generate
// --profile-ops` and tests/bench/model_bench print it; it is how the model-level tables in
// docs/benchmarks.md say where a step's time goes.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "absl/synchronization/mutex.h"
#include "kernels/ops.h"

namespace flashmem::kernels {

enum class OpKind : int {
  kLinear, kRmsNorm, kHeadRmsNorm, kRope, kFp8RoundTrip, kFp4RoundTrip, kHadamard,
  kSparseAttention, kIndexScores, kTopK, kIndexTopK, kIndexerLogits, kHcPre, kHcPost, kHcHead, kRoutedExperts, kRoundBf16, kRowOps, kRoutedMoE, kWriteRecords, kPoolSteps, kCount
};
const char* OpName(OpKind op);

struct OpStats {
  uint64_t calls = 0;
  double seconds = 0;
  uint64_t items = 0;  // Linear: token rows; attention: candidate slots; scoring, top-k: keys; experts: (expert, row) pairs; others: rows
};

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(const Backend& inner) : inner_(inner) {}
  void HoldOnDevice(float* p, int64_t count) const override { inner_.HoldOnDevice(p, count); }
  void SyncToHost(float* p) const override { inner_.SyncToHost(p); }
  void ReleaseFromDevice(float* p, bool keep) const override { inner_.ReleaseFromDevice(p, keep); }
  void FinishWrites() const override { inner_.FinishWrites(); }
  int64_t DeviceWaits() const override { return inner_.DeviceWaits(); }
  const char* name() const override { return inner_.name(); }
  absl::Status Health() const override { return inner_.Health(); }
  absl::Status Prepare(const WeightMatrix& w) const override { return inner_.Prepare(w); }

  void Linear(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out) const override;
  void LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y, Rounding out) const override;
  void LinearMany(std::span<const LinearJob> jobs, const float* x, int64_t n) const override;
  void LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const override;
  void LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                  std::span<const RowOp> then) const override;
  void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) const override;
  void HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const override;
  void Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims, const float* cos,
            const float* sin, int64_t rows_per_angle, bool inverse) const override;
  void Fp8RoundTrip(float* x, int64_t n, int64_t block) const override;
  void Fp4RoundTrip(float* x, int64_t n, int64_t block) const override;
  void Hadamard(float* x, int64_t rows, int64_t dim) const override;
  void SparseAttention(const float* q, int64_t heads, int64_t dim, std::span<const float* const> kv_rows,
                       const float* sink, float softmax_scale, float* out) const override;
  void SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims, std::span<const KvSlot> slots,
                              const float* sink, float softmax_scale, float* out) const override;
  void SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim, int64_t rope_dims,
                           const float* sink, float softmax_scale) const override;
  void IndexScoresBatch(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim) const override;
  void WriteRecords(std::span<const RecordWrite> writes, int64_t dim, int64_t rope_dims) const override;
  void PoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) const override;
  KvReserveStats ReserveStats() const override { return inner_.ReserveStats(); }
  std::vector<std::vector<int32_t>> TopKBatch(std::span<const std::span<const float>> scores, int64_t k) const override;
  std::vector<std::vector<int32_t>> IndexTopKBatch(std::span<const IndexSelectRow> rows, int64_t heads, int64_t dim,
                                                   int64_t k) const override;
  void IndexScores(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                   float* scores) const override;
  std::vector<int32_t> TopK(std::span<const float> scores, int64_t k) const override;
  void IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim, std::span<const float* const> keys,
                     float* logits) const override;
  void HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc, int64_t dim,
             int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb) const override;
  void HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                 int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb,
                 std::span<const RowOp> then) const override;
  void RowOps(float* x, int64_t values, std::span<const RowOp> ops) const override;
  void HcPost(const float* f, const float* residual, const float* post, const float* comb, int64_t n, int hc,
              int64_t dim, float* out) const override;
  void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc, int64_t dim,
              float norm_eps, float hc_eps, float* y) const override;
  void RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim, float swiglu_limit,
                     float* y) const override;
  void RoutedMoE(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit, float* y,
                 int32_t* ids, float* weights) const override;
  void RoundBf16(const float* x, int64_t n, float* y) const override;

  OpStats Stats(OpKind op) const;
  void Reset();
  // One line per op that ran: calls, total ms, µs per call, share of the total, items per call.
  std::string Report() const;

 private:
  void Record(OpKind op, double seconds, uint64_t items) const;

  const Backend& inner_;
  mutable absl::Mutex mu_;
  mutable std::array<OpStats, static_cast<int>(OpKind::kCount)> stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace flashmem::kernels
