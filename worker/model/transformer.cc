#include "worker/model/transformer.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/numerics.h"
#include "kernels/topk.h"

namespace flashmem::model {

// ---- Block -----------------------------------------------------------------------------------

Block::Block(const ModelArgs& args, const BlockWeights& w, int64_t layer, const kernels::Backend& be,
             const parallel::Communicator* comm)
    : args_(args), w_(w), be_(be), tensor_parallel_(comm && comm->size() > 1), attn_(args, w.attn, layer, be, comm),
      ffn_(args, w.ffn, layer, be, comm) {}

void Block::Forward(Scratch& X, std::span<const TokenRow> rows,
                    std::span<const int32_t> tokens, std::span<ForwardTrace* const> trace_rows) const {
  const int64_t n = static_cast<int64_t>(rows.size()), d = args_.dim;
  const int hc = args_.hc_mult;
  Scratch xn(n * d), f(n * d), post(n * hc), comb(n * hc * hc), next(X.size());
  // Only ops touch the residual stream's next copy (hc_post writes it, hc_pre and hc_post read it
  // after the swap), hc_pre's mixes post and comb (-> hc_post), xn (the normed hc_pre output ->
  // the sublayer's projections) and f (the sublayer's output -> hc_post): a device backend keeps
  // them there, and hc_pre need not wait for its kernels. The attention reads xn on the host only
  // for the memory indexer's capture (ReadsInputOnHost), after a sync; tensor parallel sublayers
  // all-reduce f on the host, so it is held on one rank only.
  const kernels::DeviceHold<Scratch> hold_next(be_, next), hold_xn(be_, xn), hold_post(be_, post),
      hold_comb(be_, comb);
  std::optional<kernels::DeviceHold<Scratch>> hold_f;
  if (!tensor_parallel_) hold_f.emplace(be_, f);
  const bool attn_reads_xn = attn_.ReadsInputOnHost(rows);
  auto sublayer = [&](const std::vector<float>& fn, const std::vector<float>& base,
                      const std::vector<float>& scale, const std::vector<float>& norm, auto&& body) {
    // hc_pre's mix of the residual stream, then its RMSNorm in place: one backend call.
    const kernels::RowOp normed[] = {kernels::RowOp::RmsNorm(d, norm.data(), args_.norm_eps)};
    be_.HcPreThen(X.data(), n, fn.data(), base.data(), scale.data(), hc, d, args_.hc_sinkhorn_iters, args_.norm_eps,
                  args_.hc_eps, xn.data(), post.data(), comb.data(), normed);
    body();
    be_.HcPost(f.data(), X.data(), post.data(), comb.data(), n, hc, d, next.data());  // out must not be X
    X.swap(next);
  };
  sublayer(w_.hc_attn_fn, w_.hc_attn_base, w_.hc_attn_scale, w_.attn_norm,
           [&] {
             if (attn_reads_xn) hold_xn.Sync();
             attn_.Forward(xn.data(), rows, f.data());
           });
  sublayer(w_.hc_ffn_fn, w_.hc_ffn_base, w_.hc_ffn_scale, w_.ffn_norm,
           [&] { ffn_.Forward(xn.data(), tokens, trace_rows, f.data()); });
}

// ---- ParallelHead ----------------------------------------------------------------------------

std::vector<float> ParallelHead::Normed(const float* X, int64_t n) const {
  const int64_t d = args_.dim;
  Scratch u(n * d);
  std::vector<float> xn(n * d);
  be_.HcHead(X, n, hc_.fn.data(), hc_.base.data(), hc_.scale[0], args_.hc_mult, d, args_.norm_eps,
             args_.hc_eps, u.data());
  be_.RmsNorm(u.data(), norm_.data(), n, d, args_.norm_eps, xn.data());
  return xn;
}

void ParallelHead::Forward(const float* X, int64_t n, float* logits, std::vector<float>* head_input) const {
  std::vector<float> xn = Normed(X, n);
  be_.Linear(head_, xn.data(), n, logits, kernels::Rounding::kNone);  // fp32 logits
  if (head_input) *head_input = std::move(xn);
}

void ParallelHead::Argmax(const float* X, int64_t n, int32_t* index) const {
  const std::vector<float> xn = Normed(X, n);
  be_.LinearArgmax(head_, xn.data(), n, index);
}

// ---- Transformer -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Transformer>> Transformer::Load(const std::string& model_dir,
                                                               const kernels::Backend& be,
                                                               ShardSpec shard, const LoadProgress& progress,
                                                               const parallel::Communicator* comm) {
  if (comm && (comm->rank() != shard.rank || comm->size() != shard.world_size))
    return absl::InvalidArgumentError(absl::StrCat("tensor parallel: shard ", shard.rank, "/", shard.world_size,
                                                   " does not match the group's rank ", comm->rank(), " of ",
                                                   comm->size()));
  FM_ASSIGN_OR_RETURN(ModelArgs args, LoadModelArgs(model_dir));
  FM_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(model_dir));
  FM_ASSIGN_OR_RETURN(ModelWeights w, LoadWeights(*ckpt, args, shard, progress));
  auto tf = std::make_unique<Transformer>(std::move(args), std::move(w), be, comm);
  FM_RETURN_IF_ERROR(tf->PrepareWeights());
  return tf;
}

absl::Status Block::Prepare() const {
  FM_RETURN_IF_ERROR(attn_.Prepare());
  return ffn_.Prepare();
}

absl::Status Transformer::PrepareWeights() const {
  for (const auto& layer : layers_) FM_RETURN_IF_ERROR(layer->Prepare());
  return head_->Prepare();
}

Transformer::Transformer(ModelArgs args, ModelWeights weights, const kernels::Backend& be,
                         const parallel::Communicator* comm)
    : args_(std::move(args)), w_(std::move(weights)), be_(be), comm_(comm && comm->size() > 1 ? comm : nullptr) {
  for (int64_t l = 0; l < args_.n_layers; ++l)
    layers_.push_back(std::make_unique<Block>(args_, w_.layers[l], l, be_, comm_));
  head_ = std::make_unique<ParallelHead>(args_, w_.head, w_.norm, w_.hc_head, be_);
}

absl::Status Transformer::Forward(std::span<BatchItem> batch) const {
  if (w_.shard.world_size != (comm_ ? comm_->size() : 1))
    return absl::FailedPreconditionError(absl::StrCat("tensor parallel: this model holds shard ", w_.shard.rank, " of ",
                                                      w_.shard.world_size, " but runs in a group of ",
                                                      comm_ ? comm_->size() : 1));
  const int64_t d = args_.dim, hc = args_.hc_mult;
  int n_csa = 0;
  for (int64_t l = 0; l < args_.n_layers; ++l) n_csa += args_.ratio(l) == 4;
  std::vector<TokenRow> rows;
  std::vector<int32_t> tokens;
  std::vector<ForwardTrace*> trace_rows;
  for (size_t b = 0; b < batch.size(); ++b) {
    BatchItem& it = batch[b];
    if (!it.state) return absl::InvalidArgumentError(absl::StrCat("batch[", b, "]: no session state"));
    if (it.tokens.empty()) return absl::InvalidArgumentError(absl::StrCat("batch[", b, "]: no tokens"));
    for (size_t c = 0; c < b; ++c)
      if (batch[c].state == it.state)
        return absl::InvalidArgumentError(absl::StrCat("batch[", b, "]: session appears twice in one batch"));
    for (size_t i = 0; i < it.tokens.size(); ++i) {
      const int32_t t = it.tokens[i];
      if (t < 0 || t >= args_.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("batch[", b, "].tokens[", i, "] = ", t, " is outside the vocabulary [0, ", args_.vocab_size, ")"));
      TokenRow r;
      r.state = it.state;
      r.pos = it.state->position + static_cast<int64_t>(i);
      r.token = t;
      r.chunk_start = it.state->position;
      r.chunk_len = static_cast<int64_t>(it.tokens.size());
      const bool last = i + 1 == it.tokens.size();
      r.trace = last ? it.trace : nullptr;
      rows.push_back(r);
      tokens.push_back(t);
      trace_rows.push_back(r.trace);
    }
    if (it.trace) {
      *it.trace = ForwardTrace{};
      it.trace->moe_experts.resize(args_.n_layers);
      it.trace->moe_weights.resize(args_.n_layers);
      it.trace->indexer_scores.resize(n_csa);
      it.trace->indexer_topk.resize(n_csa);
      it.trace->block_out.resize(args_.n_layers);
    }
  }
  const int64_t n = static_cast<int64_t>(rows.size());
  // Embedding, expanded to hc copies of the residual stream. Tensor parallel: each rank holds a
  // slice of the vocabulary; rows outside it are zero and the all-reduce assembles them (exact:
  // one rank contributes each row).
  const int64_t v0 = comm_ ? comm_->rank() * w_.embed.rows : 0;
  std::vector<float> E(n * d, 0.0f);
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] >= v0 && tokens[i] < v0 + w_.embed.rows)
      std::copy_n(w_.embed.values.begin() + (tokens[i] - v0) * d, d, E.begin() + i * d);
  if (comm_) comm_->AllReduceSum(E.data(), n * d);
  Scratch X(n * hc * d);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < hc; ++j) std::copy_n(E.begin() + i * d, d, X.begin() + (i * hc + j) * d);
  // The residual stream stays on a device backend from here to the head; the host reads it only
  // for traces and the head's gathered rows (synced first).
  const kernels::DeviceHold<Scratch> hold_x(be_, X);
  const bool traced_rows = std::any_of(trace_rows.begin(), trace_rows.end(), [](ForwardTrace* t) { return t; });
  for (int64_t l = 0; l < args_.n_layers; ++l) {
    layers_[l]->Forward(X, rows, tokens, trace_rows);
    if (traced_rows) hold_x.Sync();
    for (int64_t i = 0; i < n; ++i)
      if (trace_rows[i]) trace_rows[i]->block_out[l].assign(X.begin() + i * hc * d, X.begin() + (i + 1) * hc * d);
  }
  // The head, for every item that asks for logits or a trace: their last rows in one call per op
  // (one pass over the head's weights for the batch, not one per item).
  // Items that want only a greedy pick (one rank) go through the head apart: their logits stay
  // where the head ran.
  std::vector<size_t> heads, picks;  // items through the head: with logits, with only a pick
  std::vector<int64_t> head_rows, pick_rows;  // their last rows
  Scratch H, P;                               // those rows' residuals [m, hc, d]
  bool traced = false;  // some item records the head's input
  int64_t row = 0;
  for (size_t b = 0; b < batch.size(); ++b) {
    BatchItem& it = batch[b];
    const int64_t last = row + static_cast<int64_t>(it.tokens.size()) - 1;
    if (it.logits || it.trace || (it.greedy && comm_)) {
      heads.push_back(b);
      head_rows.push_back(last);
      traced = traced || it.trace;
    } else if (it.greedy) {
      picks.push_back(b);
      pick_rows.push_back(last);
    }
    it.state->position += static_cast<int64_t>(it.tokens.size());
    row = last + 1;
  }
  // A decode step of greedy items picks from every row of X in order: X itself (4 MB at batch 64
  // not copied, and read by the head's op where a device holds it); otherwise the rows are
  // gathered on the host, from X synced first.
  const bool every_row = static_cast<int64_t>(picks.size()) == n;
  if (!head_rows.empty() || (!picks.empty() && !every_row)) hold_x.Sync();
  auto gather = [&](const std::vector<int64_t>& rows_of, Scratch& out) {
    out.reserve(rows_of.size() * hc * d);
    for (int64_t r : rows_of) out.insert(out.end(), X.begin() + r * hc * d, X.begin() + (r + 1) * hc * d);
  };
  gather(head_rows, H);
  if (!picks.empty()) {
    if (!every_row) gather(pick_rows, P);
    std::vector<int32_t> index(picks.size());
    head_->Argmax(every_row ? X.data() : P.data(), static_cast<int64_t>(picks.size()), index.data());
    for (size_t j = 0; j < picks.size(); ++j) *batch[picks[j]].greedy = index[j];
  }
  const int64_t m = static_cast<int64_t>(heads.size()), vl = w_.head.rows;
  if (m > 0) {
    // The batch's logits (33 MB at 64 rows of V4's vocabulary) in a buffer this thread keeps: a
    // fresh one would be mapped and faulted in page by page every step.
    thread_local Scratch logits;
    logits.resize(m * vl);
    std::vector<float> head_input;
    head_->Forward(H.data(), m, logits.data(), traced ? &head_input : nullptr);
    std::vector<float> all;  // vocab-split head: every rank gets the whole vocabulary's logits
    if (comm_) {
      all.resize(logits.size() * comm_->size());
      comm_->AllGather(logits.data(), static_cast<int64_t>(logits.size()), all.data());
    }
    std::vector<float> gathered;  // a picked row's whole vocabulary (TP) when the item takes no logits
    for (int64_t j = 0; j < m; ++j) {
      BatchItem& it = batch[heads[j]];
      std::span<const float> full(logits.data() + j * vl, static_cast<size_t>(vl));  // row j's logits
      if (comm_ && (it.logits || it.greedy)) {  // rank r's block holds its slice of every row at r * m * vl + j * vl
        std::vector<float>& to = it.logits ? *it.logits : gathered;  // refilled in place (no new allocation)
        to.clear();
        for (int r = 0; r < comm_->size(); ++r)
          to.insert(to.end(), all.begin() + (r * m + j) * vl, all.begin() + (r * m + j + 1) * vl);
        full = to;
      } else if (it.logits) {
        it.logits->assign(full.begin(), full.end());
      }
      if (it.greedy) *it.greedy = kernels::ArgmaxIndex(full);
      if (it.trace) {
        it.trace->head_input.assign(head_input.begin() + j * d, head_input.begin() + (j + 1) * d);
        it.trace->hidden_hc.assign(H.begin() + j * hc * d, H.begin() + (j + 1) * hc * d);
      }
    }
  }
  // The host's pages and compressor rings take what ops still have on the way (a device's KV
  // records and ring rows) before the caller reads them (the pager's commits, snapshots) or frees
  // them.
  be_.FinishWrites();
  // A device backend's failure inside an op (memory budget, lost device) or a failed collective
  // makes the pass invalid.
  FM_RETURN_IF_ERROR(be_.Health());
  return comm_ ? comm_->Health() : absl::OkStatus();
}

}  // namespace flashmem::model
