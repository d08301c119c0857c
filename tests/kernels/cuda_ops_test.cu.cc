// CUDA ops against the CPU reference. Skipped (never faked) where no GPU is present.
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kernels {
namespace {

std::vector<float> Random(size_t n, uint32_t seed, float std) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> v(n);
  for (float& x : v) x = num::RoundBf16(d(g));
  return v;
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(CudaOps, RoundTripsMatchCpuBitForBit) {
  for (float std : {1e-6f, 0.01f, 1.0f, 300.0f}) {
    std::vector<float> x = Random(64 * 512, 1, std), a = x, b = x;
    CpuBackend().Fp8RoundTrip(a.data(), static_cast<int64_t>(a.size()), 64);
    ASSERT_TRUE(cuda::Fp8RoundTrip(b.data(), static_cast<int64_t>(b.size()), 64).ok());
    EXPECT_EQ(a, b) << "fp8, std " << std;
    a = x;
    b = x;
    CpuBackend().Fp4RoundTrip(a.data(), static_cast<int64_t>(a.size()), 32);
    ASSERT_TRUE(cuda::Fp4RoundTrip(b.data(), static_cast<int64_t>(b.size()), 32).ok());
    EXPECT_EQ(a, b) << "fp4, std " << std;
  }
}

TEST_F(CudaOps, RmsNormMatchesCpu) {
  const int64_t n = 33, dim = 4096;
  std::vector<float> x = Random(n * dim, 2, 1.0f), w = Random(dim, 3, 0.1f), a(n * dim), b(n * dim);
  for (float& v : w) v += 1.0f;
  CpuBackend().RmsNorm(x.data(), w.data(), n, dim, 1e-6f, a.data());
  ASSERT_TRUE(cuda::RmsNorm(x.data(), w.data(), n, dim, 1e-6f, b.data()).ok());
  int64_t same = 0;
  for (int64_t i = 0; i < n * dim; ++i) {
    same += a[i] == b[i];
    EXPECT_NEAR(a[i], b[i], 0.008f * (1 + std::fabs(a[i])));  // one bf16 ulp (sum order differs)
  }
  EXPECT_GT(same, n * dim * 9 / 10);
}

}  // namespace
}  // namespace flashmem::kernels
