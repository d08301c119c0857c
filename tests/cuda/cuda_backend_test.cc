// Every CUDA op against its CPU reference op on fresh random inputs, outputs poisoned (NaN) before
// each run; error = ||cuda - cpu|| / ||cpu||: fp32 outputs 1e-5, bf16-rounded outputs 4e-3; ops whose
// arithmetic is the CPU's operation for operation must be bit-identical. GPU cases skip (never
// faked) without a CUDA device; the device-selection errors are checked everywhere.
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
#include "kernels/cuda/host_gather.h"
#include "kernels/cuda/op_phases.h"
#include "kernels/device.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "worker/model/scratch.h"

namespace flashmem::kernels {
namespace {

// A routed-expert layer: FP4 and FP8 experts, rows routed to several experts, one expert without
// rows; y starts non-zero (the op accumulates).
struct ExpertLayer {
  std::vector<WeightMatrix> w;  // 3 per expert: w1, w3, w2
  std::vector<ExpertWork> work;
};
ExpertLayer RandomExperts(int64_t n, int64_t dim, int64_t inter, uint32_t seed, bool mixed = true);

WeightMatrix RandomWeight(WeightFormat f, int64_t rows, int64_t cols, uint32_t seed, bool bf16 = true) {
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

ExpertLayer RandomExperts(int64_t n, int64_t dim, int64_t inter, uint32_t seed, bool mixed) {
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
void* Upload(const void* p, size_t bytes) {
  void* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, p, bytes, cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}

// A WeightMatrix in the device layout the kernels read (values and scales freed by the caller).
cuda::DeviceWeight DeviceCopy(const WeightMatrix& w) {
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

// Candidate lists with masked slots, a fully masked block of 64, and none at all.
std::vector<const float*> Slots(const std::vector<float>& kv, int64_t rows, int64_t dim, int64_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<const float*> s(n);
  for (int64_t j = 0; j < n; ++j) {
    const bool masked = (j >= 64 && j < 128) || g() % 7 == 0;
    s[j] = masked ? nullptr : kv.data() + (g() % rows) * dim;
  }
  return s;
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
// heads keep the exact kernel.
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
      if (heads % 64 == 0 && n >= 63)
        EXPECT_LT(FracIdentical(got, exact), 1.0) << "heads " << heads << " n " << n << ": the exact kernel ran";
      if (heads % 64 != 0) EXPECT_EQ(std::memcmp(got.data(), exact.data(), got.size() * 4), 0) << "n " << n;
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
// V4's wo_a and FP8 ones, 1 and 5 rows; groups of different shapes are a clear error.
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

// The paged 584-B FP8 record kernels against the CPU op on the records' decoded rows: the exact
// kernel and the tensor-core one, on shapes that give one split (the block writes the output) and
// several (the combine kernel merges them), a partial last chunk, two head groups, masked slots
// and a token whose slots are all masked (the sink alone: output 0).
TEST_F(CudaOps, PagedFp8RecordsAttentionMatchesDecodedRows) {
  const int64_t B = 64, pages = 12, entries = B * pages;
  std::mt19937 g(41);
  std::vector<uint8_t> mem(pages * B * cuda::kRecordBytes);
  std::vector<float> rows(entries * cuda::kRecordDim);
  for (int64_t e = 0; e < entries; ++e) {
    uint8_t* page = mem.data() + (e / B) * B * cuda::kRecordBytes;
    uint8_t* data = page + (e % B) * cuda::kRecordData;
    uint8_t* scales = page + B * cuda::kRecordData + (e % B) * cuda::kRecordScales;
    for (int s = 0; s < 7; ++s) scales[s] = static_cast<uint8_t>(120 + g() % 6);
    scales[7] = 0;
    for (int d = 0; d < cuda::kRecordNope; ++d) {
      uint8_t c = static_cast<uint8_t>(g());
      if ((c & 0x7f) == 0x7f) c &= 0xfe;  // no NaN codes
      data[d] = c;
      rows[e * 512 + d] = num::E4m3ToFloat(c) * num::E8m0ToFloat(scales[d / 64]);
    }
    for (int r = 0; r < cuda::kRecordRope; ++r) {
      const uint16_t bits = num::FloatToBf16Bits(std::normal_distribution<float>(0, 1)(g));
      data[cuda::kRecordNope + 2 * r] = bits & 0xff;
      data[cuda::kRecordNope + 2 * r + 1] = bits >> 8;
      rows[e * 512 + cuda::kRecordNope + r] = num::Bf16BitsToFloat(bits);
    }
  }
  uint8_t* d_pages = nullptr;
  ASSERT_EQ(cudaMalloc(&d_pages, mem.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_pages, mem.data(), mem.size(), cudaMemcpyHostToDevice), cudaSuccess);
  struct Case { int64_t batch, n, heads; };
  for (const Case& c : {Case{3, 640, 64}, Case{1, 37, 64}, Case{5, 200, 128}, Case{70, 130, 64}}) {
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

// The backend's fast modes: quantized Linear through the decode GEMV (< 16 tokens, FP4) and, from
// 16 tokens, FP8 weights on the bf16 tensor cores (dequantized; fp32 sums: fp32-rounding close)
// or, in fast-fp8, cuBLASLt's block-scaled FP8 GEMM (K blocks padded in the scale layout; ~1e-4);
// dense bf16 weights through cuBLASLt's bf16 GEMM from 4 tokens, or of >= 4M elements at any count
// (2048 x 2048; tokens padded to 4): a router's 16 x 4096 at 64 tokens, 7 rows (cuBLASLt may refuse
// that layout: the exact kernel then).
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
      cuda::DeviceWeight dwb = dw;
      dwb.scale_exps = static_cast<const uint8_t*>(Upload(exps.data(), exps.size()));
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
      const cuda::GemvGroup groups[7] = {
          {codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + 2 * n * rows, dwb.scale_exps},
          {codes, dw.scales, dw.scale_cols, rows, cols, xq, xs, n, y + 3 * n * rows, dwb.scale_exps},
          {codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 4 * n * rows, dwb.scale_exps, xh},
          {codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 5 * n * rows, dwb.scale_exps, xh},
          {codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 6 * n * rows, dwb.scale_exps, xh},
          {codes, dw.scales, dw.scale_cols, rows, cols, nullptr, xs2, n, y + 7 * n * rows, dwb.scale_exps, xh},
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
      for (const void* p : {dw.values, static_cast<const void*>(dw.scales), static_cast<const void*>(dwb.scale_exps),
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

}  // namespace
}  // namespace flashmem::kernels
