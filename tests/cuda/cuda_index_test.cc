// The indexer's scoring and top-k, and greedy decoding's pick, on the CUDA backend against the CPU
// reference: keys read from the KV reserve's key pages, several rows in one launch, fast mode's
// tensor cores, the radix select's lists against the host's, the head's argmax on the device. GPU cases skip (never faked) without a CUDA device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/cuda/device_ops.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "worker/kv/entry_pages.h"
#include "worker/model/scratch.h"

namespace flashmem::kernels {
namespace {

// Key pages for the index-scoring tests: `count` pages of 64 random fp32 keys of `dim`, each
// with its KvPage (as EntryPages holds them).
struct KeyPages {
  KeyPages(int64_t count, int64_t dim, uint32_t seed) {
    for (int64_t p = 0; p < count; ++p) {
      keys.push_back(Random(64 * dim, seed + static_cast<uint32_t>(p), 1.0f));
      pages.push_back(std::make_unique<kernels::KvPage>());
      pages[p]->bytes = reinterpret_cast<const uint8_t*>(keys[p].data());
      pages[p]->size = 64 * dim * 4;
      pages[p]->entries = 64;
      pages[p]->version = kernels::NewKvPageVersion();
    }
    this->dim = dim;
  }
  kernels::KeyRun Run(int64_t page, int64_t first, int64_t count) const {
    return {keys[page].data() + first * dim, count, pages[page].get(), static_cast<int32_t>(first)};
  }
  std::vector<std::vector<float>> keys;
  std::vector<std::unique_ptr<kernels::KvPage>> pages;
  int64_t dim = 0;
};

// IndexScores over the runs' keys, staged (the reference path on this backend).
std::vector<float> StagedScores(const Backend& be, const float* q, const float* w, int64_t heads, int64_t dim,
                                const std::vector<kernels::KeyRun>& runs) {
  std::vector<const float*> rows;
  for (const kernels::KeyRun& r : runs)
    for (int64_t j = 0; j < r.count; ++j) rows.push_back(r.rows + j * dim);
  std::vector<float> out = Poisoned(rows.size());
  be.IndexScores(q, w, heads, dim, rows, out.data());
  return out;
}


// The indexer's keys, fp32 rows in pages that name themselves, are scored from the KV reserve's
// key half: the same scores as IndexScores over the staged rows, a page re-uploaded only when its
// version changes (bytes changed under the old version keep serving the copy: the reserve was
// read), and a call over more pages than the reserve holds staged.
TEST_F(CudaOps, IndexScoresReadNamedKeyPagesFromTheKvReserve) {
  const int64_t heads = 64, dim = 128, num_pages = 20;
  KeyPages kp(num_pages, dim, 120);
  const std::vector<float> q = Random(heads * dim, 141, 1.0f), w = Random(heads, 142, 0.5f);
  // The first `count` keys as runs of whole pages in order, or split at entry 17 with the pages
  // in reverse order.
  auto runs_of = [&](int64_t count, bool split) {
    std::vector<kernels::KeyRun> runs;
    for (int64_t i = 0; i * 64 < count; ++i) {
      const int64_t p = split ? (count - 1) / 64 - i : i, len = std::min<int64_t>(64, count - p * 64);
      if (split && len > 17) {
        runs.push_back(kp.Run(p, 17, len - 17));
        runs.push_back(kp.Run(p, 0, 17));
      } else {
        runs.push_back(kp.Run(p, 0, len));
      }
    }
    return runs;
  };
  auto paged = [&](const Backend& be, const std::vector<kernels::KeyRun>& runs) {
    int64_t n = 0;
    for (const kernels::KeyRun& r : runs) n += r.count;
    std::vector<float> out = Poisoned(n);
    const kernels::IndexScoreRow row{q.data(), w.data(), runs, out.data()};
    be.IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&row, 1), heads, dim);
    EXPECT_TRUE(be.Health().ok()) << be.Health();
    return out;
  };
  cuda::CudaBackendOptions small_opt;
  small_opt.kv_reserve_bytes = 2 * 4 * 64 * dim * 4;  // four key pages
  auto small = cuda::NewCudaBackend(small_opt);
  ASSERT_TRUE(small.ok()) << small.status();
  for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(small->get())}) {
    const bool tiny = be == small->get();
    for (int64_t count : {int64_t{1}, int64_t{200}, num_pages * 64}) {
      for (bool split : {false, true}) {
        const std::string what = std::string(tiny ? "4-page reserve, " : "") + std::to_string(count) + " keys" + (split ? ", split runs" : "");
        const std::vector<kernels::KeyRun> runs = runs_of(count, split);
        const std::vector<float> want = StagedScores(*be, q.data(), w.data(), heads, dim, runs);
        const std::vector<float> got = paged(*be, runs), again = paged(*be, runs);
        EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << what;
        EXPECT_EQ(std::memcmp(again.data(), want.data(), got.size() * 4), 0) << what << ", pages found in place";
        const std::vector<float> host = StagedScores(cpu(), q.data(), w.data(), heads, dim, runs);
        EXPECT_LE(RelErr(got, host), kBf16Tol) << what;
        // The page holding key 0 rewritten under its old version, then announced.
        const std::vector<float> original = kp.keys[0];
        for (float& v : kp.keys[0]) v = -v;
        const std::vector<float> stale = paged(*be, runs), fresh = StagedScores(*be, q.data(), w.data(), heads, dim, runs);
        EXPECT_NE(std::memcmp(fresh.data(), want.data(), fresh.size() * 4), 0) << what << ": key page 0 is read";
        const bool fits = !tiny || count <= 4 * 64;
        EXPECT_EQ(std::memcmp(stale.data(), (fits ? want : fresh).data(), stale.size() * 4), 0)
            << what << (fits ? ": the reserve's copy" : ": staged");
        kp.pages[0]->version = kernels::NewKvPageVersion();
        const std::vector<float> renewed = paged(*be, runs);
        EXPECT_EQ(std::memcmp(renewed.data(), fresh.data(), fresh.size() * 4), 0) << what << ", after a new version";
        std::copy(original.begin(), original.end(), kp.keys[0].begin());
        kp.pages[0]->version = kernels::NewKvPageVersion();
      }
    }
    const kernels::KvReserveStats st = be->ReserveStats();
    if (tiny) EXPECT_EQ(st.keys.slots, 4);
    EXPECT_EQ(st.keys.bytes, st.keys.slots * 64 * dim * 4);
    EXPECT_GT(st.keys.uploads, 0);
    EXPECT_GT(st.keys.hits, 0);
    EXPECT_LE(st.keys.held, st.keys.slots);
  }
}

TEST_F(CudaOps, IndexerScoresAndLogits) {
  const int64_t heads = 4, dim = 128, rows = 500;
  const std::vector<float> q = Random(heads * dim, 21, 1.0f), keys = Random(rows * dim, 22, 1.0f),
                           w = Random(heads, 23, 0.5f);
  for (int64_t n : {0, 1, 300}) {
    std::vector<const float*> k(n);
    for (int64_t t = 0; t < n; ++t) k[t] = keys.data() + (t * 7 % rows) * dim;
    std::vector<float> a = Poisoned(n), b = a;
    cpu().IndexScores(q.data(), w.data(), heads, dim, k, a.data());
    gpu_->IndexScores(q.data(), w.data(), heads, dim, k, b.data());
    EXPECT_LE(RelErr(b, a), kBf16Tol) << n;
    for (int64_t t = 0; t < n; t += 5) k[t] = nullptr;  // null keys score 0 in the logits
    a = b = Poisoned(n);
    cpu().IndexerLogits(q.data(), w.data(), heads, dim, k, a.data());
    gpu_->IndexerLogits(q.data(), w.data(), heads, dim, k, b.data());
    EXPECT_LE(RelErr(b, a), kFp32Tol) << n;
  }
}

// Page recall in one launch from mapped pinned host memory: every byte lands where it should.
// Top-k on the device (a radix select) gives the host's list exactly: bf16 scores tie often and
// ties go by index, -inf (invisible chunks) ranks last, -0 equals +0, k from 1 to the device's
// limit, odd lengths; past the limit or below the size worth a round trip the host answers.
// Several rows' top-k in one call (a decode step's sessions, contexts of different lengths):
// the host's list for every row, -inf and signed-zero ties included; rows padded to the longest
// with -inf never pick a pad. Batches the device does not take (a row shorter than k, too few
// scores in all) give the same lists row by row.
TEST_F(CudaOps, TopKOfSeveralRowsEqualsTheHostsLists) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<std::vector<float>> rows;
  for (int64_t n : {2048, 3001, 2048, 5000, 2500}) {
    std::vector<float> s = Random(n, static_cast<uint32_t>(200 + n + rows.size()), 1.0f);
    for (int64_t i = 0; i < n; i += 3) s[i] = -inf;  // LSA's hidden chunks
    for (int64_t i = 1; i < n; i += 89) s[i] = i % 2 ? 0.0f : -0.0f;
    rows.push_back(std::move(s));
  }
  rows[2].assign(2048, -inf);  // a row of -inf only: its first k indices
  std::vector<std::span<const float>> lists(rows.begin(), rows.end());
  for (int64_t k : {1, 512, 2048}) {
    const auto got = gpu_->TopKBatch(lists, k);
    ASSERT_EQ(got.size(), rows.size());
    for (size_t r = 0; r < rows.size(); ++r) EXPECT_EQ(got[r], TopKIndices(rows[r], k)) << "k " << k << " row " << r;
  }
  // A row shorter than k, and a batch too small for the device: row by row, the same lists.
  const std::vector<float> short_row = Random(100, 301, 1.0f);
  lists.push_back(short_row);
  auto got = gpu_->TopKBatch(lists, 512);
  for (size_t r = 0; r < lists.size(); ++r) EXPECT_EQ(got[r], TopKIndices(lists[r], 512)) << "row " << r;
  const std::vector<float> a = Random(1000, 302, 1.0f), b = Random(1000, 303, 1.0f);
  const std::span<const float> small[] = {a, b};
  got = gpu_->TopKBatch(small, 10);
  EXPECT_EQ(got[0], TopKIndices(a, 10));
  EXPECT_EQ(got[1], TopKIndices(b, 10));
  EXPECT_TRUE(gpu_->TopKBatch(std::span<const std::span<const float>>(), 10).empty());
}

// Several rows' index scores in one call: each row's scores as that row alone, whether every
// key comes from the reserve (one launch) or one row has a run of zero keys (row by row).
TEST_F(CudaOps, IndexScoresOfSeveralRowsEqualOneCallPerRow) {
  const int64_t heads = 64, dim = 128;
  KeyPages kp(30, dim, 400);
  // Row r: its own pages, the last one partly written (as a session's newest keys).
  const std::vector<int64_t> lengths = {130, 1, 640, 0, 333};
  std::vector<std::vector<kernels::KeyRun>> runs(lengths.size());
  int64_t next_page = 0;
  for (size_t r = 0; r < lengths.size(); ++r)
    for (int64_t t = 0; t < lengths[r]; t += 64) runs[r].push_back(kp.Run(next_page++, 0, std::min<int64_t>(64, lengths[r] - t)));
  std::vector<std::vector<float>> q, w;
  for (size_t r = 0; r < lengths.size(); ++r) {
    q.push_back(Random(heads * dim, 500 + static_cast<uint32_t>(r), 1.0f));
    w.push_back(Random(heads, 600 + static_cast<uint32_t>(r), 0.5f));
  }
  for (bool with_zero_keys : {false, true}) {
    if (with_zero_keys) runs[4].push_back({nullptr, 5, nullptr, 0});  // five zero keys: this batch goes row by row
    std::vector<std::vector<float>> got(lengths.size()), alone(lengths.size());
    std::vector<kernels::IndexScoreRow> rows;
    for (size_t r = 0; r < lengths.size(); ++r) {
      int64_t n = 0;
      for (const kernels::KeyRun& run : runs[r]) n += run.count;
      got[r] = Poisoned(n);
      alone[r] = Poisoned(n);
      rows.push_back({q[r].data(), w[r].data(), runs[r], got[r].data()});
    }
    gpu_->IndexScoresBatch(rows, heads, dim);
    ASSERT_TRUE(gpu_->Health().ok()) << gpu_->Health();
    // The queries as slices of one activation buffer (page-locked: one transfer): the same bits.
    model::Scratch qs(lengths.size() * heads * dim);
    std::vector<std::vector<float>> from_slices(lengths.size());
    std::vector<kernels::IndexScoreRow> slice_rows = rows;
    for (size_t r = 0; r < lengths.size(); ++r) {
      std::copy(q[r].begin(), q[r].end(), qs.begin() + r * heads * dim);
      from_slices[r] = Poisoned(got[r].size());
      slice_rows[r].q = qs.data() + r * heads * dim;
      slice_rows[r].scores = from_slices[r].data();
    }
    gpu_->IndexScoresBatch(slice_rows, heads, dim);
    ASSERT_TRUE(gpu_->Health().ok()) << gpu_->Health();
    for (size_t r = 0; r < lengths.size(); ++r)
      EXPECT_EQ(std::memcmp(from_slices[r].data(), got[r].data(), got[r].size() * 4), 0) << "row " << r << " from slices";
    for (size_t r = 0; r < lengths.size(); ++r) {
      const kernels::IndexScoreRow one{q[r].data(), w[r].data(), runs[r], alone[r].data()};
      gpu_->IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&one, 1), heads, dim);
      EXPECT_EQ(std::memcmp(got[r].data(), alone[r].data(), got[r].size() * 4), 0) << "row " << r << (with_zero_keys ? " (zero keys)" : "");
      std::vector<float> host = Poisoned(got[r].size());
      const kernels::IndexScoreRow on_cpu{q[r].data(), w[r].data(), runs[r], host.data()};
      cpu().IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&on_cpu, 1), heads, dim);
      EXPECT_LE(RelErr(got[r], host), kBf16Tol) << "row " << r;
    }
  }
}

TEST_F(CudaOps, TopKEqualsTheHostsList) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {4096, 5003, 16384, 65537}) {
    std::vector<float> s = Random(n, static_cast<uint32_t>(31 + n), 1.0f);
    for (int64_t i = 0; i < n; i += 3) s[i] = -inf;
    for (int64_t i = 1; i < n; i += 97) s[i] = i % 2 ? 0.0f : -0.0f;
    for (int64_t k : {1, 7, 512, 2048, 3000}) EXPECT_EQ(gpu_->TopK(s, k), TopKIndices(s, k)) << "n " << n << " k " << k;
  }
  std::vector<float> same(6000, 0.25f);  // all tied: the first k indices
  EXPECT_EQ(gpu_->TopK(same, 100), TopKIndices(same, 100));
  std::vector<float> few(8192, -inf);  // fewer finite scores than k: the -inf ones follow by index
  few[8000] = 1.0f;
  few[3] = 2.0f;
  EXPECT_EQ(gpu_->TopK(few, 10), TopKIndices(few, 10));
  EXPECT_EQ(gpu_->TopK(few, 10)[0], 3);
  EXPECT_EQ(gpu_->TopK(few, 10)[2], 0);
  EXPECT_TRUE(gpu_->TopK(few, 0).empty());
  EXPECT_EQ(gpu_->TopK(std::vector<float>(5000, 1.0f), 9000).size(), 5000u);  // k past n: all of them

  // The launcher: three rows at once into a poisoned output; bad sizes are refused.
  const int64_t rows = 3, n = 10001, k = 333;  // rows 1 and 2 start unaligned: the scalar loads
  std::vector<float> all = Random(rows * n, 77, 1.0f);
  float* d_s = nullptr;
  int32_t* d_out = nullptr;
  ASSERT_EQ(cudaMalloc(&d_s, all.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_out, rows * k * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_s, all.data(), all.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(d_out, 0xff, rows * k * 4), cudaSuccess);
  ASSERT_EQ(cuda::TopK(d_s, rows, n, k, d_out, nullptr), cudaSuccess);
  std::vector<int32_t> got(rows * k);
  ASSERT_EQ(cudaMemcpy(got.data(), d_out, got.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t r = 0; r < rows; ++r)
    EXPECT_EQ(std::vector<int32_t>(got.begin() + r * k, got.begin() + (r + 1) * k),
              TopKIndices(std::span<const float>(all.data() + r * n, n), k))
        << "row " << r;
  EXPECT_EQ(cuda::TopK(d_s, 1, n, cuda::kTopKMaxK + 1, d_out, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(cuda::TopK(d_s, 1, 10, 11, d_out, nullptr), cudaErrorInvalidValue);
  cudaFree(d_s);
  cudaFree(d_out);
}

// Fast mode scores a page's run of keys on the tensor cores (cuda::IndexScoresRunsMma). On
// bf16-grid queries and keys — the model's are FP4 values times power-of-two scales — only the
// summation order differs from the CPU: each head's bf16-rounded dot product may land one bf16
// step away, so each score is within 2^-6 of the sum of its heads' |terms| plus one bf16 step of
// itself, and most are bit-identical. Runs start mid-page, end mid-page and switch queries inside
// a block (past 4,096 runs a block takes several); heads 16, 64 and 128, and 4 and 40 (warps
// padded with zero heads); 136 heads (past the kernel's 128) keep the exact kernel, bit-identical
// to the exact backend.
TEST_F(CudaOps, FastModeScoresKeyRunsOnTheTensorCores) {
  const int64_t dim = 128, num_pages = 40;
  KeyPages kp(num_pages, dim, 700);
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  for (int64_t heads : {int64_t{16}, int64_t{64}, int64_t{128}, int64_t{4}, int64_t{40}, int64_t{136}}) {
    for (int64_t queries : {int64_t{3}, int64_t{70}}) {
      const int64_t runs_per_query = queries > 3 ? 63 : 9;  // 70 x 63 = 4,410 runs: two a block
      std::vector<std::vector<kernels::KeyRun>> runs(queries);
      std::vector<std::vector<float>> q, w, got(queries), host(queries), exact(queries);
      std::vector<kernels::IndexScoreRow> rows, on_cpu, on_exact;
      for (int64_t r = 0; r < queries; ++r) {
        int64_t n = 0;
        for (int64_t j = 0; j < runs_per_query; ++j) {
          const int64_t entry = (r * 7 + j * 3) % 64, count = 1 + (r + 5 * j) % (64 - entry);
          runs[r].push_back(kp.Run((r + j) % num_pages, entry, count));
          n += count;
        }
        q.push_back(Random(heads * dim, 800 + static_cast<uint32_t>(r), 1.0f));
        w.push_back(Random(heads, 900 + static_cast<uint32_t>(r), 0.5f));
        got[r] = host[r] = exact[r] = Poisoned(n);
      }
      for (int64_t r = 0; r < queries; ++r) {
        rows.push_back({q[r].data(), w[r].data(), runs[r], got[r].data()});
        on_cpu.push_back({q[r].data(), w[r].data(), runs[r], host[r].data()});
        on_exact.push_back({q[r].data(), w[r].data(), runs[r], exact[r].data()});
      }
      (*fast)->IndexScoresBatch(rows, heads, dim);
      ASSERT_TRUE((*fast)->Health().ok()) << (*fast)->Health();
      cpu().IndexScoresBatch(on_cpu, heads, dim);
      gpu_->IndexScoresBatch(on_exact, heads, dim);
      const std::string what = std::to_string(heads) + " heads, " + std::to_string(queries) + " queries";
      if (!cuda::IndexScoresMmaSupports(heads, dim)) {
        for (int64_t r = 0; r < queries; ++r)
          EXPECT_EQ(std::memcmp(got[r].data(), exact[r].data(), got[r].size() * 4), 0) << what << ", row " << r;
        continue;
      }
      int64_t same = 0, total = 0;
      for (int64_t r = 0; r < queries; ++r) {
        int64_t t = 0;
        for (const kernels::KeyRun& run : runs[r])
          for (int64_t j = 0; j < run.count; ++j, ++t) {
            const float* key = run.rows + j * dim;
            double terms = 0;
            for (int64_t h = 0; h < heads; ++h) {
              double dot = 0;
              for (int64_t d = 0; d < dim; ++d) dot += static_cast<double>(q[r][h * dim + d]) * key[d];
              terms += std::fabs(std::max(dot, 0.0) * w[r][h]);
            }
            const double bound = terms / 64 + std::fabs(host[r][t]) / 128 + 1e-30;
            ASSERT_FALSE(std::isnan(got[r][t])) << what << ", row " << r << " key " << t << " not written";
            EXPECT_LE(std::fabs(got[r][t] - host[r][t]), bound) << what << ", row " << r << " key " << t;
            same += got[r][t] == host[r][t];
            ++total;
          }
      }
      EXPECT_GE(static_cast<double>(same) / total, 0.9) << what << ": " << same << " of " << total << " identical";
    }
  }
}

// Fast mode's IndexTopKBatch keeps the scores on the device: each row's runs scored into its list
// (-inf where no run is, shorter lists padded), the radix select over the lists, only the picks
// (and the lists rows ask for) back. The same picks and lists as the two ops it fuses on this
// backend (IndexScoresBatch, placement, TopKBatch), and the picks are the host's top-k of the
// lists. A row shorter than k sends the batch through the two ops, with the same answer.
TEST_F(CudaOps, FastModeIndexTopKEqualsScoresThenTopK) {
  const int64_t heads = 64, dim = 128, k = 100;
  KeyPages kp(24, dim, 1300);
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  const Backend& be = **fast;
  for (bool short_row : {false, true}) {
    const std::vector<int64_t> lengths = {640, 300, short_row ? 50 : 1000, 128};
    std::vector<std::vector<kernels::KeyRun>> runs(lengths.size());
    std::vector<std::vector<int64_t>> at(lengths.size());
    std::vector<std::vector<float>> q, w;
    for (size_t r = 0; r < lengths.size(); ++r) {
      // Every other page of the list is a run (the rest stay -inf); the last run ends mid-page.
      for (int64_t p0 = 0; p0 < lengths[r]; p0 += 64)
        if ((p0 / 64) % 2 == 0 || p0 + 64 >= lengths[r]) {
          const int64_t first = p0 == 0 ? 5 : 0, count = std::min<int64_t>(64, lengths[r] - p0) - first;
          runs[r].push_back(kp.Run((r * 5 + p0 / 64) % 24, first, count));
          at[r].push_back(p0 + first);
        }
      q.push_back(Random(heads * dim, 1400 + static_cast<uint32_t>(r), 1.0f));
      w.push_back(Random(heads, 1500 + static_cast<uint32_t>(r), 0.5f));
    }
    std::vector<std::vector<float>> lists(lengths.size());
    std::vector<kernels::IndexSelectRow> rows;
    for (size_t r = 0; r < lengths.size(); ++r) {
      lists[r] = Poisoned(lengths[r]);
      rows.push_back({q[r].data(), w[r].data(), runs[r], at[r], lengths[r], r % 2 ? lists[r].data() : nullptr});
    }
    const std::vector<std::vector<int32_t>> got = be.IndexTopKBatch(rows, heads, dim, k);
    ASSERT_TRUE(be.Health().ok()) << be.Health();
    // The two ops it fuses.
    std::vector<std::vector<float>> want_lists(lengths.size());
    std::vector<std::span<const float>> spans;
    for (size_t r = 0; r < lengths.size(); ++r) {
      int64_t n = 0;
      for (const kernels::KeyRun& run : runs[r]) n += run.count;
      std::vector<float> scored = Poisoned(n);
      const kernels::IndexScoreRow one{q[r].data(), w[r].data(), runs[r], scored.data()};
      be.IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&one, 1), heads, dim);
      want_lists[r].assign(lengths[r], -std::numeric_limits<float>::infinity());
      for (size_t j = 0, from = 0; j < runs[r].size(); from += runs[r][j].count, ++j)
        std::copy_n(scored.begin() + static_cast<int64_t>(from), runs[r][j].count, want_lists[r].begin() + at[r][j]);
      spans.push_back(want_lists[r]);
    }
    const std::vector<std::vector<int32_t>> want = be.TopKBatch(spans, k);
    ASSERT_EQ(got.size(), lengths.size());
    for (size_t r = 0; r < lengths.size(); ++r) {
      const std::string what = std::string(short_row ? "with a short row, " : "") + "row " + std::to_string(r);
      EXPECT_EQ(got[r], want[r]) << what;
      EXPECT_EQ(got[r], TopKIndices(want_lists[r], k)) << what << ": the host's top-k of the list";
      if (r % 2) EXPECT_EQ(std::memcmp(lists[r].data(), want_lists[r].data(), lengths[r] * 4), 0) << what << ": list";
      else EXPECT_TRUE(std::isnan(lists[r][0])) << what << ": a list nobody asked for is not written";
    }
  }
  // A run past the end of its list (the kernel would write outside it): a clear, sticky error.
  auto other = FastBackend(false);
  ASSERT_TRUE(other.ok()) << other.status();
  const int64_t past[] = {60};
  const kernels::KeyRun run[] = {kp.Run(0, 0, 10)};
  const std::vector<float> q0 = Random(heads * dim, 1800, 1.0f), w0 = Random(heads, 1801, 0.5f);
  const kernels::IndexSelectRow bad[] = {{q0.data(), w0.data(), run, past, 64, nullptr}};
  const auto none = (*other)->IndexTopKBatch(bad, heads, dim, 5);
  EXPECT_EQ(none.size(), 1u);
  EXPECT_TRUE(none[0].empty());
  EXPECT_EQ((*other)->Health().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE((*other)->Health().message().find("rows[0]"), std::string::npos) << (*other)->Health();
}

// Index keys as the model holds them (kv::EntryPages with its MXFP4 twins, state.h): random
// values through the FP4 round trip, with the grid's corners — an all-zero block, negative zeros,
// a block at the smallest scale (a subnormal 2^-127 among its values), large magnitudes.
std::vector<kv::EntryPages> ModelKeyStreams(int64_t streams, int64_t keys, int64_t dim, uint32_t seed) {
  std::vector<kv::EntryPages> out;
  std::mt19937 g(seed);
  for (int64_t s = 0; s < streams; ++s) {
    out.emplace_back(kv::PageFormat::IndexKeys(dim), /*encoded=*/false, /*packed_twin=*/true);
    for (int64_t k = 0; k < keys; ++k) {
      std::vector<float> x = Random(dim, seed + static_cast<uint32_t>(s * 100003 + k), std::ldexp(1.0f, static_cast<int>(g() % 24) - 12));
      if (k % 9 == 2) std::fill(x.begin(), x.begin() + 32, 0.0f);
      if (k % 11 == 5) {
        std::fill(x.begin() + 32, x.begin() + 64, 0.0f);
        x[32] = 6.0f * std::ldexp(1.0f, -126);
        x[33] = std::ldexp(1.0f, -127);
        x[34] = -std::ldexp(1.0f, -126);
      }
      CpuBackend().Fp4RoundTrip(x.data(), dim, 32);
      if (k % 7 == 3) x[70] = -0.0f;
      out.back().Append(x.data());
    }
    EXPECT_TRUE(out.back().has_packed_twin()) << "stream " << s << ": a key off the FP4 grid";
  }
  return out;
}

// Fast mode holds and reads the keys' MXFP4 twins (68 bytes a key, KeyRun::packed) instead of
// their fp32 rows: the same scores and picks bit for bit as a backend given the rows alone, for
// whole pages, split runs and keys appended between calls (the twin patched in place); a reserve
// of the twins' page size. A call in the form the reserve does not hold, and one past its slots,
// is staged: the exact kernel's scores (the exact backend's bits).
TEST_F(CudaOps, FastModeReadsTheKeysMxfp4TwinsWithTheRowsScores) {
  const int64_t dim = 128, k = 64;
  std::vector<kv::EntryPages> streams = ModelKeyStreams(5, 600, dim, 2100);
  auto packed_be = FastBackend(false), rows_be = FastBackend(false);
  ASSERT_TRUE(packed_be.ok() && rows_be.ok());
  cuda::CudaBackendOptions tiny_opt;
  tiny_opt.exact = false;
  tiny_opt.kv_reserve_bytes = 2 * 6 * 64 * cuda::kIndexKeyMxfp4Bytes;  // six twin pages
  auto tiny = cuda::NewCudaBackend(tiny_opt);
  ASSERT_TRUE(tiny.ok()) << tiny.status();
  for (int64_t heads : {int64_t{64}, int64_t{16}, int64_t{40}}) {
    for (int round = 0; round < 3; ++round) {
      const std::string what = std::to_string(heads) + " heads, round " + std::to_string(round);
      // Each stream's keys as runs within pages: whole pages, or split at entry 13 (round 1).
      std::vector<std::vector<kernels::KeyRun>> runs(streams.size()), plain(streams.size());
      std::vector<std::vector<int64_t>> at(streams.size());
      std::vector<std::vector<float>> q, w;
      for (size_t r = 0; r < streams.size(); ++r) {
        const int64_t n = streams[r].size();
        for (int64_t p0 = 0; p0 < n; p0 += 64) {
          const int64_t p1 = std::min(n, p0 + 64);
          if (round == 1 && p1 - p0 > 13) {
            runs[r].push_back(streams[r].Run(p0 + 13, p1 - p0 - 13));
            at[r].push_back(p0 + 13);
            runs[r].push_back(streams[r].Run(p0, 13));
            at[r].push_back(p0);
          } else {
            runs[r].push_back(streams[r].Run(p0, p1 - p0));
            at[r].push_back(p0);
          }
        }
        for (kernels::KeyRun run : runs[r]) {
          ASSERT_NE(run.packed, nullptr) << what;
          run.packed = nullptr;
          plain[r].push_back(run);
        }
        q.push_back(Random(heads * dim, 2200 + static_cast<uint32_t>(r + 10 * round), 1.0f));
        CpuBackend().Fp4RoundTrip(q.back().data(), heads * dim, 32);  // the model's queries are on the grid too
        w.push_back(Random(heads, 2300 + static_cast<uint32_t>(r), 0.5f));
      }
      auto score = [&](const Backend& be, const std::vector<std::vector<kernels::KeyRun>>& which) {
        std::vector<std::vector<float>> out(streams.size());
        std::vector<kernels::IndexScoreRow> rows;
        for (size_t r = 0; r < streams.size(); ++r) {
          out[r] = Poisoned(streams[r].size());
          rows.push_back({q[r].data(), w[r].data(), which[r], out[r].data()});
        }
        be.IndexScoresBatch(rows, heads, dim);
        EXPECT_TRUE(be.Health().ok()) << be.Health();
        return out;
      };
      auto pick = [&](const Backend& be, const std::vector<std::vector<kernels::KeyRun>>& which) {
        std::vector<kernels::IndexSelectRow> rows;
        for (size_t r = 0; r < streams.size(); ++r)
          rows.push_back({q[r].data(), w[r].data(), which[r], at[r], streams[r].size(), nullptr});
        return be.IndexTopKBatch(rows, heads, dim, k);
      };
      const auto want = score(**rows_be, plain), exact = score(*gpu_, plain);
      const auto got = score(**packed_be, runs), staged = score(**tiny, runs);
      for (size_t r = 0; r < streams.size(); ++r) {
        ASSERT_FALSE(std::isnan(got[r][0])) << what;
        // Run order differs from key order in round 1: compare as the runs lay them out.
        EXPECT_EQ(std::memcmp(got[r].data(), want[r].data(), want[r].size() * 4), 0) << what << ", stream " << r;
        EXPECT_EQ(std::memcmp(staged[r].data(), exact[r].data(), want[r].size() * 4), 0)
            << what << ", stream " << r << ", past the small reserve";
      }
      EXPECT_EQ(pick(**packed_be, runs), pick(**rows_be, plain)) << what << ": the picks";
      // Keys appended to every stream between calls: a new page's first keys, then one key (its
      // twin's page patched in place: one entry's bytes).
      for (size_t r = 0; r < streams.size(); ++r) {
        std::vector<float> x = Random(dim, 2400 + static_cast<uint32_t>(r + 10 * round), 0.7f);
        CpuBackend().Fp4RoundTrip(x.data(), dim, 32);
        for (int j = 0; j < (round == 0 && heads == 64 ? 41 : 1); ++j) streams[r].Append(x.data());
      }
    }
  }
  const KvReserveStats st = (*packed_be)->ReserveStats();
  EXPECT_GT(st.keys.slots, 0);
  EXPECT_EQ(st.keys.bytes, st.keys.slots * 64 * cuda::kIndexKeyMxfp4Bytes) << "the reserve holds twin pages";
  EXPECT_GT(st.keys.patches, 0) << "appended keys patch their twin in place";
  EXPECT_GT(st.keys.hits, 0);
  EXPECT_GT((*rows_be)->ReserveStats().keys.slots, 0);
  EXPECT_EQ((*rows_be)->ReserveStats().keys.bytes, (*rows_be)->ReserveStats().keys.slots * 64 * dim * 4);
  // Each backend given the other form: staged, the exact backend's scores.
  const std::vector<float> q0 = Random(64 * dim, 2500, 1.0f), w0 = Random(64, 2501, 0.5f);
  std::vector<kernels::KeyRun> runs0 = {streams[0].Run(0, 64)}, plain0 = runs0;
  plain0[0].packed = nullptr;
  std::vector<float> a = Poisoned(64), b = Poisoned(64), c = Poisoned(64);
  const kernels::IndexScoreRow ra{q0.data(), w0.data(), runs0, a.data()}, rb{q0.data(), w0.data(), plain0, b.data()},
      rc{q0.data(), w0.data(), plain0, c.data()};
  (*packed_be)->IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&rb, 1), 64, dim);
  (*rows_be)->IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&ra, 1), 64, dim);
  gpu_->IndexScoresBatch(std::span<const kernels::IndexScoreRow>(&rc, 1), 64, dim);
  EXPECT_TRUE((*packed_be)->Health().ok() && (*rows_be)->Health().ok());
  EXPECT_EQ(std::memcmp(a.data(), c.data(), 64 * 4), 0) << "twins on the rows' reserve";
  EXPECT_EQ(std::memcmp(b.data(), c.data(), 64 * 4), 0) << "rows on the twins' reserve";
}

// Greedy decoding's pick from the head, on the device (Backend::LinearArgmax: only the picks come
// back): ArgmaxIndex of the same backend's Linear, exact and fast (a dense bf16 head of 4M values
// and more takes cuBLASLt there), with rows 0 and 7 of the weight equal (an exact tie: the lower
// index wins) and 1, 3 and 64 rows of x.
TEST_F(CudaOps, LinearArgmaxEqualsTheArgmaxOfItsLinear) {
  const int64_t vocab = 1031, dim = 4096;  // 4.2M weights: fast mode's cuBLASLt bf16 path
  WeightMatrix w;
  w.format = WeightFormat::kDense;
  w.rows = vocab;
  w.cols = dim;
  w.values = Random(vocab * dim, 1600, 0.05f);
  std::copy_n(w.values.begin(), dim, w.values.begin() + 7 * dim);
  auto fast = FastBackend(false);
  ASSERT_TRUE(fast.ok()) << fast.status();
  for (const Backend* be : {static_cast<const Backend*>(gpu_), static_cast<const Backend*>(fast->get())}) {
    for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{64}}) {
      std::vector<float> x = Random(n * dim, 1700 + static_cast<uint32_t>(n), 1.0f);
      // Row 0 of x points along weight row 0 (= row 7): the tie is the pick.
      for (int64_t d = 0; d < dim; ++d) x[d] = w.values[d] * 40.0f;
      std::vector<float> y = Poisoned(n * vocab);
      be->Linear(w, x.data(), n, y.data(), Rounding::kNone);
      std::vector<int32_t> picks(n, -1);
      be->LinearArgmax(w, x.data(), n, picks.data());
      ASSERT_TRUE(be->Health().ok()) << be->Health();
      for (int64_t i = 0; i < n; ++i)
        EXPECT_EQ(picks[i], ArgmaxIndex(std::span<const float>(y.data() + i * vocab, vocab)))
            << (be == gpu_ ? "exact" : "fast") << ", n " << n << ", row " << i;
      EXPECT_EQ(picks[0], 0) << "rows 0 and 7 tie: the lower index";
      if (be == gpu_) {  // exact: the CPU's picks too
        std::vector<int32_t> host(n, -1);
        cpu().LinearArgmax(w, x.data(), n, host.data());
        EXPECT_EQ(picks, host) << "n " << n;
      }
    }
  }
}

}  // namespace
}  // namespace flashmem::kernels
