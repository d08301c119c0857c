// The `flashmem` binary's stable interface, run as a process: generate with teacher forcing,
// --prefill-split and --dump against the golden set; ckpt random / inspect; clear errors.

#include <chrono>
#include <cstdio>
#include <thread>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/model/golden_util.h"
#include "tests/model/test_models.h"
#include "tests/process_util.h"

namespace flashmem::testing {
namespace {

using Result = ShellResult;
Result RunCli(const std::string& args) { return RunShell(std::string(FLASHMEM_BIN) + " " + args); }

std::string GoldenC() { return std::string(FLASHMEM_GOLDEN_DIR) + "/dsv4-tiny-c"; }

std::string WriteIds(const std::string& path, const std::vector<int64_t>& ids, size_t begin, size_t end) {
  std::ofstream out(path);
  for (size_t i = begin; i < end; ++i) out << ids[i] << (i % 20 == 19 ? "\n" : " ");
  return path;
}

// `api_out` (a completion through the public API) holds the prompt followed by the text that
// `flashmem generate` on the engine directly gives for 12 tokens.
void ExpectEngineText(const std::string& model, const std::string& prompt, const std::string& api_out) {
  Result direct = RunCli("generate --model " + model + " --prompt \"" + prompt + "\" --max-new-tokens 12");
  ASSERT_EQ(direct.code, 0) << direct.out;
  const auto t = direct.out.find("text: ");
  ASSERT_NE(t, std::string::npos) << direct.out;
  const std::string text = direct.out.substr(t + 6, direct.out.find('\n', t) - t - 6);
  EXPECT_NE(api_out.find(prompt + text), std::string::npos) << "api: " << api_out << "\ndirect: " << text;
}

TEST(Cli, GenerateTeacherForcedDumpMatchesGolden) {
  auto g = model::SafetensorsFile::Open(GoldenC() + "/golden.safetensors");
  ASSERT_TRUE(g.ok());
  const Array prompt = ReadArray(**g, "prompt_ids"), next = ReadArray(**g, "s1_next_tokens"), logits = ReadArray(**g, "s1_logits");
  const std::string dir = TempDir("cli");
  WriteIds(dir + "/prompt.txt", prompt.i, 0, prompt.i.size());
  WriteIds(dir + "/force.txt", next.i, 0, next.i.size() - 1);
  Result r = RunCli("generate --model " + GoldenC() + " --prompt-file " + dir + "/prompt.txt --force-file " + dir +
                 "/force.txt --dump " + dir + "/out.safetensors --quiet");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("tok/s"), std::string::npos) << r.out;
  auto d = model::SafetensorsFile::Open(dir + "/out.safetensors");
  ASSERT_TRUE(d.ok()) << d.status();
  const Array dl = ReadArray(**d, "logits"), dt = ReadArray(**d, "tokens");
  ASSERT_EQ(dl.shape, logits.shape);
  ASSERT_EQ(dt.shape, std::vector<int64_t>{logits.shape[0]});
  std::vector<double> maxabs;
  for (int64_t r2 = 0; r2 < dl.shape[0]; ++r2) {
    maxabs.push_back(MaxAbsDiff(logits.f.data() + r2 * dl.shape[1], dl.f.data() + r2 * dl.shape[1], dl.shape[1]));
    const float* row = dl.f.data() + r2 * dl.shape[1];
    EXPECT_EQ(dt.i[r2], std::max_element(row, row + dl.shape[1]) - row);
  }
  EXPECT_LE(Median(maxabs), 0.16);  // dsv4-tiny-c logits bounds
  EXPECT_LE(Max(maxabs), 0.25);
  // --prefill-split: prefill 305, feed the rest one at a time (the s2 layout: 307 rows).
  r = RunCli("generate --model " + GoldenC() + " --prompt-file " + dir + "/prompt.txt --prefill-split 305 --max-new-tokens 1 --dump " +
          dir + "/split.safetensors --quiet");
  ASSERT_EQ(r.code, 0) << r.out;
  auto s = model::SafetensorsFile::Open(dir + "/split.safetensors");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(ReadArray(**s, "logits").shape, (std::vector<int64_t>{307 + 1, 1024}));
  std::filesystem::remove_all(dir);
}

TEST(Cli, CkptRandomAndInspect) {
  const std::string dir = TempDir("cli_ckpt");
  Result r = RunCli("ckpt random --preset tiny --layers 2 --seed 5 --out " + dir + "/m");
  ASSERT_EQ(r.code, 0) << r.out;
  r = RunCli("ckpt inspect " + dir + "/m");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("parameters:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("KV per token"), std::string::npos) << r.out;
  r = RunCli("generate --model " + dir + "/m --prompt-ids \"0, 5,6\" --max-new-tokens 3");
  ASSERT_EQ(r.code, 0) << r.out;
  std::filesystem::remove_all(dir);
}

// A real flashmem-worker process serving the public API: `flashmem complete` through it prints
// the same text as `flashmem generate` on the engine directly.
TEST(Cli, WorkerServesThePublicApiWithTheEngineTokens) {
  const std::string dir = TempDir("cli_worker");
  ASSERT_EQ(RunCli("ckpt random --preset tiny --layers 2 --seed 4 --out " + dir + "/m").code, 0);
  Child worker = Spawn(FLASHMEM_WORKER_BIN, {"--model", dir + "/m", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"});
  const std::string target = worker.target;
  ASSERT_FALSE(target.empty()) << worker.output;
  const std::string prompt = "Pages come back before they are needed";
  Result api = RunCli("complete --target " + target + " --prompt \"" + prompt + "\" --max-tokens 12");
  // The worker's /metrics saw one generation of 12 tokens.
  const auto m = worker.output.find("METRICS ");
  ASSERT_NE(m, std::string::npos) << worker.output;
  const int metrics_port = std::stoi(worker.output.substr(m + 8));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // gauges refresh every 200 ms
  const std::string metrics = HttpGet(metrics_port, "/metrics");
  EXPECT_NE(metrics.find("flashmem_worker_time_to_first_token_seconds_count 1"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("flashmem_worker_inter_token_seconds_count 11"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("flashmem_worker_tokens{kind=\"prefill\"}"), std::string::npos) << metrics;
  Stop(worker);
  ASSERT_EQ(api.code, 0) << api.out;
  ExpectEngineText(dir + "/m", prompt, api.out);
  std::filesystem::remove_all(dir);
}

TEST(Cli, LocalClusterUpCompleteDown) {
  const std::string dir = TempDir("cli_cluster");
  ASSERT_EQ(RunCli("ckpt random --preset tiny --layers 2 --seed 4 --out " + dir + "/m").code, 0);
  Result up = RunCli("cluster up --workers 2 --model " + dir + "/m --run-dir " + dir + "/run");
  ASSERT_EQ(up.code, 0) << up.out;
  EXPECT_NE(up.out.find("2 worker(s)"), std::string::npos) << up.out;
  EXPECT_NE(RunCli("cluster up --model " + dir + "/m --run-dir " + dir + "/run").out.find("cluster down` first"), std::string::npos);
  const std::string prompt = "Pages come back before they are needed";
  Result api = RunCli("complete --run-dir " + dir + "/run --prompt \"" + prompt + "\" --max-tokens 12");
  // chat: two turns on one session, then /quit.
  const Result chat = RunShell("printf 'first turn\\nsecond turn\\n/quit\\n' | " + std::string(FLASHMEM_BIN) +
                              " chat --run-dir " + dir + "/run --max-tokens 4");
  const std::string& chat_out = chat.out;
  EXPECT_EQ(chat.code, 0) << chat_out;
  size_t prompts = 0;  // "> " before each line read: two turns, then the one that reads /quit
  for (size_t at = 0; (at = chat_out.find("> ", at)) != std::string::npos; ++at) ++prompts;
  EXPECT_EQ(prompts, 3u) << chat_out;
  EXPECT_EQ(chat_out.find("flashmem:"), std::string::npos) << chat_out;
  Result down = RunCli("cluster down --run-dir " + dir + "/run");
  EXPECT_EQ(down.code, 0) << down.out;
  ASSERT_EQ(api.code, 0) << api.out;
  ExpectEngineText(dir + "/m", prompt, api.out);
  EXPECT_FALSE(std::filesystem::exists(dir + "/run/cluster.json"));
  std::filesystem::remove_all(dir);
}

// `cluster up` starts the binaries next to the flashmem it runs as (a copied or installed tree),
// before the build's; a --*-bin that is not an executable is refused up front, naming it (it used
// to be started and "exit during startup" with an empty log).
TEST(Cli, ClusterUpStartsTheBinariesNextToIt) {
  namespace fs = std::filesystem;
  const std::string dir = TempDir("cli_siblings");
  ASSERT_EQ(RunCli("ckpt random --preset tiny --layers 2 --seed 4 --out " + dir + "/m").code, 0);
  fs::create_directories(dir + "/bin");
  fs::copy_file(FLASHMEM_BIN, dir + "/bin/flashmem");
  {
    std::ofstream script(dir + "/bin/flashmem-coordinator");
    script << "#!/bin/sh\necho \"$@\" > " << dir << "/coordinator-ran\nexit 3\n";
  }
  fs::permissions(dir + "/bin/flashmem-coordinator", fs::perms::owner_all);
  const Result up = RunShell(dir + "/bin/flashmem cluster up --model " + dir + "/m --run-dir " + dir + "/run");
  EXPECT_NE(up.code, 0) << up.out;
  EXPECT_NE(up.out.find("coordinator exited during startup"), std::string::npos) << up.out;
  std::ifstream ran(dir + "/coordinator-ran");
  std::string args;
  std::getline(ran, args);
  EXPECT_NE(args.find("--listen 127.0.0.1:0"), std::string::npos) << "the sibling script was not the one started";
  const Result bad = RunCli("cluster up --model " + dir + "/m --run-dir " + dir + "/run2 --coordinator-bin " + dir + "/nope");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("--coordinator-bin " + dir + "/nope: not an executable"), std::string::npos) << bad.out;
  EXPECT_FALSE(fs::exists(dir + "/run2/cluster.json"));
  fs::remove_all(dir);
}

// `cluster up --tp 2`: each worker is a group of two rank processes; completions through the
// coordinator give the engine's text, and `cluster down` ends every rank.
TEST(Cli, LocalClusterOfTensorParallelGroups) {
  const std::string dir = TempDir("cli_cluster_tp");
  ASSERT_EQ(RunCli("ckpt random --preset tiny --layers 2 --seed 4 --out " + dir + "/m").code, 0);
  Result up = RunCli("cluster up --workers 2 --tp 2 --dense --model " + dir + "/m --run-dir " + dir + "/run");
  ASSERT_EQ(up.code, 0) << up.out;
  EXPECT_NE(up.out.find("2 worker(s) of 2 tensor-parallel ranks"), std::string::npos) << up.out;
  const std::string prompt = "Every rank follows its leader";
  Result api = RunCli("complete --run-dir " + dir + "/run --prompt \"" + prompt + "\" --max-tokens 12");
  std::ifstream cj(dir + "/run/cluster.json");
  const nlohmann::json j = nlohmann::json::parse(cj);
  std::vector<pid_t> ranks;
  for (const auto& w : j["workers"])
    for (const auto& r : w["rank_pids"]) ranks.push_back(r.get<pid_t>());
  EXPECT_EQ(ranks.size(), 2u);
  Result down = RunCli("cluster down --run-dir " + dir + "/run");
  EXPECT_EQ(down.code, 0) << down.out;
  EXPECT_NE(down.out.find("(6 processes)"), std::string::npos) << down.out;
  for (pid_t p : ranks) EXPECT_NE(::kill(p, 0), 0) << "rank process " << p << " outlived cluster down";
  ASSERT_EQ(api.code, 0) << api.out;
  ExpectEngineText(dir + "/m", prompt, api.out);
  std::filesystem::remove_all(dir);
}

TEST(Cli, ClearErrors) {
  Result r = RunCli("generate --model /nonexistent --prompt-ids 1 --max-new-tokens 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("cannot open /nonexistent/config.json"), std::string::npos) << r.out;
  r = RunCli("generate --model " + GoldenC() + " --prompt-ids 1,x --max-new-tokens 1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("--prompt-ids: 'x' is not a non-negative token id"), std::string::npos) << r.out;
  r = RunCli("generate --model " + GoldenC() + " --prompt-ids 1,5000 --max-new-tokens 1");
  EXPECT_NE(r.out.find("prompt[1] = 5000 is outside the vocabulary"), std::string::npos) << r.out;
  r = RunCli("generate --model " + GoldenC() + " --prompt-ids 1,2 --prefill-split 3 --max-new-tokens 1");
  EXPECT_NE(r.out.find("--prefill-split 3 must be in [1, 2]"), std::string::npos) << r.out;
  r = RunCli("ckpt random --preset huge --seed 1 --out /tmp/x");
  EXPECT_NE(r.out.find("--preset 'huge'"), std::string::npos) << r.out;
  // Device flags: an unknown device or kernel mode is named; a CUDA device that is not there
  // (CI has no GPU) is refused before any work, never silently run on the CPU.
  r = RunCli("generate --model " + GoldenC() + " --prompt-ids 1 --max-new-tokens 1 --device gpu0");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("--device: 'gpu0' is neither cpu nor cuda:N"), std::string::npos) << r.out;
  r = RunCli("generate --model " + GoldenC() + " --prompt-ids 1 --max-new-tokens 1 --cuda-kernels turbo");
  EXPECT_NE(r.out.find("--cuda-kernels: 'turbo' is none of exact, fast, fast-fp8"), std::string::npos) << r.out;
  r = RunCli("generate --model " + GoldenC() + " --prompt-ids 1 --max-new-tokens 1 --device cuda:7");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.out.find("--device cuda:7"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace flashmem::testing
