#include "worker/model/weights.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "kernels/numerics.h"

namespace flashmem::model {
namespace {

using kernels::WeightFormat;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string LayerPrefix(const ModelArgs& a, int64_t layer) {
  return layer < a.n_layers ? absl::StrCat("layers.", layer, ".") : absl::StrCat("mtp.", layer - a.n_layers, ".");
}

void AddFp8(std::vector<TensorSpec>* out, const std::string& name, int64_t rows, int64_t cols) {
  out->push_back({name + ".weight", DType::kF8E4M3, {rows, cols}});
  out->push_back({name + ".scale", DType::kF8E8M0, {CeilDiv(rows, 128), CeilDiv(cols, 128)}});
}

void AddExpert(std::vector<TensorSpec>* out, const std::string& p, int64_t dim, int64_t inter, bool fp4) {
  if (!fp4) {
    AddFp8(out, p + "w1", inter, dim);
    AddFp8(out, p + "w2", dim, inter);
    AddFp8(out, p + "w3", inter, dim);
    return;
  }
  for (const char* w : {"w1", "w3"}) {
    out->push_back({absl::StrCat(p, w, ".weight"), DType::kI8, {inter, dim / 2}});
    out->push_back({absl::StrCat(p, w, ".scale"), DType::kF8E8M0, {inter, dim / 32}});
  }
  out->push_back({p + "w2.weight", DType::kI8, {dim, inter / 2}});
  out->push_back({p + "w2.scale", DType::kF8E8M0, {dim, inter / 32}});
}

void AddBlock(std::vector<TensorSpec>* out, const ModelArgs& a, int64_t layer) {
  const std::string p = LayerPrefix(a, layer);
  const int64_t d = a.dim, hcd = a.hc_mult * a.dim, mix = a.mix_hc();
  const int ratio = a.ratio(layer);
  out->push_back({p + "attn_norm.weight", DType::kBF16, {d}});
  out->push_back({p + "ffn_norm.weight", DType::kBF16, {d}});
  for (const char* s : {"attn", "ffn"}) {
    out->push_back({absl::StrCat(p, "hc_", s, "_fn"), DType::kF32, {mix, hcd}});
    out->push_back({absl::StrCat(p, "hc_", s, "_base"), DType::kF32, {mix}});
    out->push_back({absl::StrCat(p, "hc_", s, "_scale"), DType::kF32, {3}});
  }
  out->push_back({p + "attn.attn_sink", DType::kF32, {a.n_heads}});
  out->push_back({p + "attn.q_norm.weight", DType::kBF16, {a.q_lora_rank}});
  out->push_back({p + "attn.kv_norm.weight", DType::kBF16, {a.head_dim}});
  AddFp8(out, p + "attn.wq_a", a.q_lora_rank, d);
  AddFp8(out, p + "attn.wq_b", a.n_heads * a.head_dim, a.q_lora_rank);
  AddFp8(out, p + "attn.wkv", a.head_dim, d);
  AddFp8(out, p + "attn.wo_a", a.o_groups * a.o_lora_rank, a.n_heads * a.head_dim / a.o_groups);
  AddFp8(out, p + "attn.wo_b", d, a.o_groups * a.o_lora_rank);
  if (ratio > 0) {
    const int64_t coff = ratio == 4 ? 2 : 1;
    out->push_back({p + "attn.compressor.wkv.weight", DType::kBF16, {coff * a.head_dim, d}});
    out->push_back({p + "attn.compressor.wgate.weight", DType::kBF16, {coff * a.head_dim, d}});
    out->push_back({p + "attn.compressor.ape", DType::kF32, {ratio, coff * a.head_dim}});
    out->push_back({p + "attn.compressor.norm.weight", DType::kBF16, {a.head_dim}});
  }
  if (ratio == 4) {
    AddFp8(out, p + "attn.indexer.wq_b", a.index_n_heads * a.index_head_dim, a.q_lora_rank);
    out->push_back({p + "attn.indexer.weights_proj.weight", DType::kBF16, {a.index_n_heads, d}});
    out->push_back({p + "attn.indexer.compressor.wkv.weight", DType::kBF16, {2 * a.index_head_dim, d}});
    out->push_back({p + "attn.indexer.compressor.wgate.weight", DType::kBF16, {2 * a.index_head_dim, d}});
    out->push_back({p + "attn.indexer.compressor.ape", DType::kF32, {4, 2 * a.index_head_dim}});
    out->push_back({p + "attn.indexer.compressor.norm.weight", DType::kBF16, {a.index_head_dim}});
  }
  out->push_back({p + "ffn.gate.weight", DType::kBF16, {a.n_routed_experts, d}});
  if (layer < a.n_layers && a.is_hash_layer(layer))
    out->push_back({p + "ffn.gate.tid2eid", DType::kI64, {a.vocab_size, a.n_activated_experts}});
  else
    out->push_back({p + "ffn.gate.bias", DType::kF32, {a.n_routed_experts}});
  for (int64_t e = 0; e < a.n_routed_experts; ++e)
    AddExpert(out, absl::StrCat(p, "ffn.experts.", e, "."), d, a.moe_inter_dim, a.expert_dtype == ExpertDtype::kFp4);
  AddExpert(out, p + "ffn.shared_experts.", d, a.moe_inter_dim, false);
}

// ---- decoding -------------------------------------------------------------------------------

class Loader {
 public:
  Loader(const Checkpoint& ckpt, ShardSpec shard) : ckpt_(ckpt), shard_(shard) {}

  absl::StatusOr<const TensorView*> Get(const std::string& name) const {
    const TensorView* v = ckpt_.Find(name);
    if (!v) return absl::NotFoundError(absl::StrCat("checkpoint has no tensor '", name, "'"));
    return v;
  }

  // Any float tensor, upcast to fp32; elements [begin, end) only (end < 0: to the end), so a
  // tensor-parallel rank decodes just its slice of the mapped file.
  absl::StatusOr<std::vector<float>> Floats(const std::string& name, int64_t begin = 0, int64_t end = -1) const {
    FM_ASSIGN_OR_RETURN(const TensorView* v, Get(name));
    if (end < 0) end = v->numel;
    std::vector<float> out(end - begin);
    const uint8_t* p = v->bytes.data();
    for (int64_t i = begin; i < end; ++i) {
      switch (v->dtype) {
        case DType::kF32: std::memcpy(&out[i - begin], p + 4 * i, 4); break;
        case DType::kBF16: { uint16_t b; std::memcpy(&b, p + 2 * i, 2); out[i - begin] = num::Bf16BitsToFloat(b); break; }
        case DType::kF16: { uint16_t b; std::memcpy(&b, p + 2 * i, 2); out[i - begin] = num::F16BitsToFloat(b); break; }
        default: return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': dtype ", DTypeName(v->dtype), " is not a float type"));
      }
    }
    return out;
  }

  // Rows [r0, r1) of a 2-D float tensor as a dense matrix.
  absl::StatusOr<WeightMatrix> Dense(const std::string& name, int64_t r0 = 0, int64_t r1 = -1) const {
    FM_ASSIGN_OR_RETURN(const TensorView* v, Get(name));
    WeightMatrix w;
    w.format = WeightFormat::kDense;
    const int64_t rows = v->shape[0], cols = v->shape.size() > 1 ? v->shape[1] : 1;
    if (r1 < 0) r1 = rows;
    if (r0 < 0 || r1 > rows || r0 > r1)
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': rows [", r0, ", ", r1, ") outside [0, ", rows, ")"));
    w.rows = r1 - r0;
    w.cols = cols;
    FM_ASSIGN_OR_RETURN(w.values, Floats(name, r0 * cols, r1 * cols));
    return w;
  }

  // FP8 block-quantized weight (name.weight / name.scale), rows [r0,r1) and cols [c0,c1):
  // slices must fall on 128 boundaries so that each keeps whole scale blocks.
  absl::StatusOr<WeightMatrix> Fp8(const std::string& name, int64_t r0 = 0, int64_t r1 = -1,
                                   int64_t c0 = 0, int64_t c1 = -1) const {
    FM_ASSIGN_OR_RETURN(const TensorView* v, Get(name + ".weight"));
    FM_ASSIGN_OR_RETURN(const TensorView* s, Get(name + ".scale"));
    const int64_t rows = v->shape[0], cols = v->shape[1];
    if (r1 < 0) r1 = rows;
    if (c1 < 0) c1 = cols;
    if (r0 % 128 || c0 % 128 || (r1 % 128 && r1 != rows) || (c1 % 128 && c1 != cols))
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, ".weight': tensor-parallel slice [", r0, ":", r1, ", ", c0, ":", c1, "] does not fall on 128x128 scale blocks"));
    const int64_t scols = s->shape[1];
    WeightMatrix w;
    w.format = WeightFormat::kFp8Block128;
    w.rows = r1 - r0;
    w.cols = c1 - c0;
    w.values.resize(w.rows * w.cols);
    const std::array<float, 256>& e4m3 = num::E4m3Table();  // by lookup: ldexp per value made loading slow
    for (int64_t r = 0; r < w.rows; ++r) {
      const uint8_t* row = v->bytes.data() + (r0 + r) * cols + c0;
      float* out = w.values.data() + r * w.cols;
      bool nan = false;
      for (int64_t c = 0; c < w.cols; ++c) {
        nan |= (row[c] & 0x7f) == 0x7f;
        out[c] = e4m3[row[c]];
      }
      if (nan)
        for (int64_t c = 0; c < w.cols; ++c)
          if ((row[c] & 0x7f) == 0x7f)
            return absl::InvalidArgumentError(absl::StrCat("tensor '", name, ".weight': NaN e4m3 code at [", r0 + r, ", ", c0 + c, "]"));
    }
    const int64_t br = CeilDiv(w.rows, 128), bc = CeilDiv(w.cols, 128);
    w.scales.resize(br * bc);
    for (int64_t i = 0; i < br; ++i)
      for (int64_t j = 0; j < bc; ++j) {
        const uint8_t b = s->bytes[(r0 / 128 + i) * scols + c0 / 128 + j];
        if (num::E8m0IsNan(b))
          return absl::InvalidArgumentError(absl::StrCat("tensor '", name, ".scale': E8M0 byte 255 (NaN) at [", r0 / 128 + i, ", ", c0 / 128 + j, "]"));
        w.scales[i * bc + j] = num::E8m0ToFloat(b);
      }
    return w;
  }

  // FP8 weight dequantized to its bf16 values (the official converter does this for wo_a).
  absl::StatusOr<WeightMatrix> Fp8Dequantized(const std::string& name, int64_t r0 = 0, int64_t r1 = -1) const {
    FM_ASSIGN_OR_RETURN(WeightMatrix w, Fp8(name, r0, r1));
    const int64_t bc = CeilDiv(w.cols, 128);
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t c = 0; c < w.cols; ++c)
        w.values[r * w.cols + c] = num::RoundBf16(w.values[r * w.cols + c] * w.scales[(r / 128) * bc + c / 128]);
    w.scales.clear();
    w.format = WeightFormat::kDense;
    return w;
  }

  // FP4 e2m1 weight packed two per byte along K (low nibble = even K), E8M0 scale per 32 K.
  absl::StatusOr<WeightMatrix> Fp4(const std::string& name) const {
    FM_ASSIGN_OR_RETURN(const TensorView* v, Get(name + ".weight"));
    FM_ASSIGN_OR_RETURN(const TensorView* s, Get(name + ".scale"));
    WeightMatrix w;
    w.format = WeightFormat::kFp4Group32;
    w.rows = v->shape[0];
    w.cols = v->shape[1] * 2;
    w.values.resize(w.rows * w.cols);
    for (int64_t i = 0; i < v->numel; ++i) {
      const uint8_t b = v->bytes[i];
      w.values[2 * i] = num::E2m1ToFloat(b & 0xf);
      w.values[2 * i + 1] = num::E2m1ToFloat(b >> 4);
    }
    w.scales.resize(s->numel);
    for (int64_t i = 0; i < s->numel; ++i) {
      if (num::E8m0IsNan(s->bytes[i]))
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, ".scale': E8M0 byte 255 (NaN) at flat index ", i));
      w.scales[i] = num::E8m0ToFloat(s->bytes[i]);
    }
    return w;
  }

  absl::StatusOr<WeightMatrix> Expert(const std::string& name) const {
    FM_ASSIGN_OR_RETURN(const TensorView* v, Get(name + ".weight"));
    return v->dtype == DType::kI8 ? Fp4(name) : Fp8(name);
  }

  absl::StatusOr<ExpertWeights> ExpertTriple(const std::string& p) const {
    ExpertWeights e;
    FM_ASSIGN_OR_RETURN(e.w1, Expert(p + "w1"));
    FM_ASSIGN_OR_RETURN(e.w2, Expert(p + "w2"));
    FM_ASSIGN_OR_RETURN(e.w3, Expert(p + "w3"));
    return e;
  }

  absl::StatusOr<CompressorWeights> Compressor(const std::string& p) const {
    CompressorWeights c;
    FM_ASSIGN_OR_RETURN(c.wkv, Dense(p + "wkv.weight"));
    FM_ASSIGN_OR_RETURN(c.wgate, Dense(p + "wgate.weight"));
    FM_ASSIGN_OR_RETURN(c.ape, Floats(p + "ape"));
    FM_ASSIGN_OR_RETURN(c.norm, Floats(p + "norm.weight"));
    return c;
  }

  absl::StatusOr<BlockWeights> Block(const ModelArgs& a, int64_t layer) const {
    const std::string p = LayerPrefix(a, layer);
    const int ws = shard_.world_size, rk = shard_.rank;
    BlockWeights b;
    FM_ASSIGN_OR_RETURN(b.attn_norm, Floats(p + "attn_norm.weight"));
    FM_ASSIGN_OR_RETURN(b.ffn_norm, Floats(p + "ffn_norm.weight"));
    FM_ASSIGN_OR_RETURN(b.hc_attn_fn, Floats(p + "hc_attn_fn"));
    FM_ASSIGN_OR_RETURN(b.hc_attn_base, Floats(p + "hc_attn_base"));
    FM_ASSIGN_OR_RETURN(b.hc_attn_scale, Floats(p + "hc_attn_scale"));
    FM_ASSIGN_OR_RETURN(b.hc_ffn_fn, Floats(p + "hc_ffn_fn"));
    FM_ASSIGN_OR_RETURN(b.hc_ffn_base, Floats(p + "hc_ffn_base"));
    FM_ASSIGN_OR_RETURN(b.hc_ffn_scale, Floats(p + "hc_ffn_scale"));
    AttentionWeights& at = b.attn;
    const int64_t lh = a.n_heads / ws, lg = a.o_groups / ws;
    FM_ASSIGN_OR_RETURN(std::vector<float> sink, Floats(p + "attn.attn_sink"));
    at.attn_sink.assign(sink.begin() + rk * lh, sink.begin() + (rk + 1) * lh);
    FM_ASSIGN_OR_RETURN(at.q_norm, Floats(p + "attn.q_norm.weight"));
    FM_ASSIGN_OR_RETURN(at.kv_norm, Floats(p + "attn.kv_norm.weight"));
    FM_ASSIGN_OR_RETURN(at.wq_a, Fp8(p + "attn.wq_a"));
    FM_ASSIGN_OR_RETURN(at.wq_b, Fp8(p + "attn.wq_b", rk * lh * a.head_dim, (rk + 1) * lh * a.head_dim));
    FM_ASSIGN_OR_RETURN(at.wkv, Fp8(p + "attn.wkv"));
    FM_ASSIGN_OR_RETURN(at.wo_a, Fp8Dequantized(p + "attn.wo_a", rk * lg * a.o_lora_rank, (rk + 1) * lg * a.o_lora_rank));
    FM_ASSIGN_OR_RETURN(at.wo_b, Fp8(p + "attn.wo_b", 0, -1, rk * lg * a.o_lora_rank, (rk + 1) * lg * a.o_lora_rank));
    const int ratio = a.ratio(layer);
    if (ratio > 0) {
      FM_ASSIGN_OR_RETURN(at.compressor, Compressor(p + "attn.compressor."));
    }
    if (ratio == 4) {
      IndexerWeights ix;
      const int64_t lih = a.index_n_heads / ws;
      FM_ASSIGN_OR_RETURN(ix.wq_b, Fp8(p + "attn.indexer.wq_b", rk * lih * a.index_head_dim, (rk + 1) * lih * a.index_head_dim));
      FM_ASSIGN_OR_RETURN(ix.weights_proj, Dense(p + "attn.indexer.weights_proj.weight", rk * lih, (rk + 1) * lih));
      FM_ASSIGN_OR_RETURN(ix.compressor, Compressor(p + "attn.indexer.compressor."));
      at.indexer = std::move(ix);
    }
    MoEWeights& m = b.ffn;
    FM_ASSIGN_OR_RETURN(m.gate.weight, Dense(p + "ffn.gate.weight"));
    if (layer < a.n_layers && a.is_hash_layer(layer)) {
      FM_ASSIGN_OR_RETURN(const TensorView* t, Get(p + "ffn.gate.tid2eid"));
      m.gate.tid2eid.resize(t->numel);
      for (int64_t i = 0; i < t->numel; ++i) {
        int64_t e;
        std::memcpy(&e, t->bytes.data() + 8 * i, 8);
        if (e < 0 || e >= a.n_routed_experts)
          return absl::InvalidArgumentError(absl::StrCat("tensor '", p, "ffn.gate.tid2eid': expert id ", e, " at flat index ", i, " is outside [0, ", a.n_routed_experts, ")"));
        m.gate.tid2eid[i] = static_cast<int32_t>(e);
      }
    } else {
      FM_ASSIGN_OR_RETURN(m.gate.bias, Floats(p + "ffn.gate.bias"));
    }
    const int64_t le = a.n_routed_experts / ws;
    m.first_local_expert = rk * le;
    // The experts are most of a layer's bytes: decoded in parallel when the layers are not
    // (LoadWeights runs the layers in parallel; nested regions then get one thread).
    std::vector<absl::StatusOr<ExpertWeights>> experts(le);
#pragma omp parallel for schedule(dynamic)
    for (int64_t i = 0; i < le; ++i) experts[i] = ExpertTriple(absl::StrCat(p, "ffn.experts.", rk * le + i, "."));
    for (absl::StatusOr<ExpertWeights>& ew : experts) {
      if (!ew.ok()) return ew.status();
      m.experts.push_back(*std::move(ew));
    }
    FM_ASSIGN_OR_RETURN(m.shared, ExpertTriple(p + "ffn.shared_experts."));
    return b;
  }

  absl::StatusOr<HcHeadWeights> HcHead(const std::string& p) const {
    HcHeadWeights h;
    FM_ASSIGN_OR_RETURN(h.fn, Floats(p + "hc_head_fn"));
    FM_ASSIGN_OR_RETURN(h.base, Floats(p + "hc_head_base"));
    FM_ASSIGN_OR_RETURN(h.scale, Floats(p + "hc_head_scale"));
    return h;
  }

 private:
  const Checkpoint& ckpt_;
  ShardSpec shard_;
};

}  // namespace

std::vector<TensorSpec> ExpectedTensors(const ModelArgs& a) {
  std::vector<TensorSpec> out;
  out.push_back({"embed.weight", DType::kBF16, {a.vocab_size, a.dim}});
  out.push_back({"head.weight", DType::kBF16, {a.vocab_size, a.dim}});
  out.push_back({"norm.weight", DType::kBF16, {a.dim}});
  out.push_back({"hc_head_fn", DType::kF32, {a.hc_mult, a.hc_mult * a.dim}});
  out.push_back({"hc_head_base", DType::kF32, {a.hc_mult}});
  out.push_back({"hc_head_scale", DType::kF32, {1}});
  for (int64_t l = 0; l < a.n_layers + a.n_mtp_layers; ++l) {
    AddBlock(&out, a, l);
    if (l >= a.n_layers) {
      const std::string p = LayerPrefix(a, l);
      AddFp8(&out, p + "e_proj", a.dim, a.dim);
      AddFp8(&out, p + "h_proj", a.dim, a.dim);
      for (const char* n : {"enorm", "hnorm", "norm"}) out.push_back({absl::StrCat(p, n, ".weight"), DType::kBF16, {a.dim}});
      out.push_back({p + "hc_head_fn", DType::kF32, {a.hc_mult, a.hc_mult * a.dim}});
      out.push_back({p + "hc_head_base", DType::kF32, {a.hc_mult}});
      out.push_back({p + "hc_head_scale", DType::kF32, {1}});
    }
  }
  return out;
}

absl::Status ValidateCheckpoint(const Checkpoint& ckpt, const ModelArgs& args) {
  auto shape_str = [](const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); };
  std::set<std::string> expected;
  for (const TensorSpec& t : ExpectedTensors(args)) {
    expected.insert(t.name);
    const TensorView* v = ckpt.Find(t.name);
    if (!v) return absl::InvalidArgumentError(absl::StrCat("checkpoint is missing tensor '", t.name, "' (", DTypeName(t.dtype), " ", shape_str(t.shape), ")"));
    // Norm weights and bf16 tensors may come as F32/F16 in converted checkpoints.
    const bool float_ok = t.dtype == DType::kBF16 && (v->dtype == DType::kF32 || v->dtype == DType::kF16);
    if (v->dtype != t.dtype && !float_ok)
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has dtype ", DTypeName(v->dtype), ", expected ", DTypeName(t.dtype)));
    if (v->shape != t.shape)
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has shape ", shape_str(v->shape), ", expected ", shape_str(t.shape)));
  }
  for (const auto& [name, v] : ckpt.tensors())
    if (!expected.count(name)) return absl::InvalidArgumentError(absl::StrCat("checkpoint has unexpected tensor '", name, "'"));
  return absl::OkStatus();
}

absl::StatusOr<ModelWeights> LoadWeights(const Checkpoint& ckpt, const ModelArgs& a, ShardSpec shard,
                                         const LoadProgress& progress) {
  if (shard.world_size < 1 || shard.rank < 0 || shard.rank >= shard.world_size)
    return absl::InvalidArgumentError(absl::StrCat("shard: rank ", shard.rank, " / world_size ", shard.world_size, " is invalid"));
  const int ws = shard.world_size;
  if (a.n_heads % ws || a.o_groups % ws || a.index_n_heads % ws || a.n_routed_experts % ws || a.vocab_size % ws)
    return absl::InvalidArgumentError(absl::StrCat("world_size ", ws, " must divide num_attention_heads, o_groups, index_n_heads, n_routed_experts and vocab_size"));
  FM_RETURN_IF_ERROR(ValidateCheckpoint(ckpt, a));
  Loader ld(ckpt, shard);
  ModelWeights w;
  w.shard = shard;
  const int64_t lv = a.vocab_size / ws;
  FM_ASSIGN_OR_RETURN(w.embed, ld.Dense("embed.weight", shard.rank * lv, (shard.rank + 1) * lv));
  FM_ASSIGN_OR_RETURN(w.head, ld.Dense("head.weight", shard.rank * lv, (shard.rank + 1) * lv));
  FM_ASSIGN_OR_RETURN(w.norm, ld.Floats("norm.weight"));
  FM_ASSIGN_OR_RETURN(w.hc_head, ld.HcHead(""));
  const int64_t steps = a.n_layers + a.n_mtp_layers;
  // Layers decode in parallel (each is independent, and decoding is host work on the mapped
  // file: single-threaded, a flash-shape checkpoint took over a minute); progress counts the
  // layers done, in order of completion, and the first failing layer's error is returned. A layer
  // past one that failed is not decoded (its result could not be returned; a flash-shape layer
  // is seconds of work): the lowest failing index always runs, as only a lower failure skips it.
  std::vector<absl::StatusOr<BlockWeights>> blocks(a.n_layers);
  absl::Mutex progress_mu;
  int64_t done = 0, first_failed = a.n_layers;  // both under progress_mu
#pragma omp parallel for schedule(dynamic)
  for (int64_t l = 0; l < a.n_layers; ++l) {
    {
      absl::MutexLock lock(&progress_mu);
      if (l > first_failed) {
        blocks[l] = absl::CancelledError(absl::StrCat("layer ", l, ": not decoded after layer ", first_failed, " failed"));
        continue;
      }
    }
    blocks[l] = ld.Block(a, l);
    absl::MutexLock lock(&progress_mu);
    if (!blocks[l].ok()) {
      first_failed = std::min(first_failed, l);
      continue;
    }
    ++done;
    if (progress) progress(done, steps);
  }
  for (absl::StatusOr<BlockWeights>& b : blocks) {
    if (!b.ok()) return b.status();
    w.layers.push_back(*std::move(b));
  }
  for (int64_t l = a.n_layers; l < a.n_layers + a.n_mtp_layers; ++l) {
    MTPWeights m;
    const std::string p = LayerPrefix(a, l);
    FM_ASSIGN_OR_RETURN(m.block, ld.Block(a, l));
    FM_ASSIGN_OR_RETURN(m.e_proj, ld.Fp8(p + "e_proj"));
    FM_ASSIGN_OR_RETURN(m.h_proj, ld.Fp8(p + "h_proj"));
    FM_ASSIGN_OR_RETURN(m.enorm, ld.Floats(p + "enorm.weight"));
    FM_ASSIGN_OR_RETURN(m.hnorm, ld.Floats(p + "hnorm.weight"));
    FM_ASSIGN_OR_RETURN(m.norm, ld.Floats(p + "norm.weight"));
    FM_ASSIGN_OR_RETURN(m.hc_head, ld.HcHead(p));
    w.mtp.push_back(std::move(m));
    if (progress) progress(l + 1, steps);
  }
  return w;
}

}  // namespace flashmem::model
