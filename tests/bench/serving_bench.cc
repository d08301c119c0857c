// Serving benchmark (issue 4 item 9; docs/benchmarks.md), real processes on 127.0.0.1:
//  1. tokens/s of N concurrent sessions through the public API (coordinator -> worker) against
//     the same sessions on the engine directly (an in-process Scheduler): the overhead ratio;
//  2. time to first token through the API;
//  3. failover: a session with a long prompt, its worker SIGKILLed; the time until the client's
//     stream delivers the next token (lease wait + adoption + first step) against the time the
//     prompt's prefill took (what re-prefilling would cost). Goal: ratio <= 0.1.
//
//   serving_bench [--sessions 8] [--tokens 32] [--failover-prompt 16384] [--model DIR]
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <future>
#include <thread>

#include "CLI/CLI.hpp"
#include "session.grpc.pb.h"
#include "tests/process_util.h"
#include "tests/test_prompt.h"
#include "worker/model/random_checkpoint.h"
#include "worker/server/scheduler.h"

namespace {

using namespace flashmem;
using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

using testing::Prompt;

struct Client {
  std::unique_ptr<v1::SessionService::Stub> stub;
  std::string id, token;
  explicit Client(const std::string& target)
      : stub(v1::SessionService::NewStub(grpc::CreateChannel(target, grpc::InsecureChannelCredentials()))) {}
  bool Create() {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse cs;
    if (!stub->CreateSession(&ctx, v1::CreateSessionRequest(), &cs).ok()) return false;
    id = cs.session_id();
    token = cs.token();
    return true;
  }
  bool Append(const std::vector<int32_t>& ids) {
    v1::AppendRequest a;
    a.set_session_id(id);
    for (int32_t t : ids) a.mutable_token_ids()->add_ids(t);
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    auto r = stub->Append(&ctx, a);
    v1::AppendProgress p;
    while (r->Read(&p)) {
    }
    return r->Finish().ok();
  }
  // Generates n tokens; `first` receives the time to the first one.
  int Generate(int n, double* first = nullptr, std::function<void(int)> on_token = nullptr) {
    v1::GenerateRequest g;
    g.set_session_id(id);
    g.set_max_tokens(n);
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + token);
    const auto t0 = Clock::now();
    auto r = stub->Generate(&ctx, g);
    v1::GeneratedToken t;
    int got = 0;
    while (r->Read(&t)) {
      if (got == 0 && first) *first = Since(t0);
      if (on_token) on_token(got);
      ++got;
    }
    return r->Finish().ok() ? got : -got - 1;
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"serving benchmark: API overhead, time to first token, failover resume vs re-prefill"};
  int sessions = 8, tokens = 32, prompt_len = 256;
  int64_t failover_prompt = 16384;
  std::string model_dir;
  app.add_option("--sessions", sessions, "concurrent sessions");
  app.add_option("--tokens", tokens, "tokens generated per session");
  app.add_option("--prompt", prompt_len, "prompt tokens per session");
  app.add_option("--failover-prompt", failover_prompt, "prompt tokens of the failover session");
  app.add_option("--model", model_dir, "model (default: the tiny preset, written to a temp dir)");
  CLI11_PARSE(app, argc, argv);
  const std::string dir = (std::filesystem::temp_directory_path() / "flashmem_serving_bench").string();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  if (model_dir.empty()) {
    model_dir = dir + "/m";
    auto a = model::PresetArgs("tiny", 0);
    if (!a.ok() || !model::WriteRandomCheckpoint(*a, 1, model_dir).ok()) return 1;
  }
  auto tf = model::Transformer::Load(model_dir, kernels::CpuBackend());
  if (!tf.ok()) return 1;
  const int64_t vocab = (*tf)->args().vocab_size;

  // 1. Engine directly: N sessions on one scheduler, all generating at once.
  double engine_tps = 0;
  {
    server::Scheduler sch(**tf, {});
    std::vector<uint64_t> ids;
    for (int i = 0; i < sessions; ++i) {
      ids.push_back(*sch.CreateSession());
      (void)sch.Append(ids.back(), Prompt(prompt_len, vocab, 100 + i));
    }
    while (true) {  // prefill done
      int64_t left = 0;
      for (uint64_t id : ids) left += *sch.Pending(id);
      if (left == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::vector<std::promise<void>> done(sessions);
    const auto t0 = Clock::now();
    for (int i = 0; i < sessions; ++i) {
      server::GenerateParams p;
      p.max_tokens = tokens;
      (void)sch.Generate(ids[i], p, [&done, i](int32_t, bool last, const std::string&) {
        if (last) done[i].set_value();
      });
    }
    for (auto& d : done) d.get_future().wait();
    engine_tps = sessions * tokens / Since(t0);
  }

  // 2. Through the API: memtier + coordinator + 2 workers.
  using testing::Child;
  using testing::Spawn;
  using testing::Stop;
  Child memtier = Spawn(FLASHMEM_MEMTIER_BIN, {"--grpc-listen", "127.0.0.1:0", "--data-dir", dir + "/mt", "--ram-bytes", "1073741824"});
  Child coord = Spawn(FLASHMEM_COORDINATOR_BIN, {"--listen", "127.0.0.1:0", "--data-dir", dir + "/coord"});
  const std::vector<std::string> wargs = {"--model", model_dir, "--listen", "127.0.0.1:0", "--memtier", memtier.target,
                                          "--coordinator", coord.target, "--max-context", "1048576"};
  Child w1 = Spawn(FLASHMEM_WORKER_BIN, wargs);
  if (memtier.target.empty() || coord.target.empty() || w1.target.empty()) {
    std::fprintf(stderr, "cluster did not come up\n");
    return 1;
  }
  double api_tps = 0, ttft_sum = 0;
  {
    std::vector<std::unique_ptr<Client>> cs;
    for (int i = 0; i < sessions; ++i) {
      cs.push_back(std::make_unique<Client>(coord.target));
      if (!cs.back()->Create() || !cs.back()->Append(Prompt(prompt_len, vocab, 100 + i))) return 1;
    }
    std::vector<double> first(sessions);
    std::vector<std::thread> th;
    const auto t0 = Clock::now();
    for (int i = 0; i < sessions; ++i) th.emplace_back([&, i] { cs[i]->Generate(tokens, &first[i]); });
    for (auto& t : th) t.join();
    api_tps = sessions * tokens / Since(t0);
    for (double f : first) ttft_sum += f;
  }
  // Time to first token of one session alone (prompt already appended), through the API.
  double ttft_alone = 0;
  {
    Client c(coord.target);
    if (!c.Create() || !c.Append(Prompt(prompt_len, vocab, 7))) return 1;
    c.Generate(1, &ttft_alone);
  }
  std::printf("sessions %d x %d tokens (prompt %d): engine %.1f tok/s, API %.1f tok/s, ratio %.3f; "
              "time to first token %.1f ms alone, %.1f ms mean under load\n",
              sessions, tokens, prompt_len, engine_tps, api_tps, api_tps / engine_tps, ttft_alone * 1e3,
              ttft_sum / sessions * 1e3);
  std::fflush(stdout);

  // 3. Failover of a long session: resume vs re-prefill.
  Child w2 = Spawn(FLASHMEM_WORKER_BIN, wargs);
  Client c(coord.target);
  if (!c.Create()) return 1;
  const auto p0 = Clock::now();
  if (!c.Append(Prompt(failover_prompt, vocab, 9))) return 1;
  const double prefill_s = Since(p0);
  c.Generate(4);
  // Which worker serves it: kill that one mid-stream, after the 2nd token of the next stream.
  v1::SessionInfo info;
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + c.token);
    v1::SessionRef ref;
    ref.set_session_id(c.id);
    c.stub->GetSession(&ctx, ref, &info);
  }
  Child& victim = info.served_by() == w1.target ? w1 : w2;
  Clock::time_point killed;
  double resume_s = 0;
  c.Generate(8, nullptr, [&](int i) {
    if (i == 1) {
      killed = Clock::now();
      Stop(victim, SIGKILL);
    } else if (i == 2) {
      resume_s = Since(killed);
    }
  });
  std::printf("failover: %lld-token prompt prefilled in %.2f s; after SIGKILL of its worker the next token came %.3f s later "
              "(2 s lease included); resume / re-prefill = %.3f\n",
              static_cast<long long>(failover_prompt), prefill_s, resume_s, resume_s / prefill_s);
  Stop(w1);
  Stop(w2);
  Stop(coord);
  Stop(memtier);
  std::filesystem::remove_all(dir);
  return 0;
}
