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
struct CompressorState {
  std::vector<float> kv;
  std::vector<float> score;
  void Init(int ratio, int64_t head_dim) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    kv.assign(coff * ratio * coff * head_dim, 0.0f);
    score.assign(coff * ratio * coff * head_dim, -std::numeric_limits<float>::infinity());
  }
};

struct LayerState {
  std::vector<float> window;      // [window_size][head_dim]; slot = position % window_size
  kv::EntryPages compressed;      // compressed entries (ratio > 0)
  kv::EntryPages index_keys;      // indexer keys (ratio == 4)
  CompressorState compressor;     // main compressor
  CompressorState index_compressor;
};

struct SessionState {
  int64_t position = 0;  // tokens consumed so far
  std::vector<LayerState> layers;

  explicit SessionState(const ModelArgs& a) {
    layers.resize(a.n_layers);
    for (int64_t l = 0; l < a.n_layers; ++l) {
      LayerState& s = layers[l];
      s.window.assign(a.window_size * a.head_dim, 0.0f);
      const int r = a.ratio(l);
      if (r > 0) {
        s.compressed = kv::EntryPages(a.head_dim);
        s.compressor.Init(r, a.head_dim);
      }
      if (r == 4) {
        s.index_keys = kv::EntryPages(a.index_head_dim);
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
