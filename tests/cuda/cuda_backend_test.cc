// Every CUDA op against its CPU reference op on fresh random inputs, outputs poisoned (NaN) before
// each run; error = ||cuda - cpu|| / ||cpu||: fp32 outputs 1e-5, bf16-rounded outputs 4e-3; ops whose
// arithmetic is the CPU's operation for operation must be bit-identical. GPU cases skip (never
// faked) without a CUDA device. This file: Linear, the norms, RoPE and Hadamard, sparse attention
// (rows, FP8 records, the tensor-core path, the KV reserve), op chains on the device;
// cuda_gemm_test.cc has the fast GEMMs and the MoE, cuda_support_test.cc the rest.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/activation_pool.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/host_gather.h"
#include "kernels/cuda/op_phases.h"
#include "kernels/device.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "worker/model/scratch.h"

namespace flashmem::kernels {
namespace {

TEST_F(CudaOps, LinearEveryFormatShapeAndRounding) {
  struct Shape { int64_t rows, cols, n; };
  uint32_t seed = 10;
  for (WeightFormat f : {WeightFormat::kDense, WeightFormat::kFp8Block128, WeightFormat::kFp4Group32})
    for (Shape s : {Shape{256, 512, 1}, Shape{300, 384, 5}, Shape{129, 1024, 17}, Shape{7, 128, 8}})
      for (Rounding r : {Rounding::kNone, Rounding::kBf16}) {
        const WeightMatrix w = RandomWeight(f, s.rows, s.cols, ++seed);
        const std::vector<float> x = Random(s.n * s.cols, ++seed, 1.5f);
        std::vector<float> a = Poisoned(s.n * s.rows), b = Poisoned(s.n * s.rows);
        cpu().Linear(w, x.data(), s.n, a.data(), r);
        gpu_->Linear(w, x.data(), s.n, b.data(), r);
        EXPECT_LE(RelErr(b, a), r == Rounding::kNone ? kFp32Tol : kBf16Tol)
            << "format " << static_cast<int>(f) << " " << s.rows << "x" << s.cols << " n=" << s.n;
      }
  // A dense weight whose values are not all bf16 stays fp32 on the device.
  const WeightMatrix w = RandomWeight(WeightFormat::kDense, 64, 200, 99, /*bf16=*/false);
  const std::vector<float> x = Random(3 * 200, 98, 1.0f);
  std::vector<float> a = Poisoned(3 * 64), b = Poisoned(3 * 64);
  cpu().Linear(w, x.data(), 3, a.data(), Rounding::kNone);
  gpu_->Linear(w, x.data(), 3, b.data(), Rounding::kNone);
  EXPECT_LE(RelErr(b, a), kFp32Tol);
}

TEST_F(CudaOps, ResidentWeightFollowsChangedValues) {
  WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, 128, 256, 5);
  const std::vector<float> x = Random(2 * 256, 6, 1.0f);
  std::vector<float> a = Poisoned(256), b = Poisoned(256);
  gpu_->Linear(w, x.data(), 2, b.data(), Rounding::kNone);
  for (float& v : w.values) v = -v;  // same buffer, new contents
  cpu().Linear(w, x.data(), 2, a.data(), Rounding::kNone);
  gpu_->Linear(w, x.data(), 2, b.data(), Rounding::kNone);
  EXPECT_LE(RelErr(b, a), kFp32Tol);
}

TEST_F(CudaOps, NormsRopeRoundTripsHadamard) {
  for (int64_t n : {1, 33})
    for (int64_t dim : {200, 4096}) {
      std::vector<float> x = Random(n * dim, 2, 1.0f), w = Random(dim, 3, 0.1f), a = Poisoned(n * dim), b = a;
      for (float& v : w) v = num::RoundBf16(v + 1.0f);
      cpu().RmsNorm(x.data(), w.data(), n, dim, 1e-6f, a.data());
      gpu_->RmsNorm(x.data(), w.data(), n, dim, 1e-6f, b.data());
      EXPECT_LE(RelErr(b, a), kBf16Tol) << n << "x" << dim;
    }
  for (int64_t dim : {64, 512}) {
    std::vector<float> q = Random(8 * dim, 4, 3.0f), a = q, b = q;
    cpu().HeadRmsNormBf16(a.data(), 8, dim, 1e-6f);
    gpu_->HeadRmsNormBf16(b.data(), 8, dim, 1e-6f);
    EXPECT_LE(RelErr(b, a), kBf16Tol) << dim;
  }
  {  // RoPE and its inverse: the same operations in the same order, so bit-identical.
    const int64_t rows = 6, stride = 576, rd = 64;
    std::vector<float> x = Random(rows * stride, 5, 1.0f), cs(rows * rd / 2), sn(rows * rd / 2);
    for (int64_t i = 0; i < rows * rd / 2; ++i) {
      cs[i] = std::cos(0.37f * (i + 1));
      sn[i] = std::sin(0.37f * (i + 1));
    }
    for (int64_t rows_per_angle : {int64_t{6}, int64_t{2}, int64_t{1}})  // one angle set; per token of 2 heads; per row
      for (bool inv : {false, true}) {
        std::vector<float> a = x, b = x;
        cpu().Rope(a.data(), rows, stride, stride - rd, rd, cs.data(), sn.data(), rows_per_angle, inv);
        gpu_->Rope(b.data(), rows, stride, stride - rd, rd, cs.data(), sn.data(), rows_per_angle, inv);
        EXPECT_EQ(a, b) << "inverse " << inv << ", rows per angle " << rows_per_angle;
      }
  }
  for (float std : {1e-6f, 0.01f, 1.0f, 300.0f}) {
    std::vector<float> x = Random(64 * 512, 1, std), a = x, b = x;
    cpu().Fp8RoundTrip(a.data(), static_cast<int64_t>(a.size()), 64);
    gpu_->Fp8RoundTrip(b.data(), static_cast<int64_t>(b.size()), 64);
    EXPECT_EQ(a, b) << "fp8, std " << std;
    a = b = x;
    cpu().Fp4RoundTrip(a.data(), static_cast<int64_t>(a.size()), 32);
    gpu_->Fp4RoundTrip(b.data(), static_cast<int64_t>(b.size()), 32);
    EXPECT_EQ(a, b) << "fp4, std " << std;
  }
  for (int64_t dim : {128, 512}) {
    std::vector<float> x = Random(5 * dim, 7, 1.0f), a = x, b = x;
    cpu().Hadamard(a.data(), 5, dim);
    gpu_->Hadamard(b.data(), 5, dim);
    EXPECT_EQ(a, b) << dim;
  }
}

TEST_F(CudaOps, SparseAttentionWithSinkAndMaskedSlots) {
  for (int64_t dim : {128, 512})
    for (int64_t n : {0, 1, 70, 200}) {
      const int64_t heads = 8, rows = 300;
      const std::vector<float> q = Random(heads * dim, 11, 1.0f), kv = Random(rows * dim, 12, 1.0f),
                               sink = Random(heads, 13, 1.0f);
      const std::vector<const float*> slots = Slots(kv, rows, dim, n, 14);
      std::vector<float> a = Poisoned(heads * dim), b = a;
      const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
      cpu().SparseAttention(q.data(), heads, dim, slots, sink.data(), scale, a.data());
      gpu_->SparseAttention(q.data(), heads, dim, slots, sink.data(), scale, b.data());
      EXPECT_LE(RelErr(b, a), kBf16Tol) << "dim " << dim << " n " << n;
    }
}

// Attention over FP8 records as the worker holds them (kernels::KvSlot): staged as records and
// attended by the paged kernel, the same bits as SparseAttention over the decoded rows on the GPU
// (which is what the model ran before); fp32 rows among the slots take the decoding default.
TEST_F(CudaOps, SparseAttentionOverRecordsEqualsTheDecodedRows) {
  const int64_t heads = 8, entries = 96;
  const std::vector<uint8_t> page = RandomRecordPage(entries, 51);
  const std::vector<float> q = Random(heads * 512, 52, 1.0f), sink = Random(heads, 53, 1.0f), extra = Random(512, 54, 1.0f);
  const float scale = 1.0f / std::sqrt(512.0f);
  for (int64_t n : {1, 64, 200, 700}) {
    for (bool with_row : {false, true}) {
      std::vector<kernels::KvSlot> slots = RecordSlots(page, entries, n);
      if (with_row) slots[n / 2] = kernels::KvSlot{nullptr, nullptr, extra.data()};
      std::vector<float> decoded(n * 512);
      std::vector<const float*> rows(n, nullptr);
      for (int64_t j = 0; j < n; ++j) {
        if (slots[j].row) rows[j] = slots[j].row;
        if (!slots[j].record) continue;
        num::DecodeFp8Record(slots[j].record, slots[j].scales, 512, 64, decoded.data() + j * 512);
        rows[j] = decoded.data() + j * 512;
      }
      std::vector<float> want = Poisoned(heads * 512), got = want, host = want;
      gpu_->SparseAttention(q.data(), heads, 512, rows, sink.data(), scale, want.data());
      gpu_->SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, got.data());
      ASSERT_TRUE(gpu_->Health().ok()) << gpu_->Health();
      EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << "n " << n << (with_row ? " with an fp32 row" : "");
      cpu().SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, host.data());
      EXPECT_LE(RelErr(got, host), kBf16Tol) << "n " << n;
    }
  }
}

// Fast mode attends over the records on the warpgroup MMA when the heads fill its 64 rows: within
// bf16 rounding of the CPU reference, not bit-identical to the exact kernel (the tensor-core path
// ran: its sums are reordered), for one and two head groups, slot counts that leave partial chunks
// and splits, a record with a large scale, and slots all masked (the sink alone: zeros). Fewer
// heads (8: a tensor-parallel shard's) run the few-heads kernel on mma.sync, checked the same way.
TEST_F(CudaOps, FastModeAttendsOverRecordsOnTheTensorCores) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const int64_t entries = 700;
  const std::vector<uint8_t> page = RandomRecordPage(entries, 61);
  const float scale = 1.0f / std::sqrt(512.0f);
  for (int64_t heads : {64, 128, 8}) {
    const std::vector<float> q = Random(heads * 512, 62, 1.0f), sink = Random(heads, 63, 1.0f);
    for (int64_t n : {1, 63, 640, 1153}) {
      const std::vector<kernels::KvSlot> slots = RecordSlots(page, entries, n);
      std::vector<float> got = Poisoned(heads * 512), exact = got, host = got;
      (*fast)->SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, got.data());
      ASSERT_TRUE((*fast)->Health().ok()) << (*fast)->Health();
      gpu_->SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, exact.data());
      cpu().SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, host.data());
      EXPECT_LE(RelErr(got, host), kBf16Tol) << "heads " << heads << " n " << n;
      if (n >= 63)
        EXPECT_LT(FracIdentical(got, exact), 1.0) << "heads " << heads << " n " << n << ": the exact kernel ran";
    }
    // A record with a large scale (2^13: values to 3.7e6) still agrees with the CPU.
    std::vector<uint8_t> wide = page;
    wide[entries * cuda::kRecordData + 37 * cuda::kRecordScales + 2] = 127 + 13;
    for (int64_t n : {64, 640}) {
      const std::vector<kernels::KvSlot> slots = RecordSlots(wide, entries, n);  // slot 1 is entry 37
      std::vector<float> got = Poisoned(heads * 512), host = got;
      (*fast)->SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, got.data());
      cpu().SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), scale, host.data());
      EXPECT_LE(RelErr(got, host), kBf16Tol) << "heads " << heads << " n " << n << ", a scale of 2^13";
    }
    const std::vector<kernels::KvSlot> none(5);  // every slot masked
    std::vector<float> got = Poisoned(heads * 512), host = got;
    (*fast)->SparseAttentionRecords(q.data(), heads, 512, 64, none, sink.data(), scale, got.data());
    cpu().SparseAttentionRecords(q.data(), heads, 512, 64, none, sink.data(), scale, host.data());
    EXPECT_EQ(std::memcmp(got.data(), host.data(), got.size() * 4), 0) << "heads " << heads << ", all masked";
  }
}

// Rows attended together (one staging, one launch): the exact backend gives each row the bits of
// its own call; fast mode agrees with the CPU within bf16 rounding. Rows of different lengths
// (padded with masked slots), a row with no slots (the sink alone), 1 and 9 rows; a batch with an
// fp32 row among its slots takes the per-row path and still agrees.
TEST_F(CudaOps, RowsAttendedTogetherEqualOneCallPerRow) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const int64_t entries = 700, heads = 64;
  const std::vector<uint8_t> page = RandomRecordPage(entries, 71);
  const std::vector<float> sink = Random(heads, 72, 1.0f), extra = Random(512, 73, 1.0f);
  const float scale = 1.0f / std::sqrt(512.0f);
  for (int64_t b : {1, 9}) {
    for (bool with_row : {false, true}) {
      std::vector<std::vector<kernels::KvSlot>> slots(b);
      std::vector<std::vector<float>> q(b);
      for (int64_t i = 0; i < b; ++i) {
        slots[i] = RecordSlots(page, entries, i == 3 ? 0 : 40 + 97 * i);
        q[i] = Random(heads * 512, 74 + static_cast<uint32_t>(i), 1.0f);
      }
      if (with_row) slots[b - 1][0] = kernels::KvSlot{nullptr, nullptr, extra.data()};
      for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
        std::vector<std::vector<float>> got(b, Poisoned(heads * 512)), alone(b, Poisoned(heads * 512));
        std::vector<AttentionRow> rows(b);
        for (int64_t i = 0; i < b; ++i) rows[i] = {q[i].data(), slots[i], got[i].data()};
        be->SparseAttentionRows(rows, heads, 512, 64, sink.data(), scale);
        ASSERT_TRUE(be->Health().ok()) << be->Health();
        // The rows' queries and outputs as slices of two activation buffers (page-locked: copied
        // straight, the adjacent slices in one transfer each way): the same bits.
        model::Scratch qs(b * heads * 512), os(b * heads * 512, NAN);
        for (int64_t i = 0; i < b; ++i) {
          std::copy(q[i].begin(), q[i].end(), qs.begin() + i * heads * 512);
          rows[i].q = qs.data() + i * heads * 512;
          rows[i].out = os.data() + i * heads * 512;
        }
        be->SparseAttentionRows(rows, heads, 512, 64, sink.data(), scale);
        ASSERT_TRUE(be->Health().ok()) << be->Health();
        for (int64_t i = 0; i < b; ++i)
          EXPECT_EQ(std::memcmp(os.data() + i * heads * 512, got[i].data(), heads * 512 * 4), 0)
              << be->name() << " b " << b << " row " << i << " from activation buffers";
        for (int64_t i = 0; i < b; ++i) {
          be->SparseAttentionRecords(q[i].data(), heads, 512, 64, slots[i], sink.data(), scale, alone[i].data());
          std::vector<float> host = Poisoned(heads * 512);
          cpu().SparseAttentionRecords(q[i].data(), heads, 512, 64, slots[i], sink.data(), scale, host.data());
          const std::string what = std::string(be->name()) + " b " + std::to_string(b) + " row " + std::to_string(i) +
                                   (with_row ? " (an fp32 row in the batch)" : "");
          EXPECT_LE(RelErr(got[i], host), kBf16Tol) << what;
          if (be == gpu_) EXPECT_EQ(std::memcmp(got[i].data(), alone[i].data(), got[i].size() * 4), 0) << what;
        }
      }
    }
  }
}

// A grouped projection (wo_a) in one call: every group's Linear on its columns, the same bits as a
// Linear per group on gathered columns — exact (and the CPU's) and fast, dense bf16 groups as
// V4's wo_a and FP8 ones, 1 and 5 rows, and wo_a-sized dense groups (the GEMV below 4 rows);
// groups of different shapes are a clear error.
TEST_F(CudaOps, LinearGroupsEqualALinearPerGroup) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const int64_t G = 3, k = 256, m = 128;
  for (WeightFormat format : {WeightFormat::kDense, WeightFormat::kFp8Block128})
    for (int64_t n : {1, 5}) {
      std::vector<WeightMatrix> w;
      for (int64_t g = 0; g < G; ++g) w.push_back(RandomWeight(format, m, k, 120 + static_cast<uint32_t>(g)));
      const std::vector<float> x = Random(n * G * k, 130 + static_cast<uint32_t>(n), 1.0f);
      auto per_group = [&](const Backend& be) {  // the default: be's Linear per group on gathered columns
        std::vector<float> y = Poisoned(n * G * m);
        be.Backend::LinearGroups(w, x.data(), n, y.data(), Rounding::kBf16);
        return y;
      };
      const std::vector<float> host = per_group(cpu());
      for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
        std::vector<float> got = Poisoned(n * G * m);
        be->LinearGroups(w, x.data(), n, got.data(), Rounding::kBf16);
        ASSERT_TRUE(be->Health().ok()) << be->Health();
        const std::vector<float> want = per_group(*be);
        const std::string what = std::string(be->name()) + " n " + std::to_string(n) +
                                 (format == WeightFormat::kDense ? " dense" : " fp8");
        EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << what;
        if (be == gpu_) EXPECT_EQ(std::memcmp(got.data(), host.data(), got.size() * 4), 0) << what << " vs the CPU";
      }
    }
  // wo_a's shape class: dense groups of >= 4M values, which fast mode sends to cuBLASLt from 4 rows
  // and to one grouped GEMV launch below (fp32 sums in another order: within fp32 rounding of the
  // CPU before the bf16 rounding; here unrounded).
  {
    const int64_t big_k = 4096, big_m = 1024;
    std::vector<WeightMatrix> w;
    for (int64_t g = 0; g < G; ++g) w.push_back(RandomWeight(WeightFormat::kDense, big_m, big_k, 150 + static_cast<uint32_t>(g)));
    for (int64_t n : {1, 2, 3, 4}) {
      const std::vector<float> x = Random(n * G * big_k, 160 + static_cast<uint32_t>(n), 1.0f);
      std::vector<float> want = Poisoned(n * G * big_m), got = want;
      cpu().LinearGroups(w, x.data(), n, want.data(), Rounding::kNone);
      (*fast)->LinearGroups(w, x.data(), n, got.data(), Rounding::kNone);
      EXPECT_LE(RelErr(got, want), kFp32Tol) << "dense groups of 1024 x 4096, n " << n;
    }
    ASSERT_TRUE((*fast)->Health().ok()) << (*fast)->Health();
  }
  cuda::CudaBackendOptions opt;
  auto bad = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(bad.ok());
  const std::vector<WeightMatrix> mixed = {RandomWeight(WeightFormat::kDense, m, k, 140),
                                           RandomWeight(WeightFormat::kDense, m, 128, 141)};
  const std::vector<float> x = Random(2 * k, 142, 1.0f);
  std::vector<float> y = Poisoned(2 * m);
  (*bad)->LinearGroups(mixed, x.data(), 1, y.data(), Rounding::kBf16);
  EXPECT_EQ((*bad)->Health().code(), absl::StatusCode::kInvalidArgument) << (*bad)->Health();
  EXPECT_NE((*bad)->Health().message().find("w[1]"), std::string::npos) << (*bad)->Health();
}

// Ops that ride on an op's output (LinearThen, AttentionRow::then) run on the device before it
// comes back: the same bits as the separate calls, on both backends (and, exact, the CPU's).
// Attention rows whose ops differ only in their angles run them merged; a batch with one row
// without ops runs them row by row. A malformed op is a clear, sticky error.
TEST_F(CudaOps, OpsAfterAnOpRunOnTheDeviceWithTheSameBits) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const int64_t heads = 4, dim = 128, n = 3;
  const WeightMatrix w = RandomWeight(WeightFormat::kFp8Block128, heads * dim, 256, 91);
  const std::vector<float> x = Random(n * 256, 92, 1.0f), cs = Random(n * 32, 93, 1.0f), sn = Random(n * 32, 94, 1.0f);
  const kernels::RowOp then[] = {kernels::RowOp::HeadRmsNormBf16(dim, 1e-6f),
                                 kernels::RowOp::Rope(dim, dim - 64, 64, cs.data(), sn.data(), heads, false),
                                 kernels::RowOp::Hadamard(dim), kernels::RowOp::Fp4RoundTrip(32)};
  auto separate = [&](const Backend& be) {
    std::vector<float> y = Poisoned(n * heads * dim);
    be.Linear(w, x.data(), n, y.data(), Rounding::kBf16);
    be.HeadRmsNormBf16(y.data(), n * heads, dim, 1e-6f);
    be.Rope(y.data(), n * heads, dim, dim - 64, 64, cs.data(), sn.data(), heads, false);
    be.Hadamard(y.data(), n * heads, dim);
    be.Fp4RoundTrip(y.data(), n * heads * dim, 32);
    return y;
  };
  const std::vector<float> host = separate(cpu());
  for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
    std::vector<float> got = Poisoned(n * heads * dim);
    be->LinearThen(w, x.data(), n, got.data(), Rounding::kBf16, then);
    ASSERT_TRUE(be->Health().ok()) << be->Health();
    const std::vector<float> want = separate(*be);
    EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << be->name() << ": LinearThen";
    if (be == gpu_) EXPECT_EQ(std::memcmp(got.data(), host.data(), got.size() * 4), 0) << "exact LinearThen vs the CPU";
  }
  // The window KV's chain (kv_norm with its weight, RoPE on the last 64 dims, the FP8 round trip
  // of the 448 nope dims) after wkv, 1 and 3 rows.
  {
    const int64_t D = 512, nope = 448;
    const WeightMatrix wkv = RandomWeight(WeightFormat::kFp8Block128, D, 256, 191);
    const std::vector<float> norm = Random(D, 192, 0.5f), kcs = Random(3 * 32, 193, 1.0f), ksn = Random(3 * 32, 194, 1.0f);
    for (int64_t rows : {int64_t{1}, int64_t{3}}) {
      const kernels::RowOp kv_then[] = {kernels::RowOp::RmsNorm(D, norm.data(), 1e-6f),
                                        kernels::RowOp::Rope(D, nope, 64, kcs.data(), ksn.data(), 1, false),
                                        kernels::RowOp::Fp8RoundTripPrefix(D, nope, 64)};
      auto kv_separate = [&](const Backend& be) {
        std::vector<float> raw = Poisoned(rows * D), y = Poisoned(rows * D);
        be.Linear(wkv, x.data(), rows, raw.data(), Rounding::kBf16);
        be.RmsNorm(raw.data(), norm.data(), rows, D, 1e-6f, y.data());
        be.Rope(y.data(), rows, D, nope, 64, kcs.data(), ksn.data(), 1, false);
        for (int64_t i = 0; i < rows; ++i) be.Fp8RoundTrip(y.data() + i * D, nope, 64);
        return y;
      };
      const std::vector<float> kv_host = kv_separate(cpu());
      for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
        std::vector<float> got = Poisoned(rows * D);
        be->LinearThen(wkv, x.data(), rows, got.data(), Rounding::kBf16, kv_then);
        ASSERT_TRUE(be->Health().ok()) << be->Health();
        const std::vector<float> want = kv_separate(*be);
        EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << be->name() << ": window KV, " << rows;
        if (be == gpu_)
          EXPECT_EQ(std::memcmp(got.data(), kv_host.data(), got.size() * 4), 0) << "exact window KV vs the CPU, " << rows;
      }
    }
  }
  // Attention rows, each output's RoPE undone with its own angles.
  const int64_t ah = 64, entries = 300, b = 5;
  const std::vector<uint8_t> page = RandomRecordPage(entries, 95);
  const std::vector<float> sink = Random(ah, 96, 1.0f), acs = Random(b * 32, 97, 1.0f), asn = Random(b * 32, 98, 1.0f);
  const float scale = 1.0f / std::sqrt(512.0f);
  std::vector<std::vector<kernels::KvSlot>> slots(b);
  std::vector<std::vector<float>> q(b);
  std::vector<kernels::RowOp> inverse(b);
  for (int64_t i = 0; i < b; ++i) {
    slots[i] = RecordSlots(page, entries, 30 + 50 * i);
    q[i] = Random(ah * 512, 99 + static_cast<uint32_t>(i), 1.0f);
    inverse[i] = kernels::RowOp::Rope(512, 448, 64, acs.data() + i * 32, asn.data() + i * 32, ah, true);
  }
  for (bool all : {true, false})  // all rows with ops (merged), or row 2 without (row by row)
    for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
      std::vector<std::vector<float>> got(b, Poisoned(ah * 512)), want(b, Poisoned(ah * 512));
      std::vector<AttentionRow> with(b), without(b);
      for (int64_t i = 0; i < b; ++i) {
        const bool ops = all || i != 2;
        with[i] = {q[i].data(), slots[i], got[i].data(),
                   ops ? std::span<const kernels::RowOp>(&inverse[i], 1) : std::span<const kernels::RowOp>()};
        without[i] = {q[i].data(), slots[i], want[i].data()};
      }
      be->SparseAttentionRows(with, ah, 512, 64, sink.data(), scale);
      be->SparseAttentionRows(without, ah, 512, 64, sink.data(), scale);
      for (int64_t i = 0; i < b; ++i)
        if (all || i != 2) be->Rope(want[i].data(), ah, 512, 448, 64, acs.data() + i * 32, asn.data() + i * 32, ah, true);
      ASSERT_TRUE(be->Health().ok()) << be->Health();
      for (int64_t i = 0; i < b; ++i)
        EXPECT_EQ(std::memcmp(got[i].data(), want[i].data(), got[i].size() * 4), 0)
            << be->name() << (all ? " merged" : " row by row") << ", row " << i;
    }
  cuda::CudaBackendOptions opt;
  auto bad = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(bad.ok());
  const kernels::RowOp zero[] = {kernels::RowOp::Hadamard(0)};
  std::vector<float> y = Poisoned(n * heads * dim);
  (*bad)->LinearThen(w, x.data(), n, y.data(), Rounding::kBf16, zero);
  EXPECT_EQ((*bad)->Health().code(), absl::StatusCode::kInvalidArgument) << (*bad)->Health();
  EXPECT_NE((*bad)->Health().message().find("then[0].width"), std::string::npos) << (*bad)->Health();
}

// Pages the worker names (KvSlot::page) are read from the backend's KV reserve: uploaded when new
// or written, found in place after. The results are the staged path's bit for bit (the same
// kernels over the same records). A page whose bytes change under the same version keeps serving
// the reserve's copy — which shows the reserve was read (EntryPages gives every write a new
// version; this breaks that contract on purpose) — and a new version is uploaded. A reserve
// smaller than a call's pages stages that call, correctly.
TEST_F(CudaOps, AttentionReadsNamedPagesFromTheKvReserve) {
  const int64_t heads = 64, num_pages = 12;
  std::vector<std::vector<uint8_t>> bytes(num_pages);
  std::vector<std::unique_ptr<kernels::KvPage>> pages;  // stable addresses, as EntryPages keeps them
  for (int64_t p = 0; p < num_pages; ++p) {
    bytes[p] = RandomRecordPage(64, 100 + static_cast<uint32_t>(p));
    pages.push_back(std::make_unique<kernels::KvPage>());
    pages[p]->bytes = bytes[p].data();
    pages[p]->size = 64 * cuda::kRecordBytes;
    pages[p]->entries = 64;
    pages[p]->version = kernels::NewKvPageVersion();
  }
  // Slots over the first `over` pages (page 0 always among them), every eleventh masked.
  auto slots_of = [&](int64_t n, uint32_t seed, int64_t over) {
    std::mt19937 g(seed);
    std::vector<kernels::KvSlot> slots(n);
    for (int64_t j = 0; j < n; ++j) {
      if (j % 11 == 5) continue;
      const int64_t p = j == 0 ? 0 : g() % over, e = g() % 64;
      slots[j] = {bytes[p].data() + e * cuda::kRecordData, bytes[p].data() + 64 * cuda::kRecordData + e * cuda::kRecordScales,
                  nullptr, pages[p].get(), static_cast<int32_t>(e)};
    }
    return slots;
  };
  const std::vector<float> sink = Random(heads, 81, 1.0f);
  const float scale = 1.0f / std::sqrt(512.0f);
  const std::vector<int64_t> lengths = {1, 64, 0, 200, 640};
  std::vector<std::vector<float>> q;
  for (size_t i = 0; i < lengths.size(); ++i) q.push_back(Random(heads * 512, 82 + static_cast<uint32_t>(i), 1.0f));
  // One call for every row; staged: the same slots without their pages.
  auto attend = [&](const Backend& be, const std::vector<std::vector<kernels::KvSlot>>& slots, bool staged) {
    std::vector<std::vector<kernels::KvSlot>> use = slots;
    if (staged)
      for (auto& row : use)
        for (kernels::KvSlot& s : row) s.page = nullptr;
    std::vector<std::vector<float>> out(use.size(), Poisoned(heads * 512));
    std::vector<AttentionRow> rows;
    for (size_t i = 0; i < use.size(); ++i) rows.push_back({q[i].data(), use[i], out[i].data()});
    be.SparseAttentionRows(rows, heads, 512, 64, sink.data(), scale);
    EXPECT_TRUE(be.Health().ok()) << be.Health();
    return out;
  };
  auto same = [](const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
    for (size_t i = 0; i < a.size(); ++i)
      if (std::memcmp(a[i].data(), b[i].data(), a[i].size() * 4) != 0) return false;
    return true;
  };
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  cuda::CudaBackendOptions small_opt;
  small_opt.kv_reserve_bytes = 2 * 3 * 64 * cuda::kRecordBytes;  // three record pages (half is the keys')
  auto small = cuda::NewCudaBackend(small_opt);
  ASSERT_TRUE(small.ok()) << small.status();
  for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get()),
                            static_cast<const Backend*>(small->get())}) {
    const bool tiny = be == small->get();
    // Over every page (the small reserve cannot hold a call's pages: staged), then over two.
    for (int64_t over : {num_pages, int64_t{2}}) {
      const std::string what = std::string(be->name()) + (tiny ? " (3-page reserve)" : "") + " over " + std::to_string(over) + " pages";
      std::vector<std::vector<kernels::KvSlot>> slots;
      for (size_t i = 0; i < lengths.size(); ++i) slots.push_back(slots_of(lengths[i], 90 + static_cast<uint32_t>(i), over));
      const auto first = attend(*be, slots, false), staged = attend(*be, slots, true), again = attend(*be, slots, false);
      EXPECT_TRUE(same(first, staged)) << what;
      EXPECT_TRUE(same(again, staged)) << what << ", pages found in place";
      for (size_t i = 0; i < first.size(); ++i) {
        std::vector<float> host = Poisoned(heads * 512);
        cpu().SparseAttentionRecords(q[i].data(), heads, 512, 64, slots[i], sink.data(), scale, host.data());
        EXPECT_LE(RelErr(first[i], host), kBf16Tol) << what << " row " << i;
      }
      // Page 0's bytes replaced under its old version: the reserve still serves its copy (where
      // the call fits in it); staging reads the new bytes.
      const std::vector<uint8_t> original = bytes[0];
      const std::vector<uint8_t> other = RandomRecordPage(64, 999);
      std::copy(other.begin(), other.end(), bytes[0].begin());
      const auto stale = attend(*be, slots, false), fresh = attend(*be, slots, true);
      EXPECT_FALSE(same(fresh, staged)) << what << ": page 0 is read";
      const bool fits = !tiny || over <= 3;
      EXPECT_TRUE(same(stale, fits ? staged : fresh)) << what << (fits ? ": the reserve's copy" : ": staged");
      pages[0]->version = kernels::NewKvPageVersion();  // the write announced: uploaded again
      EXPECT_TRUE(same(attend(*be, slots, false), fresh)) << what << ", after a new version";
      std::copy(original.begin(), original.end(), bytes[0].begin());
      pages[0]->version = kernels::NewKvPageVersion();
    }
    // What the metrics show: the reserve's size, its copies, hits and uploads.
    const kernels::KvReserveStats st = be->ReserveStats();
    EXPECT_EQ(st.records.slots, tiny ? 3 : st.records.bytes / (64 * cuda::kRecordBytes)) << be->name();
    EXPECT_EQ(st.records.bytes, st.records.slots * 64 * cuda::kRecordBytes);
    EXPECT_GT(st.records.uploads, 0) << be->name();
    EXPECT_GT(st.records.hits, 0) << be->name();
    EXPECT_GT(st.records.held, 0);
    EXPECT_LE(st.records.held, st.records.slots);
  }
}



// `pages` pages of 64 random 584-B records as the KV writer lays them out (FP8 codes, never NaN;
// scale bytes first_scale .. first_scale + 5 for the FP8 blocks, 0 for the rope block; rope dims
// bf16 of N(0, 1)) and the fp32 rows they decode to.
struct RecordPages {
  std::vector<uint8_t> bytes;
  std::vector<float> rows;
};
RecordPages RandomRecordPages(int64_t pages, uint32_t seed, int first_scale) {
  const int64_t B = 64, entries = B * pages;
  std::mt19937 g(seed);
  RecordPages out{std::vector<uint8_t>(pages * B * cuda::kRecordBytes), std::vector<float>(entries * cuda::kRecordDim)};
  for (int64_t e = 0; e < entries; ++e) {
    uint8_t* page = out.bytes.data() + (e / B) * B * cuda::kRecordBytes;
    uint8_t* data = page + (e % B) * cuda::kRecordData;
    uint8_t* scales = page + B * cuda::kRecordData + (e % B) * cuda::kRecordScales;
    float* row = out.rows.data() + e * cuda::kRecordDim;
    for (int s = 0; s < 7; ++s) scales[s] = static_cast<uint8_t>(first_scale + g() % 6);
    scales[7] = 0;
    for (int d = 0; d < cuda::kRecordNope; ++d) {
      uint8_t c = static_cast<uint8_t>(g());
      if ((c & 0x7f) == 0x7f) c &= 0xfe;  // no NaN codes
      data[d] = c;
      row[d] = num::E4m3ToFloat(c) * num::E8m0ToFloat(scales[d / 64]);
    }
    for (int r = 0; r < cuda::kRecordRope; ++r) {
      const uint16_t bits = num::FloatToBf16Bits(std::normal_distribution<float>(0, 1)(g));
      data[cuda::kRecordNope + 2 * r] = bits & 0xff;
      data[cuda::kRecordNope + 2 * r + 1] = bits >> 8;
      row[cuda::kRecordNope + r] = num::Bf16BitsToFloat(bits);
    }
  }
  return out;
}

// The paged 584-B FP8 record kernels against the CPU op on the records' decoded rows: the exact
// kernel and the tensor-core one, on shapes that give one split (the block writes the output) and
// several (the combine kernel merges them), a partial last chunk, two head groups, masked slots
// and a token whose slots are all masked (the sink alone: output 0).
TEST_F(CudaOps, PagedFp8RecordsAttentionMatchesDecodedRows) {
  const int64_t B = 64, pages = 12, entries = B * pages;
  std::mt19937 g(41);
  const RecordPages records = RandomRecordPages(pages, 41, 120);
  const std::vector<uint8_t>& mem = records.bytes;
  const std::vector<float>& rows = records.rows;
  uint8_t* d_pages = nullptr;
  ASSERT_EQ(cudaMalloc(&d_pages, mem.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_pages, mem.data(), mem.size(), cudaMemcpyHostToDevice), cudaSuccess);
  struct Case { int64_t batch, n, heads; };
  // 64 and 128 heads: the warpgroup kernel (with one split and with many); 16, 8, 32, 24 and 1
  // (tensor-parallel shards and odd counts): the few-heads kernel, its slots split when the batch is small.
  for (const Case& c : {Case{3, 640, 64}, Case{1, 37, 64}, Case{5, 200, 128}, Case{70, 130, 64}, Case{64, 640, 16},
                        Case{3, 640, 8}, Case{300, 100, 16}, Case{5, 200, 32}, Case{2, 37, 24}, Case{4, 150, 1}}) {
    const int64_t batch = c.batch, n = c.n, heads = c.heads;
    const std::vector<float> q = Random(batch * heads * 512, 42 + n, 0.05f), sink = Random(heads, 43, 1.0f);
    std::vector<int32_t> idx(batch * n);
    for (int32_t& i : idx) i = g() % 9 == 0 ? -1 : static_cast<int32_t>(g() % entries);
    if (batch > 1) std::fill(idx.begin(), idx.begin() + n, -1);  // token 0: every slot masked
    const float scale = 1.0f / std::sqrt(512.0f);
    std::vector<float> want(batch * heads * 512);
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<const float*> slots(n);
      for (int64_t j = 0; j < n; ++j) slots[j] = idx[b * n + j] < 0 ? nullptr : rows.data() + idx[b * n + j] * 512;
      cpu().SparseAttention(q.data() + b * heads * 512, heads, 512, slots, sink.data(), scale, want.data() + b * heads * 512);
    }
    float *d_q = nullptr, *d_sink = nullptr, *d_out = nullptr;
    int32_t* d_idx = nullptr;
    void* ws = nullptr;
    ASSERT_EQ(cudaMalloc(&d_q, q.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_sink, sink.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_out, want.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_idx, idx.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&ws, cuda::PagedSparseAttentionFp8FastWorkspace(batch, heads, n)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_q, q.data(), q.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_sink, sink.data(), sink.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_idx, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    const std::string shape = "batch " + std::to_string(batch) + " n " + std::to_string(n) + " heads " + std::to_string(heads);
    std::vector<float> exact_out;
    for (bool tensor_cores : {false, true}) {
      const char* name = tensor_cores ? "tensor-core kernel, " : "exact kernel, ";
      ASSERT_EQ(cudaMemset(d_out, 0xff, want.size() * 4), cudaSuccess);  // NaN poison
      ASSERT_EQ(tensor_cores ? cuda::PagedSparseAttentionFp8Fast(d_q, batch, heads, d_pages, B, d_idx, n, d_sink, scale,
                                                                 d_out, ws, nullptr)
                             : cuda::PagedSparseAttentionFp8(d_q, batch, heads, d_pages, B, d_idx, n, d_sink, scale, d_out,
                                                             nullptr),
                cudaSuccess);
      std::vector<float> got(want.size());
      ASSERT_EQ(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_LE(RelErr(got, want), kBf16Tol) << name << shape;
      if (!tensor_cores) {
        exact_out = got;
      } else {  // how close to the reference's bits (information: the kernels reorder fp32 sums)
        int64_t same = 0;
        for (size_t i = 0; i < got.size(); ++i) same += got[i] == exact_out[i];
        std::printf("%s: tensor-core kernel equals the exact one in %.4f of the outputs\n", shape.c_str(),
                    double(same) / got.size());
      }
      if (batch > 1)
        for (int64_t i = 0; i < heads * 512; ++i) ASSERT_EQ(got[i], 0.0f) << "all-masked token, " << name << shape;
      if (tensor_cores) {  // again on the same workspace: the same bits (no state carried between calls)
        ASSERT_EQ(cudaMemset(d_out, 0xff, want.size() * 4), cudaSuccess);
        ASSERT_EQ(cuda::PagedSparseAttentionFp8Fast(d_q, batch, heads, d_pages, B, d_idx, n, d_sink, scale, d_out, ws, nullptr),
                  cudaSuccess);
        std::vector<float> again(want.size());
        ASSERT_EQ(cudaMemcpy(again.data(), d_out, again.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        ASSERT_EQ(std::memcmp(again.data(), got.data(), got.size() * 4), 0) << "second call, " << shape;
      }
    }
    for (void* p : {static_cast<void*>(d_q), static_cast<void*>(d_sink), static_cast<void*>(d_out), static_cast<void*>(d_idx), ws})
      cudaFree(p);
  }
  cudaFree(d_pages);
}

// The few-heads kernel splits a token's slots over more blocks the fewer tokens there are (one
// block a token and head group fills no GPU). Each split starts from the running maximum the
// reference's single pass has at its first chunk (the scores pass), so P rounds to bf16 exactly as
// there: a token alone (10 splits of one chunk) gives what it gives in a batch of 264 (one split),
// but for the order of the fp32 sums — a handful of bf16 ties. A split starting from its own
// maximum rounds P differently and changes about a fifth of the outputs' last bits.
TEST_F(CudaOps, FewHeadsSplitsRoundPAsTheSinglePass) {
  const int64_t B = 64, pages = 16, entries = B * pages, heads = 16, n = 640, big = 264;
  const std::vector<uint8_t> mem = RandomRecordPages(pages, 7, 118).bytes;
  std::mt19937 g(7);
  const std::vector<float> q1 = Random(heads * 512, 5, 2.0f), sink = Random(heads, 6, 1.0f);
  std::vector<int32_t> idx1(n);
  for (int32_t& i : idx1) i = g() % 11 == 0 ? -1 : static_cast<int32_t>(g() % entries);
  std::vector<float> qb(big * heads * 512);
  std::vector<int32_t> idxb(big * n);
  for (int64_t b = 0; b < big; ++b) {
    std::copy(q1.begin(), q1.end(), qb.begin() + b * heads * 512);
    std::copy(idx1.begin(), idx1.end(), idxb.begin() + b * n);
  }
  uint8_t* d_pages = nullptr;
  float *d_q = nullptr, *d_sink = nullptr, *d_out = nullptr;
  int32_t* d_idx = nullptr;
  void* ws = nullptr;
  ASSERT_EQ(cudaMalloc(&d_pages, mem.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_q, qb.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_sink, sink.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_out, qb.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_idx, idxb.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&ws, std::max(cuda::PagedSparseAttentionFp8FastWorkspace(1, heads, n),
                                     cuda::PagedSparseAttentionFp8FastWorkspace(big, heads, n))),
            cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_pages, mem.data(), mem.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_q, qb.data(), qb.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_sink, sink.data(), sink.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_idx, idxb.data(), idxb.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  const float scale = 1.0f / std::sqrt(512.0f);
  auto attend = [&](int64_t batch) {
    std::vector<float> got(batch * heads * 512);
    EXPECT_EQ(cudaMemset(d_out, 0xff, got.size() * 4), cudaSuccess);  // NaN poison
    EXPECT_EQ(cuda::PagedSparseAttentionFp8Fast(d_q, batch, heads, d_pages, B, d_idx, n, d_sink, scale, d_out, ws, nullptr),
              cudaSuccess);
    EXPECT_EQ(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return got;
  };
  const std::vector<float> alone = attend(1), batched = attend(big);
  int64_t same = 0;
  double worst = 0;
  for (int64_t i = 0; i < heads * 512; ++i) {
    ASSERT_FALSE(std::isnan(alone[i])) << i;
    same += alone[i] == batched[i];
    worst = std::max(worst, std::abs(double(alone[i]) - batched[i]) / std::max(1e-30, std::abs(double(batched[i]))));
  }
  const double frac = double(same) / (heads * 512);
  std::printf("few-heads kernel, a token alone vs in a batch of %lld: %.5f identical, worst rel diff %.3g\n",
              static_cast<long long>(big), frac, worst);
  EXPECT_GE(frac, 0.99);
  EXPECT_LE(worst, 1.0 / 128);  // at most one bf16 step apart
  for (void* p : {static_cast<void*>(d_pages), static_cast<void*>(d_q), static_cast<void*>(d_sink),
                  static_cast<void*>(d_out), static_cast<void*>(d_idx), ws})
    cudaFree(p);
}

}  // namespace
}  // namespace flashmem::kernels
