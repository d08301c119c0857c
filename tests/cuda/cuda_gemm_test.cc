// The fast GEMMs and the MoE on the GPU against the CPU reference (fast Linear, cuBLASLt FP8, the
// decode GEMV and its FP4 forms, resident weights' identity, bit-identity of the exact kernels,
// the routed experts). GPU cases skip (never faked) without a CUDA device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/activation_pool.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/fp4_layout.h"
#include "kernels/cuda/host_gather.h"
#include "kernels/cuda/op_phases.h"
#include "kernels/device.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "worker/model/scratch.h"

namespace flashmem::kernels {
namespace {

// The backend's fast modes: quantized Linear through the decode GEMV (< 16 tokens, FP4) and, from
// 16 tokens, FP8 weights on the bf16 tensor cores (dequantized; fp32 sums: fp32-rounding close)
// or, in fast-fp8, cuBLASLt's block-scaled FP8 GEMM (K blocks padded in the scale layout; ~1e-4);
// dense bf16 weights through cuBLASLt's bf16 GEMM from 4 tokens, or of >= 4M elements at any count
// (2048 x 2048; tokens padded to 4; below 4 tokens such a weight runs the dense GEMV instead): a
// router's 16 x 4096 at 64 tokens, 7 rows (cuBLASLt may refuse that layout: the exact kernel then).
TEST_F(CudaOps, FastModeLinearWithinBf16Rounding) {
  for (bool fp8_tc : {false, true}) {
  auto fast = FastBackend(fp8_tc);
  ASSERT_TRUE(fast.ok()) << fast.status();
  EXPECT_STREQ((*fast)->name(), fp8_tc ? "cuda-fast-fp8" : "cuda-fast");
  // Unrounded outputs: fp32 sums in another order, or (FP8 tensor cores, >= 16 tokens) ~14-bit block sums.
  const double fp32_tol = fp8_tc ? 3e-4 : kFp32Tol;
  uint32_t seed = 90;
  struct Shape { int64_t rows, cols, n; };
  for (WeightFormat f : {WeightFormat::kDense, WeightFormat::kFp8Block128, WeightFormat::kFp4Group32})
    for (Shape s : {Shape{384, 1024, 3}, Shape{384, 1024, 40}, Shape{512, 640, 64}, Shape{300, 512, 17}, Shape{1024, 2048, 512}, Shape{2048, 2048, 5},
                     Shape{2048, 2048, 1}, Shape{2048, 2048, 3},
                     Shape{16, 4096, 64}, Shape{7, 256, 4}})
      for (Rounding r : {Rounding::kNone, Rounding::kBf16}) {
        const WeightMatrix w = RandomWeight(f, s.rows, s.cols, ++seed);
        const std::vector<float> x = Random(s.n * s.cols, ++seed, 1.5f);
        std::vector<float> a = Poisoned(s.n * s.rows), b = a;
        cpu().Linear(w, x.data(), s.n, a.data(), r);
        (*fast)->Linear(w, x.data(), s.n, b.data(), r);
        EXPECT_LE(RelErr(b, a), r == Rounding::kNone ? fp32_tol : kBf16Tol)
            << (fp8_tc ? "fast-fp8 " : "fast ") << "format " << static_cast<int>(f) << " " << s.rows << "x" << s.cols
            << " n=" << s.n;
        if (!fp8_tc && r == Rounding::kBf16 && f == WeightFormat::kFp8Block128)  // bf16 outputs: nearly all identical
          EXPECT_GE(FracIdentical(b, a), 0.99) << s.rows << "x" << s.cols << " n=" << s.n;
      }
  EXPECT_TRUE((*fast)->Health().ok()) << (*fast)->Health();
  }
}

// cuBLASLt's block-scaled FP8 GEMM itself (must not be refused on sm_90), K blocks padded in the
// scale layout (640 = 5 blocks), tokens padded to a multiple of 4. The FP8 tensor cores sum a
// 128-block with ~14 bits, so ~5% of bf16 outputs differ from the reference by an ulp (measured
// 0.946-0.953 identical on the H200, the same with bf16 or fp32 output): fast-fp8 only.
TEST_F(CudaOps, CublasLtBlockScaledFp8MatchesCpu) {
  cuda::LtContext lt;
  uint32_t seed = 120;
  struct Shape { int64_t rows, cols, n; };
  for (Shape s : {Shape{384, 640, 16}, Shape{1024, 1024, 37}, Shape{256, 512, 64}}) {
    const WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, s.rows, s.cols, ++seed);
    const std::vector<float> x = Random(s.n * s.cols, ++seed, 1.5f);
    std::vector<float> want = Poisoned(s.n * s.rows);
    cpu().Linear(w, x.data(), s.n, want.data(), Rounding::kBf16);
    const std::vector<float> lts = cuda::BlockScalesForLt(w);
    const cuda::DeviceWeight dw = DeviceCopy(w);
    const float* d_lts = static_cast<const float*>(Upload(lts.data(), lts.size() * 4));
    const int64_t ld = (s.n + 3) / 4 * 4;
    float* dx = static_cast<float*>(Upload(x.data(), x.size() * 4));
    uint8_t* codes = nullptr;
    float *st = nullptr, *y = nullptr;
    __nv_bfloat16* yb = nullptr;
    ASSERT_EQ(cudaMalloc(&codes, ld * s.cols), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&st, ld * (s.cols / 128) * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&yb, ld * s.rows * 2), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&y, ld * s.rows * 4), cudaSuccess);
    ASSERT_EQ(cudaMemset(y, 0xff, ld * s.rows * 4), cudaSuccess);
    ASSERT_EQ(cuda::QuantizeActivationsFp8(dx, s.n, s.cols, codes, st, ld, nullptr), cudaSuccess);
    ASSERT_EQ(cuda::LinearFp8Lt(lt, dw, d_lts, codes, st, ld, yb, cuda::LtOutput::kBf16, nullptr), cudaSuccess)
        << lt.last_error();
    ASSERT_EQ(cuda::Bf16ToF32(yb, s.n * s.rows, y, nullptr), cudaSuccess);
    std::vector<float> got_bf16(s.n * s.rows), got(s.n * s.rows);
    ASSERT_EQ(cudaMemcpy(got_bf16.data(), y, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cuda::LinearFp8Lt(lt, dw, d_lts, codes, st, ld, y, cuda::LtOutput::kF32, nullptr), cudaSuccess)
        << lt.last_error();
    ASSERT_EQ(cuda::RoundToBf16(y, s.n * s.rows, nullptr), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    std::printf("  cuBLASLt %lldx%lld n=%lld: identical to the reference: fp32 out + RNE %.4f, bf16 out %.4f\n",
                static_cast<long long>(s.rows), static_cast<long long>(s.cols), static_cast<long long>(s.n),
                FracIdentical(got, want), FracIdentical(got_bf16, want));
    EXPECT_GE(FracIdentical(got, want), 0.9) << s.rows << "x" << s.cols << " n=" << s.n;
    for (const void* p : {dw.values, static_cast<const void*>(dw.scales), static_cast<const void*>(d_lts), static_cast<const void*>(dx),
                          static_cast<const void*>(codes), static_cast<const void*>(st), static_cast<const void*>(yb),
                          static_cast<const void*>(y)})
      cudaFree(const_cast<void*>(p));
    EXPECT_LE(RelErr(got, want), kBf16Tol) << s.rows << "x" << s.cols << " n=" << s.n;
  }
}

// The fast decode GEMV (reordered sums) against the CPU reference, on device memory.
TEST_F(CudaOps, FastDecodeGemvWithinFp32Rounding) {
  uint32_t seed = 80;
  for (WeightFormat f : {WeightFormat::kFp8Block128, WeightFormat::kFp4Group32})
    for (int64_t n : {1, 2, 3, 8, 13})
      for (int64_t cols : {128, 640, 4096}) {
        const int64_t rows = 300;
        const WeightMatrix w = RandomWeight(f, rows, cols, ++seed);
        const std::vector<float> x = Random(n * cols, ++seed, 1.5f);
        std::vector<float> want = Poisoned(n * rows);
        cpu().Linear(w, x.data(), n, want.data(), Rounding::kNone);
        const cuda::DeviceWeight dw = DeviceCopy(w);
        float* dx = static_cast<float*>(Upload(x.data(), x.size() * 4));
        float *xq = nullptr, *xs = nullptr, *y = nullptr;
        ASSERT_EQ(cudaMalloc(&xq, x.size() * 4), cudaSuccess);
        ASSERT_EQ(cudaMalloc(&xs, n * (cols / 128) * 4), cudaSuccess);
        ASSERT_EQ(cudaMalloc(&y, n * rows * 4), cudaSuccess);
        ASSERT_EQ(cudaMemset(y, 0xff, n * rows * 4), cudaSuccess);  // NaN poison
        ASSERT_EQ(cuda::QuantizeActivations(dx, n, cols, xq, xs, nullptr), cudaSuccess);
        ASSERT_EQ(cuda::LinearDecode(dw, xq, xs, n, y, Rounding::kNone, nullptr), cudaSuccess);
        std::vector<float> got(n * rows);
        ASSERT_EQ(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        for (const void* p : {dw.values, static_cast<const void*>(dw.scales), static_cast<const void*>(dx),
                              static_cast<const void*>(xq), static_cast<const void*>(xs), static_cast<const void*>(y)})
          cudaFree(const_cast<void*>(p));
        EXPECT_LE(RelErr(got, want), kFp32Tol) << "format " << static_cast<int>(f) << " n " << n << " cols " << cols;
      }
}

// The generic decode GEMV with two and four rows a warp (row counts that choose them, the last
// warp with fewer rows than that) gives one row a warp's bits, alone and grouped, and stays within
// fp32 rounding of the CPU; FP8 weights (FP4 ones of these shapes take the tensor cores), one to
// three tokens.
TEST_F(CudaOps, DecodeGemvRowsPerWarpGiveOneRowAWarpsBits) {
  const int sms = cuda::DeviceSmLimits().count;
  ASSERT_GT(sms, 0);
  uint32_t seed = 900;
  const int64_t cols = 1024;
  // The fewest rows a matrix needs for 4 (and 2) rows a warp: about one 8-warp block an SM.
  const int64_t rows4 = (sms * 15 / 16) * 32 - 2, rows2 = (sms * 15 / 16) * 16 - 1;
  ASSERT_EQ(cuda::DecodeGemvRowsPerWarp(rows4, 1), 4);
  ASSERT_EQ(cuda::DecodeGemvRowsPerWarp(rows2, 1), 2);
  ASSERT_EQ(cuda::DecodeGemvRowsPerWarp(rows2, 2), 4);  // two matrices of a grouped launch
  ASSERT_EQ(cuda::DecodeGemvRowsPerWarp(300, 1), 1);
  for (int64_t rows : {rows4, rows2})
    for (int64_t n : {1, 2, 3}) {
      const WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, rows, cols, ++seed);
      const WeightMatrix first = [&] {  // its first 300 rows: one row a warp
        WeightMatrix m = w;
        m.rows = 300;
        m.values.resize(300 * cols);
        m.scales.resize(3 * (cols / 128));  // its first three 128-row blocks
        return m;
      }();
      const std::vector<float> x = Random(n * cols, ++seed, 1.5f);
      std::vector<float> want(n * rows);
      cpu().Linear(w, x.data(), n, want.data(), Rounding::kNone);
      const cuda::DeviceWeight dw = DeviceCopy(w), dfirst = DeviceCopy(first);
      float* dx = static_cast<float*>(Upload(x.data(), x.size() * 4));
      float *xq = nullptr, *xs = nullptr, *y = nullptr;
      ASSERT_EQ(cudaMalloc(&xq, x.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&xs, n * (cols / 128) * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&y, (3 * rows + 300) * n * 4), cudaSuccess);  // alone, grouped x 2, the first rows
      ASSERT_EQ(cudaMemset(y, 0xff, (3 * rows + 300) * n * 4), cudaSuccess);  // NaN poison
      ASSERT_EQ(cuda::QuantizeActivations(dx, n, cols, xq, xs, nullptr), cudaSuccess);
      ASSERT_EQ(cuda::LinearDecode(dw, xq, xs, n, y, Rounding::kNone, nullptr), cudaSuccess);
      const auto* codes = static_cast<const uint8_t*>(dw.values);
      const cuda::GemvGroup groups[2] = {{codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + n * rows},
                                         {codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + 2 * n * rows}};
      auto* dgroups = static_cast<const cuda::GemvGroup*>(Upload(groups, sizeof groups));
      ASSERT_EQ(cuda::LinearDecodeGrouped(dgroups, 2, rows, n, cols, true, Rounding::kNone, nullptr, {}), cudaSuccess);
      ASSERT_EQ(cuda::LinearDecode(dfirst, xq, xs, n, y + 3 * n * rows, Rounding::kNone, nullptr), cudaSuccess);
      std::vector<float> got((3 * rows + 300) * n);
      ASSERT_EQ(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      for (const void* p : {dw.values, static_cast<const void*>(dw.scales), dfirst.values,
                            static_cast<const void*>(dfirst.scales), static_cast<const void*>(dx),
                            static_cast<const void*>(xq), static_cast<const void*>(xs), static_cast<const void*>(y),
                            static_cast<const void*>(dgroups)})
        cudaFree(const_cast<void*>(p));
      const std::string where = "rows " + std::to_string(rows) + " n " + std::to_string(n);
      const std::vector<float> alone(got.begin(), got.begin() + n * rows);
      EXPECT_LE(RelErr(alone, want), kFp32Tol) << where;
      for (int g = 1; g <= 2; ++g)
        EXPECT_EQ(std::memcmp(got.data() + g * n * rows, alone.data(), n * rows * 4), 0) << where << " group " << g;
      for (int64_t t = 0; t < n; ++t)  // one row a warp, the same rows' bits
        EXPECT_EQ(std::memcmp(got.data() + 3 * n * rows + t * 300, alone.data() + t * rows, 300 * 4), 0)
            << where << " token " << t;
    }
}

// FP4 scales read as the checkpoint's E8M0 bytes and tokens read as f16 in the MMA's order (fast
// mode's grouped MoE) give the fp32 scales' and tokens' bits, alone and grouped, one to 13 tokens;
// so do blocks with k split between warps and blocks whose warps take all of k (Fp4Blocks).
TEST_F(CudaOps, Fp4ScaleBytesAndHalfTokensGiveTheFp32Bits) {
  uint32_t seed = 500;
  for (int64_t cols : {256, 2048, 4096})
    for (int64_t n : {1, 2, 3, 8, 13}) {
      const int64_t rows = 200;
      const WeightMatrix w = RandomWeight(WeightFormat::kFp4Group32, rows, cols, ++seed);
      const std::vector<uint8_t> exps = cuda::ScaleExponents(w);
      ASSERT_EQ(exps.size(), w.scales.size());
      const cuda::DeviceWeight dw = DeviceCopy(w);
      cuda::DeviceWeight dwb = dw;  // fast mode's form: scale bytes, codes in the decode layout
      dwb.scale_exps = static_cast<const uint8_t*>(Upload(exps.data(), exps.size()));
      const std::vector<uint8_t> moved = cuda::Fp4CodesInDecodeLayout(cuda::EncodeWeight(w).values);
      dwb.values = Upload(moved.data(), moved.size());
      EXPECT_EQ(dwb.bytes(), rows * cols / 2 + rows * (cols / 32));
      const std::vector<float> x = Random(n * cols, ++seed, 1.5f);
      float* dx = static_cast<float*>(Upload(x.data(), x.size() * 4));
      float *xq = nullptr, *xs = nullptr, *xs2 = nullptr, *y = nullptr;
      uint16_t* xh = nullptr;
      // fp32 alone, bytes alone, grouped (2 groups each): bytes + fp32 tokens, + f16 tokens; one group
      // each: f16 tokens with k split, with whole k; fp32 scales and tokens with whole k
      const int64_t parts = 9;
      ASSERT_EQ(cudaMalloc(&xq, x.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&xh, x.size() * 2), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&xs, n * (cols / 128) * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&xs2, n * (cols / 128) * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&y, parts * n * rows * 4), cudaSuccess);
      ASSERT_EQ(cudaMemset(y, 0xff, parts * n * rows * 4), cudaSuccess);  // NaN poison
      ASSERT_EQ(cuda::QuantizeActivations(dx, n, cols, xq, xs, nullptr), cudaSuccess);
      ASSERT_EQ(cuda::QuantizeActivationsMmaF16(dx, n, cols, xh, xs2, nullptr), cudaSuccess);
      ASSERT_EQ(cuda::LinearDecode(dw, xq, xs, n, y, Rounding::kNone, nullptr), cudaSuccess);
      ASSERT_EQ(cuda::LinearDecode(dwb, xq, xs, n, y + n * rows, Rounding::kNone, nullptr), cudaSuccess);
      const auto* codes = static_cast<const uint8_t*>(dw.values);
      const auto* moved_codes = static_cast<const uint8_t*>(dwb.values);
      const cuda::GemvGroup groups[7] = {
          {moved_codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + 2 * n * rows, dwb.scale_exps},
          {moved_codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + 3 * n * rows, dwb.scale_exps},
          {moved_codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 4 * n * rows, dwb.scale_exps, xh},
          {moved_codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 5 * n * rows, dwb.scale_exps, xh},
          {moved_codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 6 * n * rows, dwb.scale_exps, xh},
          {moved_codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 7 * n * rows, dwb.scale_exps, xh},
          {codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + 8 * n * rows}};
      auto* dgroups = static_cast<const cuda::GemvGroup*>(Upload(groups, sizeof groups));
      ASSERT_TRUE(cuda::GroupedFp4OnTensorCores(n, cols, true));
      ASSERT_EQ(cuda::LinearDecodeGrouped(dgroups, 2, rows, n, cols, false, Rounding::kNone, nullptr, {true, false}),
                cudaSuccess);
      ASSERT_EQ(cuda::LinearDecodeGrouped(dgroups + 2, 2, rows, n, cols, false, Rounding::kNone, nullptr, {true, true}),
                cudaSuccess);
      using cuda::Fp4Blocks;
      ASSERT_EQ(cuda::LinearDecodeGrouped(dgroups + 4, 1, rows, n, cols, false, Rounding::kNone, nullptr,
                                          {true, true, Fp4Blocks::kSplitK}),
                cudaSuccess);
      ASSERT_EQ(cuda::LinearDecodeGrouped(dgroups + 5, 1, rows, n, cols, false, Rounding::kNone, nullptr,
                                          {true, true, Fp4Blocks::kWholeK}),
                cudaSuccess);
      ASSERT_EQ(cuda::LinearDecodeGrouped(dgroups + 6, 1, rows, n, cols, false, Rounding::kNone, nullptr,
                                          {false, false, Fp4Blocks::kWholeK}),
                cudaSuccess);
      // FP8 (the generic GEMV) cannot take scale bytes or f16 tokens: refused, never misread.
      EXPECT_EQ(cuda::LinearDecodeGrouped(dgroups, 2, rows, n, cols, true, Rounding::kNone, nullptr, {true, false}),
                cudaErrorInvalidValue);
      EXPECT_EQ(cuda::LinearDecodeGrouped(dgroups, 2, rows, n, cols, true, Rounding::kNone, nullptr, {false, true}),
                cudaErrorInvalidValue);
      std::vector<float> got(parts * n * rows), s1(n * (cols / 128)), s2(s1.size());
      ASSERT_EQ(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(s1.data(), xs, s1.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(s2.data(), xs2, s2.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      for (const void* p : {dw.values, dwb.values, static_cast<const void*>(dw.scales), static_cast<const void*>(dwb.scale_exps),
                            static_cast<const void*>(dx), static_cast<const void*>(xq), static_cast<const void*>(xh),
                            static_cast<const void*>(xs), static_cast<const void*>(xs2), static_cast<const void*>(y),
                            static_cast<const void*>(dgroups)})
        cudaFree(const_cast<void*>(p));
      EXPECT_EQ(s1, s2);
      for (float v : got) ASSERT_FALSE(std::isnan(v)) << "cols " << cols << " n " << n;
      for (int64_t part = 1; part < parts; ++part)
        EXPECT_EQ(std::memcmp(got.data(), got.data() + part * n * rows, n * rows * 4), 0)
            << "part " << part << " cols " << cols << " n " << n;
    }
}

// A matrix built on another's values buffer (same address, same sampled values, other values
// changed) is a new weight: its identity, not the sampled values, sends it to the device again.
TEST_F(CudaOps, AWeightBuiltOnAnothersBufferIsUploadedAgain) {
  WeightMatrix a = RandomWeight(WeightFormat::kDense, 64, 256, 71);
  const std::vector<float> x = Random(3 * 256, 72, 1.0f);
  std::vector<float> ya = Poisoned(3 * 64), want_a = ya;
  gpu_->Linear(a, x.data(), 3, ya.data(), Rounding::kNone);
  cpu().Linear(a, x.data(), 3, want_a.data(), Rounding::kNone);
  EXPECT_EQ(ya, want_a);
  WeightMatrix b;
  b.format = a.format;
  b.rows = a.rows;
  b.cols = a.cols;
  b.values = std::move(a.values);  // the same buffer
  const float* at = b.values.data();
  for (size_t i = 1; i < 64; ++i) b.values[i] = -b.values[i];  // row 0 (the samples are far apart)
  std::vector<float> yb = Poisoned(3 * 64), want_b = yb;
  gpu_->Linear(b, x.data(), 3, yb.data(), Rounding::kNone);
  cpu().Linear(b, x.data(), 3, want_b.data(), Rounding::kNone);
  EXPECT_EQ(b.values.data(), at);
  EXPECT_EQ(yb, want_b);
  EXPECT_NE(yb, ya);
}

// The kernels add in the CPU reference's order (dot products, K blocks, online softmax) and both
// backends round exp through double: outputs are bit-identical, not merely close.
TEST_F(CudaOps, BitIdenticalToTheCpuReference) {
  for (WeightFormat f : {WeightFormat::kDense, WeightFormat::kFp8Block128, WeightFormat::kFp4Group32}) {
    const WeightMatrix w = RandomWeight(f, 300, 384, 61 + static_cast<int>(f));
    const std::vector<float> x = Random(13 * 384, 62, 1.5f);
    std::vector<float> a = Poisoned(13 * 300), b = a;
    cpu().Linear(w, x.data(), 13, a.data(), Rounding::kNone);
    gpu_->Linear(w, x.data(), 13, b.data(), Rounding::kNone);
    EXPECT_EQ(a, b) << "Linear format " << static_cast<int>(f);
  }
  {
    const int64_t heads = 8, dim = 512, rows = 300, n = 200;
    const std::vector<float> q = Random(heads * dim, 63, 1.0f), kv = Random(rows * dim, 64, 1.0f),
                             sink = Random(heads, 65, 1.0f);
    const std::vector<const float*> slots = Slots(kv, rows, dim, n, 66);
    std::vector<float> a = Poisoned(heads * dim), b = a;
    cpu().SparseAttention(q.data(), heads, dim, slots, sink.data(), 0.044f, a.data());
    gpu_->SparseAttention(q.data(), heads, dim, slots, sink.data(), 0.044f, b.data());
    EXPECT_EQ(a, b) << "SparseAttention";
    std::vector<const float*> keys(slots.begin(), slots.begin() + 100);
    for (auto& k : keys) if (!k) k = kv.data();
    std::vector<float> sa = Poisoned(100), sb = sa;
    cpu().IndexScores(q.data(), sink.data(), 4, 128, keys, sa.data());
    gpu_->IndexScores(q.data(), sink.data(), 4, 128, keys, sb.data());
    EXPECT_EQ(sa, sb) << "IndexScores";
    cpu().IndexerLogits(q.data(), sink.data(), 4, 128, keys, sa.data());
    gpu_->IndexerLogits(q.data(), sink.data(), 4, 128, keys, sb.data());
    EXPECT_EQ(sa, sb) << "IndexerLogits";
  }
  {
    const int hc = 4;
    const int64_t dim = 512, k = hc * dim, mix = (2 + hc) * hc;
    const std::vector<float> x = Random(k, 67, 1.0f), fn = Random(mix * k, 68, 0.02f), base = Random(mix, 69, 0.5f),
                             scale = Random(3, 70, 0.5f);
    std::vector<float> ya = Poisoned(dim), yb = ya, pa = Poisoned(hc), pb = pa, ca = Poisoned(hc * hc), cb = ca;
    cpu().HcPre(x.data(), 1, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, ya.data(), pa.data(), ca.data());
    gpu_->HcPre(x.data(), 1, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, yb.data(), pb.data(), cb.data());
    EXPECT_EQ(ya, yb) << "HcPre y";
    EXPECT_EQ(ca, cb) << "HcPre comb";
    std::vector<float> ra = Poisoned(dim), rb = ra, w = Random(dim, 71, 1.0f);
    cpu().RmsNorm(x.data(), w.data(), 1, dim, 1e-6f, ra.data());
    gpu_->RmsNorm(x.data(), w.data(), 1, dim, 1e-6f, rb.data());
    EXPECT_EQ(ra, rb) << "RmsNorm";
    std::vector<float> qa = x, qb = x;
    cpu().HeadRmsNormBf16(qa.data(), hc, dim, 1e-6f);
    gpu_->HeadRmsNormBf16(qb.data(), hc, dim, 1e-6f);
    EXPECT_EQ(qa, qb) << "HeadRmsNormBf16";
  }
}




// The device layout's e4m3 codes (one encoder shared by weight upload and the cuBLASLt
// activation quantizer) against the reference encoder, for every finite e4m3 value; and e2m1
// packing. Host code: runs without a GPU.
// Fast mode's operand for FP8 weights: values x block scale in bf16, exactly.
// The whole routed-expert layer on the device (one staging round trip): bit-identical to the CPU's
// per-expert Linear calls with the exact kernels, within bf16 rounding in both fast modes — per
// expert (mixed formats, or FP4 experts past 64 rows) and grouped (all FP4: ~27 rows an expert at
// n = 40, more than one pass of 8 rows over each expert's weights).
TEST_F(CudaOps, RoutedExpertsOnTheDeviceMatchTheCpu) {
  for (bool mixed : {true, false})
  for (int64_t n : {1, 5, 40, 150}) {
    const int64_t dim = 256, inter = 384;
    const ExpertLayer layer = RandomExperts(n, dim, inter, static_cast<uint32_t>(200 + n), mixed);
    const std::vector<float> x = Random(n * dim, 300 + n, 1.0f), y0 = Random(n * dim, 400 + n, 0.5f);
    std::vector<float> want = y0, got = y0;
    cpu().RoutedExperts(layer.work, x.data(), n, dim, 10.0f, want.data());
    gpu_->RoutedExperts(layer.work, x.data(), n, dim, 10.0f, got.data());
    EXPECT_EQ(got, want) << "exact kernels, n=" << n << (mixed ? " mixed" : " fp4");
    for (bool fp8_tc : {false, true}) {
      auto fast = FastBackend(fp8_tc);
      ASSERT_TRUE(fast.ok()) << fast.status();
      std::vector<float> f = y0;
      (*fast)->RoutedExperts(layer.work, x.data(), n, dim, 10.0f, f.data());
      EXPECT_LE(RelErr(f, want), 2 * kBf16Tol) << (fp8_tc ? "fast-fp8" : "fast") << " n=" << n << (mixed ? " mixed" : " fp4");
      EXPECT_TRUE((*fast)->Health().ok()) << (*fast)->Health();
    }
  }
  // Inconsistent shapes are a clear, sticky error (never a device fault).
  cuda::CudaBackendOptions opt;
  auto be = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(be.ok());
  ExpertLayer bad = RandomExperts(2, 256, 384, 9);
  bad.work[0].rows = {0, 7};  // row 7 of 2
  std::vector<float> x = Random(2 * 256, 1, 1.0f), y(2 * 256, 0.0f);
  (*be)->RoutedExperts(bad.work, x.data(), 2, 256, 10.0f, y.data());
  EXPECT_EQ((*be)->Health().code(), absl::StatusCode::kInvalidArgument) << (*be)->Health();
}

// The grouped MoE's one scatter-add (each token's rows summed in expert order) against one
// ScatterAddRows launch per expert: the same fp32 additions, so the same bits; rows no expert took
// keep theirs.
TEST_F(CudaOps, OrderedScatterAddEqualsOneLaunchPerExpert) {
  const int64_t n = 37, dim = 300;
  std::mt19937 g(7);
  std::vector<int32_t> rows, first;  // experts' rows end to end, each expert's distinct
  for (int e = 0; e < 9; ++e) {
    first.push_back(static_cast<int32_t>(rows.size()));
    for (int32_t r = 0; r < n; ++r)
      if (g() % 3 == 0 && r != 5) rows.push_back(r);  // row 5: no expert
  }
  first.push_back(static_cast<int32_t>(rows.size()));
  const int64_t M = static_cast<int64_t>(rows.size());
  const std::vector<float> out = Random(M * dim, 71, 3.0f), y0 = Random(n * dim, 72, 1.0f);
  std::vector<int32_t> offsets, order;
  cuda::OrderRowsByTarget(rows, n, &offsets, &order);
  ASSERT_EQ(offsets.size(), static_cast<size_t>(n + 1));
  ASSERT_EQ(offsets.back(), M);
  for (int64_t r = 0; r < n; ++r)
    for (int32_t j = offsets[r]; j < offsets[r + 1]; ++j) {
      EXPECT_EQ(rows[order[j]], r);
      if (j > offsets[r]) EXPECT_LT(order[j - 1], order[j]);  // increasing: expert order
    }
  auto* d_out = static_cast<float*>(Upload(out.data(), out.size() * 4));
  auto* d_rows = static_cast<int32_t*>(Upload(rows.data(), rows.size() * 4));
  auto* d_off = static_cast<int32_t*>(Upload(offsets.data(), offsets.size() * 4));
  auto* d_ord = static_cast<int32_t*>(Upload(order.data(), order.size() * 4));
  auto* y_each = static_cast<float*>(Upload(y0.data(), y0.size() * 4));
  auto* y_once = static_cast<float*>(Upload(y0.data(), y0.size() * 4));
  for (size_t e = 0; e + 1 < first.size(); ++e)
    ASSERT_EQ(cuda::ScatterAddRows(d_out + first[e] * dim, d_rows + first[e], first[e + 1] - first[e], dim, y_each, nullptr),
              cudaSuccess);
  ASSERT_EQ(cuda::ScatterAddOrdered(d_out, d_off, d_ord, n, dim, y_once, nullptr), cudaSuccess);
  std::vector<float> a(n * dim), b(n * dim);
  ASSERT_EQ(cudaMemcpy(a.data(), y_each, a.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(b.data(), y_once, b.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0);
  EXPECT_EQ(std::memcmp(b.data() + 5 * dim, y0.data() + 5 * dim, dim * 4), 0);
  int64_t taken = 0;  // a row some expert took: changed
  while (offsets[taken + 1] == offsets[taken]) ++taken;
  EXPECT_NE(std::memcmp(b.data() + taken * dim, y0.data() + taken * dim, dim * 4), 0);
  for (void* p : {static_cast<void*>(d_out), static_cast<void*>(d_rows), static_cast<void*>(d_off),
                  static_cast<void*>(d_ord), static_cast<void*>(y_each), static_cast<void*>(y_once)})
    cudaFree(p);
}

// A routed layer for RoutedMoE: a fp32 router (the exact kernel computes its logits on both
// paths), E experts of one format, a bias or a hash layer's picks.
struct RoutedLayer {
  WeightMatrix gate;
  std::vector<WeightMatrix> w;  // 3 an expert: w1, w3, w2
  std::vector<ExpertMatrices> experts;
  std::vector<float> bias;
  std::vector<int32_t> hash;
  MoeRouter router;
  RoutedLayer(int64_t E, int64_t k, int64_t n, int64_t dim, int64_t inter, RouterScore score, bool biased, bool hashed,
              uint32_t seed, bool mixed = false, bool skewed = false) {
    gate = RandomWeight(WeightFormat::kDense, E, dim, seed, /*bf16=*/false);
    for (float& v : gate.values) v *= 20.0f;  // logits of a few units: picks far from ties
    for (int64_t e = 0; e < E; ++e) {
      const WeightFormat f = mixed && e % 2 ? WeightFormat::kFp8Block128 : WeightFormat::kFp4Group32;
      w.push_back(RandomWeight(f, inter, dim, seed + 10 * static_cast<uint32_t>(e) + 1));
      w.push_back(RandomWeight(f, inter, dim, seed + 10 * static_cast<uint32_t>(e) + 2));
      w.push_back(RandomWeight(f, dim, inter, seed + 10 * static_cast<uint32_t>(e) + 3));
    }
    for (int64_t e = 0; e < E; ++e) experts.push_back({&w[3 * e], &w[3 * e + 1], &w[3 * e + 2]});
    std::mt19937 g(seed);
    if (biased) bias = Random(E, seed + 7, 0.05f);
    if (biased && skewed) bias[0] = 100.0f;  // every token picks expert 0
    if (hashed)
      for (int64_t i = 0; i < n; ++i) {
        std::vector<int32_t> all(E);
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), g);
        hash.insert(hash.end(), all.begin(), all.begin() + k);
      }
    router.gate = &gate;
    router.bias = bias;
    router.hash_ids = hash;
    router.score = score;
    router.k = k;
    router.route_scale = 2.5f;
    router.experts = experts;
  }
};

// Fast mode routes on the device: the same picks as the host's rules on the same logits, the
// weights within 2 ulp (softmax's: its sum in another order), and the sum bit for bit the host-routed RoutedExperts' given those picks
// (the grouping, the token tiles — every token on expert 0 at n = 40 over 8 experts: 40 rows
// where the grid covers 20 — and the scatter-add's order). Against the CPU: within bf16 rounding. Shapes it does not take
// (past 64 tokens, mixed formats) and the exact kernels fall back to the host's routing: the CPU's
// bits with the exact kernels. Without ids/weights asked for, the same sum.
TEST_F(CudaOps, RoutedMoEOnTheDeviceRoutesAsTheHost) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  struct Case {
    int64_t E, k, n;
    RouterScore score;
    bool biased, hashed, mixed, skewed = false;
  };
  const int64_t dim = 256, inter = 512;
  const float limit = 10.0f;
  uint32_t seed = 500;
  for (const Case c : {Case{16, 4, 1, RouterScore::kSqrtSoftplus, true, false, false},
                       Case{48, 6, 5, RouterScore::kSigmoid, false, false, false},
                       Case{8, 2, 40, RouterScore::kSqrtSoftplus, true, false, false, true},
                       Case{64, 6, 64, RouterScore::kSoftmax, false, false, false},
                       Case{32, 3, 7, RouterScore::kSqrtSoftplus, false, true, false},
                       Case{8, 2, 70, RouterScore::kSigmoid, true, false, false},
                       Case{8, 2, 6, RouterScore::kSigmoid, true, false, true}}) {
    const RoutedLayer l(c.E, c.k, c.n, dim, inter, c.score, c.biased, c.hashed, seed += 100, c.mixed,
                        c.skewed);
    const std::string what = "E=" + std::to_string(c.E) + " k=" + std::to_string(c.k) + " n=" + std::to_string(c.n);
    const int64_t M = c.n * c.k;
    const std::vector<float> x = Random(c.n * dim, seed + 1, 1.0f), y0 = Random(c.n * dim, seed + 2, 0.5f);
    std::vector<float> y = y0, y_quiet = y0, want = y0;
    std::vector<int32_t> ids(M, -1), want_ids(M, -2);
    std::vector<float> wts = Poisoned(M), want_wts = Poisoned(M);
    (*fast)->RoutedMoE(l.router, x.data(), c.n, dim, limit, y.data(), ids.data(), wts.data());
    (*fast)->RoutedMoE(l.router, x.data(), c.n, dim, limit, y_quiet.data());
    ASSERT_TRUE((*fast)->Health().ok()) << (*fast)->Health() << " " << what;
    EXPECT_EQ(std::memcmp(y.data(), y_quiet.data(), y.size() * 4), 0) << what;
    // The host's rules on the backend's own logits.
    std::vector<float> logits(c.n * c.E);
    (*fast)->Linear(l.gate, x.data(), c.n, logits.data(), Rounding::kNone);
    RouteFromLogits(l.router, logits.data(), c.n, want_ids.data(), want_wts.data());
    EXPECT_EQ(ids, want_ids) << what;
    // Within 2 ulp; softmax's sum is taken in another order (a warp's tree): within fp32 rounding.
    const double ulps = c.score == RouterScore::kSoftmax ? 1e-6 : 2.5e-7;
    for (int64_t i = 0; i < M; ++i) EXPECT_NEAR(wts[i], want_wts[i], ulps * std::fabs(want_wts[i])) << what << " " << i;
    (*fast)->RoutedExperts(GroupByExpert(l.router, ids.data(), wts.data(), c.n), x.data(), c.n, dim, limit,
                           want.data());
    EXPECT_EQ(std::memcmp(y.data(), want.data(), y.size() * 4), 0) << what;
    // The CPU, and the exact kernels (the host's routing: its bits).
    std::vector<float> cpu_y = y0, exact_y = y0;
    std::vector<int32_t> cpu_ids(M);
    std::vector<float> cpu_wts(M);
    cpu().RoutedMoE(l.router, x.data(), c.n, dim, limit, cpu_y.data(), cpu_ids.data(), cpu_wts.data());
    EXPECT_EQ(ids, cpu_ids) << what;
    EXPECT_LE(RelErr(y, cpu_y), 2 * kBf16Tol) << what;
    gpu_->RoutedMoE(l.router, x.data(), c.n, dim, limit, exact_y.data());
    EXPECT_EQ(exact_y, cpu_y) << what;
    EXPECT_NE(y, y0) << what;
  }
  // A hash pick outside the layer: a clear, sticky error before anything runs.
  const RoutedLayer l(8, 2, 2, dim, inter, RouterScore::kSigmoid, false, true, 77);
  std::vector<int32_t> bad = l.hash;
  bad[3] = 8;
  MoeRouter r = l.router;
  r.hash_ids = bad;
  auto be = FastBackend(false);
  ASSERT_TRUE(be.ok());
  std::vector<float> x = Random(2 * dim, 1, 1.0f), y(2 * dim, 0.0f);
  (*be)->RoutedMoE(r, x.data(), 2, dim, limit, y.data());
  EXPECT_EQ((*be)->Health().code(), absl::StatusCode::kInvalidArgument) << (*be)->Health();
  EXPECT_EQ(y, std::vector<float>(2 * dim, 0.0f));
}

}  // namespace
}  // namespace flashmem::kernels
