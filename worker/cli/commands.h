// The subcommands of the `flashmem` binary, apart from main.cc so that CLI11 stays there.
#pragma once

#include <cstdint>
#include <istream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace flashmem::cli {

// Token ids separated by commas and/or whitespace.
absl::StatusOr<std::vector<int32_t>> ParseTokenIds(const std::string& text, const std::string& what);
absl::StatusOr<std::vector<int32_t>> ReadTokenFile(const std::string& path);

struct GenerateOptions {
  std::string model_dir;
  std::vector<int32_t> prompt;
  std::string prompt_text;       // tokenized with the model's tokenizer.json (BOS first) when set
  int64_t max_new_tokens = 16;
  std::vector<int32_t> force;    // teacher forcing: fed instead of the argmax
  int64_t prefill_split = -1;    // prefill this many prompt tokens, feed the rest one by one
  std::string dump_path;         // F32 logits [n_steps, vocab] + I64 tokens [n_steps]
  bool quiet = false;
  float temperature = 0.0f;      // 0: greedy
  float top_p = 1.0f;
  uint64_t seed = 0;
  // LSA: the memory indexer (a fm_indexer.safetensors file or its directory); empty: dense.
  std::string lsa_indexer;
  std::string lsa_options;       // "kmax=8,interval=16,..." (docs/lsa.md)
  bool lsa_apply_next_step = false;  // the release's s+1 instead of the next boundary
  bool lsa_stats = false;        // print the LSA statistics (and measure Level-2 agreement)
  std::string device = "cpu";    // compute backend: cpu or cuda:N
  int64_t gpu_memory_bytes = 0;  // CUDA backend memory budget (0: free memory minus 1 GiB)
  int64_t gpu_kv_reserve_bytes = -1;  // its KV reserve (-1: a quarter of the budget; 0: none)
  std::string cuda_kernels = "exact";  // exact | fast | fast-fp8
  // Tensor parallel (spec §7): this process is rank tp_rank of tp_size; every rank runs the same
  // command and loads only its shard; rank 0 serves the group's rendezvous at tp_leader (host:port)
  // and alone prints and dumps. Gloo on the CPU.
  int tp_size = 1;
  int tp_rank = 0;
  std::string tp_leader;
  double tp_timeout_s = 60;  // joining the group, and every collective
};
absl::Status Generate(const GenerateOptions& opt);

// Writes the checkpoint; with the real 129,280-token vocabulary it also copies the DeepSeek
// tokenizer (tokenizer.json, tokenizer_config.json) from `tokenizer_dir` so text works.
absl::Status CkptRandom(const std::string& preset, int64_t layers, int64_t experts, uint64_t seed,
                        const std::string& out_dir, const std::string& tokenizer_dir);
absl::Status CkptInspect(const std::string& dir, bool all_tensors);

// A client of the public SessionService: one session, the prompt appended (BOS first, with
// prefill progress), `max_tokens` streamed back as text.
struct CompleteOptions {
  std::string target = "127.0.0.1:7080";
  std::string prompt;
  uint32_t max_tokens = 32;
  float temperature = 0.0f, top_p = 1.0f;
  uint64_t seed = 0;
  std::string tls_ca, tls_cert, tls_key;  // TLS to the API (common/tls.h); empty: plaintext
};
absl::Status Complete(const CompleteOptions& opt);
// A conversation on one session: each input line is appended (BOS before the first), then up
// to max_tokens are generated and streamed; ends at "/quit" or end of input.
absl::Status Chat(const CompleteOptions& opt, std::istream& in);
// grpc.health.v1 Check of `service` ("" = the whole server) at opt.target: prints the status and
// returns whether it is SERVING (an exec probe, or an operator's check of any flashmem endpoint).
absl::StatusOr<bool> HealthCheck(const CompleteOptions& opt, const std::string& service, int timeout_s);

struct ClusterOptions {
  std::string run_dir;           // logs, data, cluster.json
  int workers = 1;
  int tp = 1;                    // tensor-parallel ranks per worker (processes each)
  std::string model_dir;         // empty: the embedded `preset` model, written under run_dir
  std::string preset = "tiny";
  std::string tokenizer_dir;
  std::string memtier_bin, coordinator_bin, worker_bin;
  bool lsa = true;               // workers run LSA with an indexer from `indexer init`
  std::string lsa_options;       // passed to the workers' --lsa-options
  uint64_t kv_budget_bytes = 0;  // passed to the workers' --kv-budget-bytes
  std::string device = "cpu";    // the workers' --device; "cuda": worker i on cuda:i
  std::string cuda_kernels = "exact";  // the workers' --cuda-kernels
};
absl::Status ClusterUp(const ClusterOptions& opt);
// The binary `name` next to this executable (installed side by side) or at
// <this executable's dir>/../../<component>/<name> (a build tree, or a copy of one, as the GPU
// bundle); else `built`, its build-time path.
std::string SiblingBinary(const std::string& name, const std::string& component, const std::string& built);
absl::Status ClusterDown(const std::string& run_dir);
absl::StatusOr<std::string> ClusterTarget(const std::string& run_dir);  // the coordinator's address

}  // namespace flashmem::cli
