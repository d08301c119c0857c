#include "worker/model/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>

#include "common/status.h"
#include "kernels/numerics.h"

namespace flashmem::model {

using kernels::Rounding;

namespace {

// The rotary angles of every row's position, [rows][rope_dims / 2] (one Rope call for them all).
void RowAngles(const RotaryTable& rope, std::span<const TokenRow> rows, int64_t rope_dims, std::vector<float>* cs,
               std::vector<float>* sn) {
  const int64_t half = rope_dims / 2;
  cs->resize(rows.size() * half);
  sn->resize(rows.size() * half);
  for (size_t i = 0; i < rows.size(); ++i) rope.Angles(rows[i].pos, cs->data() + i * half, sn->data() + i * half);
}

}  // namespace

void RoundTripNopeFp8(const kernels::Backend& be, float* x, int64_t rows, int64_t dim, int64_t nope) {
  // The row op's default: the nope dims of every row in one call when they are whole blocks.
  const kernels::RowOp op = kernels::RowOp::Fp8RoundTripPrefix(dim, nope, 64);
  kernels::ApplyRowOps(be, x, rows * dim, std::span<const kernels::RowOp>(&op, 1));
}

// ---- Compressor ------------------------------------------------------------------------------

Compressor::Compressor(const ModelArgs& args, const CompressorWeights& w, int ratio,
                       int64_t head_dim, bool rotate, const RotaryTable& rope,
                       const kernels::Backend& be)
    : args_(args), w_(w), ratio_(ratio), head_dim_(head_dim), overlap_(ratio == 4),
      rotate_(rotate), rope_(rope), be_(be) {}

void Compressor::ProjectJobs(int64_t n, Scratch* kv, Scratch* score, std::vector<kernels::LinearJob>* jobs) const {
  kv->resize(n * w_.wkv.rows);
  score->resize(n * w_.wgate.rows);
  jobs->push_back({&w_.wkv, kv->data(), Rounding::kNone, {}});  // the reference runs these in fp32
  jobs->push_back({&w_.wgate, score->data(), Rounding::kNone, {}});
}

void Compressor::Finish(const float* pooled, std::span<const int64_t> block_starts, float* out) const {
  const int64_t m = static_cast<int64_t>(block_starts.size()), d = head_dim_, rd = args_.rope_head_dim;
  if (m == 0) return;
  std::vector<float> cs(m * (rd / 2)), sn(m * (rd / 2));
  for (int64_t i = 0; i < m; ++i) rope_.Angles(block_starts[i], cs.data() + i * (rd / 2), sn.data() + i * (rd / 2));
  // The norm, RoPE and the rounding as one chain of row ops in one backend call (a device runs
  // them before the entries come back), where the rounding's blocks fill whole rows.
  const bool chain = rotate_ ? d % 32 == 0 && (d & (d - 1)) == 0 : (d - rd) % 64 == 0;
  if (chain) {
    if (out != pooled) std::copy_n(pooled, m * d, out);
    std::vector<kernels::RowOp> ops = {kernels::RowOp::RmsNorm(d, w_.norm.data(), args_.norm_eps),
                                       kernels::RowOp::Rope(d, d - rd, rd, cs.data(), sn.data(), 1, false)};
    if (rotate_) {
      ops.push_back(kernels::RowOp::Hadamard(d));
      ops.push_back(kernels::RowOp::Fp4RoundTrip(32));
    } else {
      ops.push_back(kernels::RowOp::Fp8RoundTripPrefix(d, d - rd, 64));
    }
    be_.RowOps(out, m * d, ops);
    return;
  }
  be_.RmsNorm(pooled, w_.norm.data(), m, d, args_.norm_eps, out);
  be_.Rope(out, m, d, d - rd, rd, cs.data(), sn.data(), 1, false);
  if (rotate_) {
    be_.Hadamard(out, m, d);
    for (int64_t i = 0; i < m; ++i) be_.Fp4RoundTrip(out + i * d, d, 32);  // a block would straddle two rows
  } else {
    RoundTripNopeFp8(be_, out, m, d, d - rd);
  }
}

// ---- Indexer ---------------------------------------------------------------------------------

Indexer::Indexer(const ModelArgs& args, const IndexerWeights& w, const RotaryTable& rope,
                 const kernels::Backend& be, const parallel::Communicator* comm)
    : args_(args), w_(w), rope_(rope), be_(be), comm_(comm),
      n_local_heads_(w.weights_proj.rows),
      compressor_(args, w.compressor, 4, args.index_head_dim, /*rotate=*/true, rope, be) {}

void Indexer::WeightsJob(int64_t n, Scratch* weights, kernels::RowOp* then, std::vector<kernels::LinearJob>* jobs) const {
  const float scale = static_cast<float>(std::pow(static_cast<double>(args_.index_head_dim), -0.5) *
                                         std::pow(static_cast<double>(args_.index_n_heads), -0.5));
  weights->resize(n * n_local_heads_);
  *then = kernels::RowOp::ScaleBf16(scale);
  jobs->push_back({&w_.weights_proj, weights->data(), Rounding::kBf16, std::span<const kernels::RowOp>(then, 1)});
}

void Indexer::QueryJob(int64_t n, const float* cs, const float* sn, Scratch* q, std::array<kernels::RowOp, 3>* then,
                       std::vector<kernels::LinearJob>* jobs) const {
  const int64_t hd = args_.index_head_dim, rd = args_.rope_head_dim, h = n_local_heads_;
  q->resize(n * h * hd);
  *then = {kernels::RowOp::Rope(hd, hd - rd, rd, cs, sn, h, false), kernels::RowOp::Hadamard(hd),
           kernels::RowOp::Fp4RoundTrip(32)};
  jobs->push_back({&w_.wq_b, q->data(), Rounding::kBf16, *then});
}

void Indexer::Scores(const float* q, const float* weights, const kv::EntryPages& keys,
                     const Residency& residency, std::vector<float>* scores) const {
  const ScoreQuery one{q, weights, &keys, &residency, scores};
  ScoresBatch(std::span<const ScoreQuery>(&one, 1));
}

Indexer::VisibleRuns Indexer::Visible(std::span<const ScoreQuery> queries) const {
  const size_t m = queries.size();
  // Only visible chunks are scored (LSA Level 2); the rest get -inf and are never picked. Keys go
  // to the backend as runs within a page (where each run starts in `at`), not one by one.
  VisibleRuns v{std::vector<std::vector<kernels::KeyRun>>(m), std::vector<std::vector<int64_t>>(m),
                std::vector<int64_t>(m + 1, 0)};
  for (size_t i = 0; i < m; ++i) {
    const kv::EntryPages& keys = *queries[i].keys;
    const Residency& res = *queries[i].residency;
    const int64_t n = keys.size();
    int64_t visible = 0;
    for (int64_t p0 = 0; p0 < n; p0 += kv::kEntriesPerPage) {
      const int64_t p1 = std::min(n, p0 + kv::kEntriesPerPage);
      // Visibility goes by page, but for the chunks past the covered ones (Residency::Visible): a
      // page's visible keys are all of it or its tail from the first uncovered chunk — one run,
      // found without asking per key (1M keys a layer at batch 64 and 64K tokens).
      const int64_t t = res.PageVisible(p0 / kv::kEntriesPerPage) ? p0 : std::max(p0, res.covered_chunks);
      if (t >= p1) continue;
      v.runs[i].push_back(keys.Run(t, p1 - t));
      v.at[i].push_back(t);
      visible += p1 - t;
    }
    v.offset[i + 1] = v.offset[i] + visible;
  }
  return v;
}

void Indexer::ScoresBatch(std::span<const ScoreQuery> queries) const {
  const size_t m = queries.size();
  const VisibleRuns v = Visible(queries);
  Scratch scored(v.offset[m]);
  std::vector<kernels::IndexScoreRow> rows(m);
  for (size_t i = 0; i < m; ++i) rows[i] = {queries[i].q, queries[i].weights, v.runs[i], scored.data() + v.offset[i]};
  be_.IndexScoresBatch(rows, n_local_heads_, args_.index_head_dim);
  if (comm_ && comm_->size() > 1) {  // each rank scored its own heads: the sum, in bf16 as the reference's
    comm_->AllReduceSum(scored.data(), static_cast<int64_t>(scored.size()));
    for (float& s : scored) s = num::RoundBf16(s);
  }
  for (size_t i = 0; i < m; ++i) {
    std::vector<float>& scores = *queries[i].scores;
    scores.assign(queries[i].keys->size(), -std::numeric_limits<float>::infinity());
    kernels::PlaceRuns(scored.data() + v.offset[i], v.runs[i], v.at[i], scores);
  }
}

std::vector<std::vector<int32_t>> Indexer::SelectBatch(std::span<const ScoreQuery> queries, int64_t k) const {
  const size_t m = queries.size();
  if (comm_ && comm_->size() > 1) {  // the scores are summed over the ranks before top-k
    std::vector<std::vector<float>> own(m);
    std::vector<ScoreQuery> with(queries.begin(), queries.end());
    for (size_t i = 0; i < m; ++i)
      if (!with[i].scores) with[i].scores = &own[i];
    ScoresBatch(with);
    std::vector<std::span<const float>> lists(m);
    for (size_t i = 0; i < m; ++i) lists[i] = *with[i].scores;
    return be_.TopKBatch(lists, k);
  }
  const VisibleRuns v = Visible(queries);
  std::vector<kernels::IndexSelectRow> rows(m);
  for (size_t i = 0; i < m; ++i) {
    const int64_t length = queries[i].keys->size();
    float* list = nullptr;
    if (queries[i].scores) {
      queries[i].scores->resize(length);
      list = queries[i].scores->data();
    }
    rows[i] = {queries[i].q, queries[i].weights, v.runs[i], v.at[i], length, list};
  }
  return be_.IndexTopKBatch(rows, n_local_heads_, args_.index_head_dim, k);
}

// ---- Attention -------------------------------------------------------------------------------

Attention::Attention(const ModelArgs& args, const AttentionWeights& w, int64_t layer,
                     const kernels::Backend& be, const parallel::Communicator* comm)
    : args_(args), w_(w), layer_(layer), ratio_(args.ratio(layer)),
      n_local_heads_(static_cast<int64_t>(w.attn_sink.size())),
      n_local_groups_(w.wo_a.rows / args.o_lora_rank), be_(be), comm_(comm),
      rope_(RotaryTable::ForLayer(args, args.ratio(layer))), csa_index_(-1) {
  const int64_t group_in = w.wo_a.cols;
  for (int64_t g = 0; g < n_local_groups_; ++g) {
    WeightMatrix m;
    m.format = kernels::WeightFormat::kDense;
    m.rows = args.o_lora_rank;
    m.cols = group_in;
    m.values.assign(w.wo_a.values.begin() + g * m.rows * group_in, w.wo_a.values.begin() + (g + 1) * m.rows * group_in);
    wo_a_groups_.push_back(std::move(m));
  }
  if (ratio_ > 0) compressor_.emplace(args, *w.compressor, ratio_, args.head_dim, false, rope_, be);
  if (ratio_ == 4) {
    indexer_.emplace(args, *w.indexer, rope_, be, comm);
    csa_index_ = 0;
    for (int64_t l = 0; l < layer && l < args.n_layers; ++l) csa_index_ += args.ratio(l) == 4;
  }
}

void Attention::Candidates(const TokenRow& row, const LayerState& ls,
                           std::span<const int32_t> selected,
                           std::vector<kernels::KvSlot>* slots) const {
  const int64_t W = args_.window_size, s = row.pos;
  const int64_t complete = ratio_ == 0 ? 0 : (s + 1) / ratio_;
  // The list's length, then every slot written in place (masked: the default KvSlot). A list is
  // rebuilt per row and layer — 327 K slots a batch-64 step of V4-Flash's shape — so no growth and
  // no per-slot push (push_back was not inlined: ~10% of such a step's host time).
  int64_t compressed = 0;
  if (ratio_ == 4) {
    compressed = row.prefill() ? std::max<int64_t>(static_cast<int64_t>(selected.size()),
                                                   std::min<int64_t>(args_.index_topk, row.chunk_len / 4))
                               : static_cast<int64_t>(selected.size());
  } else if (ratio_ > 0) {
    compressed = row.prefill() ? row.chunk_len / ratio_ : complete;
  }
  const int64_t window = row.prefill() ? std::min(row.chunk_len, W) : W;
  slots->clear();
  slots->resize(window + compressed);
  kernels::KvSlot* out = slots->data();
  auto ring = [&](int64_t p) { return ls.window.Slot(p % W); };
  if (row.prefill()) {  // rows of the whole prompt: max(0, s-W+1) + j, masked past s
    const int64_t first = std::max<int64_t>(0, s - W + 1);
    for (int64_t j = 0; j < window; ++j)
      if (first + j <= s) out[j] = ring(first + j);
  } else if (s >= W - 1) {  // a full ring, oldest first
    for (int64_t j = 0; j < W; ++j) out[j] = ring(s - W + 1 + j);
  } else {  // positions 0..s, the rest masked
    for (int64_t p = 0; p <= s; ++p) out[p] = ring(p);
  }
  out += window;
  // Entries stay where they are held (FP8 records): the backend reads them in place.
  if (ratio_ == 4) {
    for (size_t j = 0; j < selected.size(); ++j) out[j] = ls.compressed.Slot(selected[j]);  // then masked to k
  } else if (ratio_ > 0) {
    for (int64_t j = 0; j < std::min(compressed, complete); ++j) out[j] = ls.compressed.Slot(j);
  }
}

void Attention::AfterSelection(const TokenRow& row, const float* x_row, const float* iq_row, const float* iw_row,
                               const std::vector<float>& scores, std::vector<int32_t>* selected) const {
  LayerState& ls = row.state->layers[layer_];
  Residency& res = row.state->residency;
  if (!res.dense()) {
    while (!selected->empty() && !res.Visible(selected->back())) selected->pop_back();
    if (res.measure_agreement && !row.prefill() && !selected->empty()) {
      const Residency all;
      std::vector<float> full;
      indexer_->Scores(iq_row, iw_row, ls.index_keys, all, &full);
      const auto ref = be_.TopK(full, args_.index_topk);
      int64_t hit = 0;
      for (int32_t t : ref) hit += std::find(selected->begin(), selected->end(), t) != selected->end();
      res.agreement_sum += static_cast<double>(hit) / static_cast<double>(ref.size());
      res.agreement_count++;
    }
  }
  for (int32_t t : *selected)
    if (!ls.compressed.RowResident(t)) res.missing_rows++;  // the pager failed its guarantee
  if (row.state->capture.enabled && static_cast<int64_t>(row.state->capture.x[csa_index_].size()) == args_.dim) {
    std::copy(x_row, x_row + args_.dim, row.state->capture.x[csa_index_].begin());
    row.state->capture.pos = row.pos;
  }
  if (row.trace) {
    row.trace->indexer_scores[csa_index_] = scores;
    row.trace->indexer_topk[csa_index_] = *selected;
  }
}

bool Attention::ReadsInputOnHost(std::span<const TokenRow> rows) const {
  return indexer_ && std::any_of(rows.begin(), rows.end(), [](const TokenRow& r) { return r.state->capture.enabled; });
}

void Attention::Forward(const float* x, std::span<const TokenRow> rows, float* out) const {
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t D = args_.head_dim, rd = args_.rope_head_dim, H = n_local_heads_;
  const int64_t W = args_.window_size, Q = args_.q_lora_rank;
  std::vector<float> cs, sn;  // every row's rotary angles (one set per token)
  RowAngles(rope_, rows, rd, &cs, &sn);
  Scratch qr(n * Q), q(n * H * D), o(n * H * D);
  // qr, q and the attention's output o go only from op to op (q_norm(wq_a's) -> wq_b's -> the
  // attention -> wo_a's groups; qr also -> the indexer's wq_b): a device backend keeps them there.
  const kernels::DeviceHold<Scratch> hold_qr(be_, qr), hold_q(be_, q), hold_o(be_, o);
  // Every projection of x in one backend call (a device stages x once and waits once for the
  // outputs the host reads, if any: a decode step's all stay with a device — the window KV rows,
  // the compressors' kv and scores, the indexer's weights, scaled as a row op): qr =
  // q_norm(wq_a(x)); the window entries kv = kv_norm(wkv(x)), RoPE, FP8 round trip of the nope
  // dims (on wkv's output before it comes back, when the nope dims are whole FP8 blocks); the
  // compressor's and the indexer's projections.
  Scratch kv(n * D), kv_raw;
  // The window rows wkv's chain makes go only to their records (Backend::WriteRecords): a device
  // keeps them and encodes them where they are.
  std::optional<kernels::DeviceHold<Scratch>> hold_kv;
  Scratch ckv, cscore, iw, ikv, iscore, iq;
  std::optional<kernels::DeviceHold<Scratch>> hold_iw;  // the indexer's head weights: their job -> the scoring
  // The compressors' projections go only to their pooling (Backend::PoolSteps): a device keeps
  // them and pools where they are — when the rows are one batch (a decode step's: distinct
  // sessions); a prompt's rows go one at a time, each a PoolSteps call, and stay on the host.
  std::optional<kernels::DeviceHold<Scratch>> hold_ckv, hold_cscore, hold_ikv, hold_iscore;
  const bool one_batch = [&] {
    std::vector<const SessionState*> sessions(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) sessions[i] = rows[i].state;
    std::sort(sessions.begin(), sessions.end());
    return std::adjacent_find(sessions.begin(), sessions.end()) == sessions.end();
  }();
  kernels::RowOp iw_then;
  std::vector<kernels::LinearJob> jobs;
  const kernels::RowOp qa_then[] = {kernels::RowOp::RmsNorm(Q, w_.q_norm.data(), args_.norm_eps)};
  jobs.push_back({&w_.wq_a, qr.data(), Rounding::kBf16, qa_then});
  const bool kv_chain = (D - rd) % 64 == 0;
  const kernels::RowOp kv_then[] = {kernels::RowOp::RmsNorm(D, w_.kv_norm.data(), args_.norm_eps),
                                    kernels::RowOp::Rope(D, D - rd, rd, cs.data(), sn.data(), 1, false),
                                    kernels::RowOp::Fp8RoundTripPrefix(D, D - rd, 64)};
  if (kv_chain) {
    hold_kv.emplace(be_, kv);
    jobs.push_back({&w_.wkv, kv.data(), Rounding::kBf16, kv_then});
  } else {
    kv_raw.resize(n * D);
    jobs.push_back({&w_.wkv, kv_raw.data(), Rounding::kBf16, {}});
  }
  if (compressor_) {
    compressor_->ProjectJobs(n, &ckv, &cscore, &jobs);
    if (one_batch) hold_ckv.emplace(be_, ckv), hold_cscore.emplace(be_, cscore);  // sized by the jobs
  }
  if (indexer_) {
    indexer_->WeightsJob(n, &iw, &iw_then, &jobs);
    hold_iw.emplace(be_, iw);  // sized by the job
    indexer_->compressor().ProjectJobs(n, &ikv, &iscore, &jobs);
    if (one_batch) hold_ikv.emplace(be_, ikv), hold_iscore.emplace(be_, iscore);
  }
  be_.LinearMany(jobs, x, n);
  if (!kv_chain) {
    be_.RmsNorm(kv_raw.data(), w_.kv_norm.data(), n, D, args_.norm_eps, kv.data());
    be_.Rope(kv.data(), n, D, D - rd, rd, cs.data(), sn.data(), 1, false);
    // The FP8 round trip of every row's nope dims in one call (a decode step's rows: one call, not
    // one per session).
    RoundTripNopeFp8(be_, kv.data(), n, D, D - rd);
  }
  // Queries: q = wq_b(qr), per-head RMS (no weight), RoPE on the last rd dims (the angles differ
  // per token, one set per row group); the indexer's queries from the same qr: one backend call (a
  // device keeps q between the ops).
  jobs.clear();
  const kernels::RowOp q_then[] = {kernels::RowOp::HeadRmsNormBf16(D, args_.norm_eps),
                                   kernels::RowOp::Rope(D, D - rd, rd, cs.data(), sn.data(), H, false)};
  jobs.push_back({&w_.wq_b, q.data(), Rounding::kBf16, q_then});
  std::optional<kernels::DeviceHold<Scratch>> hold_iq;  // the indexer's queries: wq_b's -> the scoring
  std::array<kernels::RowOp, 3> iq_then;
  if (indexer_) {
    iq.resize(n * indexer_->n_local_heads() * args_.index_head_dim);  // the job's size: held before written
    hold_iq.emplace(be_, iq);
    indexer_->QueryJob(n, cs.data(), sn.data(), &iq, &iq_then, &jobs);
  }
  be_.LinearMany(jobs, qr.data(), n);
  // Sequential part, token by token in position order: state updates, then index scoring, top-k
  // and attention. Rows go in batches (one backend call each: a device runs them in one launch)
  // of distinct sessions: a session's next row writes KV its pending row reads (the window slot it
  // overwrites is still in that row's window; the index key it appends), so a batch runs before
  // such a row's writes. A decode step's rows are one batch; a prompt's rows go one at a time.
  const int64_t cw = compressor_ ? ckv.size() / n : 0, iw_ = indexer_ ? ikv.size() / n : 0;
  // The pending rows' compressor steps (Backend::PoolSteps: one call a compressor for a batch —
  // a batch's rows are distinct sessions, so its steps are independent — run where the
  // projections are), then the blocks they completed, finished together (one call per op for a
  // step's rows, not one per session) and appended before the batch that reads them runs:
  // finished in place where a device holds them, then written as entries the host appends
  // (Backend::WriteRecords: a device encodes FP8 records where they are; the default writes each
  // on the host).
  struct Pooling {
    std::vector<kernels::PoolStep> steps;
    std::vector<float> pooled;  // the completed blocks' rows, in step order
    std::vector<int64_t> starts;  // each completed block's first position
    std::vector<kv::EntryPages*> to;
    void Add(const Compressor& comp, CompressorState& st, const float* kv_row, const float* score_row, int64_t pos,
             kv::EntryPages* entries) {
      steps.push_back({st.ring(), kv_row, score_row, pos, nullptr});
      if (!comp.Completes(pos)) return;
      starts.push_back(pos + 1 - comp.ratio());
      to.push_back(entries);
    }
    void Run(const Compressor& comp, const kernels::Backend& be, int64_t rope_dims) {
      if (steps.empty()) return;
      const int64_t d = comp.head_dim();
      pooled.resize(starts.size() * d);
      {
        const kernels::DeviceHold<std::vector<float>> hold(be, pooled);  // the pooled rows -> their entries
        size_t c = 0;
        for (kernels::PoolStep& st : steps)
          if (comp.Completes(st.pos)) st.pooled = pooled.data() + (c++) * d;
        be.PoolSteps(steps, comp.Shape());
        if (!starts.empty()) {
          comp.Finish(pooled.data(), starts, pooled.data());
          std::vector<kernels::RecordWrite> writes(to.size());
          for (size_t j = 0; j < to.size(); ++j) writes[j] = {pooled.data() + j * d, to[j], to[j]->AppendForWrite()};
          be.WriteRecords(writes, d, rope_dims);
        }
      }
      steps.clear();
      pooled.clear();
      starts.clear();
      to.clear();
    }
  } pooling, index_pooling;
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<int64_t> batch;                       // the pending rows (indices into `rows`)
  std::vector<std::vector<float>> scores;           // their index scores, reused batch after batch
  std::vector<std::vector<kernels::KvSlot>> slots;  // their slot lists, likewise
  std::vector<kernels::AttentionRow> attention_rows;
  std::vector<kernels::RowOp> inverse_rope;         // each pending row's
  // The pending rows' window writes (the row's KV into its session's ring as an FP8 record: one
  // backend call for the batch, on the host ~1-2 us a row; a device encodes the rows it holds).
  std::vector<kernels::RecordWrite> window_writes;
  auto run_batch = [&] {
    const size_t m = batch.size();
    if (m == 0) return;
    be_.WriteRecords(window_writes, D, rd);
    window_writes.clear();
    if (compressor_) pooling.Run(*compressor_, be_, rd);
    if (indexer_) index_pooling.Run(indexer_->compressor(), be_, rd);
    if (scores.size() < m) scores.resize(m);
    if (slots.size() < m) slots.resize(m);
    std::vector<std::vector<int32_t>> selected(m);
    if (indexer_) {
      const int64_t ih = indexer_->n_local_heads(), ihd = args_.index_head_dim;
      std::vector<Indexer::ScoreQuery> queries(m);
      for (size_t j = 0; j < m; ++j) {
        const int64_t i = batch[j];
        // The scores come back only for a traced row (AfterSelection records them).
        queries[j] = {iq.data() + i * ih * ihd, iw.data() + i * ih, &rows[i].state->layers[layer_].index_keys,
                      &rows[i].state->residency, rows[i].trace ? &scores[j] : nullptr};
      }
      selected = indexer_->SelectBatch(queries, args_.index_topk);
      for (size_t j = 0; j < m; ++j) AfterSelection(rows[batch[j]], x + batch[j] * args_.dim, iq.data() + batch[j] * ih * ihd,
                                                    iw.data() + batch[j] * ih, scores[j], &selected[j]);
    }
    attention_rows.clear();
    if (inverse_rope.size() < m) inverse_rope.resize(m);
    // Each row's slot list (640 slots a row at V4-Flash's shape) from its own session's state.
    const int64_t rows_m = static_cast<int64_t>(m);
#pragma omp parallel for schedule(static) if (rows_m >= 8)
    for (int64_t j = 0; j < rows_m; ++j)
      Candidates(rows[batch[j]], rows[batch[j]].state->layers[layer_], selected[j], &slots[j]);
    for (size_t j = 0; j < m; ++j) {
      const int64_t i = batch[j];
      // The output's RoPE undone with the row's own angles, where the output is.
      inverse_rope[j] = kernels::RowOp::Rope(D, D - rd, rd, cs.data() + i * (rd / 2), sn.data() + i * (rd / 2), H,
                                             /*inverse=*/true);
      attention_rows.push_back({q.data() + i * H * D, slots[j], o.data() + i * H * D,
                                std::span<const kernels::RowOp>(&inverse_rope[j], 1)});
    }
    be_.SparseAttentionRows(attention_rows, H, D, rd, w_.attn_sink.data(), softmax_scale);
    batch.clear();
  };
  for (int64_t i = 0; i < n; ++i) {
    const TokenRow& row = rows[i];
    if (std::any_of(batch.begin(), batch.end(), [&](int64_t j) { return rows[j].state == row.state; })) run_batch();
    LayerState& ls = row.state->layers[layer_];
    window_writes.push_back({kv.data() + i * D, &ls.window, row.pos % W});
    if (compressor_)
      pooling.Add(*compressor_, ls.compressor, ckv.data() + i * cw, cscore.data() + i * cw, row.pos, &ls.compressed);
    if (indexer_)
      index_pooling.Add(indexer_->compressor(), ls.index_compressor, ikv.data() + i * iw_, iscore.data() + i * iw_,
                        row.pos, &ls.index_keys);
    batch.push_back(i);
  }
  run_batch();
  // Grouped low-rank output projection: z_g = wo_a[g] · o_g (bf16 einsum), y = wo_b · z.
  const int64_t O = args_.o_lora_rank, G = n_local_groups_;
  Scratch z(n * G * O);
  const kernels::DeviceHold<Scratch> hold_z(be_, z);  // wo_a's groups -> wo_b
  be_.LinearGroups(wo_a_groups_, o.data(), n, z.data(), Rounding::kBf16);
  if (comm_ && comm_->size() > 1) {  // row-parallel: fp32 partial sums, all-reduced, then bf16
    be_.Linear(w_.wo_b, z.data(), n, out, Rounding::kNone);
    comm_->AllReduceSum(out, n * w_.wo_b.rows);
    for (int64_t i = 0; i < n * w_.wo_b.rows; ++i) out[i] = num::RoundBf16(out[i]);
  } else {
    be_.Linear(w_.wo_b, z.data(), n, out, Rounding::kBf16);
  }
}

}  // namespace flashmem::model

namespace flashmem::model {

absl::Status Compressor::Prepare() const {
  FM_RETURN_IF_ERROR(be_.Prepare(w_.wkv));
  return be_.Prepare(w_.wgate);
}

absl::Status Indexer::Prepare() const {
  FM_RETURN_IF_ERROR(be_.Prepare(w_.wq_b));
  FM_RETURN_IF_ERROR(be_.Prepare(w_.weights_proj));
  return compressor_.Prepare();
}

absl::Status Attention::Prepare() const {
  for (const WeightMatrix* m : {&w_.wq_a, &w_.wq_b, &w_.wkv, &w_.wo_b}) FM_RETURN_IF_ERROR(be_.Prepare(*m));
  for (const WeightMatrix& g : wo_a_groups_) FM_RETURN_IF_ERROR(be_.Prepare(g));  // the copies Forward uses
  if (compressor_) FM_RETURN_IF_ERROR(compressor_->Prepare());
  if (indexer_) FM_RETURN_IF_ERROR(indexer_->Prepare());
  return absl::OkStatus();
}

}  // namespace flashmem::model
