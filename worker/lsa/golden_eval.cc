#include "worker/lsa/golden_eval.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/lsa/memory_indexer.h"
#include "worker/lsa/resident_set.h"
#include "worker/model/safetensors.h"

namespace flashmem::lsa {
namespace {

using json = nlohmann::json;
using model::DType;
using model::TensorToWrite;

absl::Status Bad(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("golden set: ", what));
}

const model::TensorView* Find(const model::SafetensorsFile& f, const std::string& name) {
  auto it = f.tensors().find(name);
  return it == f.tensors().end() ? nullptr : &it->second;
}

absl::StatusOr<std::vector<int64_t>> ReadI64(const model::SafetensorsFile& f, const std::string& name) {
  const auto* v = Find(f, name);
  if (!v || v->dtype != DType::kI64 || v->shape.size() != 1)
    return Bad(absl::StrCat(f.path(), ": ", name, " must be an I64 vector"));
  std::vector<int64_t> out(v->numel);
  std::memcpy(out.data(), v->bytes.data(), out.size() * 8);
  return out;
}

absl::StatusOr<std::vector<float>> ReadF32(const model::SafetensorsFile& f, const std::string& name,
                                           int64_t rows, int64_t cols) {
  const auto* v = Find(f, name);
  if (!v || v->dtype != DType::kF32 || v->shape != std::vector<int64_t>{rows, cols})
    return Bad(absl::StrCat(f.path(), ": ", name, " must be F32 [", rows, ", ", cols, "]"));
  std::vector<float> out(v->numel);
  std::memcpy(out.data(), v->bytes.data(), out.size() * 4);
  return out;
}

template <typename T>
TensorToWrite Tensor(const std::string& name, DType dt, std::vector<int64_t> shape, const std::vector<T>& v) {
  TensorToWrite t{name, dt, std::move(shape), {}};
  t.bytes.resize(v.size() * sizeof(T));
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

absl::StatusOr<LsaOptions> SettingOptions(const json& s) {
  LsaOptions o;
  try {
    o.ensemble = s.at("mode").get<std::string>() == "mean" ? Ensemble::kMean : Ensemble::kOr;
    o.threshold = s.at("thresh").get<float>();
    o.tail_chunks = s.at("last_keep").get<int64_t>();
    o.sink_chunks = s.value("first_keep", int64_t{0});
    o.max_resident = s.value("max_resident", int64_t{0});
    if (s.contains("kmax")) o.kmax = s["kmax"].get<int64_t>();
    if (s.contains("kmax_ratio")) {
      o.kmax_ratio = s["kmax_ratio"].get<double>();
      o.target_context_tokens = s.at("target_context_tokens").get<int64_t>();
    }
  } catch (const std::exception& e) {
    return Bad(absl::StrCat("setting ", s.dump(), ": ", e.what()));
  }
  return o;
}

// The manifests are written by Python's json module, which emits the non-JSON literals Infinity,
// -Infinity and NaN (in statistics we do not read); they become null outside strings.
std::string SanitizePythonJson(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out.push_back(c);
      if (c == '\\' && i + 1 < text.size()) out.push_back(text[++i]);
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    bool replaced = false;
    for (const char* lit : {"-Infinity", "Infinity", "NaN"}) {
      const size_t len = std::strlen(lit);
      if (text.compare(i, len, lit) == 0) {
        out += "null";
        i += len - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out.push_back(c);
  }
  return out;
}

}  // namespace

absl::Status RunGoldenEval(const std::string& dir, const std::string& out_path, const kernels::Backend& be) {
  namespace fs = std::filesystem;
  FM_ASSIGN_OR_RETURN(auto wfile, model::SafetensorsFile::Open((fs::path(dir) / "indexer_weights.safetensors").string()));
  FM_ASSIGN_OR_RETURN(MemoryIndexer mi, MemoryIndexer::FromFile(*wfile, be));
  FM_ASSIGN_OR_RETURN(auto in, model::SafetensorsFile::Open((fs::path(dir) / "inputs.safetensors").string()));
  FM_ASSIGN_OR_RETURN(std::string manifest_text, ReadFileToString((fs::path(dir) / "manifest.json").string()));
  json params;
  try {
    params = json::parse(SanitizePythonJson(manifest_text)).at("parameters");
  } catch (const std::exception& e) {
    return Bad(absl::StrCat("manifest.json: ", e.what()));
  }
  FM_ASSIGN_OR_RETURN(auto positions, ReadI64(*in, "positions"));
  FM_ASSIGN_OR_RETURN(auto n_blk, ReadI64(*in, "n_blk"));
  const int64_t Q = static_cast<int64_t>(positions.size());
  if (static_cast<int64_t>(n_blk.size()) != Q) return Bad("n_blk and positions differ in length");
  const std::vector<int> ids = mi.csa_layers();
  const int L = static_cast<int>(ids.size());

  // Index-K records per layer; all layers hold the same number of chunks.
  int64_t N = -1;
  std::vector<std::vector<const uint8_t*>> recs(L);
  std::vector<std::vector<float>> keys(L);
  std::vector<std::vector<const float*>> key_rows(L);
  for (int l = 0; l < L; ++l) {
    const std::string name = absl::StrCat("index_k.l", ids[l]);
    const auto* v = Find(*in, name);
    if (!v || v->dtype != DType::kU8 || v->shape.size() != 2 || v->shape[1] != kIndexKRecordBytes)
      return Bad(absl::StrCat(name, " must be U8 [N, 132]"));
    if (N >= 0 && v->shape[0] != N) return Bad(absl::StrCat(name, " has ", v->shape[0], " rows, other layers ", N));
    N = v->shape[0];
    keys[l].resize(N * kIndexHeadDim);
    for (int64_t j = 0; j < N; ++j) {
      recs[l].push_back(v->bytes.data() + j * kIndexKRecordBytes);
      DecodeIndexKRecord(recs[l].back(), keys[l].data() + j * kIndexHeadDim);
      key_rows[l].push_back(keys[l].data() + j * kIndexHeadDim);
    }
  }
  for (int64_t q = 0; q < Q; ++q)
    if (n_blk[q] < 0 || n_blk[q] > N) return Bad(absl::StrCat("n_blk[", q, "] = ", n_blk[q], " is outside [0, ", N, "]"));

  std::vector<TensorToWrite> out;
  const char* kVariants[2] = {"ref", "fp8q"};
  // sig[variant][layer] = [Q * N] sigmoids.
  std::vector<std::vector<std::vector<float>>> sig(2, std::vector<std::vector<float>>(L));
  for (int l = 0; l < L; ++l) {
    FM_ASSIGN_OR_RETURN(auto hidden, ReadF32(*in, absl::StrCat("hidden.l", ids[l]), Q, mi.hidden()));
    std::vector<float> logits[2] = {std::vector<float>(Q * N), std::vector<float>(Q * N)};
    std::vector<float> q_final, fused_w;
    std::vector<uint8_t> q8;
    for (int64_t q = 0; q < Q; ++q) {
      const IndexerQuery iq = mi.Query(l, hidden.data() + q * mi.hidden(), positions[q]);
      mi.ScoreRef(iq, key_rows[l].data(), N, logits[0].data() + q * N);
      mi.ScoreFp8q(iq, recs[l].data(), N, logits[1].data() + q * N);
      q_final.insert(q_final.end(), iq.q.begin(), iq.q.end());
      fused_w.insert(fused_w.end(), iq.w.begin(), iq.w.end());
      q8.insert(q8.end(), iq.q8.begin(), iq.q8.end());
    }
    for (int v = 0; v < 2; ++v) {
      sig[v][l].resize(Q * N);
      for (int64_t i = 0; i < Q * N; ++i) sig[v][l][i] = Sigmoid(logits[v][i]);
      out.push_back(Tensor(absl::StrCat("logits_", kVariants[v], ".l", ids[l]), DType::kF32, {Q, N}, logits[v]));
    }
    out.push_back(Tensor(absl::StrCat("q_final.l", ids[l]), DType::kF32, {Q, mi.n_heads(), kIndexHeadDim}, q_final));
    out.push_back(Tensor(absl::StrCat("fused_w.l", ids[l]), DType::kF32, {Q, mi.n_heads()}, fused_w));
    out.push_back(Tensor(absl::StrCat("q_fp8_bytes.l", ids[l]), DType::kU8, {Q, mi.n_heads(), kIndexHeadDim}, q8));
  }

  const int64_t P = (N + kChunksPerPage - 1) / kChunksPerPage;
  for (int v = 0; v < 2; ++v) {
    // Ensembles over every chunk row (as the golden arrays hold them), per query.
    std::vector<float> ens[2] = {std::vector<float>(Q * N), std::vector<float>(Q * N)};
    for (int64_t q = 0; q < Q; ++q) {
      std::vector<std::vector<float>> rows(L);
      for (int l = 0; l < L; ++l) rows[l].assign(sig[v][l].begin() + q * N, sig[v][l].begin() + (q + 1) * N);
      EnsembleScores(rows, N, Ensemble::kOr, ens[0].data() + q * N);
      EnsembleScores(rows, N, Ensemble::kMean, ens[1].data() + q * N);
    }
    out.push_back(Tensor(absl::StrCat("ens_max.", kVariants[v]), DType::kF32, {Q, N}, ens[0]));
    out.push_back(Tensor(absl::StrCat("ens_mean.", kVariants[v]), DType::kF32, {Q, N}, ens[1]));
    for (const json& s : params.value("chunk_settings", json::array())) {
      FM_ASSIGN_OR_RETURN(LsaOptions o, SettingOptions(s));
      std::vector<uint8_t> keep(Q * N, 0);
      for (int64_t q = 0; q < Q; ++q) {
        const float* e = ens[o.ensemble == Ensemble::kOr ? 0 : 1].data() + q * N;
        auto k = ChunkResidentSet(e, n_blk[q], o);
        std::copy(k.begin(), k.end(), keep.begin() + q * N);
      }
      out.push_back(Tensor(absl::StrCat("sel.", s["id"].get<std::string>(), ".", kVariants[v], ".keep"), DType::kU8, {Q, N}, keep));
    }
    for (const json& s : params.value("page_settings", json::array())) {
      FM_ASSIGN_OR_RETURN(LsaOptions o, SettingOptions(s));
      const int64_t kmax = ResolveKmax(o);
      std::vector<uint8_t> keep(Q * N, 0);
      std::vector<float> score(Q * P, -1.0f);
      std::vector<int64_t> pages(Q * kmax, -1), K(Q);
      for (int64_t q = 0; q < Q; ++q) {
        const float* e = ens[o.ensemble == Ensemble::kOr ? 0 : 1].data() + q * N;
        PageSelection sel = SelectPages(e, n_blk[q], o);
        auto k = ExpandPages(sel, n_blk[q]);
        std::copy(k.begin(), k.end(), keep.begin() + q * N);
        std::copy(sel.page_score.begin(), sel.page_score.end(), score.begin() + q * P);
        std::copy(sel.pages.begin(), sel.pages.end(), pages.begin() + q * kmax);
        K[q] = sel.k;
      }
      const std::string p = absl::StrCat("sel.", s["id"].get<std::string>(), ".", kVariants[v], ".");
      out.push_back(Tensor(p + "keep", DType::kU8, {Q, N}, keep));
      out.push_back(Tensor(p + "page_score", DType::kF32, {Q, P}, score));
      out.push_back(Tensor(p + "pages", DType::kI64, {Q, kmax}, pages));
      out.push_back(Tensor(p + "K", DType::kI64, {Q}, K));
    }
  }

  // Threshold-fallback trace (ref scorer), when the set has one.
  if (params.contains("fallback") && Find(*in, "fb_n_blk")) {
    const json& fb = params["fallback"];
    LsaOptions o;
    try {
      o.tail_chunks = fb.at("last_keep").get<int64_t>();
      o.sink_chunks = fb.at("first_keep").get<int64_t>();
      o.threshold = fb.at("thresh").get<float>();
      o.ensemble = fb.at("ensemble_mode").get<std::string>() == "mean" ? Ensemble::kMean : Ensemble::kOr;
      o.fallback_limit = fb.at("fb_value").get<double>();
    } catch (const std::exception& e) {
      return Bad(absl::StrCat("parameters.fallback: ", e.what()));
    }
    FM_ASSIGN_OR_RETURN(auto fb_n, ReadI64(*in, "fb_n_blk"));
    FM_ASSIGN_OR_RETURN(auto fb_pos, ReadI64(*in, "fb_positions"));
    const int64_t C = static_cast<int64_t>(fb_n.size());
    if (static_cast<int64_t>(fb_pos.size()) != C) return Bad("fb_n_blk and fb_positions differ in length");
    ThresholdFallback fallback(o.fallback_limit);
    std::vector<uint8_t> keep(C * N, 0), triggered(C);
    std::vector<int64_t> cum_thresh(C), cum_c4(C), n_keep(C);
    std::vector<std::vector<float>> fb_logits(L, std::vector<float>(C * N, 0.0f));
    std::vector<std::vector<float>> fb_hidden(L);
    for (int l = 0; l < L; ++l) {
      FM_ASSIGN_OR_RETURN(fb_hidden[l], ReadF32(*in, absl::StrCat("fb_hidden.l", ids[l]), C, mi.hidden()));
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = fb_n[c];
      if (n < 0 || n > N) return Bad(absl::StrCat("fb_n_blk[", c, "] = ", n, " is outside [0, ", N, "]"));
      std::vector<std::vector<float>> s(L, std::vector<float>(n));
      for (int l = 0; l < L; ++l) {
        const IndexerQuery iq = mi.Query(l, fb_hidden[l].data() + c * mi.hidden(), fb_pos[c]);
        mi.ScoreRef(iq, key_rows[l].data(), n, fb_logits[l].data() + c * N);
        for (int64_t j = 0; j < n; ++j) s[l][j] = Sigmoid(fb_logits[l][c * N + j]);
      }
      std::vector<float> ens(n);
      EnsembleScores(s, n, o.ensemble, ens.data());
      const bool dense = fallback.Observe(ens.data(), n, o);
      LsaOptions chunk = o;
      chunk.max_resident = 0;
      std::vector<uint8_t> k = dense ? std::vector<uint8_t>(n, 1) : ChunkResidentSet(ens.data(), n, chunk);
      std::copy(k.begin(), k.end(), keep.begin() + c * N);
      triggered[c] = dense;
      cum_thresh[c] = fallback.cum_thresh();
      cum_c4[c] = fallback.cum_c4();
      for (uint8_t b : k) n_keep[c] += b;
    }
    out.push_back(Tensor("fb.keep", DType::kU8, {C, N}, keep));
    out.push_back(Tensor("fb.triggered", DType::kU8, {C}, triggered));
    out.push_back(Tensor("fb.cum_thresh", DType::kI64, {C}, cum_thresh));
    out.push_back(Tensor("fb.cum_c4", DType::kI64, {C}, cum_c4));
    out.push_back(Tensor("fb.n_keep", DType::kI64, {C}, n_keep));
    for (int l = 0; l < L; ++l)
      out.push_back(Tensor(absl::StrCat("fb.logits_ref.l", ids[l]), DType::kF32, {C, N}, fb_logits[l]));
  }
  return model::WriteSafetensors(out_path, out, {{"producer", "flashmem indexer golden-eval"}});
}

}  // namespace flashmem::lsa
