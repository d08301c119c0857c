#include "worker/lsa/memory_indexer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "kernels/numerics.h"
#include "worker/model/rope.h"

namespace flashmem::lsa {
namespace {

constexpr int64_t kRopeDim = 64;  // RoPE covers dims 64..127 of every head

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("indexer checkpoint ", path, ": ", what));
}

// Reads an F32 (or BF16) tensor of the expected shape into floats; rejects non-finite values.
absl::StatusOr<std::vector<float>> ReadTensor(const model::SafetensorsFile& f, const std::string& name,
                                              const std::vector<int64_t>& shape) {
  auto it = f.tensors().find(name);
  if (it == f.tensors().end()) return Bad(f.path(), absl::StrCat("missing tensor ", name));
  const model::TensorView& v = it->second;
  if (v.shape != shape) {
    std::string got, want;
    for (int64_t d : v.shape) absl::StrAppend(&got, got.empty() ? "" : ",", d);
    for (int64_t d : shape) absl::StrAppend(&want, want.empty() ? "" : ",", d);
    return Bad(f.path(), absl::StrCat(name, " has shape [", got, "], expected [", want, "]"));
  }
  std::vector<float> out(v.numel);
  if (v.dtype == model::DType::kF32) {
    std::memcpy(out.data(), v.bytes.data(), out.size() * 4);
  } else if (v.dtype == model::DType::kBF16) {
    num::Bf16BytesToFloats(v.bytes.data(), out.size(), out.data());
  } else {
    return Bad(f.path(), absl::StrCat(name, " has dtype ", model::DTypeName(v.dtype), ", expected F32 or BF16"));
  }
  for (int64_t i = 0; i < v.numel; ++i)
    if (!std::isfinite(out[i])) return Bad(f.path(), absl::StrCat(name, "[", i, "] is not finite"));
  return out;
}

kernels::WeightMatrix Dense(int64_t rows, int64_t cols, std::vector<float> values) {
  kernels::WeightMatrix m;
  m.format = kernels::WeightFormat::kDense;
  m.rows = rows;
  m.cols = cols;
  m.values = std::move(values);
  return m;
}

// In place FWHT of 128 values in the release's butterfly order, then / sqrt(128) (spec §1.3).
void Fwht128(float* q) {
  for (int64_t s = 1; s < kIndexHeadDim; s *= 2)
    for (int64_t b = 0; b < kIndexHeadDim; b += 2 * s)
      for (int64_t j = b; j < b + s; ++j) {
        const float a = q[j], c = q[j + s];
        q[j] = a + c;
        q[j + s] = a - c;
      }
  const float root = std::sqrt(static_cast<float>(kIndexHeadDim));
  for (int64_t d = 0; d < kIndexHeadDim; ++d) q[d] = q[d] / root;
}

absl::StatusOr<double> MetaNumber(const model::SafetensorsFile& f, const std::string& key, double dflt) {
  auto it = f.metadata().find(key);
  if (it == f.metadata().end()) return dflt;
  double v;
  if (!absl::SimpleAtod(it->second, &v) || !std::isfinite(v) || v <= 0)
    return Bad(f.path(), absl::StrCat("metadata ", key, " = '", it->second, "' is not a positive number"));
  return v;
}

}  // namespace

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

void DecodeIndexKRecord(const uint8_t* record, float* key) {
  float scale;
  std::memcpy(&scale, record + kIndexHeadDim, 4);
  for (int64_t d = 0; d < kIndexHeadDim; ++d) key[d] = num::E4m3ToFloat(record[d]) * scale;
}

void EncodeIndexKRecord(const float* key, uint8_t* record) {
  float amax = 0.0f;
  for (int64_t d = 0; d < kIndexHeadDim; ++d) amax = std::max(amax, std::fabs(key[d]));
  const float scale = amax > 0.0f ? amax / num::kE4m3Max : 1.0f;
  for (int64_t d = 0; d < kIndexHeadDim; ++d) {
    const float v = std::clamp(key[d] / scale, -num::kE4m3Max, num::kE4m3Max);
    record[d] = num::EncodeE4m3(num::RoundE4m3(v));
  }
  std::memcpy(record + kIndexHeadDim, &scale, 4);
}

absl::StatusOr<MemoryIndexer> MemoryIndexer::Load(const std::string& path, const kernels::Backend& be) {
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = (std::filesystem::path(path) / "fm_indexer.safetensors").string();
  FM_ASSIGN_OR_RETURN(auto f, model::SafetensorsFile::Open(file));
  return FromFile(*f, be);
}

absl::StatusOr<MemoryIndexer> MemoryIndexer::FromFile(const model::SafetensorsFile& f,
                                                      const kernels::Backend& be) {
  MemoryIndexer mi(be);
  // Layer ids from the key names retrievers.l{csa}.{wq_a.weight, wq_b.weight, q_norm_weight,
  // weights_proj.weight}; anything else under retrievers.* is rejected (freqs_cis is dropped by
  // the converter, as every inference loader ignores it).
  std::map<int, int> seen;
  for (const auto& [name, view] : f.tensors()) {
    if (!name.starts_with("retrievers.l"))
      return Bad(f.path(), absl::StrCat("unexpected tensor ", name, " (keys must be retrievers.l<csa>.*)"));
    const std::string rest = name.substr(std::strlen("retrievers.l"));
    const size_t dot = rest.find('.');
    int id;
    if (dot == std::string::npos || !absl::SimpleAtoi(rest.substr(0, dot), &id) || id < 0 || id > 4096)
      return Bad(f.path(), absl::StrCat("tensor ", name, ": cannot read the layer id"));
    const std::string field = rest.substr(dot + 1);
    if (field != "wq_a.weight" && field != "wq_b.weight" && field != "q_norm_weight" && field != "weights_proj.weight")
      return Bad(f.path(), absl::StrCat("unexpected tensor ", name));
    ++seen[id];
  }
  if (seen.empty()) return Bad(f.path(), "no retrievers.l<csa>.* tensors");
  const int first = seen.begin()->first;
  auto shape_of = [&](const std::string& n) -> std::vector<int64_t> {
    auto it = f.tensors().find(n);
    return it == f.tensors().end() ? std::vector<int64_t>{} : it->second.shape;
  };
  const auto wa = shape_of(absl::StrCat("retrievers.l", first, ".wq_a.weight"));
  const auto wb = shape_of(absl::StrCat("retrievers.l", first, ".wq_b.weight"));
  if (wa.size() != 2 || wb.size() != 2 || wb[0] % kIndexHeadDim != 0 || wa[0] <= 0 || wa[1] <= 0 || wb[0] <= 0)
    return Bad(f.path(), absl::StrCat("retrievers.l", first, ": wq_a must be [R, hidden] and wq_b [H*128, R]"));
  mi.q_lora_rank_ = wa[0];
  mi.hidden_ = wa[1];
  mi.n_heads_ = wb[0] / kIndexHeadDim;
  for (const auto& [id, count] : seen) {
    const std::string p = absl::StrCat("retrievers.l", id, ".");
    MemoryIndexerLayer L;
    L.csa_index = id;
    FM_ASSIGN_OR_RETURN(auto a, ReadTensor(f, p + "wq_a.weight", {mi.q_lora_rank_, mi.hidden_}));
    FM_ASSIGN_OR_RETURN(L.q_norm, ReadTensor(f, p + "q_norm_weight", {mi.q_lora_rank_}));
    FM_ASSIGN_OR_RETURN(auto b, ReadTensor(f, p + "wq_b.weight", {mi.n_heads_ * kIndexHeadDim, mi.q_lora_rank_}));
    FM_ASSIGN_OR_RETURN(auto w, ReadTensor(f, p + "weights_proj.weight", {mi.n_heads_, mi.hidden_}));
    L.wq_a = Dense(mi.q_lora_rank_, mi.hidden_, std::move(a));
    L.wq_b = Dense(mi.n_heads_ * kIndexHeadDim, mi.q_lora_rank_, std::move(b));
    L.weights_proj = Dense(mi.n_heads_, mi.hidden_, std::move(w));
    mi.layers_.push_back(std::move(L));
  }
  if (auto it = f.metadata().find("layers"); it != f.metadata().end()) {
    std::vector<int> listed;
    for (absl::string_view s : absl::StrSplit(it->second, ',')) {
      int v;
      if (!absl::SimpleAtoi(s, &v)) return Bad(f.path(), absl::StrCat("metadata layers = '", it->second, "' is not a list of integers"));
      listed.push_back(v);
    }
    std::sort(listed.begin(), listed.end());
    if (listed != mi.csa_layers())
      return Bad(f.path(), absl::StrCat("metadata layers = '", it->second, "' does not match the tensors' layer ids"));
  }
  FM_ASSIGN_OR_RETURN(mi.rope_.base, MetaNumber(f, "rope_theta", mi.rope_.base));
  FM_ASSIGN_OR_RETURN(mi.rope_.factor, MetaNumber(f, "rope_factor", mi.rope_.factor));
  FM_ASSIGN_OR_RETURN(double osl, MetaNumber(f, "original_seq_len", static_cast<double>(mi.rope_.original_seq_len)));
  FM_ASSIGN_OR_RETURN(mi.rope_.beta_fast, MetaNumber(f, "beta_fast", mi.rope_.beta_fast));
  FM_ASSIGN_OR_RETURN(mi.rope_.beta_slow, MetaNumber(f, "beta_slow", mi.rope_.beta_slow));
  FM_ASSIGN_OR_RETURN(double maxpos, MetaNumber(f, "max_position", static_cast<double>(mi.rope_.max_position)));
  mi.rope_.original_seq_len = static_cast<int64_t>(osl);
  mi.rope_.max_position = static_cast<int64_t>(maxpos);
  const bool yarn = mi.rope_.factor > 1.0 && mi.rope_.original_seq_len > 0;
  mi.inv_freq_ = model::RotaryTable(kRopeDim, mi.rope_.base, yarn ? mi.rope_.original_seq_len : 0,
                                    mi.rope_.factor, mi.rope_.beta_fast, mi.rope_.beta_slow).inv_freq();
  return mi;
}

std::vector<int> MemoryIndexer::csa_layers() const {
  std::vector<int> ids;
  for (const auto& L : layers_) ids.push_back(L.csa_index);
  return ids;
}

IndexerQuery MemoryIndexer::Query(int slot, const float* x, int64_t pos) const {
  const MemoryIndexerLayer& L = layers_[slot];
  const int64_t R = q_lora_rank_, H = n_heads_, D = kIndexHeadDim;
  IndexerQuery q;
  q.q_lora.resize(R);
  be_->Linear(L.wq_a, x, 1, q.q_lora.data(), kernels::Rounding::kNone);
  double ss = 0;
  for (float v : q.q_lora) ss += static_cast<double>(v) * v;
  const float rms = std::sqrt(static_cast<float>(ss / R) + 1e-6f);
  q.q_norm.resize(R);
  for (int64_t i = 0; i < R; ++i) q.q_norm[i] = q.q_lora[i] / rms * L.q_norm[i];
  q.q_pre.resize(H * D);
  be_->Linear(L.wq_b, q.q_norm.data(), 1, q.q_pre.data(), kernels::Rounding::kNone);
  // bf16 rounding of all dims, interleaved-pair RoPE on dims 64..127 re-rounded to bf16.
  const int64_t p = std::clamp<int64_t>(pos, 0, rope_.max_position - 1);
  std::vector<float> cs(kRopeDim / 2), sn(kRopeDim / 2);
  const float fp = static_cast<float>(p);
  for (int64_t i = 0; i < kRopeDim / 2; ++i) {
    const float angle = fp * inv_freq_[i];
    cs[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    sn[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
  q.q_rope.resize(H * D);
  for (int64_t h = 0; h < H; ++h) {
    float* r = q.q_rope.data() + h * D;
    for (int64_t d = 0; d < D; ++d) r[d] = num::RoundBf16(q.q_pre[h * D + d]);
    for (int64_t i = 0; i < kRopeDim / 2; ++i) {
      const float a = r[D - kRopeDim + 2 * i], b = r[D - kRopeDim + 2 * i + 1];
      const float re = a * cs[i] - b * sn[i];
      const float im = a * sn[i] + b * cs[i];
      r[D - kRopeDim + 2 * i] = num::RoundBf16(re);
      r[D - kRopeDim + 2 * i + 1] = num::RoundBf16(im);
    }
  }
  q.q = q.q_rope;
  for (int64_t h = 0; h < H; ++h) Fwht128(q.q.data() + h * D);
  q.per_head_w.resize(H);
  be_->Linear(L.weights_proj, x, 1, q.per_head_w.data(), kernels::Rounding::kNone);
  const float weight_scale = static_cast<float>(std::pow(static_cast<double>(D), -0.5) *
                                                std::pow(static_cast<double>(H), -0.5));
  q.w.resize(H);
  for (int64_t h = 0; h < H; ++h) q.w[h] = q.per_head_w[h] * weight_scale;
  // fp8q: sglang act_quant with scale_fmt None: s = max(amax, 1e-4) * fp32(1/448).
  q.q8.resize(H * D);
  q.q_scale.resize(H);
  q.w8.resize(H);
  const float inv448 = 1.0f / num::kE4m3Max;
  for (int64_t h = 0; h < H; ++h) {
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(q.q[h * D + d]));
    const float s = std::max(amax, 1e-4f) * inv448;
    q.q_scale[h] = s;
    for (int64_t d = 0; d < D; ++d) {
      const float v = std::clamp(q.q[h * D + d] / s, -num::kE4m3Max, num::kE4m3Max);
      q.q8[h * D + d] = num::EncodeE4m3(num::RoundE4m3(v));
    }
    q.w8[h] = q.w[h] * s;
  }
  return q;
}

void MemoryIndexer::ScoreRef(const IndexerQuery& q, const float* const* keys, int64_t n,
                             float* logits) const {
  be_->IndexerLogits(q.q.data(), q.w.data(), n_heads_, kIndexHeadDim, std::span(keys, n), logits);
  for (int64_t j = 0; j < n; ++j)
    if (!keys[j]) logits[j] = -std::numeric_limits<float>::infinity();
}

void MemoryIndexer::ScoreFp8q(const IndexerQuery& q, const uint8_t* const* records, int64_t n,
                              float* logits) const {
  const int64_t H = n_heads_, D = kIndexHeadDim;
  std::vector<float> q8(H * D);
  for (int64_t i = 0; i < H * D; ++i) q8[i] = num::E4m3ToFloat(q.q8[i]);
  // e4m3 x e4m3 products are exact in fp32, so dequantized codes give the fp8 kernel's products;
  // the key scale multiplies after the head sum.
  constexpr int64_t kBlock = 256;
  std::vector<float> codes(kBlock * D);
  std::vector<const float*> rows(kBlock);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t m = std::min(kBlock, n - j0);
    for (int64_t j = 0; j < m; ++j) {
      const uint8_t* rec = records[j0 + j];
      rows[j] = rec ? codes.data() + j * D : nullptr;
      if (rec)
        for (int64_t d = 0; d < D; ++d) codes[j * D + d] = num::E4m3ToFloat(rec[d]);
    }
    be_->IndexerLogits(q8.data(), q.w8.data(), H, D, std::span(rows.data(), m), logits + j0);
    for (int64_t j = 0; j < m; ++j) {
      const uint8_t* rec = records[j0 + j];
      if (!rec) {
        logits[j0 + j] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float scale;
      std::memcpy(&scale, rec + D, 4);
      logits[j0 + j] = logits[j0 + j] * scale;
    }
  }
}

}  // namespace flashmem::lsa
