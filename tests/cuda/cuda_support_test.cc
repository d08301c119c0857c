// The CUDA backend's supporting pieces against the CPU reference: hyper-connections, page-locked
// activations, gathers from host memory, budget errors, the device weight layouts, op phases and
// device selection. GPU cases skip (never faked) without a CUDA device; the host-only ones
// (layouts, gathers, names, device selection) run everywhere.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
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

TEST_F(CudaOps, HyperConnections) {
  const int hc = 4;
  for (int64_t dim : {256, 4096})
  for (int64_t n : {1, 3}) {  // tokens per call
    const int64_t k = hc * dim, mix = (2 + hc) * hc;
    const std::vector<float> x = Random(n * k, 31, 1.0f), fn = Random(mix * k, 32, 0.02f), base = Random(mix, 33, 0.5f),
                             scale = Random(3, 34, 0.5f);
    std::vector<float> ya = Poisoned(n * dim), yb = ya, pa = Poisoned(n * hc), pb = pa, ca = Poisoned(n * hc * hc), cb = ca;
    cpu().HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, ya.data(), pa.data(), ca.data());
    gpu_->HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, yb.data(), pb.data(), cb.data());
    EXPECT_LE(RelErr(yb, ya), kBf16Tol) << dim;
    EXPECT_LE(RelErr(pb, pa), kFp32Tol) << dim;
    EXPECT_LE(RelErr(cb, ca), kFp32Tol) << dim;
    const std::vector<float> f = Random(n * dim, 35, 1.0f);
    std::vector<float> oa = Poisoned(n * k), ob = oa;
    cpu().HcPost(f.data(), x.data(), pa.data(), ca.data(), n, hc, dim, oa.data());
    gpu_->HcPost(f.data(), x.data(), pa.data(), ca.data(), n, hc, dim, ob.data());
    EXPECT_LE(RelErr(ob, oa), 1e-6) << dim;
    std::vector<float> ha = Poisoned(n * dim), hb = ha;
    cpu().HcHead(x.data(), n, fn.data(), base.data(), 0.7f, hc, dim, 1e-6f, 1e-6f, ha.data());
    gpu_->HcHead(x.data(), n, fn.data(), base.data(), 0.7f, hc, dim, 1e-6f, 1e-6f, hb.data());
    EXPECT_LE(RelErr(hb, ha), kBf16Tol) << dim;
  }
}

// Fast mode's HcPre (hc 4): the mixes' sums split over blocks — another order than the CPU's, so
// the weights within fp32 rounding and y within bf16 rounding; other hc take the exact kernel.
TEST_F(CudaOps, FastModeHcPreSplitsTheMixesWithinRounding) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  for (int hc : {4, 2})
    for (int64_t dim : {256, 4096})
      for (int64_t n : {1, 3, 64}) {
        const int64_t k = hc * dim, mix = (2 + hc) * hc;
        const std::vector<float> x = Random(n * k, 51 + n, 1.0f), fn = Random(mix * k, 52, 0.02f),
                                 base = Random(mix, 53, 0.5f), scale = Random(3, 54, 0.5f);
        std::vector<float> ya = Poisoned(n * dim), yb = ya, pa = Poisoned(n * hc), pb = pa, ca = Poisoned(n * hc * hc),
                           cb = ca;
        cpu().HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, ya.data(), pa.data(),
                    ca.data());
        (*fast)->HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, yb.data(),
                       pb.data(), cb.data());
        const std::string what = "hc " + std::to_string(hc) + " dim " + std::to_string(dim) + " n " + std::to_string(n);
        EXPECT_LE(RelErr(yb, ya), kBf16Tol) << what;
        EXPECT_LE(RelErr(pb, pa), 1e-5) << what;
        EXPECT_LE(RelErr(cb, ca), 1e-5) << what;
        EXPECT_GE(FracIdentical(yb, ya), 0.9) << what;  // bf16 outputs: a few flip
      }
  EXPECT_TRUE((*fast)->Health().ok()) << (*fast)->Health();
}

// Arrays in page-locked activation memory (the pool the backend installs; model::Scratch takes
// it) go straight between the caller's buffer and the device, the others through the staging
// buffer, in runs of adjacent staged inputs. Every mix gives the all-staged path's bits.
TEST_F(CudaOps, PinnedActivationsCopyStraightAndGiveTheStagedBits) {
  ActivationPool* pool = InstalledActivationPool();
  if (!pool) GTEST_SKIP() << "no activation pool (FLASHMEM_CUDA_PINNED=0)";
  const int hc = 4;
  const int64_t dim = 4096, n = 8, k = hc * dim, mix = (2 + hc) * hc;
  const std::vector<float> x = Random(n * k, 41, 1.0f), fn = Random(mix * k, 42, 0.02f), base = Random(mix, 43, 0.5f),
                           scale = Random(3, 44, 0.5f), f = Random(n * dim, 45, 1.0f);
  auto same = [](const float* a, const std::vector<float>& ref) {
    return std::memcmp(a, ref.data(), ref.size() * 4) == 0;
  };
  // All staged (std::vector is heap memory).
  std::vector<float> y0 = Poisoned(n * dim), p0 = Poisoned(n * hc), c0 = Poisoned(n * hc * hc), o0 = Poisoned(n * k);
  gpu_->HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, y0.data(), p0.data(), c0.data());
  gpu_->HcPost(f.data(), x.data(), p0.data(), c0.data(), n, hc, dim, o0.data());
  ASSERT_TRUE(gpu_->Health().ok());
  ASSERT_FALSE(std::isnan(o0[0]));

  model::Scratch xs(x.begin(), x.end()), fs(f.begin(), f.end()), ys(n * dim, NAN), os(n * k, NAN);
  for (const model::Scratch* a : {&xs, &fs, &ys, &os}) ASSERT_TRUE(pool->Contains(a->data(), a->size() * 4));
  ASSERT_FALSE(pool->Contains(p0.data(), p0.size() * 4));
  std::vector<float> p1 = Poisoned(n * hc), c1 = Poisoned(n * hc * hc);
  // x and y straight, post and comb staged.
  gpu_->HcPre(xs.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, ys.data(), p1.data(), c1.data());
  EXPECT_TRUE(same(ys.data(), y0));
  EXPECT_EQ(p1, p0);
  EXPECT_EQ(c1, c0);
  // f straight, then one staged run (residual, post, comb); the output straight.
  gpu_->HcPost(fs.data(), x.data(), p0.data(), c0.data(), n, hc, dim, os.data());
  EXPECT_TRUE(same(os.data(), o0));
  // f staged, the residual straight, post and comb staged; the output staged.
  std::vector<float> o2 = Poisoned(n * k);
  gpu_->HcPost(f.data(), xs.data(), p0.data(), c0.data(), n, hc, dim, o2.data());
  EXPECT_EQ(o2, o0);
  // A Linear both ways round, exact and fast.
  const WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, 512, 4096, 46);
  const int64_t rows = 16;
  model::Scratch xl(fs.begin(), fs.begin() + rows * 4096), yl(rows * 512, NAN);
  const std::vector<float> xv(xl.begin(), xl.end());
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
    std::vector<float> y_staged = Poisoned(rows * 512), y_out = Poisoned(rows * 512);
    be->Linear(w, xv.data(), rows, y_staged.data(), Rounding::kBf16);
    be->Linear(w, xl.data(), rows, y_out.data(), Rounding::kBf16);  // input straight
    EXPECT_EQ(y_out, y_staged) << be->name();
    std::fill(yl.begin(), yl.end(), NAN);
    be->Linear(w, xv.data(), rows, yl.data(), Rounding::kBf16);  // output straight
    EXPECT_TRUE(same(yl.data(), y_staged)) << be->name();
    EXPECT_TRUE(be->Health().ok()) << be->Health();
  }
}

// The mHC mixes are staged through shared memory in tiles; the sums keep the CPU's order, so the
// results stay bit-identical — across tile boundaries, a k that is not a multiple of 16 (the tail
// after the shuffle tree), several tokens, and V4-Flash's hc 4 x 4096.
TEST_F(CudaOps, HyperConnectionMixesStagedStayBitIdentical) {
  const int hc = 4;
  for (int64_t dim : {101, 4096})
    for (int64_t n : {1, 3}) {
      const int64_t k = hc * dim, mix = (2 + hc) * hc;
      const std::vector<float> x = Random(n * k, 81, 1.0f), fn = Random(mix * k, 82, 0.02f),
                               base = Random(mix, 83, 0.5f), scale = Random(3, 84, 0.5f);
      std::vector<float> ya = Poisoned(n * dim), yb = ya, pa = Poisoned(n * hc), pb = pa, ca = Poisoned(n * hc * hc), cb = ca;
      cpu().HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, ya.data(), pa.data(), ca.data());
      gpu_->HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, yb.data(), pb.data(), cb.data());
      EXPECT_EQ(ya, yb) << "y dim " << dim << " n " << n;
      EXPECT_EQ(pa, pb) << "post dim " << dim << " n " << n;
      EXPECT_EQ(ca, cb) << "comb dim " << dim << " n " << n;
      std::vector<float> ha = Poisoned(n * dim), hb = ha;  // every token's head row, one call
      cpu().HcHead(x.data(), n, fn.data(), base.data(), 0.7f, hc, dim, 1e-6f, 1e-6f, ha.data());
      gpu_->HcHead(x.data(), n, fn.data(), base.data(), 0.7f, hc, dim, 1e-6f, 1e-6f, hb.data());
      EXPECT_EQ(ha, hb) << "head dim " << dim << " n " << n;
    }
  EXPECT_TRUE(gpu_->Health().ok()) << gpu_->Health();
}

TEST_F(CudaOps, GatherPagesFromMappedHostMemory) {
  const int64_t page = 37376, pages = 200, picked = 77;
  uint8_t* host = nullptr;
  ASSERT_EQ(cudaHostAlloc(&host, pages * page, cudaHostAllocMapped), cudaSuccess);
  std::mt19937 g(5);
  for (int64_t i = 0; i < pages * page; ++i) host[i] = static_cast<uint8_t>(g());
  std::vector<const uint8_t*> src(picked);
  std::vector<int64_t> which(picked);
  for (int64_t i = 0; i < picked; ++i) {
    which[i] = g() % pages;
    uint8_t* dptr = nullptr;
    ASSERT_EQ(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dptr), host + which[i] * page, 0), cudaSuccess);
    src[i] = dptr;
  }
  const uint8_t** d_src = nullptr;
  uint8_t* dst = nullptr;
  ASSERT_EQ(cudaMalloc(&d_src, picked * sizeof(void*)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dst, picked * page), cudaSuccess);
  ASSERT_EQ(cudaMemset(dst, 0, picked * page), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_src, src.data(), picked * sizeof(void*), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cuda::GatherPages(d_src, picked, page, dst, nullptr), cudaSuccess);
  std::vector<uint8_t> got(picked * page);
  ASSERT_EQ(cudaMemcpy(got.data(), dst, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t i = 0; i < picked; ++i)
    EXPECT_EQ(std::memcmp(got.data() + i * page, host + which[i] * page, page), 0) << "page " << i;
  EXPECT_EQ(cuda::GatherPages(d_src, picked, 37377, dst, nullptr), cudaErrorInvalidValue);
  cudaFree(d_src);
  cudaFree(dst);
  cudaFreeHost(host);
}

TEST(CudaBackendErrors, BudgetTooSmallIsAClearStickyError) {
  if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  cuda::CudaBackendOptions opt;
  opt.memory_budget_bytes = 1 << 20;
  auto be = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(be.ok()) << be.status();
  const WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, 2048, 1024, 1);  // 2 MiB of codes
  const absl::Status prep = (*be)->Prepare(w);
  EXPECT_EQ(prep.code(), absl::StatusCode::kResourceExhausted) << prep;
  EXPECT_NE(prep.message().find("budget"), std::string::npos) << prep;
  const std::vector<float> x = Random(1024, 2, 1.0f);
  std::vector<float> y = Poisoned(2048);
  (*be)->Linear(w, x.data(), 1, y.data(), Rounding::kNone);
  EXPECT_EQ((*be)->Health().code(), absl::StatusCode::kResourceExhausted);
  std::vector<float> r = Random(64, 3, 1.0f), before = r;
  (*be)->Fp8RoundTrip(r.data(), 64, 64);  // later ops do nothing once the backend has failed
  EXPECT_EQ(r, before);
}

// The host gather that stages records (no GPU needed): every listed record lands at its entry in
// the page layout, data then scales, masked ones skip, past the threshold for the host's cores too.
TEST(HostGather, RecordsLandInThePageLayout) {
  for (int64_t n : {5, 2500}) {  // 2,500 x 584 B: over the 1 MB threshold
    const std::vector<uint8_t> src = RandomRecordPage(n, 81);
    std::vector<const uint8_t*> data(n), scales(n);
    std::vector<int32_t> entry(n);
    int64_t valid = 0;
    for (int64_t j = 0; j < n; ++j) {
      data[j] = src.data() + j * cuda::kRecordData;
      scales[j] = src.data() + n * cuda::kRecordData + j * cuda::kRecordScales;
      entry[j] = j % 3 == 1 ? -1 : static_cast<int32_t>(valid++);
    }
    std::vector<uint8_t> page(valid * cuda::kRecordBytes, 0xee);
    cuda::GatherRecords(data, scales, entry.data(), valid, page.data());
    for (int64_t j = 0; j < n; ++j) {
      if (entry[j] < 0) continue;
      ASSERT_EQ(std::memcmp(page.data() + entry[j] * cuda::kRecordData, data[j], cuda::kRecordData), 0) << j;
      ASSERT_EQ(std::memcmp(page.data() + valid * cuda::kRecordData + entry[j] * cuda::kRecordScales, scales[j],
                            cuda::kRecordScales), 0) << j;
    }
  }
}

// The copies every op makes to and from the pinned buffer (CopyAll: in 256 KB pieces over the
// host's cores past 1 MB) and the KV reserve's page gather: every byte lands where it should,
// none beyond. Runs without a GPU.
TEST(HostGather, CopiesAndPagesLandWhereTheyShould) {
  for (size_t total : {size_t{3000}, size_t{5} << 20}) {  // under and over the 1 MB threshold
    std::mt19937 g(static_cast<uint32_t>(total));
    std::vector<uint8_t> src(total);
    for (uint8_t& b : src) b = static_cast<uint8_t>(g());
    std::vector<uint8_t> dst(total + 64, 0xee);
    // Pieces of odd sizes (one of 3 MB: split), to scattered places, in reverse order.
    std::vector<cuda::HostCopy> copies;
    size_t at = 0;
    for (size_t len : {size_t{1}, size_t{777}, total / 2 + 13}) {
      if (at + len > total) break;
      copies.push_back({dst.data() + 32 + (total - at - len), src.data() + at, len});
      at += len;
    }
    copies.push_back({dst.data() + 32, src.data() + at, total - at});
    cuda::CopyAll(copies);
    for (const cuda::HostCopy& c : copies)
      ASSERT_EQ(std::memcmp(c.dst, c.src, c.bytes), 0) << total << " bytes, a copy of " << c.bytes;
    for (int i = 0; i < 32; ++i) {
      ASSERT_EQ(dst[i], 0xee) << "before the first byte";
      ASSERT_EQ(dst[32 + total + i], 0xee) << "past the last byte";
    }
  }
  for (int64_t count : {int64_t{3}, int64_t{40}}) {  // 40 x 37,376 B: over the threshold
    const int64_t page = 64 * cuda::kRecordBytes;
    std::vector<std::vector<uint8_t>> pages;
    std::vector<const uint8_t*> from;
    for (int64_t p = 0; p < count; ++p) {
      pages.push_back(RandomRecordPage(64, 900 + static_cast<uint32_t>(p)));
      from.push_back(pages.back().data());
    }
    std::reverse(from.begin(), from.end());
    std::vector<uint8_t> dst(count * page + 16, 0xee);
    cuda::GatherPagesHost(from, page, dst.data());
    for (int64_t p = 0; p < count; ++p) ASSERT_EQ(std::memcmp(dst.data() + p * page, from[p], page), 0) << p;
    for (int i = 0; i < 16; ++i) ASSERT_EQ(dst[count * page + i], 0xee);
  }
}

TEST(DeviceLayout, DequantizedFp8WeightIsExactInBf16) {
  const WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, 200, 384, 7);
  const std::vector<uint16_t> bits = cuda::DequantizeFp8ToBf16(w);
  ASSERT_EQ(bits.size(), w.values.size());
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) {
      const uint32_t u = static_cast<uint32_t>(bits[r * w.cols + c]) << 16;
      float got;
      std::memcpy(&got, &u, 4);
      ASSERT_EQ(got, w.values[r * w.cols + c] * w.scales[(r / 128) * w.scale_cols() + c / 128]) << r << "," << c;
    }
}

TEST(DeviceLayout, EncodeWeightGivesTheReferenceCodes) {
  WeightMatrix w;
  w.format = WeightFormat::kFp8Block128;
  w.rows = 1;
  w.cols = 256;
  for (int c = 0; c < 256; ++c) w.values.push_back((c & 0x7f) == 0x7f ? 0.0f : num::E4m3ToFloat(static_cast<uint8_t>(c)));
  w.scales = {1.0f};
  const cuda::EncodedWeight e = cuda::EncodeWeight(w);
  ASSERT_EQ(e.values.size(), 256u);
  for (int c = 0; c < 256; ++c) EXPECT_EQ(e.values[c], num::EncodeE4m3(w.values[c])) << "code " << c;
  WeightMatrix f;
  f.format = WeightFormat::kFp4Group32;
  f.rows = 1;
  f.cols = 32;
  for (int c = 0; c < 32; ++c) f.values.push_back(num::E2m1ToFloat(static_cast<uint8_t>(c % 16)));
  f.scales = {1.0f};
  const cuda::EncodedWeight p = cuda::EncodeWeight(f);
  ASSERT_EQ(p.values.size(), 16u);
  for (int c = 0; c < 32; ++c)
    EXPECT_EQ((p.values[c / 2] >> ((c & 1) * 4)) & 15, num::EncodeE2m1(f.values[c])) << "nibble " << c;
}

TEST(DeviceLayout, ScaleExponentsAreTheE8m0BytesOrNone) {
  WeightMatrix w = RandomWeight(WeightFormat::kFp4Group32, 3, 256, 11);
  const std::vector<uint8_t> exps = cuda::ScaleExponents(w);
  ASSERT_EQ(exps.size(), w.scales.size());
  for (size_t i = 0; i < exps.size(); ++i) EXPECT_EQ(std::ldexp(1.0f, exps[i] - 127), w.scales[i]) << i;
  auto without = [&](float scale) {
    WeightMatrix v = w;
    v.scales[5] = scale;
    return cuda::ScaleExponents(v).empty();
  };
  EXPECT_TRUE(without(0.75f));                     // not a power of two
  EXPECT_TRUE(without(-0.5f));                     // negative
  EXPECT_TRUE(without(0.0f));                      // E8M0 has no zero
  EXPECT_TRUE(without(std::ldexp(1.0f, -127)));    // subnormal: byte 0's float bits would read 0
  EXPECT_TRUE(without(std::numeric_limits<float>::infinity()));  // byte 255 is E8M0's NaN
  EXPECT_FALSE(without(std::ldexp(1.0f, 127)));    // byte 254, the largest
  EXPECT_FALSE(without(std::ldexp(1.0f, -126)));   // byte 1, the smallest
  EXPECT_TRUE(cuda::ScaleExponents(RandomWeight(WeightFormat::kFp4Group32, 3, 128, 12)).empty());  // cols % 256
  // Rows too long for the decode GEMV's tensor-core path at 8 tokens: its bytes would have no reader.
  EXPECT_TRUE(cuda::ScaleExponents(RandomWeight(WeightFormat::kFp4Group32, 1, 16384, 14)).empty());
  EXPECT_TRUE(cuda::ScaleExponents(RandomWeight(WeightFormat::kFp8Block128, 3, 256, 13)).empty());
}

TEST(OpPhases, NamesTheMemberALaunchWasWrittenIn) {
  using cuda::OpPhases;
  EXPECT_EQ(OpPhases::OpNameFromMangled(
                "ZNK8flashmem7kernels4cuda8internal15CudaBackendImpl19SparseAttentionRowsESt4spanIKNS0_12AttentionRowE"
                "Lm18446744073709551615EEllPKffEUlNS2_3DevEE_"),
            "SparseAttentionRows");
  EXPECT_EQ(OpPhases::OpNameFromMangled("Z4mainEUlvE_"), "?");                  // not a backend member
  EXPECT_EQ(OpPhases::OpNameFromMangled("ZN15CudaBackendImpl99Short"), "?");    // length past the end
  EXPECT_EQ(OpPhases::OpNameFromMangled("ZN15CudaBackendImpl"), "?");
  EXPECT_EQ(OpPhases::OpNameFromMangled(""), "?");
}

// cuBLASLt is dlopen'ed by fast mode, not linked (it broke civetweb's port-0 binding when loaded
// into every process): the library and every entry point must resolve, GPU or not.
TEST(CublasLt, LoadsOnDemandWithEveryEntryPoint) { EXPECT_EQ(cuda::CublasLtLoadError(), ""); }

TEST(DeviceSelection, BadDevicesAreRefusedByName) {
  auto bad = OpenBackend("gpu0");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("gpu0"), std::string::npos);
  EXPECT_FALSE(OpenBackend("cuda:-1").ok());
  EXPECT_FALSE(OpenBackend("cuda:x").ok());
  auto far = OpenBackend("cuda:99");
  EXPECT_FALSE(far.ok());
  EXPECT_NE(far.status().message().find("cuda:99"), std::string::npos) << far.status();
  auto cpu = OpenBackend("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_STREQ(cpu->backend->name(), "cpu");
  auto gpu = OpenBackend("cuda:0");
  if (cuda::DeviceCount() == 0) {
    EXPECT_EQ(gpu.status().code(), absl::StatusCode::kFailedPrecondition) << gpu.status();
  } else {
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_STREQ(gpu->backend->name(), "cuda");
  }
}

// The decode layout (fast mode's FP4 codes) decodes to the same f16 high bytes as the checkpoint
// layout, in every byte position of a word (the decode's shifts cross bytes), and those bytes are
// each code's value x 2^-14 as an f16 with a zero low byte.
TEST(DeviceLayout, Fp4DecodeLayoutGivesEveryCodesF16) {
  auto f16 = [](uint32_t high_byte) {  // f16 bits (high_byte << 8) as a float
    const uint32_t sign = high_byte >> 7, exp = (high_byte >> 2) & 31u, mant = (high_byte & 3u) << 8;
    const float mag = exp == 0 ? std::ldexp(static_cast<float>(mant), -24)
                               : std::ldexp(1.0f + static_cast<float>(mant) / 1024.0f, static_cast<int>(exp) - 15);
    return sign ? -mag : mag;
  };
  std::mt19937 rng(3);
  for (int trial = 0; trial < 4096; ++trial) {
    uint32_t w = rng();
    if (trial < 256) w = (w & ~0xFFu) | static_cast<uint32_t>(trial);  // every byte value in byte 0
    const uint8_t bytes[4] = {static_cast<uint8_t>(w), static_cast<uint8_t>(w >> 8), static_cast<uint8_t>(w >> 16),
                              static_cast<uint8_t>(w >> 24)};
    const std::vector<uint8_t> moved = cuda::Fp4CodesInDecodeLayout(bytes);
    uint32_t m = 0;
    for (int b = 0; b < 4; ++b) m |= static_cast<uint32_t>(moved[b]) << (8 * b);
    uint32_t lo = 0, hi = 0, mlo = 0, mhi = 0;
    cuda::E2m1WordToF16High(w, lo, hi);
    cuda::E2m1DecodeLayoutWordToF16High(m, mlo, mhi);
    ASSERT_EQ(mlo, lo) << std::hex << w;
    ASSERT_EQ(mhi, hi) << std::hex << w;
    for (int b = 0; b < 4; ++b) {
      ASSERT_EQ(f16((lo >> (8 * b)) & 0xFFu), std::ldexp(num::E2m1ToFloat(bytes[b] & 15u), -14)) << std::hex << w;
      ASSERT_EQ(f16((hi >> (8 * b)) & 0xFFu), std::ldexp(num::E2m1ToFloat(bytes[b] >> 4), -14)) << std::hex << w;
    }
  }
}

}  // namespace
}  // namespace flashmem::kernels
