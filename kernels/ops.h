// Backend-neutral compute ops of the DeepSeek-V4 decode path.
//
// Model code (worker/model) calls only this interface; backends live apart (kernels/cpu is the
// exact reference, kernels/cuda the sm_90 one) and are tested against each other.
// Activations are fp32 arrays whose values sit where the reference rounds them: every op
// documents whether its output is rounded to bf16, as the reference's bf16 tensors are.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kernels/moe_routing.h"
#include "kernels/topk.h"

namespace flashmem::kernels {

// How a weight matrix is stored, mirroring the dispatch of the reference's linear().
enum class WeightFormat {
  kDense,        // bf16/f32 checkpoint tensor upcast to fp32; plain fp32 dot products
  kFp8Block128,  // e4m3 values, one power-of-two scale per 128x128 block
  kFp4Group32,   // e2m1 values, one power-of-two scale per 32 input elements of a row
};

// Which weight matrix this is, for device backends that keep a copy of it (kernels/cuda's resident
// weights): every matrix made or copied gets an identity never given before; a move takes the
// values and their identity along. A backend that finds its copy under the values' address
// still checks the identity, so a matrix freed and another built at the same address is never
// mistaken for it — without sampling the values of every weight on every op.
class WeightIdentity {
 public:
  WeightIdentity() : id_(Next()) {}
  WeightIdentity(const WeightIdentity&) : id_(Next()) {}
  WeightIdentity& operator=(const WeightIdentity&) {
    id_ = Next();
    return *this;
  }
  WeightIdentity(WeightIdentity&& o) noexcept : id_(o.id_) { o.id_ = Next(); }
  WeightIdentity& operator=(WeightIdentity&& o) noexcept {
    id_ = o.id_;
    o.id_ = Next();
    return *this;
  }
  uint64_t id() const { return id_; }

 private:
  static uint64_t Next();
  uint64_t id_;
};

// A [rows, cols] weight (y = x · Wᵀ) with its values decoded to fp32 (exact: the grids of
// e4m3/e2m1/bf16 are subsets of fp32) and its block scales.
struct WeightMatrix {
  WeightFormat format = WeightFormat::kDense;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> values;  // rows * cols
  std::vector<float> scales;  // kFp8Block128: ceil(rows/128) x ceil(cols/128); kFp4Group32: rows x cols/32
  // Values and scales must not change in place once an op has used the matrix: a device backend
  // keeps its copy for this identity (a few sampled values are still compared, but a change
  // elsewhere would go unnoticed). Build or copy a new matrix instead.
  WeightIdentity identity;
  int64_t scale_cols() const {
    return format == WeightFormat::kFp8Block128 ? (cols + 127) / 128 : cols / 32;
  }
};

enum class Rounding { kNone, kBf16 };

// One slot of sparse attention: -1 means masked (the reference pads candidate lists with -1).
using CandidateIndex = int32_t;

// One slot of sparse attention over the session's KV as the worker holds it: an entry stored as
// an FP8 record (spec §4.1, worker/kv/page_codec.h: `record` points at its dim - rope_dims e4m3
// codes followed by its rope_dims bf16 values, `scales` at its UE8M0 bytes, one per 64 codes —
// in a page the two live apart), an fp32 row, or neither: a masked slot.
//
// A slot may also name its page (`page`, `entry`): the page's bytes (records: the paged layout,
// 64 entries' data then their scales; fp32 rows: entries x dim floats) and a version that changes
// with every write. A device backend keeps copies of such pages in its KV reserve and uploads a
// page only when the version it holds is not the page's current one; a slot without a page is
// staged on every call.
struct KvPage;
struct KvSlot {
  const uint8_t* record = nullptr;
  const uint8_t* scales = nullptr;
  const float* row = nullptr;
  const KvPage* page = nullptr;  // the record's page, or null
  int32_t entry = 0;             // the record's entry in `page`
  bool masked() const { return record == nullptr && row == nullptr; }
};

// A page of records as its owner (worker/kv/EntryPages) holds it. `version` is unique in the
// process (NewKvPageVersion) and replaced on every write, so equal versions mean equal bytes —
// a page freed and another allocated at its address never match. `device_slot` belongs to the
// backend that attends over the page: where its reserve last put a copy (-1: nowhere); the
// backend checks the copy's version before trusting it.
struct KvPage {
  const uint8_t* bytes = nullptr;
  int64_t size = 0;  // bytes
  int64_t entries = 0;
  uint64_t version = 0;
  mutable std::atomic<int64_t> device_slot{-1};
  // The last write when it changed only the byte ranges `changed` (a range of 0 bytes ends the
  // list) of the page as it was at version `before` (0: not known — a new, evicted or restored
  // page, or a write that changed more): a copy at version `before` needs only those bytes. A
  // decode step writes one entry of a session's window page: 584 of its 37,376 bytes.
  struct Range {
    int64_t offset = 0, bytes = 0;
  };
  uint64_t before = 0;
  std::array<Range, 2> changed{};
};
// A fresh page version (thread-safe; never 0, never repeated in the process).
uint64_t NewKvPageVersion();

// What a device backend's KV reserve (device copies of KV pages) holds and has done, per kind of
// page; zeros where there is none.
struct KvReserveStats {
  struct Kind {
    int64_t slots = 0;    // page copies it can hold (0: not allocated)
    int64_t held = 0;     // page copies it holds
    int64_t hits = 0;     // pages an op found in place (summed over ops)
    int64_t uploads = 0;  // pages sent to it whole: new, or written more than once since their copy
    int64_t patches = 0;  // pages updated in place with the one entry written since their copy
    int64_t written = 0;  // pages whose written entry the device wrote itself (WriteRecords)
    int64_t bytes = 0;    // device memory it takes
  };
  Kind records;  // the main KV's FP8 record pages
  Kind keys;     // the indexer's key pages (fp32 rows, or their MXFP4 twins: KeyRun::packed)
};

// An in-place op on the values an op has just written (Backend::LinearThen, AttentionRow::then):
// the Backend method of the same name over those values, run where they are — a device backend
// runs it before they come back, instead of sending them up and down again for it.
struct RowOp {
  enum class Kind { kHeadRmsNormBf16, kRope, kHadamard, kFp4RoundTrip, kRmsNorm, kFp8RoundTrip, kScaleBf16 };
  Kind kind = Kind::kHadamard;
  // The values as rows of `width` (the op's values are a multiple of it): the head dim
  // (HeadRmsNormBf16), the stride (Rope), the dim (Hadamard, RmsNorm), the block (Fp4RoundTrip),
  // the row (Fp8RoundTrip), 1 (ScaleBf16).
  int64_t width = 0;
  float eps = 0;  // HeadRmsNormBf16, RmsNorm
  const float* weight = nullptr;  // RmsNorm: [width], as Backend::RmsNorm's (in place)
  // Fp8RoundTrip: Backend::Fp8RoundTrip of the first `prefix` values of every row (a whole number
  // of blocks), as the window KV's nope dims.
  int64_t prefix = 0, block = 0;
  // Rope: as Backend::Rope over the rows of `width`, angle set r / rows_per_angle for row r.
  int64_t offset = 0, rope_dims = 0, rows_per_angle = 1;
  const float* cos = nullptr;
  const float* sin = nullptr;
  bool inverse = false;
  float scale = 1.0f;  // ScaleBf16: every value v becomes RoundBf16(v * scale), the product in fp32

  static RowOp HeadRmsNormBf16(int64_t dim, float eps);
  static RowOp Rope(int64_t stride, int64_t offset, int64_t rope_dims, const float* cos, const float* sin,
                    int64_t rows_per_angle, bool inverse);
  static RowOp Hadamard(int64_t dim);
  static RowOp Fp4RoundTrip(int64_t block);
  static RowOp RmsNorm(int64_t dim, const float* weight, float eps);
  static RowOp Fp8RoundTripPrefix(int64_t width, int64_t prefix, int64_t block);
  // No Backend method of its own: RoundBf16(v * scale) for every value (the indexer's head weights).
  static RowOp ScaleBf16(float scale);
};

// Where an op writes a KV entry (Backend::WriteRecords); worker/kv/EntryPages is one for its
// pages. Where the sink holds FP8 records, a device backend that computed the entry's values
// writes the record itself — into its KV reserve's copy of the page and, later, the host page —
// instead of sending the values to the host to be encoded there.
class RecordSink {
 public:
  // Where entry i's record goes: its data and scale bytes in the host page, its page and entry
  // there (its KvPage renewed for a write of that entry alone: a new version, `before` and
  // `changed`), or false when the entry cannot take a record written elsewhere (its page not in
  // memory, its stream not held as records, or one that keeps a second form). The caller then
  // writes these bytes, exactly as WriteOnHost would have.
  virtual bool BeginRecordWrite(int64_t i, uint8_t** data, uint8_t** scales, const KvPage** page, int32_t* entry) = 0;
  // Writes entry i from its values on the host (encoded there; values off the record's grid turn
  // the stream to fp32 rows): the default, and what a device falls back to for such values.
  virtual void WriteOnHost(int64_t i, const float* row) = 0;

 protected:
  ~RecordSink() = default;
};

// One entry to write (Backend::WriteRecords): entry `index` of `sink`, from its `row` of values.
struct RecordWrite {
  const float* row = nullptr;
  RecordSink* sink = nullptr;
  int64_t index = 0;
};

// A gated-pooling compressor's pending block of one session (worker/model's CompressorState):
// shape.slots() rows of shape.width() fp32 values of projected kv and of gate scores (ape added),
// and a version unique in the process (NewKvPageVersion), replaced by every write: equal versions
// mean equal values, so a device backend may keep a copy of the ring and trust it while they match.
// Whoever writes the arrays outside Backend::PoolSteps renews the version.
struct PoolRing {
  float* kv = nullptr;
  float* score = nullptr;
  uint64_t* version = nullptr;
};

// One token of a Backend::PoolSteps call: its projections into its session's ring, and, when it
// completes a block, the block's pooled row.
struct PoolStep {
  PoolRing ring;
  const float* kv = nullptr;     // [width] the token's kv projection
  const float* score = nullptr;  // [width] its gate scores, ape not added
  int64_t pos = 0;               // its position
  float* pooled = nullptr;       // [head_dim] the pooled row (bf16 values) when (pos + 1) % ratio == 0, else unused
};

// The compressor a PoolSteps call runs (spec §3.2): blocks of `ratio` tokens pooled into rows of
// head_dim; overlapping (ratio 4) each block pools 2 x ratio candidates — the previous block's
// first half of each row and its own second half — from rows of 2 x head_dim; `ape`
// [ratio][width] is added to the scores by position in the block.
struct PoolShape {
  int ratio = 0;
  int64_t head_dim = 0;
  bool overlap = false;
  const float* ape = nullptr;
  int64_t width() const { return (overlap ? 2 : 1) * head_dim; }
  int64_t slots() const { return (overlap ? 2 : 1) * static_cast<int64_t>(ratio); }
};

// One query token of a batched sparse attention (Backend::SparseAttentionRows): q and out are
// [heads, dim], `slots` what it attends; `then` runs on its out afterwards.
struct AttentionRow {
  const float* q = nullptr;
  std::span<const KvSlot> slots;
  float* out = nullptr;
  std::span<const RowOp> then;
};

// Keys of an index scoring held in pages: `count` consecutive fp32 rows of the scoring's dim from
// `rows` (null: zero keys), entries [entry, entry + count) of `page` (null: not paged; a device
// backend then stages them on every call). `packed`, when set, is the same page's keys as MXFP4
// (memtier's form, worker/kv/page_codec.h: every entry's dim / 2 bytes of e2m1 codes, the lower dim
// in the low nibble, then every entry's dim / 32 UE8M0 scale bytes), holding exactly the values of
// `rows`: a device backend may keep and read that form instead (68 bytes a key at dim 128
// against 512). The CPU reads `rows`.
struct KeyRun {
  const float* rows = nullptr;
  int64_t count = 0;
  const KvPage* page = nullptr;
  int32_t entry = 0;
  const KvPage* packed = nullptr;
};

// One query row of a batched index scoring (Backend::IndexScoresBatch): q [heads, dim], head
// weights w [heads], its keys as runs, scores: one per key, the runs' keys in order.
struct IndexScoreRow {
  const float* q = nullptr;
  const float* w = nullptr;
  std::span<const KeyRun> keys;
  float* scores = nullptr;
};

// One query row of Backend::IndexTopKBatch: its key runs scored into a list of `length` scores,
// run r's keys at positions at[r], at[r] + 1, ...; every other position is -inf. One `at` a run,
// each run inside the list (a device backend fails with InvalidArgument otherwise).
struct IndexSelectRow {
  const float* q = nullptr;
  const float* w = nullptr;
  std::span<const KeyRun> keys;
  std::span<const int64_t> at;  // one a run
  int64_t length = 0;
  float* list = nullptr;  // optional: receives the whole list (`length` floats), as top-k saw it
};

// Scores of key runs laid end to end (`scored`) into a list: run r's at list[at[r]], ... The
// positions no run covers keep their values; a run outside the list (or without its `at`) is
// skipped, never written outside it.
void PlaceRuns(const float* scored, std::span<const KeyRun> runs, std::span<const int64_t> at, std::span<float> list);

// One routed expert of an MoE layer (its matrices) and the token rows sent to it
// (Backend::RoutedExperts).
struct ExpertWork : ExpertMatrices {
  std::vector<int32_t> rows;   // rows of x routed to this expert
  std::vector<float> weights;  // the routing weight of each row (empty: 1, no multiply)
};

// One projection of a Backend::LinearMany call: y [n, w->rows] = x · w->ᵀ rounded `out`, then the
// row ops `then` on y's values (as LinearThen).
struct LinearJob {
  const WeightMatrix* w = nullptr;
  float* y = nullptr;
  Rounding out = Rounding::kNone;
  std::span<const RowOp> then;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // A device backend can fail inside an op (device memory budget exhausted, a lost device): the
  // first error sticks, later ops do nothing, and every forward returns it. The CPU fails only on
  // an op's bad input that the op checks (RoutedMoE's router): the default returns that error.
  virtual absl::Status Health() const {
    absl::MutexLock lock(&error_mu_);
    return error_;
  }
  // Moves a weight to where this backend computes (device memory), so that a budget too small
  // shows at load rather than at the first step. Nothing to do on the CPU.
  virtual absl::Status Prepare(const WeightMatrix& /*w*/) const { return absl::OkStatus(); }

  // y[n, w.rows] = x[n, w.cols] · Wᵀ. Quantized formats first quantize x to e4m3 per 1x128
  // block with pow2 scales (act_quant), then accumulate per K block in fp32:
  // acc += dot_block · s_x · s_w (K blocks of 128 for FP8, 32 for FP4). Dense: fp32 dot.
  virtual void Linear(const WeightMatrix& w, const float* x, int64_t n, float* y,
                      Rounding out) const = 0;
  // A grouped projection (the reference's einsum over groups, wo_a): x [n, G * k] -> y [n, G * m]
  // for G = w.size() weights of one shape [m, k]: group g's m columns of y are its k columns of x
  // times w[g]ᵀ. The same values as a Linear per group on the gathered columns, which is the
  // default (a device backend stages x once and runs every group in one call).
  virtual void LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y, Rounding out) const;
  // Linear, then `then` in order on y's n * w.rows values: the same values as those calls, which
  // is the default (a device backend runs them before y comes back).
  virtual void LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                          std::span<const RowOp> then) const;
  // `ops` in order on x's `values` values, in place: ApplyRowOps, which is the default (a device
  // backend runs the chain in one call: a compressor's finishing of its pooled rows).
  virtual void RowOps(float* x, int64_t values, std::span<const RowOp> ops) const;
  // Several projections of one input x [n, k] (every job's w->cols == k; outputs never overlap):
  // the same values as a LinearThen per job in order, which is the default. A device backend
  // stages x once and runs every job in one call — one wait, where any output comes back to the
  // host, instead of one per projection (an attention layer's wq_a, wkv and compressor and indexer
  // projections all read the same normed x).
  virtual void LinearMany(std::span<const LinearJob> jobs, const float* x, int64_t n) const;
  // index[i] = ArgmaxIndex of row i of x · Wᵀ (fp32, Rounding::kNone): greedy decoding's pick
  // from the head. The default is Linear then the host's scan; a device backend sends back the
  // n picks instead of n rows of the vocabulary (33 MB at 64 rows of V4's).
  virtual void LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const;

  // y = bf16(weight * x / sqrt(mean(x^2) + eps)) per row of `dim` (reference RMSNorm).
  virtual void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                       float* y) const = 0;

  // In place, per head of `dim`: q *= rsqrt(mean(q^2) + eps) evaluated in bf16 arithmetic, as the
  // reference does on its bf16 query tensor.
  virtual void HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const = 0;

  // In place interleaved RoPE on `rope_dims` dims starting at x + offset, for `rows` rows of
  // `stride`: pairs (2i, 2i+1) of row r rotate by cos/sin[a * rope_dims/2 + i] with a = r /
  // rows_per_angle (one angle set per token: rows_per_angle = heads); inverse rotates by -angle.
  // bf16 output.
  virtual void Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims,
                    const float* cos, const float* sin, int64_t rows_per_angle, bool inverse) const = 0;

  // In place quantize-dequantize round trips (QAT simulation), bf16 output:
  // e4m3 with pow2 scale per `block` (amax floor 1e-4), e2m1 with pow2 scale per `block`.
  virtual void Fp8RoundTrip(float* x, int64_t n, int64_t block) const = 0;
  virtual void Fp4RoundTrip(float* x, int64_t n, int64_t block) const = 0;

  // In place normalized Walsh-Hadamard transform (Sylvester order, scale dim^-1/2) over rows of
  // `dim` (a power of two); fp32 inside, bf16 output.
  virtual void Hadamard(float* x, int64_t rows, int64_t dim) const = 0;

  // Sparse MQA with a per-head sink for one query token: q [heads, dim] (bf16 values), candidate
  // rows kv(idx) of `dim`; visits `idx` in blocks of 64 with an online fp32 softmax, P rounded to
  // bf16 for P·V, sink exp(sink_h - max) added to the denominator at the end. bf16 output.
  virtual void SparseAttention(const float* q, int64_t heads, int64_t dim,
                               std::span<const float* const> kv_rows, const float* sink,
                               float softmax_scale, float* out) const = 0;

  // SparseAttention over slots held as FP8 records (or fp32 rows) of `dim` values whose last
  // `rope_dims` are bf16: the same result bit for bit as SparseAttention over the decoded rows.
  // The default decodes the records on the host and calls SparseAttention; a device backend can
  // stage the 584-byte records (a quarter of the fp32 rows) and attend over them in place.
  virtual void SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims,
                                      std::span<const KvSlot> slots, const float* sink, float softmax_scale,
                                      float* out) const;

  // SparseAttentionRecords for several query tokens at once (a decode step's rows of different
  // sessions: no row's slots are written while the batch runs), each with its own slots, then
  // each row's `then` on its out; the same results as those calls row by row, which is the
  // default. A device backend can stage every row's records together and attend over them, and
  // run the rows' `then`, in one launch each.
  virtual void SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim, int64_t rope_dims,
                                   const float* sink, float softmax_scale) const;

  // Writes each entry's values (dim floats; for a sink of FP8 records the last rope_dims of them
  // bf16 values, the rest on the e4m3 grid of a UE8M0 scale a 64-value block: what the model's
  // round trips leave) into its sink: the default is sink->WriteOnHost for each, in order (over the host's cores when every
  // write has a sink of its own). A device backend whose ops made the rows (held: Backend::HoldOnDevice) encodes them
  // where they are — the same bytes as the host's encoder, bit for bit — into its reserve's copy
  // of each page and sends them to the host page after the op: until FinishWrites() the host
  // pages may still hold the previous bytes (the backend's own ops never read them before). A
  // row off the grid goes to WriteOnHost then, its record on the device made unreadable (NaN
  // scales) in the meantime.
  virtual void WriteRecords(std::span<const RecordWrite> writes, int64_t dim, int64_t rope_dims) const;
  // The compressor's step of each token (PoolShape): its kv row into its ring's slot
  // (overlap ? ratio : 0) + pos % ratio, its scores there with ape[pos % ratio] added; when it
  // completes a block, each dim's softmax over the block's candidates (exp through num::ExpF)
  // weights their kv into the pooled row, rounded to bf16, and (overlap) the block's rows become
  // the previous block's. Each step renews its ring's version. The default runs the steps on the
  // host (over its cores when several complete; rings must then be distinct: a repeated ring runs
  // in order). A device backend whose ops made the rows (held) runs them where they are, on its
  // copies of the rings, and sends the rows to the host rings after the op: until FinishWrites()
  // the host rings may still hold the previous values.
  virtual void PoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) const;
  // Every host write an op left pending (WriteRecords, PoolSteps) done: call before the host reads or
  // frees pages or rings such ops wrote (the model does at the end of each forward pass).
  virtual void FinishWrites() const {}
  // How many times the host has waited for the device since the backend was made (an op's
  // outputs read on the host, a held buffer brought back, pending writes applied; 0 on the CPU):
  // what a decode step captured as one CUDA graph may do only at its end.
  virtual int64_t DeviceWaits() const { return 0; }

  // IndexScores for several query rows at once (a decode step's rows of different sessions), each
  // over its own keys held in pages: the same scores as IndexScores over each row's keys, which is
  // the default. A device backend can keep the pages (KeyRun::page) in its KV reserve instead of
  // staging every key on every call.
  virtual void IndexScoresBatch(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim) const;

  // TopK of several rows of scores (k clamped to each row's size): the same lists as one call per
  // row, which is the default.
  virtual std::vector<std::vector<int32_t>> TopKBatch(std::span<const std::span<const float>> scores,
                                                      int64_t k) const;

  // The indexer's candidate lists: each row's scores (IndexScoresBatch) placed in its list, then
  // the top k of every list (TopKBatch). The default is those two calls; a device backend keeps
  // the lists where they were scored.
  virtual std::vector<std::vector<int32_t>> IndexTopKBatch(std::span<const IndexSelectRow> rows, int64_t heads,
                                                           int64_t dim, int64_t k) const;

  // The KV reserve's state (thread-safe; for metrics). The default: none.
  virtual KvReserveStats ReserveStats() const { return {}; }

  // The indices of the k largest scores (at most scores.size()), descending, equal scores in
  // ascending index order (kernels/topk.h: the indexer's candidate list; bf16 scores tie often).
  // Every backend gives the same list; the CPU's is a heap select, a device's a radix select.
  virtual std::vector<int32_t> TopK(std::span<const float> scores, int64_t k) const { return TopKIndices(scores, k); }

  // Lightning-indexer scores: s_t = bf16(sum_h bf16(relu(bf16(q_h·k_t)) * w_h)) for n keys.
  virtual void IndexScores(const float* q, const float* w, int64_t heads, int64_t dim,
                           std::span<const float* const> keys, float* scores) const = 0;

  // Memory-indexer logits (LSA Level 1), all fp32: l_t = sum_h w_h * relu(q_h . k_t) for n keys of
  // `dim`; a null key row gives 0 (the caller masks it).
  virtual void IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim,
                             std::span<const float* const> keys, float* logits) const = 0;

  // Hyper-connections (mHC), all fp32 inside, for n tokens. x is the [n, hc, dim] residual (bf16
  // values); y [n, dim], post [n, hc], comb [n, hc, hc].
  // hc_pre: mixes = (fn · x) * rsqrt(mean(x^2) + norm_eps); pre = sigmoid(.)+hc_eps;
  // post = 2 sigmoid(.); comb = Sinkhorn(row softmax + hc_eps, then `iters` column/row
  // normalisations); y = bf16(sum_i pre_i x_i). fn is [(2+hc)*hc, hc*dim].
  virtual void HcPre(const float* x, int64_t n, const float* fn, const float* base,
                     const float* scale, int hc, int64_t dim, int iters, float norm_eps,
                     float hc_eps, float* y, float* post, float* comb) const = 0;
  // HcPre, then `then` in order on y's n * dim values: the same values as those calls, which is
  // the default (a device backend runs them before y comes back: the sublayer's RMSNorm rides on
  // hc_pre this way).
  virtual void HcPreThen(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                         int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post, float* comb,
                         std::span<const RowOp> then) const;
  // Per token: out_j = bf16(post_j * f + sum_i comb[i][j] * residual_i); f [n, dim], residual
  // and out [n, hc, dim] (out must not overlap residual).
  virtual void HcPost(const float* f, const float* residual, const float* post,
                      const float* comb, int64_t n, int hc, int64_t dim, float* out) const = 0;
  // The routed experts of an MoE layer on x [n, dim], in the order given: for an expert's rows,
  // g = bf16(w1·x), u = bf16(w3·x), h = bf16(silu(min(g, L)) * clamp(u, ±L) * weight) with silu
  // through num::ExpF (L <= 0: no clamp), out = bf16(w2·h), y[row] += out in fp32. y [n, dim] is
  // accumulated into. The default runs Linear per expert on the host arrays; a device backend
  // keeps the whole layer on the device (one call per layer instead of three per expert).
  virtual void RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                             float swiglu_limit, float* y) const;

  // One MoE layer's routed experts on x [n, dim], routed by `router`: the gate's fp32 logits,
  // RouteFromLogits, GroupByExpert, then RoutedExperts accumulating into y [n, dim] — the same
  // values as those calls, which is the default. ids and weights ([n][router.k] each), when not
  // null, receive the routing. A router ValidateRouter refuses fails the op (Health) and changes
  // nothing. A device backend routes where the logits are and groups the rows there: the host
  // waits for nothing (unless it asks for ids or weights).
  virtual void RoutedMoE(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit,
                         float* y, int32_t* ids = nullptr, float* weights = nullptr) const;

  // y[i] = bf16(x[i]) for n values (y may be x): the MoE's fp32 sum rounded as the sublayer's
  // output. The default runs on the host arrays; a device backend where the arrays are.
  virtual void RoundBf16(const float* x, int64_t n, float* y) const;

  // hc_head for n tokens: x [n, hc, dim], y [n, dim]; per token pre = sigmoid(mixes * scale +
  // base) + hc_eps; y = bf16(sum_i pre_i x_i) (a batch's last rows go through the head together).
  virtual void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc,
                      int64_t dim, float norm_eps, float hc_eps, float* y) const = 0;

  // Device residency of an activation buffer that only ops read and write (the residual stream
  // between layers): a hint, nothing on the CPU. Between HoldOnDevice(p, count) and
  // ReleaseFromDevice(p, ...) the caller neither reads nor writes p[0, count) itself, so a device
  // backend may keep its latest values on the device alone — ops reading any part of it read the
  // device copy, ops writing it leave their result there — instead of sending them back after
  // every op and up again before the next. SyncToHost(p) brings the latest values back to p (the
  // hold stays); ReleaseFromDevice ends the hold, bringing them back first when `keep` (without
  // it they are dropped: the buffer is dead). Release a hold before its buffer is freed; a hold
  // over a range another hold overlaps replaces that one (its values dropped).
  virtual void HoldOnDevice(float* /*p*/, int64_t /*count*/) const {}
  virtual void SyncToHost(float* /*p*/) const {}
  virtual void ReleaseFromDevice(float* /*p*/, bool /*keep*/) const {}

 protected:
  // A default op's bad input: the first one is what Health() returns from then on.
  void RecordError(const absl::Status& st) const;
  // RoutedMoE's default once ValidateRouter has passed: the logits through Linear, the routing on
  // the host, RoutedExperts (a device backend that does not route a call on the device).
  void RoutedMoEOnHost(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit, float* y,
                       int32_t* ids, float* weights) const;

 private:
  mutable absl::Mutex error_mu_;
  mutable absl::Status error_ ABSL_GUARDED_BY(error_mu_);
};

// Holds a Scratch-like buffer on the device for this object's life (Backend::HoldOnDevice), and
// releases whatever buffer `buf` owns when it ends — so buffers swapped between holders (the
// residual stream's X and next) stay covered. Declare it after the buffer.
template <typename Buffer>
class DeviceHold {
 public:
  DeviceHold(const Backend& be, Buffer& buf) : be_(be), buf_(buf) { be_.HoldOnDevice(buf_.data(), Count()); }
  ~DeviceHold() { be_.ReleaseFromDevice(buf_.data(), false); }
  DeviceHold(const DeviceHold&) = delete;
  DeviceHold& operator=(const DeviceHold&) = delete;
  // The latest values in buf's memory (the hold stays).
  void Sync() const { be_.SyncToHost(buf_.data()); }

 private:
  int64_t Count() const { return static_cast<int64_t>(buf_.size()); }
  const Backend& be_;
  Buffer& buf_;
};

// Runs `ops` in order on the n values at x through be's own in-place ops (RowOp's meaning).
void ApplyRowOps(const Backend& be, float* x, int64_t n, std::span<const RowOp> ops);

// The exact CPU reference backend (kernels/cpu).
const Backend& CpuBackend();
// Another instance of it, with a Health of its own (a test of an op's sticky error).
std::unique_ptr<Backend> NewCpuBackend();

// One expert's MLP on m rows through be's ops: out[m, dim] = bf16(w2·h) with
// h = bf16(silu(min(bf16(w1·x), L)) * clamp(bf16(w3·x), ±L) * weight) (weights null: 1; silu through
// num::ExpF). The shared expert (model::Expert) and the default RoutedExperts both run it.
void ExpertMlp(const Backend& be, const WeightMatrix& w1, const WeightMatrix& w3, const WeightMatrix& w2,
               const float* x, int64_t m, const float* weights, float swiglu_limit, float* out);

}  // namespace flashmem::kernels
