// Real processes for tests: spawn a flashmem binary and wait for its "LISTENING host:port" line.
#pragma once

#include <arpa/inet.h>
#include <poll.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace flashmem::testing {

struct Child {
  pid_t pid = -1;
  std::string target;  // host:port from its LISTENING line; empty if it did not come up
  std::string output;
};

inline Child Spawn(const std::string& bin, const std::vector<std::string>& args, std::chrono::seconds wait = std::chrono::seconds(60)) {
  int fds[2];
  if (::pipe(fds) != 0) return {};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    std::vector<char*> argv = {const_cast<char*>(bin.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  ::close(fds[1]);
  Child c;
  c.pid = pid;
  char buf[256];
  const auto deadline = std::chrono::steady_clock::now() + wait;
  while (std::chrono::steady_clock::now() < deadline && c.target.empty()) {
    pollfd p{fds[0], POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    c.output.append(buf, n);
    const auto at = c.output.find("LISTENING "), nl = c.output.find('\n', at);
    if (at != std::string::npos && nl != std::string::npos) c.target = c.output.substr(at + 10, nl - at - 10);
  }
  ::close(fds[0]);
  return c;
}

inline void Stop(Child& c, int sig = SIGTERM) {
  if (c.pid <= 0) return;
  ::kill(c.pid, sig);
  ::waitpid(c.pid, nullptr, 0);
  c.pid = -1;
}

// Starts a process without waiting for it (stdout and stderr to `log`): for processes that come
// up only once others have started (the follower ranks of a tensor-parallel group).
inline Child SpawnLogged(const std::string& bin, const std::vector<std::string>& args, const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (!std::freopen(log.c_str(), "w", stdout) || ::dup2(STDOUT_FILENO, STDERR_FILENO) < 0) ::_exit(126);
    std::vector<char*> argv = {const_cast<char*>(bin.c_str())};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(bin.c_str(), argv.data());
    ::_exit(127);
  }
  Child c;
  c.pid = pid;
  return c;
}

// The exit status of a child that has ended or ends within `wait` (-1: still running; it is then
// left running).
inline int ExitCode(Child& c, std::chrono::milliseconds wait) {
  const auto deadline = std::chrono::steady_clock::now() + wait;
  for (;;) {
    int status = 0;
    if (c.pid > 0 && ::waitpid(c.pid, &status, WNOHANG) == c.pid) {
      c.pid = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (std::chrono::steady_clock::now() >= deadline) return -1;
    ::usleep(20000);
  }
}

// A shell command's exit code and its stdout and stderr together.
struct ShellResult {
  int code = 0;
  std::string out;
};
inline ShellResult RunShell(const std::string& cmd) {
  ShellResult r;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return {-1, "popen failed"};
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int st = ::pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// Plain HTTP GET on 127.0.0.1 (Prometheus /metrics).
inline std::string HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
    const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (::write(fd, req.data(), req.size()) > 0) {
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof buf)) > 0) out.append(buf, n);
    }
  }
  ::close(fd);
  return out;
}

}  // namespace flashmem::testing
