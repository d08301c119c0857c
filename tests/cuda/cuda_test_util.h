// Helpers shared by the CUDA op tests (cuda_backend_test.cc, cuda_gemm_test.cc, cuda_support_test.cc,
// cuda_index_test.cc, cuda_hold_test.cc, cuda_reserve_test.cc): random bf16-grid inputs and
// weights, NaN-poisoned outputs, relative errors, device copies, pages of FP8 KV records, and the
// CudaOps fixture whose GPU cases skip (never faked) without a CUDA device.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kernels {

inline constexpr double kFp32Tol = 1e-5, kBf16Tol = 4e-3;

inline std::vector<float> Random(size_t n, uint32_t seed, float std) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = num::RoundBf16(d(g));
  return v;
}
inline std::vector<float> Poisoned(size_t n) { return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN()); }

// ||a - ref|| / ||ref||; any NaN in `a` where ref has none (an unwritten output) gives +inf.
inline double RelErr(const std::vector<float>& a, const std::vector<float>& ref) {
  EXPECT_EQ(a.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < ref.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(ref[i])) return std::numeric_limits<double>::infinity();
    if (std::isnan(ref[i])) continue;
    num += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// A backend in fast mode (fp8_tc: fast-fp8).
inline absl::StatusOr<std::unique_ptr<Backend>> FastBackend(bool fp8_tc) {
  cuda::CudaBackendOptions opt;
  opt.exact = false;
  opt.fp8_tensor_cores = fp8_tc;
  return cuda::NewCudaBackend(opt);
}

// The fraction of values bit-identical to the reference.
inline double FracIdentical(const std::vector<float>& a, const std::vector<float>& ref) {
  size_t same = 0;
  for (size_t i = 0; i < a.size() && i < ref.size(); ++i) same += a[i] == ref[i];
  return ref.empty() ? 1.0 : static_cast<double>(same) / ref.size();
}

// One page of `entries` random FP8 records (no NaN codes; scales 2^-9 .. 2^-2, the KV's range).
inline std::vector<uint8_t> RandomRecordPage(int64_t entries, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> page(entries * cuda::kRecordBytes);
  for (int64_t e = 0; e < entries; ++e) {
    uint8_t* data = page.data() + e * cuda::kRecordData;
    uint8_t* scales = page.data() + entries * cuda::kRecordData + e * cuda::kRecordScales;
    for (int b = 0; b < 7; ++b) scales[b] = static_cast<uint8_t>(118 + g() % 8);
    scales[7] = 0;
    for (int d = 0; d < cuda::kRecordNope; ++d) {
      uint8_t c = static_cast<uint8_t>(g());
      if ((c & 0x7f) == 0x7f) c ^= 1;  // not NaN
      data[d] = c;
    }
    for (int r = 0; r < cuda::kRecordRope; ++r) {
      const uint16_t bits = num::FloatToBf16Bits(std::normal_distribution<float>(0, 1)(g));
      data[cuda::kRecordNope + 2 * r] = bits & 0xff;
      data[cuda::kRecordNope + 2 * r + 1] = bits >> 8;
    }
  }
  return page;
}

// Slot j of n: entry (j * 37) % entries of the page, every ninth slot masked.
inline std::vector<kernels::KvSlot> RecordSlots(const std::vector<uint8_t>& page, int64_t entries, int64_t n) {
  std::vector<kernels::KvSlot> slots(n);
  for (int64_t j = 0; j < n; ++j) {
    if (j % 9 == 4) continue;
    const int64_t e = (j * 37) % entries;
    slots[j].record = page.data() + e * cuda::kRecordData;
    slots[j].scales = page.data() + entries * cuda::kRecordData + e * cuda::kRecordScales;
  }
  return slots;
}

class CudaOps : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (cuda::DeviceCount() == 0) return;
    auto be = cuda::NewCudaBackend({});
    ASSERT_TRUE(be.ok()) << be.status();
    gpu_ = be->release();
  }
  static void TearDownTestSuite() {
    delete gpu_;
    gpu_ = nullptr;
  }
  void SetUp() override {
    if (!gpu_) GTEST_SKIP() << "no CUDA device";
  }
  void TearDown() override {
    if (gpu_) EXPECT_TRUE(gpu_->Health().ok()) << gpu_->Health();
  }
  const Backend& cpu() const { return CpuBackend(); }
  static inline Backend* gpu_ = nullptr;
};

// A routed-expert layer: FP4 and FP8 experts, rows routed to several experts, one expert without
// rows; y starts non-zero (the op accumulates).
struct ExpertLayer {
  std::vector<WeightMatrix> w;  // 3 per expert: w1, w3, w2
  std::vector<ExpertWork> work;
};
inline ExpertLayer RandomExperts(int64_t n, int64_t dim, int64_t inter, uint32_t seed, bool mixed = true);

inline WeightMatrix RandomWeight(WeightFormat f, int64_t rows, int64_t cols, uint32_t seed, bool bf16 = true) {
  WeightMatrix w;
  w.format = f;
  w.rows = rows;
  w.cols = cols;
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::uniform_int_distribution<int> e(-9, -3);
  w.values.resize(rows * cols);
  for (float& v : w.values) {
    const float x = d(g);
    switch (f) {
      case WeightFormat::kDense: v = bf16 ? num::RoundBf16(x * 0.05f) : x * 0.05f; break;
      case WeightFormat::kFp8Block128: v = num::RoundE4m3(std::clamp(x * 100.0f, -448.0f, 448.0f)); break;
      case WeightFormat::kFp4Group32: v = num::RoundE2m1(std::clamp(x * 2.0f, -6.0f, 6.0f)); break;
    }
  }
  if (f == WeightFormat::kFp8Block128) w.scales.resize(((rows + 127) / 128) * w.scale_cols());
  if (f == WeightFormat::kFp4Group32) w.scales.resize(rows * w.scale_cols());
  for (float& s : w.scales) s = std::ldexp(1.0f, e(g));
  return w;
}

inline ExpertLayer RandomExperts(int64_t n, int64_t dim, int64_t inter, uint32_t seed, bool mixed) {
  ExpertLayer l;
  const int experts = 4;
  for (int e = 0; e < experts; ++e) {
    // mixed: FP4 and FP8 experts (the per-expert path); else all FP4, as V4's routed experts.
    const WeightFormat f = mixed && e % 2 ? WeightFormat::kFp8Block128 : WeightFormat::kFp4Group32;
    l.w.push_back(RandomWeight(f, inter, dim, seed + 10 * e));
    l.w.push_back(RandomWeight(f, inter, dim, seed + 10 * e + 1));
    l.w.push_back(RandomWeight(f, dim, inter, seed + 10 * e + 2));
  }
  std::mt19937 g(seed);
  for (int e = 0; e < experts; ++e) {
    ExpertWork w;
    w.w1 = &l.w[3 * e];
    w.w3 = &l.w[3 * e + 1];
    w.w2 = &l.w[3 * e + 2];
    if (e != 2)  // expert 2 gets no rows
      for (int64_t r = 0; r < n; ++r)
        if ((r + e) % 3 != 0 || n == 1) {
          w.rows.push_back(static_cast<int32_t>(r));
          w.weights.push_back(0.1f + 0.2f * static_cast<float>(g() % 4));
        }
    if (e == 3) w.weights.clear();  // weight 1 (the shared expert's form)
    l.work.push_back(std::move(w));
  }
  return l;
}

// A device copy of `bytes` host bytes (freed by the caller).
inline void* Upload(const void* p, size_t bytes) {
  void* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, p, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

// A WeightMatrix in the device layout the kernels read (values and scales freed by the caller).
inline cuda::DeviceWeight DeviceCopy(const WeightMatrix& w) {
  const cuda::EncodedWeight enc = cuda::EncodeWeight(w);
  cuda::DeviceWeight dw;
  dw.format = w.format;
  dw.rows = w.rows;
  dw.cols = w.cols;
  dw.values = Upload(enc.values.data(), enc.values.size());
  dw.scales = static_cast<const float*>(Upload(w.scales.data(), w.scales.size() * 4));
  dw.scale_cols = w.scale_cols();
  return dw;
}



// Candidate lists with masked slots, a fully masked block of 64, and none at all.
inline std::vector<const float*> Slots(const std::vector<float>& kv, int64_t rows, int64_t dim, int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<const float*> s(n);
  for (int64_t j = 0; j < n; ++j) {
    const bool masked = (j >= 64 && j < 128) || g() % 7 == 0;
    s[j] = masked ? nullptr : kv.data() + (g() % rows) * dim;
  }
  return s;
}

}  // namespace flashmem::kernels
