// The KV reserve's patches on the CUDA backend: a page written once since its device copy (a
// decode step's window entry, a compressed entry appended) is patched in place with the entry
// the write changed instead of being uploaded whole; attention then reads what the staged path
// reads, bit for bit. Written twice between reads, the page goes whole. Also what the device
// writes into the host's state after an op: KV records (WriteRecords) and compressor rings
// (PoolSteps). Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "worker/kv/entry_pages.h"

namespace flashmem::kernels {
namespace {

// A KV row as the model writes it: bf16 values, the nope dims through the FP8 round trip.
std::vector<float> ModelKvRow(std::mt19937& g) {
  std::vector<float> row(512);
  for (float& v : row) v = num::RoundBf16(std::normal_distribution<float>(0.0f, 1.0f)(g));
  CpuBackend().Fp8RoundTrip(row.data(), 448, 64);
  return row;
}

TEST_F(CudaOps, AnEntryWrittenOnceSinceItsCopyPatchesTheReserve) {
  const int64_t heads = 64;
  auto be = cuda::NewCudaBackend({});
  ASSERT_TRUE(be.ok()) << be.status();
  std::mt19937 g(17);
  kv::EntryPages window(kv::PageFormat::MainKv(512, 64), /*encoded=*/true),
      compressed(kv::PageFormat::MainKv(512, 64), /*encoded=*/true);
  for (int e = 0; e < 128; ++e) window.Append(ModelKvRow(g).data());
  for (int e = 0; e < 70; ++e) compressed.Append(ModelKvRow(g).data());
  const std::vector<float> q = Random(heads * 512, 18, 1.0f), sink = Random(heads, 19, 1.0f);
  const float scale = 1.0f / std::sqrt(512.0f);
  // One row over the window's 128 entries and the compressed ones; staged: the same slots without
  // their pages (every record copied by this call).
  auto attend = [&](bool staged) {
    std::vector<KvSlot> slots;
    for (int64_t j = 0; j < window.size(); ++j) slots.push_back(window.Slot(j));
    for (int64_t j = 0; j < compressed.size(); ++j) slots.push_back(compressed.Slot(j));
    if (staged)
      for (KvSlot& s : slots) s.page = nullptr;
    std::vector<float> out = Poisoned(heads * 512);
    const AttentionRow row{q.data(), slots, out.data()};
    (*be)->SparseAttentionRows(std::span<const AttentionRow>(&row, 1), heads, 512, 64, sink.data(), scale);
    EXPECT_TRUE((*be)->Health().ok()) << (*be)->Health();
    return out;
  };
  auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
  };
  const std::vector<float> first = attend(false);
  EXPECT_TRUE(same(first, attend(true)));
  const KvReserveStats s0 = (*be)->ReserveStats();
  EXPECT_EQ(s0.records.uploads, 4);  // two window pages, two compressed ones
  EXPECT_EQ(s0.records.patches, 0);

  // A decode step: one window entry overwritten, one compressed entry appended (page 1 of the
  // compressed stream had 6): two pages patched, none uploaded, and the new entries are read.
  window.Overwrite(77, ModelKvRow(g).data());
  compressed.Append(ModelKvRow(g).data());
  ASSERT_TRUE(window.encoded() && compressed.encoded()) << "rows off the FP8 grid";
  const std::vector<float> patched = attend(false), staged = attend(true);
  EXPECT_TRUE(same(patched, staged)) << "rel err " << RelErr(patched, staged);
  EXPECT_FALSE(same(patched, first)) << "the new entries were not read";
  const KvReserveStats s1 = (*be)->ReserveStats();
  EXPECT_EQ(s1.records.patches, s0.records.patches + 2);
  EXPECT_EQ(s1.records.uploads, s0.records.uploads);

  // Two writes to one page between reads: that page goes whole, and the result is still right.
  window.Overwrite(3, ModelKvRow(g).data());
  window.Overwrite(4, ModelKvRow(g).data());
  const std::vector<float> whole = attend(false);
  EXPECT_TRUE(same(whole, attend(true)));
  const KvReserveStats s2 = (*be)->ReserveStats();
  EXPECT_EQ(s2.records.uploads, s1.records.uploads + 1);
  EXPECT_EQ(s2.records.patches, s1.records.patches);
  // Read again unchanged: every page in place.
  EXPECT_TRUE(same(attend(false), whole));
  EXPECT_EQ((*be)->ReserveStats().records.uploads, s2.records.uploads);
  EXPECT_EQ((*be)->ReserveStats().records.patches, s2.records.patches);
}

// WriteRecords on the device: the window rows an op made (held there) become their records in
// the reserve's copy of each page — read by the next attention with no upload or patch — and
// reach the host pages by FinishWrites, or before any op reads those pages on the host (a staged
// attention). The bytes are the host encoder's, bit for bit; a row off the grid makes its stream
// fp32 rows as on the host. Both modes, since exact and fast mode encode alike.
TEST_F(CudaOps, RecordsWrittenOnTheDeviceAreTheHostEncodersBytes) {
  for (bool exact : {true, false}) {
    cuda::CudaBackendOptions o;
    o.exact = exact;
    auto be = cuda::NewCudaBackend(o);
    ASSERT_TRUE(be.ok()) << be.status();
    const Backend& dev = **be;
    std::mt19937 g(23);
    const kv::PageFormat f = kv::PageFormat::MainKv(512, 64);
    kv::EntryPages on_device(f, true), on_host(f, true);
    for (int e = 0; e < 128; ++e) {
      const std::vector<float> row = ModelKvRow(g);
      on_device.Append(row.data());
      on_host.Append(row.data());
    }
    const int64_t heads = 16;
    const std::vector<float> q = Random(heads * 512, 29, 1.0f), sink = Random(heads, 31, 1.0f);
    auto attend = [&](const kv::EntryPages& w, bool staged) {
      std::vector<KvSlot> slots;
      for (int64_t j = 0; j < w.size(); ++j) slots.push_back(w.Slot(j));
      if (staged)
        for (KvSlot& s : slots) s.page = nullptr;
      std::vector<float> out = Poisoned(heads * 512);
      const AttentionRow row{q.data(), slots, out.data()};
      dev.SparseAttentionRows(std::span<const AttentionRow>(&row, 1), heads, 512, 64, sink.data(), 0.0625f);
      EXPECT_TRUE(dev.Health().ok()) << dev.Health();
      return out;
    };
    auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      return std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
    };
    (void)attend(on_device, false);  // both window pages into the reserve
    // A step's rows as the model makes them, written by an op into a held buffer (so read in
    // place), with a zero block, signed zeros, e4m3 subnormals and large values among them.
    auto step = [&](std::span<const int64_t> entries, bool odd_row) {
      const int64_t n = static_cast<int64_t>(entries.size());
      std::vector<float> rows(n * 512);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<float> r = ModelKvRow(g);
        if (i == 1) std::fill(r.begin() + 64, r.begin() + 128, 0.0f);
        if (i == 2) r[3] = -0.0f, r[200] = -0.0f;
        if (i == 3) {  // a block scaled 2^-40 whose other values are e4m3 subnormals
          r[128] = 448.0f * std::ldexp(1.0f, -40);
          for (int j = 129; j < 192; ++j) r[j] = std::ldexp(static_cast<float>(j % 8) * (j % 3 ? 1.0f : -1.0f), -49);
        }
        if (i == 4) r[300] = 448.0f * 1024.0f;
        if (i == 4) CpuBackend().Fp8RoundTrip(r.data() + 256, 64, 64);
        if (odd_row && i == n - 1) r[5] = std::numeric_limits<float>::infinity();
        std::copy(r.begin(), r.end(), rows.begin() + i * 512);
      }
      dev.HoldOnDevice(rows.data(), n * 512);
      dev.RoundBf16(rows.data(), n * 512, rows.data());  // an op writes them: the twin is current
      std::vector<RecordWrite> w_dev, w_host;
      for (int64_t i = 0; i < n; ++i) {
        w_dev.push_back({rows.data() + i * 512, &on_device, entries[i]});
        w_host.push_back({rows.data() + i * 512, &on_host, entries[i]});
      }
      const int64_t waits = dev.DeviceWaits();
      dev.WriteRecords(w_dev, 512, 64);
      EXPECT_EQ(dev.DeviceWaits(), waits) << "WriteRecords waited for the device";
      dev.ReleaseFromDevice(rows.data(), /*keep=*/true);
      CpuBackend().WriteRecords(w_host, 512, 64);
      EXPECT_TRUE(dev.Health().ok()) << dev.Health();
    };
    // One entry a page, as a decode step writes the window: written in place in the reserve.
    const KvReserveStats s0 = dev.ReserveStats();
    const int64_t one_a_page[] = {10, 100};
    step(one_a_page, false);
    const KvReserveStats s1 = dev.ReserveStats();
    EXPECT_EQ(s1.records.written, s0.records.written + 2);
    EXPECT_EQ(s1.records.uploads, s0.records.uploads);
    EXPECT_EQ(s1.records.patches, s0.records.patches);
    // The attention reads the device's records before the host has them, then the staged path
    // (records from the host pages: they take the pending bytes first), then the host's stream.
    const std::vector<float> in_reserve = attend(on_device, false);
    EXPECT_EQ(dev.ReserveStats().records.uploads, s1.records.uploads) << "the written pages were sent again";
    EXPECT_TRUE(same(in_reserve, attend(on_device, true))) << "rel err " << RelErr(in_reserve, attend(on_device, true));
    EXPECT_TRUE(same(in_reserve, attend(on_host, false)));
    // Several entries a page, special values among them: bytes equal after FinishWrites.
    const int64_t several[] = {0, 1, 2, 3, 4, 63, 64, 65, 127, 20, 90};
    step(several, false);
    const int64_t waits = dev.DeviceWaits();
    dev.FinishWrites();
    EXPECT_EQ(dev.DeviceWaits(), waits + 1) << "FinishWrites waits once for what is pending";
    dev.FinishWrites();
    EXPECT_EQ(dev.DeviceWaits(), waits + 1) << "nothing pending: no wait";
    ASSERT_TRUE(on_device.encoded() && on_host.encoded()) << "rows off the grid";
    for (int64_t p = 0; p < 2; ++p) {
      const KvPage &a = *on_device.Slot(p * 64).page, &b = *on_host.Slot(p * 64).page;
      ASSERT_EQ(a.size, b.size);
      EXPECT_EQ(std::memcmp(a.bytes, b.bytes, a.size), 0) << "page " << p << (exact ? " exact" : " fast");
    }
    EXPECT_TRUE(same(attend(on_device, false), attend(on_host, false))) << (exact ? "exact" : "fast");
    // A row off the grid (an infinity): both streams turn to fp32 rows with the same values.
    const int64_t last[] = {30, 31};
    step(last, true);
    dev.FinishWrites();
    EXPECT_FALSE(on_device.encoded());
    EXPECT_FALSE(on_host.encoded());
    EXPECT_TRUE(on_device.fell_back_to_fp32());
    std::vector<float> a(512), b(512);
    for (int64_t e = 0; e < 128; ++e) {
      ASSERT_TRUE(on_device.ReadRow(e, a.data()) && on_host.ReadRow(e, b.data()));
      ASSERT_TRUE(same(a, b)) << "entry " << e;
    }
    ASSERT_TRUE(on_device.ReadRow(31, a.data()));
    EXPECT_TRUE(std::isinf(a[5]));
  }
}

// Sessions' compressor rings as worker/model's CompressorState holds them.
struct Rings {
  std::vector<std::vector<float>> kv, score;
  std::vector<uint64_t> version;
  Rings(int m, const PoolShape& sh)
      : kv(m, std::vector<float>(sh.slots() * sh.width(), 0.0f)),
        score(m, std::vector<float>(sh.slots() * sh.width(), -std::numeric_limits<float>::infinity())),
        version(m) {
    for (uint64_t& v : version) v = NewKvPageVersion();
  }
  PoolRing ring(int s) { return {kv[s].data(), score[s].data(), &version[s]}; }
};

// PoolSteps on the device: the projections an op made (held) pooled where they are, on the
// backend's copies of the rings — the host's pooled rows and rings bit for bit (the rings after
// FinishWrites), without a wait. Shapes of V4's CSA main and index compressors (ratio 4,
// overlapping) and of HCA (ratio 128); five sessions a step at staggered positions, so each call
// mixes completing and pending blocks. Midway a ring written on the host (its version renewed) is
// uploaded again, and a call whose inputs are on the host runs there after the pending rows land.
TEST_F(CudaOps, CompressorStepsOnTheDeviceAreTheHostsBits) {
  struct Case {
    int ratio;
    int64_t head_dim;
    bool overlap;
  };
  for (const Case c : {Case{4, 512, true}, Case{4, 128, true}, Case{128, 512, false}}) {
    SCOPED_TRACE(::testing::Message() << "ratio " << c.ratio << " head_dim " << c.head_dim);
    auto be = cuda::NewCudaBackend({});
    ASSERT_TRUE(be.ok()) << be.status();
    const Backend& dev = **be;
    const std::vector<float> ape = Random(c.ratio * (c.overlap ? 2 : 1) * c.head_dim, 41, 0.5f);
    const PoolShape shape{c.ratio, c.head_dim, c.overlap, ape.data()};
    const int m = 5;
    const int64_t W = shape.width(), d = c.head_dim;
    Rings on_device(m, shape), on_host(m, shape);
    std::vector<float> kv(m * W), score(m * W);  // the op's outputs, held
    dev.HoldOnDevice(kv.data(), m * W);
    dev.HoldOnDevice(score.data(), m * W);
    const int iters = 2 * c.ratio + 3;
    int64_t pooled_rows = 0;
    for (int t = 0; t < iters; ++t) {
      const std::vector<float> kv_src = Random(m * W, 100 + t, 1.0f), score_src = Random(m * W, 500 + t, 2.0f);
      const bool on_the_host = t == 5;  // this call's inputs are not the device's
      if (!on_the_host) {
        dev.RoundBf16(kv_src.data(), m * W, kv.data());  // an op writes them: the twins are current
        dev.RoundBf16(score_src.data(), m * W, score.data());
      }
      int completing = 0;
      for (int s = 0; s < m; ++s) completing += (t + s + 1) % c.ratio == 0;
      std::vector<float> pooled_dev(completing * d), pooled_host(completing * d);
      dev.HoldOnDevice(pooled_dev.data(), completing * d);
      std::vector<PoolStep> dev_steps, host_steps;
      int row = 0;
      for (int s = 0; s < m; ++s) {
        const int64_t pos = t + s;  // session s is s tokens ahead
        const bool completes = (pos + 1) % c.ratio == 0;
        const float* k_in = on_the_host ? kv_src.data() : kv.data();
        const float* s_in = on_the_host ? score_src.data() : score.data();
        dev_steps.push_back({on_device.ring(s), k_in + s * W, s_in + s * W, pos,
                             completes ? pooled_dev.data() + row * d : nullptr});
        host_steps.push_back({on_host.ring(s), kv_src.data() + s * W, score_src.data() + s * W, pos,
                              completes ? pooled_host.data() + row * d : nullptr});
        row += completes;
      }
      const int64_t waits = dev.DeviceWaits(), ran = cuda::DevicePoolStepsOf(dev);
      dev.PoolSteps(dev_steps, shape);
      if (on_the_host) {
        EXPECT_EQ(cuda::DevicePoolStepsOf(dev), ran) << "inputs on the host: pooled there";
      } else {
        // The first call grows the staging buffer for the rings' uploads (a wait, once).
        if (t > 0) EXPECT_EQ(dev.DeviceWaits(), waits) << "PoolSteps waited for the device at step " << t;
        EXPECT_EQ(cuda::DevicePoolStepsOf(dev), ran + m);
      }
      CpuBackend().PoolSteps(host_steps, shape);
      dev.ReleaseFromDevice(pooled_dev.data(), /*keep=*/true);
      ASSERT_TRUE(dev.Health().ok()) << dev.Health();
      EXPECT_EQ(std::memcmp(pooled_dev.data(), pooled_host.data(), pooled_dev.size() * 4), 0) << "step " << t;
      pooled_rows += completing;
      if (t % 7 == 6 || t == iters - 1 || t == iters / 2) {
        dev.FinishWrites();
        for (int s = 0; s < m; ++s) {
          ASSERT_EQ(std::memcmp(on_device.kv[s].data(), on_host.kv[s].data(), on_host.kv[s].size() * 4), 0)
              << "ring " << s << " kv at step " << t;
          ASSERT_EQ(std::memcmp(on_device.score[s].data(), on_host.score[s].data(), on_host.score[s].size() * 4), 0)
              << "ring " << s << " scores at step " << t;
        }
      }
      if (t == iters / 2) {  // a write elsewhere (a restore): new values, a new version
        for (Rings* r : {&on_device, &on_host}) {
          for (float& v : r->score[2]) v = std::isinf(v) ? v : v * 0.5f;
          r->version[2] = NewKvPageVersion();
        }
      }
    }
    EXPECT_GE(pooled_rows, 2 * m);
    dev.ReleaseFromDevice(kv.data(), false);
    dev.ReleaseFromDevice(score.data(), false);
  }
}

}  // namespace
}  // namespace flashmem::kernels
