// Helpers for the golden-vector tests: reading reference arrays and the comparison metrics of
// the golden manifests (wc_metrics definitions: row max-abs, row rel-RMS, centred cosine...).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "worker/model/safetensors.h"

namespace flashmem::testing {

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> f;    // float-typed arrays (F32, BF16)
  std::vector<int64_t> i;  // integer arrays (I32, I64)
  int64_t row_size() const {
    int64_t n = 1;
    for (size_t k = 1; k < shape.size(); ++k) n *= shape[k];
    return n;
  }
};

inline Array ReadArray(const model::SafetensorsFile& f, const std::string& name) {
  Array a;
  auto it = f.tensors().find(name);
  if (it == f.tensors().end()) return a;
  const model::TensorView& v = it->second;
  a.shape = v.shape;
  const uint8_t* p = v.bytes.data();
  for (int64_t k = 0; k < v.numel; ++k) {
    switch (v.dtype) {
      case model::DType::kF32: { float x; std::memcpy(&x, p + 4 * k, 4); a.f.push_back(x); break; }
      case model::DType::kBF16: { uint16_t b; std::memcpy(&b, p + 2 * k, 2); a.f.push_back(num::Bf16BitsToFloat(b)); break; }
      case model::DType::kI32: { int32_t x; std::memcpy(&x, p + 4 * k, 4); a.i.push_back(x); break; }
      case model::DType::kI64: { int64_t x; std::memcpy(&x, p + 8 * k, 8); a.i.push_back(x); break; }
      default: break;
    }
  }
  return a;
}

inline double MaxAbsDiff(const float* g, const float* y, int64_t n) {
  double m = 0;
  for (int64_t k = 0; k < n; ++k) m = std::max(m, std::fabs(static_cast<double>(g[k]) - y[k]));
  return m;
}
inline double RelRms(const float* g, const float* y, int64_t n) {
  double num = 0, den = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double d = static_cast<double>(g[k]) - y[k];
    num += d * d;
    den += static_cast<double>(g[k]) * g[k];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
inline double CentredCosine(const float* g, const float* y, int64_t n) {
  double mg = 0, my = 0;
  for (int64_t k = 0; k < n; ++k) { mg += g[k]; my += y[k]; }
  mg /= n; my /= n;
  double dot = 0, ng = 0, ny = 0;
  for (int64_t k = 0; k < n; ++k) {
    dot += (g[k] - mg) * (y[k] - my);
    ng += (g[k] - mg) * (g[k] - mg);
    ny += (y[k] - my) * (y[k] - my);
  }
  return dot / std::sqrt(ng * ny);
}
inline double FracExact(const float* g, const float* y, int64_t n) {
  int64_t same = 0;
  for (int64_t k = 0; k < n; ++k) same += g[k] == y[k];
  return static_cast<double>(same) / n;
}
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
inline double Quantile(std::vector<double> v, double q) {  // linear interpolation (numpy default)
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}
inline double Max(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }
inline double Min(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

struct LogitStats {
  double maxabs_median, maxabs_p90, maxabs_max, relrms_max, cosine_min, cosine_median, argmax_agree;
  int argmax_violations;  // disagreements where the golden top-1/top-2 margin exceeds 0.5
};

// Per-row logit comparison against golden logits g [rows, vocab] (the manifests' logits bounds).
inline LogitStats CompareLogits(const Array& g, const std::vector<std::vector<float>>& y) {
  const int64_t rows = g.shape[0], v = g.shape[1];
  EXPECT_EQ(static_cast<int64_t>(y.size()), rows);
  std::vector<double> maxabs, relrms, cosine;
  int agree = 0, violations = 0;
  for (int64_t r = 0; r < rows && r < static_cast<int64_t>(y.size()); ++r) {
    const float* gr = g.f.data() + r * v;
    maxabs.push_back(MaxAbsDiff(gr, y[r].data(), v));
    relrms.push_back(RelRms(gr, y[r].data(), v));
    cosine.push_back(CentredCosine(gr, y[r].data(), v));
    const int64_t ag = std::max_element(gr, gr + v) - gr;
    const int64_t ay = std::max_element(y[r].begin(), y[r].end()) - y[r].begin();
    std::vector<float> sorted(gr, gr + v);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    agree += ag == ay;
    if (ag != ay && sorted[0] - sorted[1] > 0.5f) ++violations;
  }
  return {Median(maxabs), Quantile(maxabs, 0.9), Max(maxabs), Max(relrms), Min(cosine), Median(cosine),
          static_cast<double>(agree) / rows, violations};
}

}  // namespace flashmem::testing
