// Per-session decode state, explicit and apart from the model classes (the reference keeps it
// in module buffers): window rings, compressed KV and indexer keys in 64-entry pages, and the
// pending blocks of every compressor. Together with the position this is everything a session
// needs to continue decoding (spec §3.2, §3.5).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "worker/kv/entry_pages.h"
#include "worker/model/config.h"

namespace flashmem::model {

// Pending block of a gated-pooling compressor: rows [coff*ratio][coff*head_dim] of projected kv
// and gate scores (scores start at -inf so the first overlapped block sees only its own tokens).
// `version` names the values (kernels::PoolRing): renew it (Renew) after writing them outside
// Backend::PoolSteps, so a device's copy of the ring is not trusted any more.
struct CompressorState {
  std::vector<float> kv;
  std::vector<float> score;
  uint64_t version = 0;
  void Init(int ratio, int64_t head_dim) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    kv.assign(coff * ratio * coff * head_dim, 0.0f);
    score.assign(coff * ratio * coff * head_dim, -std::numeric_limits<float>::infinity());
    Renew();
  }
  void Renew() { version = kernels::NewKvPageVersion(); }
  kernels::PoolRing ring() { return {kv.data(), score.data(), &version}; }
};

struct LayerState {
  kv::EntryPages window;          // window_size entries, FP8 records; slot = position % window_size
  kv::EntryPages compressed;      // compressed entries (ratio > 0)
  kv::EntryPages index_keys;      // indexer keys (ratio == 4)
  CompressorState compressor;     // main compressor
  CompressorState index_compressor;
};

// LSA Level 2 (spec/memory_indexer.md §3.3): which compressed chunks of the CSA layers the
// lightning indexer may pick. Dense while `covered_chunks < 0`. Otherwise chunk j is visible iff
// it was created after the set was chosen (j >= covered_chunks: it lives in the newest pages,
// which stay resident) or its page is selected. A chunk index is the same token range in every
// CSA layer, so one view serves them all.
struct Residency {
  int64_t covered_chunks = -1;
  std::vector<uint8_t> page_selected;  // [ceil(covered_chunks / 64)]
  bool dense() const { return covered_chunks < 0; }
  bool Visible(int64_t chunk) const {
    return covered_chunks < 0 || chunk >= covered_chunks || page_selected[chunk / kv::kEntriesPerPage] != 0;
  }
  bool PageVisible(int64_t page) const {
    return covered_chunks < 0 || page * kv::kEntriesPerPage >= covered_chunks ||
           (page < static_cast<int64_t>(page_selected.size()) && page_selected[page] != 0);
  }
  // Evaluation mode: the full top-k is computed alongside and the overlap accumulated.
  bool measure_agreement = false;
  double agreement_sum = 0;   // sum over (CSA layer, decode token) of |top-k(visible) ∩ top-k(all)| / k
  int64_t agreement_count = 0;
  int64_t missing_rows = 0;  // selected rows whose page was not in memory (must stay 0)
};

// Attention inputs captured for the memory indexer: when `enabled`, each CSA layer whose slot in
// `x` has `dim` room records the input of the session's last row of the forward pass.
struct LsaCapture {
  bool enabled = false;
  int64_t pos = -1;
  std::vector<std::vector<float>> x;  // [CSA index][dim]; empty vectors are not captured
};

struct SessionState {
  int64_t position = 0;  // tokens consumed so far
  std::vector<LayerState> layers;
  Residency residency;
  LsaCapture capture;

  explicit SessionState(const ModelArgs& a) {
    layers.resize(a.n_layers);
    for (int64_t l = 0; l < a.n_layers; ++l) {
      LayerState& s = layers[l];
      // The sliding window's ring: window_size entries written in place, held as FP8 records like
      // the compressed entries (the same values: both are the nope dims' FP8 round trip + rope).
      s.window = kv::EntryPages(kv::PageFormat::MainKv(a.head_dim, a.rope_head_dim), /*encoded=*/true);
      const std::vector<float> zero(a.head_dim, 0.0f);
      for (int64_t w = 0; w < a.window_size; ++w) s.window.Append(zero.data());
      const int r = a.ratio(l);
      if (r > 0) {
        // Held as FP8 records (584 B an entry at 512 dims), as they move to memtier.
        s.compressed = kv::EntryPages(kv::PageFormat::MainKv(a.head_dim, a.rope_head_dim), /*encoded=*/true);
        s.compressor.Init(r, a.head_dim);
      }
      if (r == 4) {
        // fp32 rows: the indexer reads every key every step; MXFP4 in memtier, and kept in that
        // form beside the rows too (a device backend holds and reads it: 68 B a key, not 512).
        s.index_keys = kv::EntryPages(kv::PageFormat::IndexKeys(a.index_head_dim), /*encoded=*/false,
                                      /*packed_twin=*/true);
        s.index_compressor.Init(r, a.index_head_dim);
      }
    }
  }
};

// Component values recorded for the last token of a batch item (tests compare them with the
// reference's golden arrays; serving leaves it null).
struct ForwardTrace {
  std::vector<std::vector<int32_t>> moe_experts;     // [layer][topk]
  std::vector<std::vector<float>> moe_weights;       // [layer][topk]
  std::vector<std::vector<float>> indexer_scores;    // [csa layer][complete entries]
  std::vector<std::vector<int32_t>> indexer_topk;    // [csa layer][selected]
  std::vector<std::vector<float>> block_out;         // [layer][hc*dim]
  std::vector<float> hidden_hc;                      // [hc*dim]
  std::vector<float> head_input;                     // [dim]
};

}  // namespace flashmem::model
