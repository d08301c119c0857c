// Attention of the three layer types (spec §3): Compressor, Indexer and Attention, mirroring
// the reference's classes. State lives in SessionState; these classes hold weights only.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/ops.h"
#include "worker/parallel/communicator.h"
#include "worker/model/config.h"
#include "worker/model/rope.h"
#include "worker/model/scratch.h"
#include "worker/model/state.h"
#include "worker/model/weights.h"

namespace flashmem::model {

// One token of a batched forward: which session, at which position, and how its chunk looks
// (the reference lays out prefill candidate lists differently from decode ones).
struct TokenRow {
  SessionState* state = nullptr;
  int64_t pos = 0;
  int32_t token = 0;
  int64_t chunk_start = 0;   // position of the first token of this row's chunk
  int64_t chunk_len = 1;     // tokens in the chunk
  ForwardTrace* trace = nullptr;  // non-null on the row whose components are recorded
  bool prefill() const { return chunk_start == 0 && chunk_len > 1; }
};

// In place FP8 round trip (blocks of 64) of the first `nope` of each of `rows` rows of `dim`: one
// backend call for all rows when the blocks fill whole rows' nope dims, else one per row.
void RoundTripNopeFp8(const kernels::Backend& be, float* x, int64_t rows, int64_t dim, int64_t nope);

// Gated pooling of `ratio` tokens into one entry (overlapping windows of 2*ratio when ratio 4).
class Compressor {
 public:
  Compressor(const ModelArgs& args, const CompressorWeights& w, int ratio, int64_t head_dim,
             bool rotate, const RotaryTable& rope, const kernels::Backend& be);
  // kv and gate-score projections (fp32) of n input rows: [n, coff*head_dim] each, sized here and
  // appended to `jobs` (one Backend::LinearMany with the layer's other projections of x).
  void ProjectJobs(int64_t n, Scratch* kv, Scratch* score, std::vector<kernels::LinearJob>* jobs) const;
  // The pooling of Backend::PoolSteps as this compressor runs it (its ratio, head_dim and ape): a
  // token fed at `pos` goes into its session's block; when the block completes, its pooled row
  // (head_dim bf16 values, before the norm) comes out.
  kernels::PoolShape Shape() const { return {ratio_, head_dim_, overlap_, w_.ape.data()}; }
  // Whether the row at `pos` completes a block (its step then writes a pooled row).
  bool Completes(int64_t pos) const { return (pos + 1) % ratio_ == 0; }
  // Finishes m pooled rows [m, head_dim] into entries `out` (bf16 values: normed, roped at each
  // block's first position, FP8- or Hadamard+FP4-rounded), one backend call per op for all rows.
  // `block_starts[i]`: the first position of row i's block. `out` may be `pooled` (in place).
  void Finish(const float* pooled, std::span<const int64_t> block_starts, float* out) const;
  int64_t head_dim() const { return head_dim_; }
  int ratio() const { return ratio_; }
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  const ModelArgs& args_;
  const CompressorWeights& w_;
  int ratio_;
  int64_t head_dim_;
  bool overlap_, rotate_;
  const RotaryTable& rope_;
  const kernels::Backend& be_;
};

// The lightning indexer of CSA layers: its own compressor builds index keys; queries score
// every complete key and the top-k entries are attended.
class Indexer {
 public:
  // comm: the tensor-parallel group (null: one rank); index scores are all-reduced before top-k.
  Indexer(const ModelArgs& args, const IndexerWeights& w, const RotaryTable& rope,
          const kernels::Backend& be, const parallel::Communicator* comm = nullptr);
  // The head weights' projection of x [n, heads], sized here and appended to `jobs` (one
  // Backend::LinearMany with the layer's other projections of x), scaled by
  // index_head_dim^-0.5 * index_n_heads^-0.5 in bf16 as its row op `then` (which must outlive
  // the job): only ops read the weights, so a device keeps them.
  void WeightsJob(int64_t n, Scratch* weights, kernels::RowOp* then, std::vector<kernels::LinearJob>* jobs) const;
  // The queries' projection of qr, the query's low-rank rows, into q [n, heads*head_dim] (sized
  // here), then RoPE at the rows' angles cs/sn (one set per row), the Hadamard rotation and the
  // FP4 round trip as its row ops `then` (which must outlive the job); appended to `jobs`.
  void QueryJob(int64_t n, const float* cs, const float* sn, Scratch* q, std::array<kernels::RowOp, 3>* then,
                std::vector<kernels::LinearJob>* jobs) const;
  // bf16 scores of the complete keys visible under `residency` for one query (-inf elsewhere).
  void Scores(const float* q, const float* weights, const kv::EntryPages& keys,
              const Residency& residency, std::vector<float>* scores) const;
  // Scores for several queries (rows of different sessions) in one backend call.
  struct ScoreQuery {
    const float* q = nullptr;
    const float* weights = nullptr;
    const kv::EntryPages* keys = nullptr;
    const Residency* residency = nullptr;
    std::vector<float>* scores = nullptr;
  };
  void ScoresBatch(std::span<const ScoreQuery> queries) const;
  // The top-k candidate list of each query (Backend::TopK's rule over its scores), in one backend
  // call when there is no tensor-parallel group (Backend::IndexTopKBatch: a device keeps the
  // scores); a query's scores are filled only where `scores` is not null.
  std::vector<std::vector<int32_t>> SelectBatch(std::span<const ScoreQuery> queries, int64_t k) const;
  const Compressor& compressor() const { return compressor_; }
  int64_t n_local_heads() const { return n_local_heads_; }
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  const ModelArgs& args_;
  const IndexerWeights& w_;
  const RotaryTable& rope_;
  const kernels::Backend& be_;
  const parallel::Communicator* comm_;
  int64_t n_local_heads_;
  Compressor compressor_;

  // The keys of each query that its residency shows, as runs within a page: run r of query i
  // starts at key at[i][r].
  struct VisibleRuns {
    std::vector<std::vector<kernels::KeyRun>> runs;
    std::vector<std::vector<int64_t>> at;
    std::vector<int64_t> offset;  // query i's keys start at offset[i] when laid end to end
  };
  VisibleRuns Visible(std::span<const ScoreQuery> queries) const;
};

class Attention {
 public:
  // comm: the tensor-parallel group (null: one rank); wo_b's partial sums are all-reduced.
  Attention(const ModelArgs& args, const AttentionWeights& w, int64_t layer,
            const kernels::Backend& be, const parallel::Communicator* comm = nullptr);
  // x: [n, dim] normed inputs (bf16 values) of the rows; out: [n, dim] (bf16 values).
  void Forward(const float* x, std::span<const TokenRow> rows, float* out) const;
  // Whether Forward reads x on the host for these rows: a CSA layer copies a capturing row's x
  // for the memory indexer (x must then be on the host, not held on a device).
  bool ReadsInputOnHost(std::span<const TokenRow> rows) const;
  // Moves this module's weights to where the backend computes (Backend::Prepare).
  absl::Status Prepare() const;

 private:
  // The candidate KV entries of one query in the reference's slot order (window ring, then the
  // compressed entries), as held: FP8 records in place; evicted or past-the-end slots masked.
  void Candidates(const TokenRow& row, const LayerState& ls, std::span<const int32_t> selected,
                  std::vector<kernels::KvSlot>* slots) const;
  // After the indexer's top-k of one row: drops picks LSA hides, counts what the pager missed, and
  // records what the row's session asked for (agreement, the memory indexer's capture, a trace;
  // `scores` are the row's index scores when it is traced, and read only then).
  void AfterSelection(const TokenRow& row, const float* x_row, const float* iq_row, const float* iw_row,
                      const std::vector<float>& scores, std::vector<int32_t>* selected) const;

  const ModelArgs& args_;
  const AttentionWeights& w_;
  int64_t layer_;
  int ratio_;
  int64_t n_local_heads_, n_local_groups_;
  const kernels::Backend& be_;
  const parallel::Communicator* comm_;
  RotaryTable rope_;
  std::vector<WeightMatrix> wo_a_groups_;
  std::optional<Compressor> compressor_;
  std::optional<Indexer> indexer_;
  int csa_index_;  // position of this layer among the CSA layers (trace slot), -1 otherwise
};

}  // namespace flashmem::model
