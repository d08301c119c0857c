#include "worker/model/random_checkpoint.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/numerics.h"
#include "worker/model/safetensors.h"
#include "worker/model/weights.h"

namespace flashmem::model {
namespace {

// Box-Muller over mt19937_64: the same stream on every platform (std::normal_distribution is
// implementation-defined).
class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  double Uniform() { return (static_cast<double>(gen_() >> 11) + 0.5) * 0x1.0p-53; }
  float Normal(float mean = 0.0f, float std = 1.0f) {
    if (has_spare_) {
      has_spare_ = false;
      return mean + std * spare_;
    }
    const double u = Uniform(), v = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u));
    spare_ = static_cast<float>(r * std::sin(2 * M_PI * v));
    has_spare_ = true;
    return mean + std * static_cast<float>(r * std::cos(2 * M_PI * v));
  }
  uint64_t Next() { return gen_(); }

 private:
  std::mt19937_64 gen_;
  bool has_spare_ = false;
  float spare_ = 0.0f;
};

uint64_t NameSeed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a: one stream per tensor, order-independent
  for (char c : name) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return h;
}

template <typename T>
void Put(std::vector<uint8_t>* out, T v) {
  const size_t at = out->size();
  out->resize(at + sizeof(T));
  std::memcpy(out->data() + at, &v, sizeof(T));
}

// Std of a weight's Gaussian draw: 1/sqrt(fan_in), scaled down on the projections that write
// into the residual stream so that each sub-layer adds about a quarter of its RMS.
float WeightStd(const std::string& name, int64_t fan_in) {
  float gain = 1.0f;
  if (absl::StrContains(name, "wo_b") || absl::EndsWith(name, "w2")) gain = 0.25f;
  return gain / std::sqrt(static_cast<float>(fan_in));
}

void QuantizeFp8(const std::vector<float>& w, int64_t rows, int64_t cols, TensorToWrite* weight,
                 TensorToWrite* scale) {
  const int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
  weight->bytes.assign(rows * cols, 0);
  scale->bytes.assign(br * bc, 0);
  for (int64_t i = 0; i < br; ++i)
    for (int64_t j = 0; j < bc; ++j) {
      float amax = 0.0f;
      for (int64_t r = i * 128; r < std::min(rows, (i + 1) * 128); ++r)
        for (int64_t c = j * 128; c < std::min(cols, (j + 1) * 128); ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const float s = num::Fp8BlockScale(amax);
      scale->bytes[i * bc + j] = num::Pow2ToE8m0(s);
      for (int64_t r = i * 128; r < std::min(rows, (i + 1) * 128); ++r)
        for (int64_t c = j * 128; c < std::min(cols, (j + 1) * 128); ++c)
          weight->bytes[r * cols + c] = num::EncodeE4m3(num::RoundE4m3(std::clamp(w[r * cols + c] / s, -448.0f, 448.0f)));
    }
}

void QuantizeFp4(const std::vector<float>& w, int64_t rows, int64_t cols, TensorToWrite* weight,
                 TensorToWrite* scale) {
  weight->bytes.assign(rows * cols / 2, 0);
  scale->bytes.assign(rows * cols / 32, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < cols / 32; ++g) {
      float amax = 0.0f;
      for (int64_t c = g * 32; c < (g + 1) * 32; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
      const float s = num::Fp4BlockScale(amax);
      scale->bytes[r * (cols / 32) + g] = num::Pow2ToE8m0(s);
      for (int64_t c = g * 32; c < (g + 1) * 32; ++c) {
        const uint8_t code = num::EncodeE2m1(num::RoundE2m1(std::clamp(w[r * cols + c] / s, -6.0f, 6.0f)));
        weight->bytes[(r * cols + c) / 2] |= (c % 2 == 0) ? code : static_cast<uint8_t>(code << 4);
      }
    }
}

}  // namespace

absl::StatusOr<ModelArgs> PresetArgs(const std::string& preset, int64_t layers, int64_t experts) {
  ModelArgs a;
  a.vocab_size = 129280;
  a.head_dim = 512;
  a.rope_head_dim = 64;
  a.window_size = 128;
  a.index_head_dim = 128;
  a.n_mtp_layers = 1;
  a.score_func = ScoreFunc::kSqrtSoftplus;
  a.route_scale = 1.5f;
  a.swiglu_limit = 10.0f;
  a.rope_theta = 10000;
  a.compress_rope_theta = 160000;
  a.rope_factor = 16;
  a.original_seq_len = 65536;
  a.max_position_embeddings = 1048576;
  a.n_hash_layers = 3;
  if (preset == "tiny") {
    a.dim = 128; a.n_layers = 6; a.n_heads = 4; a.q_lora_rank = 128; a.o_groups = 2; a.o_lora_rank = 128;
    a.index_n_heads = 4; a.index_topk = 16; a.n_routed_experts = 8; a.n_activated_experts = 2;
    a.moe_inter_dim = 256;
  } else if (preset == "small") {
    a.dim = 128; a.n_layers = 12; a.n_heads = 8; a.q_lora_rank = 256; a.o_groups = 4; a.o_lora_rank = 128;
    a.index_n_heads = 8; a.index_topk = 64; a.n_routed_experts = 32; a.n_activated_experts = 4;
    a.moe_inter_dim = 512;
  } else if (preset == "flash-shape") {
    a.dim = 4096; a.n_layers = 4; a.n_heads = 64; a.q_lora_rank = 1024; a.o_groups = 8; a.o_lora_rank = 1024;
    a.index_n_heads = 64; a.index_topk = 512; a.n_routed_experts = 256; a.n_activated_experts = 6;
    a.moe_inter_dim = 2048;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--preset '", preset, "': known presets are tiny, small, flash-shape"));
  }
  if (layers > 0) a.n_layers = layers;
  if (experts > 0) a.n_routed_experts = experts;
  if (a.n_activated_experts > a.n_routed_experts) a.n_activated_experts = a.n_routed_experts;
  a.n_hash_layers = std::min<int64_t>(a.n_hash_layers, a.n_layers);
  // Flash's pattern: SWA-only first layers where there is room, then CSA/HCA alternating, MTP SWA.
  a.compress_ratios.clear();
  for (int64_t l = 0; l < a.n_layers; ++l)
    a.compress_ratios.push_back(l == 0 && a.n_layers > 2 ? 0 : (l % 2 == 1 ? 4 : 128));
  a.compress_ratios.push_back(0);
  FM_RETURN_IF_ERROR(ValidateModelArgs(a));
  return a;
}

absl::StatusOr<RandomCheckpointStats> WriteRandomCheckpoint(const ModelArgs& a, uint64_t seed,
                                                            const std::string& out_dir) {
  FM_RETURN_IF_ERROR(ValidateModelArgs(a));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  std::vector<TensorSpec> specs = ExpectedTensors(a);
  std::vector<TensorToWrite> out;
  RandomCheckpointStats stats;
  // Every tensor draws from its own stream (NameSeed), so tensors are made in parallel and the
  // file is the same whatever the thread count.
  std::vector<std::vector<TensorToWrite>> parts(specs.size());
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& t = specs[i];
    if (absl::EndsWith(t.name, ".scale")) continue;  // written with its weight
    std::vector<TensorToWrite>& made = parts[i];
    Rng rng(NameSeed(seed, t.name));
    TensorToWrite w{t.name, t.dtype, t.shape, {}};
    const int64_t numel = [&] { int64_t n = 1; for (int64_t d : t.shape) n *= d; return n; }();
    const std::string base = t.name.substr(0, t.name.size() - std::string(".weight").size());
    if (t.dtype == DType::kF8E4M3 || t.dtype == DType::kI8) {
      const bool fp4 = t.dtype == DType::kI8;
      const int64_t rows = t.shape[0], cols = fp4 ? t.shape[1] * 2 : t.shape[1];
      std::vector<float> v(rows * cols);
      const float std = WeightStd(base, cols);
      for (float& x : v) x = rng.Normal(0.0f, std);
      TensorToWrite s{base + ".scale", DType::kF8E8M0, specs[i + 1].shape, {}};
      if (fp4) QuantizeFp4(v, rows, cols, &w, &s); else QuantizeFp8(v, rows, cols, &w, &s);
      made.push_back(std::move(w));
      made.push_back(std::move(s));
      continue;
    }
    if (t.dtype == DType::kI64) {  // tid2eid: distinct experts per token
      const int64_t k = t.shape[1];
      for (int64_t r = 0; r < t.shape[0]; ++r) {
        std::vector<int64_t> e(a.n_routed_experts);
        for (int64_t j = 0; j < a.n_routed_experts; ++j) e[j] = j;
        for (int64_t j = 0; j < k; ++j) std::swap(e[j], e[j + rng.Next() % (a.n_routed_experts - j)]);
        for (int64_t j = 0; j < k; ++j) Put(&w.bytes, e[j]);
      }
      made.push_back(std::move(w));
      continue;
    }
    std::vector<float> v(numel);
    const int64_t fan_in = t.shape.size() > 1 ? t.shape[1] : t.shape[0];
    if (absl::EndsWith(t.name, "norm.weight")) {
      for (float& x : v) x = 1.0f + rng.Normal(0.0f, 0.1f);
    } else if (t.name == "embed.weight") {
      for (float& x : v) x = rng.Normal();
    } else if (absl::EndsWith(t.name, "attn_sink")) {
      for (float& x : v) x = rng.Normal(1.0f, 1.0f);
    } else if (absl::EndsWith(t.name, ".ape")) {
      for (float& x : v) x = rng.Normal(0.0f, 0.25f);
    } else if (absl::EndsWith(t.name, "_base")) {
      for (float& x : v) x = rng.Normal(0.0f, 0.25f);
      if (!absl::StrContains(t.name, "hc_head")) {  // +1 on the comb matrix diagonal
        const int hc = a.hc_mult;
        for (int j = 0; j < hc; ++j) v[2 * hc + j * hc + j] += 1.0f;
      }
    } else if (absl::EndsWith(t.name, "_scale")) {
      for (float& x : v) x = 1.0f + rng.Normal(0.0f, 0.1f);
    } else if (absl::EndsWith(t.name, "gate.bias")) {
      for (float& x : v) x = rng.Normal(0.0f, 0.1f);
    } else {
      const float std = 1.0f / std::sqrt(static_cast<float>(fan_in));
      for (float& x : v) x = rng.Normal(0.0f, std);
    }
    w.bytes.resize(v.size() * (t.dtype == DType::kBF16 ? 2 : 4));
    for (size_t j = 0; j < v.size(); ++j) {
      if (t.dtype == DType::kBF16) {
        const uint16_t b = num::FloatToBf16Bits(v[j]);
        std::memcpy(w.bytes.data() + 2 * j, &b, 2);
      } else {
        std::memcpy(w.bytes.data() + 4 * j, &v[j], 4);
      }
    }
    made.push_back(std::move(w));
  }
  for (auto& p : parts)
    for (auto& t : p) out.push_back(std::move(t));
  for (const auto& t : out) stats.bytes += static_cast<int64_t>(t.bytes.size());
  stats.tensors = static_cast<int64_t>(out.size());
  FM_RETURN_IF_ERROR(WriteSafetensors(out_dir + "/model.safetensors", out));
  std::ofstream cfg(out_dir + "/config.json");
  cfg << ModelArgsToJson(a) << "\n";
  if (!cfg) return absl::InternalError(absl::StrCat("cannot write ", out_dir, "/config.json"));
  return stats;
}

}  // namespace flashmem::model
