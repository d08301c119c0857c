#include "kernels/device.h"
#include "worker/cli/commands.h"

#include "worker/lsa/lsa_session.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "kernels/ops.h"
#include "worker/model/random_checkpoint.h"
#include "worker/model/safetensors.h"
#include "worker/model/sampler.h"
#include "worker/model/transformer.h"
#include "worker/parallel/gloo_communicator.h"
#include "worker/parallel/nccl_communicator.h"
#include "worker/tokenizer/tokenizer.h"

namespace flashmem::cli {

using model::BatchItem;

absl::StatusOr<std::vector<int32_t>> ParseTokenIds(const std::string& text, const std::string& what) {
  std::vector<int32_t> ids;
  for (absl::string_view piece : absl::StrSplit(text, absl::ByAnyChar(", \t\r\n"), absl::SkipEmpty())) {
    int32_t v;
    if (!absl::SimpleAtoi(piece, &v) || v < 0)
      return absl::InvalidArgumentError(absl::StrCat(what, ": '", piece, "' is not a non-negative token id"));
    ids.push_back(v);
  }
  return ids;
}

absl::StatusOr<std::vector<int32_t>> ReadTokenFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseTokenIds(ss.str(), path);
}

namespace {

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

absl::Status Generate(const GenerateOptions& in) {
  GenerateOptions opt = in;
  // Text in and out when the model directory carries a tokenizer.json (HF convention).
  std::unique_ptr<tokenizer::Tokenizer> tok;
  if (std::filesystem::exists(opt.model_dir + "/tokenizer.json")) {
    FM_ASSIGN_OR_RETURN(tok, tokenizer::Tokenizer::Load(opt.model_dir));
  }
  if (!opt.prompt_text.empty()) {
    if (!tok) return absl::FailedPreconditionError(absl::StrCat("--prompt: ", opt.model_dir, " has no tokenizer.json; use --prompt-ids"));
    FM_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode(opt.prompt_text));
    opt.prompt = {0};  // BOS
    opt.prompt.insert(opt.prompt.end(), ids.begin(), ids.end());
  }
  if (opt.prompt.empty()) return absl::InvalidArgumentError("--prompt/--prompt-ids/--prompt-file: the prompt is empty");
  const model::SamplingOptions sampling{opt.temperature, opt.top_p, opt.seed};
  FM_RETURN_IF_ERROR(model::ValidateSampling(sampling));
  if (opt.prefill_split == 0 || opt.prefill_split > static_cast<int64_t>(opt.prompt.size()))
    return absl::InvalidArgumentError(absl::StrCat("--prefill-split ", opt.prefill_split, " must be in [1, ", opt.prompt.size(), "]"));
  const auto t0 = std::chrono::steady_clock::now();
  // "--device cuda" in a group: each rank on the GPU of its own rank number.
  const std::string device = opt.device == "cuda" ? absl::StrCat("cuda:", opt.tp_rank) : opt.device;
  FM_ASSIGN_OR_RETURN(kernels::BackendHandle backend, kernels::OpenBackend(device, opt.gpu_memory_bytes, opt.cuda_kernels, opt.gpu_kv_reserve_bytes));
  parallel::GroupOptions group;
  group.rank = opt.tp_rank;
  group.size = opt.tp_size;
  group.leader_address = opt.tp_leader;
  group.timeout = absl::Seconds(opt.tp_timeout_s);
  FM_ASSIGN_OR_RETURN(std::unique_ptr<parallel::Communicator> comm, parallel::ConnectGroup(group, device));
  FM_ASSIGN_OR_RETURN(auto tf, model::Transformer::Load(opt.model_dir, *backend.backend,
                                                        model::ShardSpec{opt.tp_rank, opt.tp_size}, nullptr, comm.get()));
  const bool leader = opt.tp_rank == 0;  // the other ranks compute but print nothing
  const auto t1 = std::chrono::steady_clock::now();
  for (size_t i = 0; i < opt.prompt.size(); ++i)
    if (opt.prompt[i] >= tf->args().vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("prompt[", i, "] = ", opt.prompt[i], " is outside the vocabulary (", tf->args().vocab_size, ")"));
  for (size_t i = 0; i < opt.force.size(); ++i)
    if (opt.force[i] >= tf->args().vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("--force-tokens[", i, "] = ", opt.force[i], " is outside the vocabulary (", tf->args().vocab_size, ")"));
  auto session = tf->NewSession();
  std::optional<lsa::MemoryIndexer> indexer;
  std::unique_ptr<lsa::LsaSession> lsa_session;
  if (!opt.lsa_indexer.empty()) {
    FM_ASSIGN_OR_RETURN(indexer, lsa::MemoryIndexer::Load(opt.lsa_indexer, *backend.backend));
    FM_ASSIGN_OR_RETURN(lsa::LsaOptions lo, lsa::ParseLsaOptions(opt.lsa_options));
    FM_RETURN_IF_ERROR(lsa::LsaSession::CheckCompatible(*indexer, tf->args(), lo));
    lsa_session = std::make_unique<lsa::LsaSession>(*indexer, tf->args(), lo, lsa::LsaMode::kAuto, 0, !opt.lsa_apply_next_step);
    session->residency.measure_agreement = opt.lsa_stats;
  } else if (!opt.lsa_options.empty()) {
    return absl::InvalidArgumentError("--lsa-options needs --lsa INDEXER");
  }
  std::vector<std::vector<float>> rows;  // dumped logits rows
  std::vector<float> logits;
  // Greedy decoding with nothing dumped takes the pick where the head ran (BatchItem::greedy):
  // the vocabulary's logits stay on a GPU.
  const bool pick_only = sampling.temperature <= 0.0f && opt.dump_path.empty() && opt.force.empty();
  int32_t pick = 0;
  auto step = [&](std::span<const int32_t> tokens, bool decode) -> absl::Status {
    BatchItem item{session.get(), tokens, pick_only ? nullptr : &logits, nullptr, pick_only ? &pick : nullptr};
    if (lsa_session) lsa_session->BeforeStep(*session, decode);
    FM_RETURN_IF_ERROR(tf->Forward(std::span<BatchItem>(&item, 1)));
    if (lsa_session) lsa_session->AfterStep(*session, decode);
    if (session->residency.missing_rows > 0) return absl::InternalError("LSA: selected KV rows were not in memory");
    if (!opt.dump_path.empty()) rows.push_back(logits);
    return absl::OkStatus();
  };
  const int64_t split = opt.prefill_split > 0 ? opt.prefill_split : static_cast<int64_t>(opt.prompt.size());
  FM_RETURN_IF_ERROR(step(std::span<const int32_t>(opt.prompt.data(), split), false));
  for (size_t i = split; i < opt.prompt.size(); ++i) FM_RETURN_IF_ERROR(step(std::span<const int32_t>(&opt.prompt[i], 1), false));
  const auto t2 = std::chrono::steady_clock::now();
  const int64_t n = opt.force.empty() ? opt.max_new_tokens : static_cast<int64_t>(opt.force.size());
  std::vector<int32_t> fed;
  std::string text;
  std::optional<tokenizer::Tokenizer::StreamDecoder> decoder;
  if (tok) decoder.emplace(*tok);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t next = pick_only       ? pick
                         : opt.force.empty() ? model::SampleToken(logits, sampling, static_cast<uint64_t>(i))
                                             : opt.force[i];
    fed.push_back(next);
    if (!opt.quiet && leader) { std::printf("%d ", next); std::fflush(stdout); }
    if (decoder && next < tok->vocab_size()) {
      auto piece = decoder->Push(next);
      if (piece.ok()) text += *piece;
    }
    FM_RETURN_IF_ERROR(step(std::span<const int32_t>(&next, 1), true));
  }
  const auto t3 = std::chrono::steady_clock::now();
  if (!leader) return absl::OkStatus();
  if (!opt.quiet) std::printf("\n");
  if (decoder && !opt.quiet) std::printf("text: %s\n", (text + decoder->Finish()).c_str());
  std::printf("prompt: %zu tokens in %.3f s (%.1f tok/s); decode: %lld tokens in %.3f s (%.2f tok/s); load %.2f s\n",
              opt.prompt.size(), Seconds(t1, t2), opt.prompt.size() / std::max(1e-9, Seconds(t1, t2)),
              static_cast<long long>(n), Seconds(t2, t3), n / std::max(1e-9, Seconds(t2, t3)), Seconds(t0, t1));
  if (lsa_session && opt.lsa_stats) {
    const lsa::LsaStats& ls = lsa_session->stats();
    const model::Residency& r = session->residency;
    const int64_t total_pages = (session->position / 4 + 63) / 64;
    int64_t visible = 0;
    for (int64_t p = 0; p < total_pages; ++p) visible += r.PageVisible(p);
    std::printf("lsa: refreshes %llu, sets applied %llu, visible pages %lld/%lld (%.3f), set %lld of %lld pages, "
                "pages recalled %llu, churn (mean Jaccard) %.3f, stalls %llu (%.1f ms), fallback %s, last scoring %.1f ms, "
                "level-2 agreement %s\n",
                static_cast<unsigned long long>(ls.refreshes), static_cast<unsigned long long>(ls.sets_applied),
                static_cast<long long>(visible), static_cast<long long>(total_pages),
                total_pages ? static_cast<double>(visible) / total_pages : 1.0, static_cast<long long>(ls.selected_pages),
                static_cast<long long>(ls.covered_pages), static_cast<unsigned long long>(ls.pages_recalled),
                ls.churn_count ? ls.churn_jaccard_sum / ls.churn_count : 1.0, static_cast<unsigned long long>(ls.stalls),
                ls.stall_seconds * 1e3, ls.fallback ? "yes" : "no", ls.last_score_ms,
                r.agreement_count ? absl::StrCat(r.agreement_sum / r.agreement_count, " over ", r.agreement_count, " (layer, token) pairs").c_str() : "n/a (no sparse step)");
  }
  if (!opt.dump_path.empty()) {
    const int64_t vocab = static_cast<int64_t>(rows[0].size()), steps = static_cast<int64_t>(rows.size());
    model::TensorToWrite lt{"logits", model::DType::kF32, {steps, vocab}, {}};
    model::TensorToWrite tt{"tokens", model::DType::kI64, {steps}, {}};
    lt.bytes.resize(steps * vocab * 4);
    tt.bytes.resize(steps * 8);
    for (int64_t r = 0; r < steps; ++r) {
      std::memcpy(lt.bytes.data() + r * vocab * 4, rows[r].data(), vocab * 4);
      const int64_t am = Argmax(rows[r]);
      std::memcpy(tt.bytes.data() + r * 8, &am, 8);
    }
    FM_RETURN_IF_ERROR(model::WriteSafetensors(opt.dump_path, {lt, tt}));
    std::printf("dumped %lld rows to %s\n", static_cast<long long>(steps), opt.dump_path.c_str());
  }
  return absl::OkStatus();
}

absl::Status CkptRandom(const std::string& preset, int64_t layers, int64_t experts, uint64_t seed,
                        const std::string& out_dir, const std::string& tokenizer_dir) {
  FM_ASSIGN_OR_RETURN(model::ModelArgs args, model::PresetArgs(preset, layers, experts));
  FM_ASSIGN_OR_RETURN(auto stats, model::WriteRandomCheckpoint(args, seed, out_dir));
  if (!tokenizer_dir.empty()) {
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
      std::error_code ec;
      std::filesystem::copy_file(std::filesystem::path(tokenizer_dir) / f, std::filesystem::path(out_dir) / f,
                                 std::filesystem::copy_options::overwrite_existing, ec);
      if (ec) return absl::NotFoundError(absl::StrCat("--tokenizer-dir ", tokenizer_dir, ": cannot copy ", f, ": ", ec.message()));
    }
  }
  std::printf("wrote %s: preset %s, %lld layers, %lld tensors, %.1f MB (seed %llu)\n", out_dir.c_str(),
              preset.c_str(), static_cast<long long>(args.n_layers), static_cast<long long>(stats.tensors),
              stats.bytes / 1e6, static_cast<unsigned long long>(seed));
  return absl::OkStatus();
}

absl::Status CkptInspect(const std::string& dir, bool all_tensors) {
  FM_ASSIGN_OR_RETURN(model::ModelArgs a, model::LoadModelArgs(dir));
  FM_ASSIGN_OR_RETURN(auto ckpt, model::Checkpoint::Open(dir));
  FM_RETURN_IF_ERROR(model::ValidateCheckpoint(*ckpt, a));
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;  // dtype -> (tensors, bytes)
  int64_t params = 0, mtp_params = 0;
  for (const auto& [name, v] : ckpt->tensors()) {
    auto& e = by_dtype[model::DTypeName(v->dtype)];
    e.first++;
    e.second += static_cast<int64_t>(v->bytes.size());
    if (v->dtype == model::DType::kF8E8M0) continue;  // scales are not parameters
    const int64_t p = v->dtype == model::DType::kI8 ? 2 * v->numel : v->numel;  // packed FP4
    (name.rfind("mtp.", 0) == 0 ? mtp_params : params) += p;
    if (all_tensors) {
      std::string shape;
      for (int64_t d : v->shape) shape += absl::StrCat(shape.empty() ? "" : ",", d);
      std::printf("%-60s %-8s [%s] %lld B\n", name.c_str(), model::DTypeName(v->dtype), shape.c_str(),
                  static_cast<long long>(v->bytes.size()));
    }
  }
  std::printf("checkpoint %s: %zu tensors, %.2f MB\n", dir.c_str(), ckpt->tensors().size(), ckpt->total_bytes() / 1e6);
  for (const auto& [dt, e] : by_dtype)
    std::printf("  %-8s %6lld tensors %12lld bytes\n", dt.c_str(), static_cast<long long>(e.first), static_cast<long long>(e.second));
  std::printf("parameters: %.3f M (+ %.3f M MTP)\n", params / 1e6, mtp_params / 1e6);
  int n_swa = 0, n_csa = 0, n_hca = 0;
  for (int64_t l = 0; l < a.n_layers; ++l) (a.ratio(l) == 0 ? n_swa : a.ratio(l) == 4 ? n_csa : n_hca)++;
  std::printf("layers: %lld (SWA %d, CSA %d, HCA %d) + %lld MTP; dim %lld, heads %lld x %lld, experts %lld (%lld active)\n",
              static_cast<long long>(a.n_layers), n_swa, n_csa, n_hca, static_cast<long long>(a.n_mtp_layers),
              static_cast<long long>(a.dim), static_cast<long long>(a.n_heads), static_cast<long long>(a.head_dim),
              static_cast<long long>(a.n_routed_experts), static_cast<long long>(a.n_activated_experts));
  // KV bytes (spec §4): FP8 "MODEL1" record = nope e4m3 + rope bf16 + one UE8M0 per 64 nope dims,
  // padded to 8 bytes (584 B at head_dim 512); index key = e4m3 dims + fp32 scale (132 B).
  const int64_t nope = a.nope_head_dim();
  const int64_t record = (nope + 2 * a.rope_head_dim + nope / 64 + 7) / 8 * 8;
  const int64_t index_record = a.index_head_dim + 4;
  double growth = 0, growth_bf16 = 0;
  for (int64_t l = 0; l < a.n_layers; ++l) {
    const int r = a.ratio(l);
    if (r == 0) continue;
    growth += static_cast<double>(record) / r + (r == 4 ? static_cast<double>(index_record) / r : 0.0);
    growth_bf16 += 2.0 * a.head_dim / r + (r == 4 ? 2.0 * a.index_head_dim / r : 0.0);
  }
  const int64_t window_bytes = (a.n_layers + a.n_mtp_layers) * a.window_size * record;
  std::printf("KV per token: %.4f B (FP8 %lld-B records + %lld-B index keys; reference bf16: %.2f B); "
              "fixed windows per sequence: %lld B\n",
              growth, static_cast<long long>(record), static_cast<long long>(index_record), growth_bf16,
              static_cast<long long>(window_bytes));
  return absl::OkStatus();
}

}  // namespace flashmem::cli
