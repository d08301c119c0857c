#include "kernels/cuda/op_phases.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace flashmem::kernels::cuda {

std::unique_ptr<OpPhases> OpPhases::FromEnv() {
  const char* v = std::getenv("FLASHMEM_CUDA_PHASES");
  if (v == nullptr || std::strcmp(v, "0") == 0) return nullptr;
  std::unique_ptr<OpPhases> p(new OpPhases());
  for (cudaEvent_t& e : p->events_)
    if (cudaEventCreate(&e) != cudaSuccess) return nullptr;
  return p;
}

std::string OpPhases::OpNameFromMangled(const std::string& m) {
  const std::string cls = "15CudaBackendImpl";
  const size_t at = m.find(cls);
  if (at == std::string::npos) return "?";
  size_t i = at + cls.size(), len = 0;
  while (i < m.size() && std::isdigit(static_cast<unsigned char>(m[i])) && len < 1000) len = len * 10 + (m[i++] - '0');
  return len > 0 && i + len <= m.size() ? m.substr(i, len) : "?";
}

void OpPhases::Add(const std::string& op, const Marks& m) {
  auto us = [](Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double, std::micro>(b - a).count();
  };
  auto ev = [&](int a, int b) {
    float ms = 0.0f;
    return cudaEventElapsedTime(&ms, events_[a], events_[b]) == cudaSuccess ? ms * 1000.0 : 0.0;
  };
  samples_[op].push_back({us(m.begin, m.staged), us(m.staged, m.filled), us(m.filled, m.enqueued),
                          us(m.enqueued, m.waited), us(m.waited, m.end), ev(0, 1), ev(1, 2), ev(2, 3),
                          m.up_bytes / 1e6, m.down_bytes / 1e6});
}

OpPhases::~OpPhases() {
  std::fprintf(stderr,
               "\nCUDA op phases (FLASHMEM_CUDA_PHASES; medians per call, us): host staging in / fill / enqueue / "
               "wait for the device / host staging out; device: uploads / kernels / downloads; MB up / down\n"
               "%-28s %7s %9s %9s %9s %9s %9s | %9s %9s %9s | %7s %7s\n",
               "op", "calls", "stage in", "fill", "enqueue", "wait", "stage out", "up", "kernels", "down", "MB up",
               "MB down");
  for (auto& [op, rows] : samples_) {
    double median[kColumns];
    for (int c = 0; c < kColumns; ++c) {
      std::vector<double> v;
      v.reserve(rows.size());
      for (const auto& r : rows) v.push_back(r[c]);
      std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
      median[c] = v[v.size() / 2];
    }
    std::fprintf(stderr, "%-28s %7zu %9.1f %9.1f %9.1f %9.1f %9.1f | %9.1f %9.1f %9.1f | %7.2f %7.2f\n", op.c_str(),
                 rows.size(), median[0], median[1], median[2], median[3], median[4], median[5], median[6], median[7],
                 median[8], median[9]);
  }
  for (cudaEvent_t e : events_)
    if (e) (void)cudaEventDestroy(e);
}

}  // namespace flashmem::kernels::cuda
