// The KV reserve's patches on the CUDA backend: a page written once since its device copy (a
// decode step's window entry, a compressed entry appended) is patched in place with the entry
// the write changed instead of being uploaded whole; attention then reads what the staged path
// reads, bit for bit. Written twice between reads, the page goes whole. Skipped without a GPU.
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

}  // namespace
}  // namespace flashmem::kernels
