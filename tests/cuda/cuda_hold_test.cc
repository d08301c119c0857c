// Held buffers (Backend::HoldOnDevice) on the CUDA backend: the residual stream's chain of ops
// keeps its values on the device — the host copy is not written until synced — and every result
// is the CPU reference's bits (the exact backend); the attention's held queries and outputs; ops
// that do not wait for their kernels; several projections of one input in one call, and chains of
// row ops on hc_pre and on host rows; ranges crossing a held buffer's edge, outputs covering part
// of one, and release with and without its values. Skipped without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"

namespace flashmem::kernels {
namespace {

// A backend that honours holds of any size (the default since 2026-11-30; named so the tests keep
// their meaning if the default changes).
const Backend& Holding() {
  static Backend* be = [] {
    cuda::CudaBackendOptions opt;
    opt.min_hold_bytes = 0;
    auto b = cuda::NewCudaBackend(opt);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? b->release() : nullptr;
  }();
  return *be;
}

bool AllNan(const float* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isnan(p[i])) return false;
  return true;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// Two sublayers of a block, as model::Block runs them: hc_pre -> norm -> (a stand-in body) ->
// hc_post into `next`, swap. With holds the host never sees next or u until synced.
TEST_F(CudaOps, HeldResidualStreamStaysOnTheDeviceWithTheSameBits) {
  const int hc = 4;
  const int64_t dim = 256, n = 3, k = hc * dim, mix = (2 + hc) * hc;
  const std::vector<float> x0 = Random(n * k, 71, 1.0f), fn = Random(mix * k, 72, 0.02f), base = Random(mix, 73, 0.5f),
                           scale = Random(3, 74, 0.5f), norm = Random(dim, 75, 0.1f), body = Random(n * dim, 76, 1.0f);
  auto run = [&](const Backend& be, bool hold, std::vector<float>* x_out, bool* next_stayed) {
    std::vector<float> X = x0, next = Poisoned(n * k), u = Poisoned(n * dim), xn = Poisoned(n * dim),
                       post = Poisoned(n * hc), comb = Poisoned(n * hc * hc), f(n * dim);
    if (hold) {
      be.HoldOnDevice(X.data(), n * k);
      be.HoldOnDevice(next.data(), n * k);
      be.HoldOnDevice(u.data(), n * dim);
    }
    for (int sub = 0; sub < 2; ++sub) {
      be.HcPre(X.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, u.data(), post.data(),
               comb.data());
      be.RmsNorm(u.data(), norm.data(), n, dim, 1e-6f, xn.data());
      for (int64_t i = 0; i < n * dim; ++i) f[i] = num::RoundBf16(xn[i] * body[i]);  // the host reads xn: not held
      be.HcPost(f.data(), X.data(), post.data(), comb.data(), n, hc, dim, next.data());
      if (sub == 0 && next_stayed) *next_stayed = AllNan(next.data(), next.size()) && AllNan(u.data(), u.size());
      X.swap(next);
    }
    if (hold) {
      be.SyncToHost(X.data());
      be.ReleaseFromDevice(X.data(), true);
      be.ReleaseFromDevice(next.data(), false);
      be.ReleaseFromDevice(u.data(), false);
    }
    *x_out = X;
  };
  std::vector<float> want, got, unheld;
  bool stayed = false;
  run(cpu(), false, &want, nullptr);
  run(*gpu_, false, &unheld, nullptr);
  run(Holding(), true, &got, &stayed);
  EXPECT_TRUE(stayed) << "hc_post's output and hc_pre's u reached the host while held";
  EXPECT_TRUE(SameBits(unheld, want));
  EXPECT_TRUE(SameBits(got, want)) << "rel err " << RelErr(got, want);
}

// A buffer of 4 rows with rows 1..2 held: an in-place op over rows 0..1 crosses the edge (the held
// rows come back first, and the op's result lands on the host), ops inside read what the host
// or the device last wrote, an op writing only row 1 leaves row 2 as it was; release with `keep`
// brings the values back, without it the host keeps what it had.
TEST_F(CudaOps, HeldRangesCrossedOrPartlyWrittenKeepTheirValues) {
  const int64_t dim = 256, rows = 4;
  const std::vector<float> init = Random(rows * dim, 81, 1.0f), w = Random(dim, 82, 0.1f);
  auto run = [&](const Backend& be, bool hold) {
    std::vector<float> buf = init;
    float* row = buf.data();
    if (hold) be.HoldOnDevice(row + dim, 2 * dim);
    be.Hadamard(row + dim, 2, dim);                              // inside: the result stays on the device
    be.Hadamard(row, 2, dim);                                    // rows 0..1: crosses the edge
    be.RmsNorm(row + dim, w.data(), 2, dim, 1e-6f, row);         // reads rows 1..2 (host-written row 1)
    be.RmsNorm(row + 3 * dim, w.data(), 1, dim, 1e-6f, row + dim);  // writes row 1 only
    be.Hadamard(row + 2 * dim, 1, dim);                          // row 2 alone, inside
    if (hold) be.ReleaseFromDevice(row + dim, true);
    return buf;
  };
  const std::vector<float> want = run(cpu(), false), got = run(Holding(), true);
  EXPECT_TRUE(SameBits(got, want)) << "rel err " << RelErr(got, want);

  // Dropped: the host keeps its own values (the device's are never copied back).
  const Backend& be = Holding();
  std::vector<float> buf = init;
  be.HoldOnDevice(buf.data(), rows * dim);
  be.Hadamard(buf.data(), rows, dim);
  be.ReleaseFromDevice(buf.data(), false);
  EXPECT_TRUE(SameBits(buf, init));
  // A hold over a range another overlaps replaces it; an unknown pointer is ignored.
  be.HoldOnDevice(buf.data(), rows * dim);
  be.HoldOnDevice(buf.data() + dim, dim);
  be.ReleaseFromDevice(buf.data() + dim, false);
  be.ReleaseFromDevice(buf.data(), true);
  be.SyncToHost(buf.data() + 2 * dim);
  EXPECT_TRUE(SameBits(buf, init));
  EXPECT_TRUE(be.Health().ok()) << be.Health();
}

// The attention's chain as model::Attention runs it with q and o held: q written by an op, each
// row's query and output a slice of the held buffers (the adjacent slices read and written in
// place, as one array each), the output read by the grouped wo_a. The host copies stay as they were
// (q's original values, o's NaN) and every result has the unheld chain's bits.
TEST_F(CudaOps, HeldQueriesAndAttentionOutputsStayOnTheDeviceWithTheSameBits) {
  const int64_t heads = 64, dim = 512, b = 9, entries = 700, groups = 8, rank = 64, width = heads * dim;
  const std::vector<uint8_t> page = RandomRecordPage(entries, 101);
  const std::vector<float> q0 = Random(b * width, 102, 1.0f), sink = Random(heads, 103, 1.0f);
  std::vector<WeightMatrix> wo(groups);
  for (int64_t g = 0; g < groups; ++g) {
    wo[g].rows = rank;
    wo[g].cols = width / groups;
    wo[g].values = Random(rank * wo[g].cols, 104 + static_cast<uint32_t>(g), 0.02f);
  }
  std::vector<std::vector<KvSlot>> slots(b);
  for (int64_t i = 0; i < b; ++i) slots[i] = RecordSlots(page, entries, i == 2 ? 0 : 100 + 61 * i);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  auto run = [&](const Backend& be, bool hold, bool* stayed) {
    std::vector<float> q = q0, o = Poisoned(b * width), z = Poisoned(b * groups * rank);
    if (hold) {
      be.HoldOnDevice(q.data(), b * width);
      be.HoldOnDevice(o.data(), b * width);
    }
    be.Hadamard(q.data(), b * heads, dim);  // stands in for wq_b and its row ops
    std::vector<AttentionRow> rows(b);
    for (int64_t i = 0; i < b; ++i) rows[i] = {q.data() + i * width, slots[i], o.data() + i * width};
    be.SparseAttentionRows(rows, heads, dim, 64, sink.data(), scale);
    be.LinearGroups(wo, o.data(), b, z.data(), Rounding::kBf16);
    if (stayed) *stayed = std::memcmp(q.data(), q0.data(), q.size() * 4) == 0 && AllNan(o.data(), o.size());
    if (hold) {
      be.ReleaseFromDevice(q.data(), false);
      be.ReleaseFromDevice(o.data(), false);
    }
    return z;
  };
  bool stayed = false;
  const std::vector<float> want = run(*gpu_, false, nullptr), got = run(Holding(), true, &stayed);
  EXPECT_TRUE(stayed) << "q's or o's device values reached the host while held";
  EXPECT_TRUE(SameBits(got, want)) << "rel err " << RelErr(got, want);
  EXPECT_FALSE(AllNan(want.data(), want.size()));
  EXPECT_TRUE(Holding().Health().ok()) << Holding().Health();
}

// Ops whose every output is held return without waiting for their kernels: a run of them, each
// staging a host array the caller rewrites as soon as the op returns, still gives every op the
// values it was called with (the next op waits for the last one's uploads before reusing the
// staging buffer), and the results are the CPU's bits.
TEST_F(CudaOps, OpsOnHeldOutputsThatDoNotWaitStillReadWhatTheyWereGiven) {
  const int64_t dim = 512, n = 8, runs = 24;
  const std::vector<float> x = Random(n * dim, 121, 1.0f);
  std::vector<float> held_x = x;
  std::vector<std::vector<float>> outs(runs, Poisoned(n * dim));
  const Backend& be = Holding();
  be.HoldOnDevice(held_x.data(), n * dim);
  for (auto& o : outs) be.HoldOnDevice(o.data(), n * dim);
  std::vector<float> w(dim);
  for (int64_t i = 0; i < runs; ++i) {
    w = Random(dim, 200 + static_cast<uint32_t>(i), 0.5f);  // rewritten the moment the last op returned
    be.RmsNorm(held_x.data(), w.data(), n, dim, 1e-6f, outs[i].data());
  }
  for (auto& o : outs) be.ReleaseFromDevice(o.data(), true);
  be.ReleaseFromDevice(held_x.data(), false);
  ASSERT_TRUE(be.Health().ok()) << be.Health();
  for (int64_t i = 0; i < runs; ++i) {
    std::vector<float> want(n * dim);
    const std::vector<float> wi = Random(dim, 200 + static_cast<uint32_t>(i), 0.5f);
    cpu().RmsNorm(x.data(), wi.data(), n, dim, 1e-6f, want.data());
    EXPECT_TRUE(SameBits(outs[i], want)) << "op " << i << ": rel err " << RelErr(outs[i], want);
  }
}

// An attention layer's projections of one x in one call (Backend::LinearMany: wq_a into a held
// buffer, wkv with its chain, a compressor's fp32 projections, the indexer's bf16 weights with
// their scale as a row op, held too): the
// same bits as a LinearThen per job on the same backend — and, exact, the CPU's — at 1 and 5
// rows; the held output stays on the device until synced. Jobs of another width are a clear error.
TEST_F(CudaOps, ProjectionsOfOneInputInOneCallEqualTheSeparateCalls) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const int64_t k = 256, D = 512, nope = 448;
  const WeightMatrix wq_a = RandomWeight(WeightFormat::kFp8Block128, 384, k, 301),
                     wkv = RandomWeight(WeightFormat::kFp8Block128, D, k, 302),
                     ckv = RandomWeight(WeightFormat::kDense, 256, k, 303),
                     cgate = RandomWeight(WeightFormat::kDense, 256, k, 304),
                     wproj = RandomWeight(WeightFormat::kDense, 64, k, 305);
  const std::vector<float> norm = Random(D, 306, 0.5f), cs = Random(5 * 32, 307, 1.0f), sn = Random(5 * 32, 308, 1.0f);
  for (int64_t n : {int64_t{1}, int64_t{5}}) {
    const std::vector<float> x = Random(n * k, 310 + static_cast<uint32_t>(n), 1.0f);
    const kernels::RowOp kv_then[] = {kernels::RowOp::RmsNorm(D, norm.data(), 1e-6f),
                                      kernels::RowOp::Rope(D, nope, 64, cs.data(), sn.data(), 1, false),
                                      kernels::RowOp::Fp8RoundTripPrefix(D, nope, 64)};
    const kernels::RowOp w_then[] = {kernels::RowOp::ScaleBf16(static_cast<float>(1.0 / std::sqrt(128.0 * 64.0)))};
    struct Out {
      std::vector<float> qa, kv, c, g, w;
    };
    auto jobs_into = [&](Out& o) {
      o = {Poisoned(n * 384), Poisoned(n * D), Poisoned(n * 256), Poisoned(n * 256), Poisoned(n * 64)};
      return std::vector<LinearJob>{{&wq_a, o.qa.data(), Rounding::kBf16, {}},
                                    {&wkv, o.kv.data(), Rounding::kBf16, kv_then},
                                    {&ckv, o.c.data(), Rounding::kNone, {}},
                                    {&cgate, o.g.data(), Rounding::kNone, {}},
                                    {&wproj, o.w.data(), Rounding::kBf16, w_then}};
    };
    auto same = [](const Out& a, const Out& b) {
      return SameBits(a.qa, b.qa) && SameBits(a.kv, b.kv) && SameBits(a.c, b.c) && SameBits(a.g, b.g) &&
             SameBits(a.w, b.w);
    };
    Out host;
    const std::vector<LinearJob> host_jobs = jobs_into(host);
    for (const LinearJob& j : host_jobs) cpu().LinearThen(*j.w, x.data(), n, j.y, j.out, j.then);
    for (const Backend* be : {&Holding(), static_cast<const Backend*>(fast->get())}) {
      const std::string what = std::string(be->name()) + ", " + std::to_string(n) + " rows";
      Out want, got;
      const std::vector<LinearJob> separate = jobs_into(want), together = jobs_into(got);
      for (const LinearJob& j : separate) be->LinearThen(*j.w, x.data(), n, j.y, j.out, j.then);
      be->HoldOnDevice(got.qa.data(), n * 384);
      be->HoldOnDevice(got.w.data(), n * 64);
      be->LinearMany(together, x.data(), n);
      ASSERT_TRUE(be->Health().ok()) << be->Health();
      EXPECT_TRUE(AllNan(got.qa.data(), got.qa.size())) << what << ": the held output reached the host unasked";
      be->ReleaseFromDevice(got.qa.data(), true);
      be->ReleaseFromDevice(got.w.data(), true);
      EXPECT_TRUE(same(got, want)) << what;
      if (be == &Holding()) EXPECT_TRUE(same(got, host)) << what << " against the CPU";
    }
  }
  cuda::CudaBackendOptions opt;
  auto bad = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(bad.ok());
  const WeightMatrix narrow = RandomWeight(WeightFormat::kDense, 64, 128, 320);
  const std::vector<float> x = Random(k, 321, 1.0f);
  std::vector<float> a = Poisoned(384), b = Poisoned(64);
  const LinearJob mixed[] = {{&wq_a, a.data(), Rounding::kBf16, {}}, {&narrow, b.data(), Rounding::kBf16, {}}};
  (*bad)->LinearMany(mixed, x.data(), 1);
  EXPECT_EQ((*bad)->Health().code(), absl::StatusCode::kInvalidArgument) << (*bad)->Health();
  EXPECT_NE((*bad)->Health().message().find("jobs[1].w"), std::string::npos) << (*bad)->Health();
  EXPECT_TRUE(AllNan(a.data(), a.size())) << "a refused call wrote an output";
}

// hc_pre with the sublayer's RMSNorm riding on it (HcPreThen), and a compressor's finishing chain
// on host rows (RowOps: the norm, RoPE, then Hadamard + FP4 or the FP8 round trip of the nope
// dims) in one call each: the same bits as the separate calls on the same backend and, exact, the
// CPU's; held mixes stay on the device. A malformed op is a clear error naming `ops`.
TEST_F(CudaOps, ChainsOnHcPreAndOnHostRowsEqualTheSeparateCalls) {
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const int hc = 4;
  const int64_t dim = 256, n = 3, mix = (2 + hc) * hc;
  const std::vector<float> x = Random(n * hc * dim, 401, 1.0f), fn = Random(mix * hc * dim, 402, 0.02f),
                           base = Random(mix, 403, 0.5f), scale = Random(3, 404, 0.5f), norm = Random(dim, 405, 0.1f);
  const RowOp normed[] = {RowOp::RmsNorm(dim, norm.data(), 1e-6f)};
  auto separate = [&](const Backend& be, std::vector<float>* y, std::vector<float>* post, std::vector<float>* comb) {
    std::vector<float> u = Poisoned(n * dim);
    *y = Poisoned(n * dim);
    *post = Poisoned(n * hc);
    *comb = Poisoned(n * hc * hc);
    be.HcPre(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, u.data(), post->data(),
             comb->data());
    be.RmsNorm(u.data(), norm.data(), n, dim, 1e-6f, y->data());
  };
  std::vector<float> hy, hp, hcomb;
  separate(cpu(), &hy, &hp, &hcomb);
  // Finishing chains over m pooled rows: the indexer's (128 dims, Hadamard + FP4) and the main
  // compressor's (512 dims, FP8 round trip of the 448 nope dims).
  const int64_t m = 5;
  const std::vector<float> cs = Random(m * 32, 406, 1.0f), sn = Random(m * 32, 407, 1.0f);
  struct Chain {
    int64_t d;
    bool rotate;
  };
  auto finish_separate = [&](const Backend& be, const Chain& c, const std::vector<float>& pooled,
                             const std::vector<float>& w) {
    std::vector<float> out = Poisoned(m * c.d);
    be.RmsNorm(pooled.data(), w.data(), m, c.d, 1e-6f, out.data());
    be.Rope(out.data(), m, c.d, c.d - 64, 64, cs.data(), sn.data(), 1, false);
    if (c.rotate) {
      be.Hadamard(out.data(), m, c.d);
      be.Fp4RoundTrip(out.data(), m * c.d, 32);
    } else {
      for (int64_t i = 0; i < m; ++i) be.Fp8RoundTrip(out.data() + i * c.d, c.d - 64, 64);
    }
    return out;
  };
  auto finish_chain = [&](const Backend& be, const Chain& c, const std::vector<float>& pooled,
                          const std::vector<float>& w) {
    std::vector<float> out = pooled;
    std::vector<RowOp> ops = {RowOp::RmsNorm(c.d, w.data(), 1e-6f),
                              RowOp::Rope(c.d, c.d - 64, 64, cs.data(), sn.data(), 1, false)};
    if (c.rotate) {
      ops.push_back(RowOp::Hadamard(c.d));
      ops.push_back(RowOp::Fp4RoundTrip(32));
    } else {
      ops.push_back(RowOp::Fp8RoundTripPrefix(c.d, c.d - 64, 64));
    }
    be.RowOps(out.data(), m * c.d, ops);
    return out;
  };
  for (const Backend* be : {&Holding(), static_cast<const Backend*>(fast->get())}) {
    const std::string what = be->name();
    std::vector<float> wy, wp, wc;
    separate(*be, &wy, &wp, &wc);
    std::vector<float> y = Poisoned(n * dim), post = Poisoned(n * hc), comb = Poisoned(n * hc * hc);
    be->HoldOnDevice(post.data(), n * hc);
    be->HoldOnDevice(comb.data(), n * hc * hc);
    be->HcPreThen(x.data(), n, fn.data(), base.data(), scale.data(), hc, dim, 20, 1e-6f, 1e-6f, y.data(), post.data(),
                  comb.data(), normed);
    ASSERT_TRUE(be->Health().ok()) << be->Health();
    EXPECT_TRUE(AllNan(post.data(), post.size()) && AllNan(comb.data(), comb.size()))
        << what << ": held mixes reached the host unasked";
    be->ReleaseFromDevice(post.data(), true);
    be->ReleaseFromDevice(comb.data(), true);
    EXPECT_TRUE(SameBits(y, wy) && SameBits(post, wp) && SameBits(comb, wc)) << what << ": HcPreThen";
    if (be == &Holding()) EXPECT_TRUE(SameBits(y, hy) && SameBits(post, hp) && SameBits(comb, hcomb)) << "vs the CPU";
    for (const Chain& c : {Chain{128, true}, Chain{512, false}}) {
      const std::vector<float> pooled = Random(m * c.d, 410 + static_cast<uint32_t>(c.d), 1.0f),
                               w = Random(c.d, 411 + static_cast<uint32_t>(c.d), 0.5f);
      const std::vector<float> got = finish_chain(*be, c, pooled, w);
      ASSERT_TRUE(be->Health().ok()) << be->Health();
      EXPECT_TRUE(SameBits(got, finish_separate(*be, c, pooled, w))) << what << ": RowOps, " << c.d << " dims";
      if (be == &Holding())
        EXPECT_TRUE(SameBits(got, finish_separate(cpu(), c, pooled, w))) << "RowOps vs the CPU, " << c.d << " dims";
    }
  }
  cuda::CudaBackendOptions opt;
  auto bad = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(bad.ok());
  std::vector<float> v = Random(2 * 96, 420, 1.0f);
  const RowOp not_pow2[] = {RowOp::Hadamard(96)};
  (*bad)->RowOps(v.data(), static_cast<int64_t>(v.size()), not_pow2);
  EXPECT_EQ((*bad)->Health().code(), absl::StatusCode::kInvalidArgument) << (*bad)->Health();
  EXPECT_NE((*bad)->Health().message().find("ops[0].width"), std::string::npos) << (*bad)->Health();
}

// RoundBf16 on the device has the host's bits — ties to even, NaN quieted with its payload's
// high bits, infinities, overflow to infinity, subnormals, -0 — out of place, and in place on a
// held buffer (the MoE's sum rounded into the sublayer's output).
TEST_F(CudaOps, RoundBf16HasTheHostsBits) {
  std::mt19937 g(111);
  std::vector<float> x(4099);
  for (float& v : x) v = std::bit_cast<float>(static_cast<uint32_t>(g()));
  const uint32_t specials[] = {0x3f808000u, 0x3f818000u, 0x7fc00001u, 0xffa00001u, 0x7f800000u, 0xff800000u,
                               0x7f7fffffu, 0x00012345u, 0x80000000u, 0x00000000u, 0x3f7fffffu};
  for (size_t i = 0; i < std::size(specials); ++i) x[7 * i] = std::bit_cast<float>(specials[i]);
  std::vector<float> want = Poisoned(x.size()), got = Poisoned(x.size());
  cpu().RoundBf16(x.data(), static_cast<int64_t>(x.size()), want.data());
  gpu_->RoundBf16(x.data(), static_cast<int64_t>(x.size()), got.data());
  EXPECT_TRUE(SameBits(got, want));
  std::vector<float> y = x;
  Holding().HoldOnDevice(y.data(), static_cast<int64_t>(y.size()));
  Holding().RoundBf16(y.data(), static_cast<int64_t>(y.size()), y.data());
  EXPECT_EQ(std::memcmp(y.data(), x.data(), x.size() * 4), 0) << "the held result reached the host unasked";
  Holding().ReleaseFromDevice(y.data(), true);
  EXPECT_TRUE(SameBits(y, want));
  EXPECT_TRUE(Holding().Health().ok()) << Holding().Health();
  // The same kernel scaled first (RowOp::ScaleBf16): the host's bits for every value, NaNs too.
  const RowOp scaled[] = {RowOp::ScaleBf16(0.0110485f)};
  std::vector<float> s_want = x, s_got = x;
  cpu().RowOps(s_want.data(), static_cast<int64_t>(x.size()), scaled);
  gpu_->RowOps(s_got.data(), static_cast<int64_t>(x.size()), scaled);
  EXPECT_TRUE(SameBits(s_got, s_want));
}

// A backend with min_hold_bytes leaves smaller buffers where they are: the op's output reaches
// the host at once. The default (0) holds every buffer the model asks it to.
TEST_F(CudaOps, BuffersUnderMinHoldBytesAreNotHeld) {
  cuda::CudaBackendOptions opt;
  opt.min_hold_bytes = int64_t{256} << 10;
  auto made = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(made.ok()) << made.status();
  const Backend& thresholded = **made;
  const int64_t dim = 256;
  const std::vector<float> x = Random(2 * dim, 91, 1.0f);
  std::vector<float> want = x;
  cpu().Hadamard(want.data(), 2, dim);
  std::vector<float> y = x;
  thresholded.HoldOnDevice(y.data(), 2 * dim);
  thresholded.Hadamard(y.data(), 2, dim);  // held, it would leave y as x
  EXPECT_TRUE(SameBits(y, want));
  thresholded.ReleaseFromDevice(y.data(), false);
  std::vector<float> z = x;  // the default backend holds it: the host keeps x until the sync
  gpu_->HoldOnDevice(z.data(), 2 * dim);
  gpu_->Hadamard(z.data(), 2, dim);
  EXPECT_TRUE(SameBits(z, x));
  gpu_->SyncToHost(z.data());
  EXPECT_TRUE(SameBits(z, want));
  gpu_->ReleaseFromDevice(z.data(), false);
  cuda::CudaBackendOptions bad;
  bad.min_hold_bytes = -1;
  auto refused = cuda::NewCudaBackend(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(std::string(refused.status().message()).find("min_hold_bytes"), std::string::npos) << refused.status();
}

// Held ranges are read and written in place in their twins (CudaBackendOptions::held_in_place):
// no device-to-device copy where the frame's layout allows it, a copy where it does not (an
// output on the range an input is read from in place; a slice off the alignment; a Linear whose
// tensor-core path writes padded rows past its output), and in every case the CPU's bits with the
// rest of the held buffer untouched.
TEST_F(CudaOps, HeldRangesAreReadAndWrittenInPlaceWhereTheLayoutAllows) {
  const int64_t dim = 256, n = 8, m = 256, k = 512;
  const std::vector<float> x0 = Random(n * dim, 131, 1.0f), w = Random(dim, 132, 0.1f);
  const Backend& be = Holding();
  auto delta = [&](auto op) {
    const cuda::HeldTraffic a = cuda::HeldTrafficOf(be);
    op();
    const cuda::HeldTraffic b = cuda::HeldTrafficOf(be);
    return cuda::HeldTraffic{b.copies - a.copies, b.copy_bytes - a.copy_bytes, b.in_place - a.in_place};
  };
  // RmsNorm from one held buffer into another: both in place.
  std::vector<float> x = x0, y = Poisoned(n * dim);
  be.HoldOnDevice(x.data(), n * dim);
  be.HoldOnDevice(y.data(), n * dim);
  be.Hadamard(x.data(), n, dim);  // x's twin current (Hadamard in place: input and output one range)
  const cuda::HeldTraffic norm = delta([&] { be.RmsNorm(x.data(), w.data(), n, dim, 1e-6f, y.data()); });
  EXPECT_EQ(norm.copies, 0);
  EXPECT_EQ(norm.in_place, 2);
  // Rows 2..5 of y rounded into rows 2..5 of x: an output at an aligned offset inside its buffer.
  const cuda::HeldTraffic part = delta([&] { be.RoundBf16(y.data() + 2 * dim, 4 * dim, x.data() + 2 * dim); });
  EXPECT_EQ(part.copies, 0);
  EXPECT_EQ(part.in_place, 2);
  // In place on itself (y = round(y)): the output lies on the range read in place, so it is staged.
  const cuda::HeldTraffic alias = delta([&] { be.RoundBf16(y.data(), n * dim, y.data()); });
  EXPECT_EQ(alias.in_place, 1);
  EXPECT_EQ(alias.copies, 1);
  // A slice 16 bytes into the buffer: off the alignment, staged both ways.
  const cuda::HeldTraffic off = delta([&] { be.RoundBf16(x.data() + 4, 64, y.data() + 4); });
  EXPECT_EQ(off.in_place, 0);
  EXPECT_EQ(off.copies, 2);
  be.ReleaseFromDevice(x.data(), true);
  be.ReleaseFromDevice(y.data(), true);
  std::vector<float> cx = x0, cy(n * dim);
  cpu().Hadamard(cx.data(), n, dim);
  cpu().RmsNorm(cx.data(), w.data(), n, dim, 1e-6f, cy.data());
  cpu().RoundBf16(cy.data() + 2 * dim, 4 * dim, cx.data() + 2 * dim);
  cpu().RoundBf16(cy.data(), n * dim, cy.data());
  cpu().RoundBf16(cx.data() + 4, 64, cy.data() + 4);
  EXPECT_TRUE(SameBits(x, cx)) << "rel err " << RelErr(x, cx);
  EXPECT_TRUE(SameBits(y, cy)) << "rel err " << RelErr(y, cy);

  // A Linear into row 1 of a held [n][m] buffer, at 1 token (exact and fast: the GEMV, n rows
  // written — in place) and at 5 tokens in fast mode (the tensor cores write 8 rows: staged); the
  // other rows keep their values.
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const WeightMatrix wq = RandomWeight(WeightFormat::kFp8Block128, m, k, 133);
  const std::vector<float> a = Random(5 * k, 134, 1.0f), y0 = Random(n * m, 135, 1.0f);
  for (const Backend* b : {&be, static_cast<const Backend*>(fast->get())})
    for (int64_t tokens : {int64_t{1}, int64_t{5}}) {
      const bool exact = b == &be, placed = exact || tokens < 4;
      std::vector<float> out = y0, expect = y0;
      b->HoldOnDevice(out.data(), n * m);  // its twin is filled from the host before the op writes part of it
      const cuda::HeldTraffic before = cuda::HeldTrafficOf(*b);
      b->Linear(wq, a.data(), tokens, out.data() + m, Rounding::kBf16);
      const cuda::HeldTraffic after = cuda::HeldTrafficOf(*b);
      b->ReleaseFromDevice(out.data(), true);
      (exact ? cpu() : *b).Linear(wq, a.data(), tokens, expect.data() + m, Rounding::kBf16);
      const std::string what = std::string(exact ? "exact, " : "fast, ") + std::to_string(tokens) + " tokens";
      EXPECT_EQ(after.copies - before.copies, placed ? 0 : 1) << what;
      EXPECT_TRUE(SameBits(out, expect)) << what << ": rel err " << RelErr(out, expect);
    }

  // Turned off: the same RmsNorm copies both ranges.
  cuda::CudaBackendOptions opt;
  opt.held_in_place = false;
  auto copying = cuda::NewCudaBackend(opt);
  ASSERT_TRUE(copying.ok()) << copying.status();
  std::vector<float> p = x0, q = Poisoned(n * dim);
  (*copying)->HoldOnDevice(p.data(), n * dim);
  (*copying)->HoldOnDevice(q.data(), n * dim);
  (*copying)->Hadamard(p.data(), n, dim);
  const cuda::HeldTraffic t0 = cuda::HeldTrafficOf(**copying);
  (*copying)->RmsNorm(p.data(), w.data(), n, dim, 1e-6f, q.data());
  const cuda::HeldTraffic t1 = cuda::HeldTrafficOf(**copying);
  EXPECT_EQ(t1.copies - t0.copies, 2);
  EXPECT_EQ(t1.in_place - t0.in_place, 0);
  (*copying)->ReleaseFromDevice(q.data(), true);
  std::vector<float> cp = x0, cq(n * dim);
  cpu().Hadamard(cp.data(), n, dim);
  cpu().RmsNorm(cp.data(), w.data(), n, dim, 1e-6f, cq.data());
  EXPECT_TRUE(SameBits(q, cq));
  EXPECT_TRUE(be.Health().ok()) << be.Health();
  EXPECT_TRUE((*copying)->Health().ok()) << (*copying)->Health();
  EXPECT_EQ(cuda::HeldTrafficOf(cpu()).copies, 0);
}

}  // namespace
}  // namespace flashmem::kernels
