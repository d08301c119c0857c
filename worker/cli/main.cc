// flashmem: one binary, subcommands (CLI11 lives here only).
//   flashmem generate --model DIR (--prompt "text" | --prompt-ids "1,2,3" | --prompt-file F) --max-new-tokens N
//            [--force-tokens "a,b" | --force-file F] [--prefill-split K] [--dump OUT.safetensors]
//   flashmem ckpt random --preset tiny|small|flash-shape [--layers L] --seed S --out DIR
//   flashmem ckpt inspect DIR
//   flashmem complete --prompt "text" [--target H:P] | flashmem chat [--target H:P]
//   flashmem cluster up [--workers N] [--tp N] | flashmem cluster down
//   flashmem indexer init --model DIR [--layers a,b,c] --out DIR
//   flashmem indexer golden-eval --golden DIR --out OUT.safetensors
#include <cstdio>
#include <iostream>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "kernels/ops.h"
#include "worker/cli/commands.h"
#include "worker/lsa/golden_eval.h"
#include "worker/lsa/indexer_init.h"

int main(int argc, char** argv) {
  CLI::App app{"flashmem: DeepSeek-V4 decode with Lookahead Sparse Attention"};
  app.require_subcommand(1);

  flashmem::cli::GenerateOptions gen;
  std::string prompt_ids, prompt_file, force_tokens, force_file;
  auto* g = app.add_subcommand("generate", "decode a prompt (greedy or sampled) on the CPU reference or a CUDA device");
  g->add_option("--model", gen.model_dir, "model directory (config.json + safetensors)")->required();
  auto* pi = g->add_option("--prompt-ids", prompt_ids, "prompt token ids, e.g. \"1,2,3\"");
  auto* pf = g->add_option("--prompt-file", prompt_file, "file of prompt ids (whitespace or commas)");
  auto* pt = g->add_option("--prompt", gen.prompt_text, "prompt text (tokenized with the model's tokenizer.json, BOS first)");
  pi->excludes(pf);
  pt->excludes(pi);
  pt->excludes(pf);
  g->add_option("--max-new-tokens", gen.max_new_tokens, "tokens to generate")->check(CLI::NonNegativeNumber);
  auto* ft = g->add_option("--force-tokens", force_tokens, "teacher forcing: feed these ids instead of the argmax");
  auto* ff = g->add_option("--force-file", force_file, "teacher forcing ids from a file");
  ft->excludes(ff);
  g->add_option("--prefill-split", gen.prefill_split, "prefill the first K prompt tokens, feed the rest one at a time");
  g->add_option("--dump", gen.dump_path, "write F32 logits [n_steps, vocab] and I64 tokens [n_steps]");
  g->add_flag("--quiet", gen.quiet, "do not print tokens as they are generated");
  g->add_option("--temperature", gen.temperature, "sampling temperature (0: greedy)");
  g->add_option("--top-p", gen.top_p, "nucleus sampling mass in (0, 1]");
  g->add_option("--seed", gen.seed, "sampling seed (same seed, same tokens)");
  g->add_option("--lsa", gen.lsa_indexer, "run Lookahead Sparse Attention with this memory indexer (fm_indexer.safetensors or its directory)");
  g->add_option("--lsa-options", gen.lsa_options, "LSA options, e.g. \"kmax=8,interval=16,tail_chunks=64\" (docs/lsa.md)");
  g->add_flag("--lsa-apply-next-step", gen.lsa_apply_next_step, "put each set in force at the next step (the release) instead of the next boundary");
  g->add_option("--device", gen.device, "compute backend: cpu (exact reference), cuda:N, or cuda (cuda:<tp-rank>)");
  g->add_option("--cuda-kernels", gen.cuda_kernels, "exact (bit-identical to the CPU reference), fast (within the golden tolerances) or fast-fp8 (FP8 tensor cores; ~1e-4 relative)");
  g->add_option("--gpu-memory-bytes", gen.gpu_memory_bytes, "device memory the CUDA backend may hold (0: free memory minus 1 GiB)");
  g->add_option("--gpu-kv-reserve-bytes", gen.gpu_kv_reserve_bytes, "the part of the device budget for copies of KV pages, so a page crosses PCIe only when new or written (-1: a quarter of the budget; 0: none, records staged every step)");
  g->add_flag("--stats", gen.lsa_stats, "print LSA statistics, measuring Level-2 agreement with the full top-k");
  g->add_option("--tp-size", gen.tp_size, "tensor-parallel ranks (every rank runs this command; Gloo on cpu, NCCL on cuda; --device cuda: rank R on cuda:R)")->check(CLI::Range(1, 64));
  g->add_option("--tp-rank", gen.tp_rank, "this process's rank in [0, --tp-size)")->check(CLI::NonNegativeNumber);
  g->add_option("--tp-leader", gen.tp_leader, "host:port where rank 0 serves the group's rendezvous");
  g->add_option("--tp-timeout-s", gen.tp_timeout_s, "seconds to wait for the group to form and for each collective")
      ->check(CLI::PositiveNumber);

  std::string preset = "tiny", out_dir;
  int64_t layers = 0, experts = 0;
  uint64_t seed = 0;
  std::string inspect_dir;
  bool all_tensors = false;
  auto* ck = app.add_subcommand("ckpt", "checkpoint tools");
  ck->require_subcommand(1);
  auto* rnd = ck->add_subcommand("random", "write a random HF-format checkpoint");
  rnd->add_option("--preset", preset, "tiny | small | flash-shape")->required();
  rnd->add_option("--layers", layers, "number of layers (default: the preset's)");
  rnd->add_option("--experts", experts, "routed experts (default: the preset's)");
  rnd->add_option("--seed", seed, "random seed")->required();
  rnd->add_option("--out", out_dir, "output directory")->required();
  std::string tokenizer_dir = FLASHMEM_TOKENIZER_DIR;
  rnd->add_option("--tokenizer-dir", tokenizer_dir, "tokenizer.json to ship with the model (empty: none)");
  auto* ins = ck->add_subcommand("inspect", "tensors, dtypes, bytes, parameters, KV bytes per token");
  ins->add_option("dir", inspect_dir, "checkpoint directory")->required();
  ins->add_flag("--tensors", all_tensors, "list every tensor");

  flashmem::cli::CompleteOptions comp;
  auto* cmp = app.add_subcommand("complete", "complete a prompt through a worker's public SessionService");
  cmp->add_option("--target", comp.target, "flashmem-worker address host:port");
  cmp->add_option("--prompt", comp.prompt, "prompt text")->required();
  cmp->add_option("--max-tokens", comp.max_tokens, "tokens to generate");
  cmp->add_option("--temperature", comp.temperature, "sampling temperature (0: greedy)");
  cmp->add_option("--top-p", comp.top_p, "nucleus sampling mass");
  cmp->add_option("--seed", comp.seed, "sampling seed");

  flashmem::cli::CompleteOptions chat;
  auto* ch = app.add_subcommand("chat", "a conversation through the public SessionService (one session, the context grows)");
  ch->add_option("--target", chat.target, "coordinator or worker address host:port (default: the local cluster)");
  ch->add_option("--max-tokens", chat.max_tokens, "tokens per reply");
  ch->add_option("--temperature", chat.temperature, "sampling temperature (0: greedy)");
  ch->add_option("--top-p", chat.top_p, "nucleus sampling mass");
  ch->add_option("--seed", chat.seed, "sampling seed");
  flashmem::cli::CompleteOptions health;
  std::string health_service;
  int health_timeout_s = 5;
  auto* hc = app.add_subcommand("health", "grpc.health.v1 check of any flashmem endpoint (exit 0: SERVING, 1: not serving, 2: error)");
  hc->add_option("--target", health.target, "host:port (a --listen, --grpc-listen or --health-listen address)")->required();
  hc->add_option("--service", health_service, "service name to check (default: the whole server)");
  hc->add_option("--timeout-s", health_timeout_s, "seconds to wait for the answer");
  for (auto [cmd, o] : {std::pair{cmp, &comp}, std::pair{ch, &chat}, std::pair{hc, &health}}) {
    cmd->add_option("--tls-ca", o->tls_ca, "PEM CA that signed the server's certificate (TLS)");
    cmd->add_option("--tls-cert", o->tls_cert, "PEM client certificate (mTLS)");
    cmd->add_option("--tls-key", o->tls_key, "PEM client key (mTLS)");
  }

  flashmem::cli::ClusterOptions cluster;
  cluster.run_dir = FLASHMEM_DEFAULT_RUN_DIR;
  cluster.tokenizer_dir = FLASHMEM_TOKENIZER_DIR;
  cluster.memtier_bin = flashmem::cli::SiblingBinary("flashmem-memtier", "memtier", FLASHMEM_MEMTIER_BIN);
  cluster.coordinator_bin = flashmem::cli::SiblingBinary("flashmem-coordinator", "coordinator", FLASHMEM_COORDINATOR_BIN);
  cluster.worker_bin = flashmem::cli::SiblingBinary("flashmem-worker", "worker", FLASHMEM_WORKER_BIN);
  auto* cl = app.add_subcommand("cluster", "a local cluster on 127.0.0.1");
  cl->require_subcommand(1);
  auto* up = cl->add_subcommand("up", "start memtier, coordinator and workers");
  up->add_option("--workers", cluster.workers, "number of workers");
  up->add_option("--tp", cluster.tp, "tensor-parallel ranks per worker (one process each; with --device cuda, rank r of worker i on cuda:(i*tp+r))");
  up->add_option("--model", cluster.model_dir, "model directory (default: the embedded tiny model)");
  up->add_option("--preset", cluster.preset, "preset of the embedded model");
  up->add_option("--run-dir", cluster.run_dir, "logs, data and cluster.json");
  up->add_option("--memtier-bin", cluster.memtier_bin, "flashmem-memtier to start (default: next to flashmem, else the build's)");
  up->add_option("--coordinator-bin", cluster.coordinator_bin, "flashmem-coordinator to start (default: as --memtier-bin)");
  up->add_option("--worker-bin", cluster.worker_bin, "flashmem-worker to start (default: as --memtier-bin)");
  bool dense = false;
  up->add_flag("--dense", dense, "workers run dense attention (default: LSA with an indexer built from the model)");
  up->add_option("--lsa-options", cluster.lsa_options, "the workers' LSA options (docs/lsa.md)");
  up->add_option("--kv-budget-bytes", cluster.kv_budget_bytes, "the workers' KV budget (0: no limit)");
  up->add_option("--cuda-kernels", cluster.cuda_kernels, "the workers' CUDA kernels: exact, fast or fast-fp8");
  up->add_option("--device", cluster.device, "the workers' backend: cpu, cuda:N (all workers), or cuda (one GPU per rank)");
  auto* down = cl->add_subcommand("down", "stop the local cluster");
  down->add_option("--run-dir", cluster.run_dir, "the cluster's run directory");
  cmp->add_option("--run-dir", cluster.run_dir, "use the local cluster of this run directory when --target is not given");
  ch->add_option("--run-dir", cluster.run_dir, "use the local cluster of this run directory when --target is not given");
  bool target_given = false;

  std::string idx_model, idx_layers, idx_out, golden_dir, golden_out;
  auto* ix = app.add_subcommand("indexer", "LSA memory-indexer tools");
  ix->require_subcommand(1);
  auto* ixi = ix->add_subcommand("init", "build a memory indexer from a model's native lightning-indexer weights");
  ixi->add_option("--model", idx_model, "model directory")->required();
  ixi->add_option("--layers", idx_layers, "target CSA layer ids, e.g. 10,12,20 (default: the release's, scaled to the model)");
  ixi->add_option("--out", idx_out, "output directory (fm_indexer.safetensors)")->required();
  auto* ixg = ix->add_subcommand("golden-eval", "run flashmem's indexer on a golden set; write arrays named as its expected.safetensors");
  ixg->add_option("--golden", golden_dir, "golden directory (indexer_weights, inputs, manifest.json)")->required();
  ixg->add_option("--out", golden_out, "output .safetensors")->required();

  CLI11_PARSE(app, argc, argv);
  target_given = cmp->count("--target") > 0 || ch->count("--target") > 0;

  absl::Status st;
  if (g->parsed()) {
    if (gen.prompt_text.empty()) {
      absl::StatusOr<std::vector<int32_t>> ids = !prompt_file.empty()
          ? flashmem::cli::ReadTokenFile(prompt_file) : flashmem::cli::ParseTokenIds(prompt_ids, "--prompt-ids");
      if (ids.ok()) gen.prompt = *ids; else st = ids.status();
    }
    if (st.ok() && (!force_tokens.empty() || !force_file.empty())) {
      auto f = !force_file.empty() ? flashmem::cli::ReadTokenFile(force_file) : flashmem::cli::ParseTokenIds(force_tokens, "--force-tokens");
      if (f.ok()) gen.force = *f; else st = f.status();
    }
    if (st.ok()) st = flashmem::cli::Generate(gen);
  } else if (rnd->parsed()) {
    st = flashmem::cli::CkptRandom(preset, layers, experts, seed, out_dir, tokenizer_dir);
  } else if (cmp->parsed()) {
    if (!target_given) {
      auto t = flashmem::cli::ClusterTarget(cluster.run_dir);
      if (t.ok()) comp.target = *t;
    }
    st = flashmem::cli::Complete(comp);
  } else if (ch->parsed()) {
    if (!target_given) {
      auto t = flashmem::cli::ClusterTarget(cluster.run_dir);
      if (t.ok()) chat.target = *t;
    }
    st = flashmem::cli::Chat(chat, std::cin);
  } else if (hc->parsed()) {
    auto serving = flashmem::cli::HealthCheck(health, health_service, health_timeout_s);
    if (!serving.ok()) {
      std::fprintf(stderr, "flashmem: %s\n", std::string(serving.status().message()).c_str());
      return 2;
    }
    return *serving ? 0 : 1;
  } else if (up->parsed()) {
    cluster.lsa = !dense;
    st = flashmem::cli::ClusterUp(cluster);
  } else if (down->parsed()) {
    st = flashmem::cli::ClusterDown(cluster.run_dir);
  } else if (ixi->parsed()) {
    std::vector<int> ids;
    for (absl::string_view t : absl::StrSplit(idx_layers, ',', absl::SkipWhitespace())) {
      int v;
      if (!absl::SimpleAtoi(t, &v)) { st = absl::InvalidArgumentError("--layers must be CSA ids separated by commas"); break; }
      ids.push_back(v);
    }
    if (st.ok()) st = flashmem::lsa::InitIndexerFromModel(idx_model, ids, idx_out);
    if (st.ok()) std::printf("wrote %s/fm_indexer.safetensors\n", idx_out.c_str());
  } else if (ixg->parsed()) {
    st = flashmem::lsa::RunGoldenEval(golden_dir, golden_out, flashmem::kernels::CpuBackend());
    if (st.ok()) std::printf("wrote %s\n", golden_out.c_str());
  } else if (ins->parsed()) {
    st = flashmem::cli::CkptInspect(inspect_dir, all_tensors);
  }
  if (!st.ok()) {
    std::fprintf(stderr, "flashmem: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}
