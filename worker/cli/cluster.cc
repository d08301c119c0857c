// `flashmem cluster up|down`: a local cluster on 127.0.0.1 — memtier, coordinator and N workers,
// free ports, logs and data under one run directory, addresses in <run>/cluster.json.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/net.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "worker/cli/commands.h"
#include "worker/lsa/indexer_init.h"
#include "worker/model/random_checkpoint.h"

namespace flashmem::cli {
namespace {

struct Started {
  pid_t pid;
  std::string target;
};

// Starts `bin args...` in its own session (it outlives this command), stdout to <run>/<name>.out,
// stderr to <run>/<name>.log.
absl::StatusOr<pid_t> Launch(const std::string& run, const std::string& name, const std::string& bin,
                             const std::vector<std::string>& args) {
  const std::string out = run + "/" + name + ".out", log = run + "/" + name + ".log";
  std::filesystem::remove(out);  // a LISTENING line of an earlier run must not be read as this one's
  std::fflush(stdout);  // a child must not inherit (and repeat) buffered output
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setsid();
    if (!std::freopen(out.c_str(), "w", stdout) || !std::freopen(log.c_str(), "w", stderr)) ::_exit(126);
    std::vector<char*> argv = {const_cast<char*>(bin.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  if (pid < 0) return absl::InternalError("fork failed");
  return pid;
}

// Waits for a launched process's `marker` line ("LISTENING host:port"; a follower rank's
// "FOLLOWING ..."), drawing its model-load progress; returns what follows the marker.
absl::StatusOr<Started> WaitReady(const std::string& run, const std::string& name, pid_t pid,
                                  const std::string& marker = "LISTENING ") {
  const std::string out = run + "/" + name + ".out", log = run + "/" + name + ".log";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  long long shown = -1;  // progress already drawn
  while (std::chrono::steady_clock::now() < deadline) {
    auto text = ReadFileToString(out);
    if (text.ok()) {
      const auto at = text->find(marker), nl = text->find('\n', at);
      if (at != std::string::npos && nl != std::string::npos) {
        if (shown >= 0) std::fprintf(stderr, "\n");
        return Started{pid, text->substr(at + marker.size(), nl - at - marker.size())};
      }
      // Model load progress ("LOADING done total" lines of a worker) as a bar.
      const auto ld = text->rfind("LOADING ");
      long long done = 0, total = 0;
      if (ld != std::string::npos && std::sscanf(text->c_str() + ld, "LOADING %lld %lld", &done, &total) == 2 && total > 0 &&
          done != shown) {
        shown = done;
        const int width = 30, filled = static_cast<int>(width * done / total);
        std::fprintf(stderr, "\r  %s loading the model [%s%s] %lld/%lld layers", name.c_str(), std::string(filled, '#').c_str(),
                     std::string(width - filled, ' ').c_str(), done, total);
      }
    }
    if (::waitpid(pid, nullptr, WNOHANG) == pid)
      return absl::UnavailableError(absl::StrCat(name, " exited during startup; see ", log));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(pid, SIGKILL);
  return absl::DeadlineExceededError(absl::StrCat(name, " did not start within 120 s; see ", log));
}

absl::StatusOr<Started> StartDaemon(const std::string& run, const std::string& name, const std::string& bin,
                                    const std::vector<std::string>& args) {
  FM_ASSIGN_OR_RETURN(pid_t pid, Launch(run, name, bin, args));
  return WaitReady(run, name, pid);
}

}  // namespace

std::string SiblingBinary(const std::string& name, const std::string& component, const std::string& built) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path dir = exe.parent_path();
    // Installed side by side, or a build tree (or a copy of one) with <component>/<name>.
    for (const fs::path& p : {dir / name, dir.parent_path().parent_path() / component / name})
      if (::access(p.c_str(), X_OK) == 0) return p.string();
  }
  return built;
}

absl::Status ClusterUp(const ClusterOptions& o) {
  namespace fs = std::filesystem;
  for (const auto& [flag, bin] : {std::pair{"--memtier-bin", &o.memtier_bin}, std::pair{"--coordinator-bin", &o.coordinator_bin},
                                  std::pair{"--worker-bin", &o.worker_bin}})
    if (::access(bin->c_str(), X_OK) != 0)
      return absl::FailedPreconditionError(absl::StrCat(flag, " ", *bin, ": not an executable (", std::strerror(errno), ")"));
  if (o.workers < 1 || o.workers > 16) return absl::InvalidArgumentError(absl::StrCat("--workers ", o.workers, " must be in [1, 16]"));
  if (o.tp < 1 || o.tp > 8) return absl::InvalidArgumentError(absl::StrCat("--tp ", o.tp, " must be in [1, 8]"));
  if (fs::exists(o.run_dir + "/cluster.json"))
    return absl::FailedPreconditionError(absl::StrCat(o.run_dir, " holds a running cluster: `flashmem cluster down` first"));
  fs::create_directories(o.run_dir);
  std::string model = o.model_dir;
  if (model.empty()) {
    model = o.run_dir + "/model";
    if (!fs::exists(model + "/model.safetensors")) {
      std::fprintf(stderr, "writing the embedded %s model to %s\n", o.preset.c_str(), model.c_str());
      FM_RETURN_IF_ERROR(CkptRandom(o.preset, 0, 0, 1, model, o.tokenizer_dir));
    }
  }
  nlohmann::json j;
  j["model"] = model;
  // LSA on by default: a memory indexer initialised from the model's own lightning indexer.
  std::vector<std::string> lsa_args;
  if (o.lsa) {
    const std::string idx = o.run_dir + "/indexer";
    if (!fs::exists(idx + "/fm_indexer.safetensors")) {
      absl::Status st = lsa::InitIndexerFromModel(model, {}, idx);
      if (!st.ok()) {  // a model the memory indexer cannot serve runs dense
        std::fprintf(stderr, "LSA off: %s\n", std::string(st.message()).c_str());
      }
    }
    if (fs::exists(idx + "/fm_indexer.safetensors")) {
      lsa_args = {"--lsa-indexer", idx};
      if (!o.lsa_options.empty()) lsa_args.insert(lsa_args.end(), {"--lsa-options", o.lsa_options});
      if (o.kv_budget_bytes > 0) lsa_args.insert(lsa_args.end(), {"--kv-budget-bytes", std::to_string(o.kv_budget_bytes)});
      j["indexer"] = idx;
    }
  }
  FM_ASSIGN_OR_RETURN(Started coord, StartDaemon(o.run_dir, "coordinator", o.coordinator_bin,
      {"--listen", "127.0.0.1:0", "--data-dir", o.run_dir + "/coordinator-data"}));
  j["coordinator"] = {{"pid", coord.pid}, {"address", coord.target}};
  FM_ASSIGN_OR_RETURN(Started memtier, StartDaemon(o.run_dir, "memtier", o.memtier_bin,
      {"--grpc-listen", "127.0.0.1:0", "--data-dir", o.run_dir + "/memtier-data", "--ram-bytes", "1073741824",
       "--shm-socket", o.run_dir + "/memtier.sock", "--coordinator", coord.target}));
  j["memtier"] = {{"pid", memtier.pid}, {"address", memtier.target}};

  // Worker i is a group of o.tp ranks (one process each; rank 0 serves, the others follow it);
  // with --device cuda, rank r of group i computes on cuda:(i * tp + r).
  for (int i = 0; i < o.workers; ++i) {
    std::fprintf(stderr, "starting worker %d/%d%s (loading the model)...\n", i + 1, o.workers,
                 o.tp > 1 ? absl::StrCat(": ", o.tp, " tensor-parallel ranks").c_str() : "");
    const std::string leader = absl::StrCat("127.0.0.1:", FreeLoopbackPort());
    std::vector<pid_t> pids;
    for (int r = 0; r < o.tp; ++r) {
      std::vector<std::string> wargs = {"--model", model, "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                        "--memtier-shm-socket", o.run_dir + "/memtier.sock", "--coordinator", coord.target};
      wargs.insert(wargs.end(), lsa_args.begin(), lsa_args.end());
      wargs.insert(wargs.end(), {"--device", o.device == "cuda" ? absl::StrCat("cuda:", i * o.tp + r) : o.device,
                                 "--cuda-kernels", o.cuda_kernels});
      if (o.tp > 1)
        wargs.insert(wargs.end(), {"--tp-size", std::to_string(o.tp), "--tp-rank", std::to_string(r), "--tp-leader",
                                   leader, "--group", absl::StrCat("worker", i)});
      FM_ASSIGN_OR_RETURN(pid_t pid, Launch(o.run_dir, r == 0 ? absl::StrCat("worker", i) : absl::StrCat("worker", i, "-rank", r),
                                            o.worker_bin, wargs));
      pids.push_back(pid);
    }
    // The leader listens once every rank follows it.
    FM_ASSIGN_OR_RETURN(Started w, WaitReady(o.run_dir, absl::StrCat("worker", i), pids[0]));
    nlohmann::json ranks = nlohmann::json::array();
    for (size_t r = 1; r < pids.size(); ++r) ranks.push_back(pids[r]);
    j["workers"].push_back({{"pid", w.pid}, {"address", w.target}, {"rank_pids", ranks}});
  }
  std::ofstream(o.run_dir + "/cluster.json") << j.dump(2) << "\n";
  std::printf("cluster up: coordinator %s (public API), memtier %s, %d worker(s)%s%s; state in %s\n",
              coord.target.c_str(), memtier.target.c_str(), o.workers,
              o.tp > 1 ? absl::StrCat(" of ", o.tp, " tensor-parallel ranks").c_str() : "",
              lsa_args.empty() ? ", dense attention" : ", LSA with the model's own indexer", o.run_dir.c_str());
  return absl::OkStatus();
}

absl::Status ClusterDown(const std::string& run_dir) {
  FM_ASSIGN_OR_RETURN(std::string text, ReadFileToString(run_dir + "/cluster.json"));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(run_dir, "/cluster.json: ", e.what()));
  }
  std::vector<pid_t> pids;
  for (const auto& w : j.value("workers", nlohmann::json::array())) {
    pids.push_back(w["pid"].get<pid_t>());
    for (const auto& r : w.value("rank_pids", nlohmann::json::array())) pids.push_back(r.get<pid_t>());
  }
  pids.push_back(j["coordinator"]["pid"].get<pid_t>());
  pids.push_back(j["memtier"]["pid"].get<pid_t>());
  for (pid_t p : pids) ::kill(p, SIGTERM);
  for (pid_t p : pids)
    for (int i = 0; i < 100 && ::kill(p, 0) == 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  for (pid_t p : pids) ::kill(p, SIGKILL);
  std::filesystem::remove(run_dir + "/cluster.json");
  std::printf("cluster down (%zu processes)\n", pids.size());
  return absl::OkStatus();
}

absl::StatusOr<std::string> ClusterTarget(const std::string& run_dir) {
  FM_ASSIGN_OR_RETURN(std::string text, ReadFileToString(run_dir + "/cluster.json"));
  try {
    return nlohmann::json::parse(text)["coordinator"]["address"].get<std::string>();
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat(run_dir, "/cluster.json: ", e.what()));
  }
}

}  // namespace flashmem::cli
