#include "kernels/ops.h"

#include <algorithm>
#include <atomic>

#include "kernels/numerics.h"

namespace flashmem::kernels {

uint64_t WeightIdentity::Next() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

namespace {

// The SwiGLU of ExpertMlp (the CUDA SwiGlu kernel computes the same, operation for operation).
void SwiGluRows(const float* gate, const float* up, int64_t m, int64_t inter, const float* weights, float limit,
                float* h) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < inter; ++j) {
      float g = gate[i * inter + j], u = up[i * inter + j];
      if (limit > 0) {
        u = std::clamp(u, -limit, limit);
        g = std::min(g, limit);
      }
      float v = (g / (1.0f + num::ExpF(-g))) * u;  // silu(gate) * up, fp32
      if (weights) v *= weights[i];
      h[i * inter + j] = num::RoundBf16(v);
    }
}

}  // namespace

void ExpertMlp(const Backend& be, const WeightMatrix& w1, const WeightMatrix& w3, const WeightMatrix& w2,
               const float* x, int64_t m, const float* weights, float swiglu_limit, float* out) {
  const int64_t inter = w1.rows;
  std::vector<float> gate(m * inter), up(m * inter), h(m * inter);
  be.Linear(w1, x, m, gate.data(), Rounding::kBf16);
  be.Linear(w3, x, m, up.data(), Rounding::kBf16);
  SwiGluRows(gate.data(), up.data(), m, inter, weights, swiglu_limit, h.data());
  be.Linear(w2, h.data(), m, out, Rounding::kBf16);
}

RowOp RowOp::HeadRmsNormBf16(int64_t dim, float eps) {
  return {.kind = Kind::kHeadRmsNormBf16, .width = dim, .eps = eps};
}

RowOp RowOp::Rope(int64_t stride, int64_t offset, int64_t rope_dims, const float* cos, const float* sin,
                  int64_t rows_per_angle, bool inverse) {
  return {.kind = Kind::kRope, .width = stride, .offset = offset, .rope_dims = rope_dims,
          .rows_per_angle = rows_per_angle, .cos = cos, .sin = sin, .inverse = inverse};
}

RowOp RowOp::Hadamard(int64_t dim) { return {.kind = Kind::kHadamard, .width = dim}; }

RowOp RowOp::Fp4RoundTrip(int64_t block) { return {.kind = Kind::kFp4RoundTrip, .width = block}; }

RowOp RowOp::RmsNorm(int64_t dim, const float* weight, float eps) {
  return {.kind = Kind::kRmsNorm, .width = dim, .eps = eps, .weight = weight};
}

RowOp RowOp::Fp8RoundTripPrefix(int64_t width, int64_t prefix, int64_t block) {
  return {.kind = Kind::kFp8RoundTrip, .width = width, .prefix = prefix, .block = block};
}

RowOp RowOp::ScaleBf16(float scale) { return {.kind = Kind::kScaleBf16, .width = 1, .scale = scale}; }

void ApplyRowOps(const Backend& be, float* x, int64_t n, std::span<const RowOp> ops) {
  for (const RowOp& op : ops) {
    const int64_t rows = op.width > 0 ? n / op.width : 0;
    switch (op.kind) {
      case RowOp::Kind::kHeadRmsNormBf16: be.HeadRmsNormBf16(x, rows, op.width, op.eps); break;
      case RowOp::Kind::kRope:
        be.Rope(x, rows, op.width, op.offset, op.rope_dims, op.cos, op.sin, op.rows_per_angle, op.inverse);
        break;
      case RowOp::Kind::kHadamard: be.Hadamard(x, rows, op.width); break;
      case RowOp::Kind::kFp4RoundTrip: be.Fp4RoundTrip(x, n, op.width); break;
      case RowOp::Kind::kRmsNorm: be.RmsNorm(x, op.weight, rows, op.width, op.eps, x); break;
      case RowOp::Kind::kFp8RoundTrip:
        if (rows > 1 && op.block > 0 && op.prefix % op.block == 0) {  // blocks never straddle two rows: one call
          std::vector<float> prefixes(rows * op.prefix);
          for (int64_t i = 0; i < rows; ++i) std::copy_n(x + i * op.width, op.prefix, prefixes.data() + i * op.prefix);
          be.Fp8RoundTrip(prefixes.data(), rows * op.prefix, op.block);
          for (int64_t i = 0; i < rows; ++i) std::copy_n(prefixes.data() + i * op.prefix, op.prefix, x + i * op.width);
        } else {
          for (int64_t i = 0; i < rows; ++i) be.Fp8RoundTrip(x + i * op.width, op.prefix, op.block);
        }
        break;
      case RowOp::Kind::kScaleBf16:
        for (int64_t i = 0; i < n; ++i) x[i] = num::RoundBf16(x[i] * op.scale);
        break;
    }
  }
}

void Backend::LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y, Rounding out) const {
  const int64_t G = static_cast<int64_t>(w.size());
  if (G == 0 || n == 0) return;
  const int64_t k = w[0].cols, m = w[0].rows;
  std::vector<float> xg(n * k), yg(n * m);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = 0; i < n; ++i) std::copy_n(x + (i * G + g) * k, k, xg.begin() + i * k);
    Linear(w[g], xg.data(), n, yg.data(), out);
    for (int64_t i = 0; i < n; ++i) std::copy_n(yg.begin() + i * m, m, y + (i * G + g) * m);
  }
}

void Backend::HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                        int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb,
                        std::span<const RowOp> then) const {
  HcPre(x, n, fn, base, scale, hc, dim, iters, norm_eps, hc_eps, y, post, comb);
  ApplyRowOps(*this, y, n * dim, then);
}

void Backend::RowOps(float* x, int64_t values, std::span<const RowOp> ops) const { ApplyRowOps(*this, x, values, ops); }

void Backend::LinearMany(std::span<const LinearJob> jobs, const float* x, int64_t n) const {
  for (const LinearJob& j : jobs) LinearThen(*j.w, x, n, j.y, j.out, j.then);
}

void Backend::LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const {
  std::vector<float> y(static_cast<size_t>(n * w.rows));
  Linear(w, x, n, y.data(), Rounding::kNone);
  for (int64_t i = 0; i < n; ++i)
    index[i] = ArgmaxIndex(std::span<const float>(y.data() + i * w.rows, static_cast<size_t>(w.rows)));
}

void Backend::LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                         std::span<const RowOp> then) const {
  Linear(w, x, n, y, out);
  ApplyRowOps(*this, y, n * w.rows, then);
}

uint64_t NewKvPageVersion() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

void Backend::SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims,
                                     std::span<const KvSlot> slots, const float* sink, float softmax_scale,
                                     float* out) const {
  size_t records = 0;
  for (const KvSlot& s : slots) records += s.record != nullptr;
  std::vector<float> decoded(records * dim);
  std::vector<const float*> rows(slots.size(), nullptr);
  float* next = decoded.data();
  for (size_t j = 0; j < slots.size(); ++j) {
    if (slots[j].record) {
      num::DecodeFp8Record(slots[j].record, slots[j].scales, dim, rope_dims, next);
      rows[j] = next;
      next += dim;
    } else {
      rows[j] = slots[j].row;
    }
  }
  SparseAttention(q, heads, dim, rows, sink, softmax_scale, out);
}

void Backend::IndexScoresBatch(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim) const {
  const std::vector<float> zero(dim, 0.0f);
  std::vector<const float*> keys;
  for (const IndexScoreRow& r : rows) {
    keys.clear();
    for (const KeyRun& run : r.keys)
      for (int64_t j = 0; j < run.count; ++j) keys.push_back(run.rows ? run.rows + j * dim : zero.data());
    if (!keys.empty()) IndexScores(r.q, r.w, heads, dim, keys, r.scores);
  }
}

std::vector<std::vector<int32_t>> Backend::TopKBatch(std::span<const std::span<const float>> scores, int64_t k) const {
  std::vector<std::vector<int32_t>> out;
  out.reserve(scores.size());
  for (std::span<const float> s : scores) out.push_back(TopK(s, k));
  return out;
}

void PlaceRuns(const float* scored, std::span<const KeyRun> runs, std::span<const int64_t> at, std::span<float> list) {
  const int64_t length = static_cast<int64_t>(list.size());
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t start = r < at.size() ? at[r] : -1, count = runs[r].count;
    if (start >= 0 && count >= 0 && start + count <= length) std::copy_n(scored, count, list.begin() + start);
    scored += count;
  }
}

std::vector<std::vector<int32_t>> Backend::IndexTopKBatch(std::span<const IndexSelectRow> rows, int64_t heads,
                                                          int64_t dim, int64_t k) const {
  std::vector<int64_t> offset(rows.size() + 1, 0);
  for (size_t i = 0; i < rows.size(); ++i) {
    offset[i + 1] = offset[i];
    for (const KeyRun& run : rows[i].keys) offset[i + 1] += run.count;
  }
  std::vector<float> scored(offset.back());
  std::vector<IndexScoreRow> score_rows(rows.size());
  for (size_t i = 0; i < rows.size(); ++i)
    score_rows[i] = {rows[i].q, rows[i].w, rows[i].keys, scored.data() + offset[i]};
  IndexScoresBatch(score_rows, heads, dim);
  std::vector<std::vector<float>> lists(rows.size());
  std::vector<std::span<const float>> spans(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    lists[i].assign(rows[i].length, -std::numeric_limits<float>::infinity());
    PlaceRuns(scored.data() + offset[i], rows[i].keys, rows[i].at, lists[i]);
    if (rows[i].list) std::copy(lists[i].begin(), lists[i].end(), rows[i].list);
    spans[i] = lists[i];
  }
  return TopKBatch(spans, k);
}

void Backend::SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim, int64_t rope_dims,
                                  const float* sink, float softmax_scale) const {
  for (const AttentionRow& r : rows) {
    SparseAttentionRecords(r.q, heads, dim, rope_dims, r.slots, sink, softmax_scale, r.out);
    ApplyRowOps(*this, r.out, heads * dim, r.then);
  }
}

void Backend::WriteRecords(std::span<const RecordWrite> writes, int64_t /*dim*/, int64_t /*rope_dims*/) const {
  const int64_t m = static_cast<int64_t>(writes.size());
  // ~1-2 us a row on the host: a decode step's rows (distinct sessions' sinks) over the cores; a
  // sink written twice in one call (its pages' versions, a turn to fp32) only in order.
  std::vector<const RecordSink*> sinks(m);
  for (int64_t k = 0; k < m; ++k) sinks[k] = writes[k].sink;
  std::sort(sinks.begin(), sinks.end());
  const bool distinct = std::adjacent_find(sinks.begin(), sinks.end()) == sinks.end();
#pragma omp parallel for schedule(static) if (m >= 8 && distinct)
  for (int64_t k = 0; k < m; ++k) writes[k].sink->WriteOnHost(writes[k].index, writes[k].row);
}

void Backend::RoundBf16(const float* x, int64_t n, float* y) const {
  for (int64_t i = 0; i < n; ++i) y[i] = num::RoundBf16(x[i]);
}

void Backend::RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                            float swiglu_limit, float* y) const {
  std::vector<float> xs, out;
  for (const ExpertWork& e : experts) {
    const int64_t m = static_cast<int64_t>(e.rows.size());
    if (m == 0) continue;
    xs.resize(m * dim);
    for (int64_t r = 0; r < m; ++r) std::copy_n(x + static_cast<int64_t>(e.rows[r]) * dim, dim, xs.begin() + r * dim);
    out.resize(m * dim);
    ExpertMlp(*this, *e.w1, *e.w3, *e.w2, xs.data(), m, e.weights.empty() ? nullptr : e.weights.data(), swiglu_limit,
              out.data());
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < dim; ++c) y[static_cast<int64_t>(e.rows[r]) * dim + c] += out[r * dim + c];
  }
  (void)n;
}

void Backend::RecordError(const absl::Status& st) const {
  absl::MutexLock lock(&error_mu_);
  if (error_.ok()) error_ = st;
}

void Backend::RoutedMoE(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit, float* y,
                        int32_t* ids, float* weights) const {
  if (n == 0) return;
  if (absl::Status st = ValidateRouter(router, n, dim); !st.ok()) return RecordError(st);
  RoutedMoEOnHost(router, x, n, dim, swiglu_limit, y, ids, weights);
}

void Backend::RoutedMoEOnHost(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit,
                              float* y, int32_t* ids, float* weights) const {
  const int64_t E = router.gate->rows, k = router.k;
  std::vector<float> logits(n * E);
  Linear(*router.gate, x, n, logits.data(), Rounding::kNone);  // the reference's fp32 router
  std::vector<int32_t> own_ids;
  std::vector<float> own_weights;
  if (!ids) {
    own_ids.resize(n * k);
    ids = own_ids.data();
  }
  if (!weights) {
    own_weights.resize(n * k);
    weights = own_weights.data();
  }
  RouteFromLogits(router, logits.data(), n, ids, weights);
  RoutedExperts(GroupByExpert(router, ids, weights, n), x, n, dim, swiglu_limit, y);
}

}  // namespace flashmem::kernels
