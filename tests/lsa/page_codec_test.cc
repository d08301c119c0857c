// KV pages travel to memtier as FP8 records (main KV) and MXFP4 (indexer keys), page_codec.h:
// values the model's own round trips produced come back bit for bit, the byte layout is the one
// the CUDA paged kernel reads, and anything off the grid or malformed is refused with a clear error.
#include "worker/kv/page_codec.h"

#include "worker/kv/entry_pages.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kv {
namespace {

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::bit_cast<uint32_t>(a[i]) != std::bit_cast<uint32_t>(b[i])) return false;
  return true;
}

// A page of entries as the model makes them: bf16 values of random magnitudes (2^-20..2^19),
// then `finish` (the model's round trip) on each entry.
template <typename Finish>
std::vector<float> ModelPage(const PageFormat& f, uint32_t seed, Finish finish) {
  std::mt19937 g(seed);
  std::vector<float> v(f.page_floats());
  for (int64_t e = 0; e < f.entries; ++e) {
    float* x = v.data() + e * f.dim;
    const float mag = std::ldexp(1.0f, static_cast<int>(g() % 40) - 20);
    for (int64_t j = 0; j < f.dim; ++j) x[j] = num::RoundBf16(std::normal_distribution<float>(0, mag)(g));
    finish(e, x);
  }
  return v;
}

// Main KV: the nope dims through the FP8 round trip (blocks of 64), with zero blocks and signed zeros.
std::vector<float> MainKvPage(const PageFormat& f, uint32_t seed) {
  return ModelPage(f, seed, [&](int64_t e, float* x) {
    if (e % 7 == 3) std::fill(x, x + 64, 0.0f);  // an all-zero block
    if (e % 5 == 1) x[2] = -0.0f;
    kernels::CpuBackend().Fp8RoundTrip(x, f.nope_dims(), 64);
  });
}

// Index keys: Hadamard, then the FP4 round trip (blocks of 32).
std::vector<float> IndexKeyPage(const PageFormat& f, uint32_t seed) {
  return ModelPage(f, seed, [&](int64_t, float* x) {
    kernels::CpuBackend().Hadamard(x, 1, f.dim);
    kernels::CpuBackend().Fp4RoundTrip(x, f.dim, 32);
  });
}

TEST(PageCodec, MainKvIsTheFp8RecordPageAndComesBackBitForBit) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  EXPECT_EQ(f.data_bytes_per_entry(), 576);
  EXPECT_EQ(f.scale_bytes_per_entry(), 8);
  EXPECT_EQ(f.page_bytes(), 37376);  // 64 x 584, the CSA page of the spec
  for (uint32_t seed : {1u, 2u, 3u}) {
    const std::vector<float> page = MainKvPage(f, seed);
    std::vector<uint8_t> bytes;
    ASSERT_TRUE(EncodePage(f, page, &bytes).ok());
    ASSERT_EQ(bytes.size(), 37376u);
    std::vector<float> back;
    ASSERT_TRUE(DecodePage(f, bytes, &back).ok());
    EXPECT_TRUE(SameBits(back, page)) << "seed " << seed;
    // Layout: entry e's codes at e * 576, its rope bf16 after the 448 codes, its scales after all
    // 64 entries' data; the pad byte is zero.
    for (int64_t e : {0, 1, 63}) {
      const float* x = page.data() + e * 512;
      const float s = num::E8m0ToFloat(bytes[64 * 576 + e * 8]);
      EXPECT_EQ(num::E4m3ToFloat(bytes[e * 576 + 5]) * s, x[5]);
      const uint16_t rope0 = static_cast<uint16_t>(bytes[e * 576 + 448] | bytes[e * 576 + 449] << 8);
      EXPECT_EQ(num::Bf16BitsToFloat(rope0), x[448]);
      EXPECT_EQ(bytes[64 * 576 + e * 8 + 7], 0);
    }
  }
}

TEST(PageCodec, IndexKeysAreMxfp4AndComeBackBitForBit) {
  const PageFormat f = PageFormat::IndexKeys(128);
  EXPECT_EQ(f.data_bytes_per_entry(), 64);
  EXPECT_EQ(f.scale_bytes_per_entry(), 4);
  EXPECT_EQ(f.page_bytes(), 64 * 68);
  for (uint32_t seed : {4u, 5u}) {
    std::vector<float> page = IndexKeyPage(f, seed);
    page[7] = -0.0f;  // the FP4 round trip makes negative zeros; they keep their sign
    std::vector<uint8_t> bytes;
    ASSERT_TRUE(EncodePage(f, page, &bytes).ok());
    std::vector<float> back;
    ASSERT_TRUE(DecodePage(f, bytes, &back).ok());
    EXPECT_TRUE(SameBits(back, page)) << "seed " << seed;
    EXPECT_TRUE(std::signbit(back[7]));
  }
}

TEST(PageCodec, SmallModelDimsAndPartialBlocks) {
  for (const PageFormat& f : {PageFormat::MainKv(128, 64), PageFormat::MainKv(160, 32), PageFormat::IndexKeys(64),
                              PageFormat::IndexKeys(48)}) {
    const bool main = f.kind == PageFormat::Kind::kFp8Record;
    std::vector<float> page = main ? MainKvPage(f, 9) : std::vector<float>(f.page_floats());
    if (!main) {  // FP4 grid values with per-block powers of two, the last block partial at 48
      std::mt19937 g(9);
      for (int64_t i = 0; i < f.page_floats(); ++i)
        page[i] = num::E2m1ToFloat(static_cast<uint8_t>(g() % 16)) * std::ldexp(1.0f, static_cast<int>((i % f.dim) / 32) - 3);
    }
    std::vector<uint8_t> bytes;
    ASSERT_TRUE(EncodePage(f, page, &bytes).ok()) << f.dim;
    EXPECT_EQ(static_cast<int64_t>(bytes.size()), f.page_bytes());
    EXPECT_LT(f.page_bytes(), f.bf16_page_bytes());
    std::vector<float> back;
    ASSERT_TRUE(DecodePage(f, bytes, &back).ok());
    EXPECT_TRUE(SameBits(back, page)) << f.dim;
  }
}

TEST(PageCodec, ValuesOffTheGridAndBadSizesAreRefused) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  const std::vector<float> good = MainKvPage(f, 11);
  std::vector<uint8_t> bytes;
  auto refused = [&](std::vector<float> page, const std::string& names) {
    const absl::Status st = EncodePage(f, page, &bytes);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << names;
    EXPECT_NE(st.message().find(names), std::string::npos) << st.message();
  };
  std::vector<float> page = good;
  page[3 * 512 + 5] = num::RoundBf16(std::nextafter(page[3 * 512 + 5] + 0.37f, 1e9f));  // between e4m3 codes
  refused(page, "entry 3 dim");
  page = good;
  page[2 * 512 + 470] = 1.0f + std::ldexp(1.0f, -12);  // a rope value that is not a bf16
  refused(page, "entry 2 dim 470");
  page = good;
  page[9] = std::nanf("");
  refused(page, "entry 0 dim 9");
  refused(std::vector<float>(good.begin(), good.end() - 1), "values");
  const PageFormat idx = PageFormat::IndexKeys(128);
  std::vector<float> keys = IndexKeyPage(idx, 12);
  keys[130] = 0.3f;
  const absl::Status st = EncodePage(idx, keys, &bytes);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("e2m1"), std::string::npos) << st.message();
}

TEST(PageCodec, DecodeTakesTheEarlierBf16FormAndRefusesOtherLengths) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  const std::vector<float> page = MainKvPage(f, 13);
  std::vector<uint8_t> bf16(f.bf16_page_bytes());
  for (size_t i = 0; i < page.size(); ++i) {
    const uint16_t h = num::FloatToBf16Bits(page[i]);
    bf16[2 * i] = static_cast<uint8_t>(h & 0xff);
    bf16[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  std::vector<float> back;
  ASSERT_TRUE(DecodePage(f, bf16, &back).ok());
  EXPECT_TRUE(SameBits(back, page));
  for (size_t n : {size_t{0}, size_t{37375}, size_t{37377}, size_t{65535}}) {
    const absl::Status st = DecodePage(f, std::vector<uint8_t>(n), &back);
    EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << n;
    EXPECT_NE(st.message().find("37376"), std::string::npos) << st.message();
  }
  std::vector<uint8_t> bytes;
  ASSERT_TRUE(EncodePage(f, page, &bytes).ok());
  bytes[64 * 576 + 5 * 8 + 2] = 0xff;  // a NaN scale
  const absl::Status st = DecodePage(f, bytes, &back);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(st.message().find("entry 5"), std::string::npos) << st.message();
}

// Main-KV entries are held as records: read back bit for bit, a page serializes as the bytes it
// holds, evicted pages come back from either memtier form, and an off-grid entry turns the stream
// into fp32 rows without losing a value.
TEST(EntryPagesTest, RecordsInMemoryRoundTripEvictAndFallBack) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  const std::vector<float> values = MainKvPage(f, 21);  // 64 entries
  EntryPages pages(f, /*encoded=*/true);
  EXPECT_EQ(pages.page_bytes(), 37376);
  for (int round = 0; round < 2; ++round)
    for (int64_t e = 0; e < 64; ++e) pages.Append(values.data() + e * 512);
  pages.Append(values.data());  // a third, partial page
  ASSERT_EQ(pages.num_pages(), 3);
  EXPECT_TRUE(pages.encoded());
  EXPECT_EQ(pages.Row(0), nullptr) << "encoded rows have no fp32 place";
  std::vector<float> row(512), page(values.size());
  for (int64_t e = 0; e < 64; ++e) ASSERT_TRUE(pages.ReadRow(64 + e, page.data() + e * 512));
  EXPECT_TRUE(SameBits(page, values));
  std::vector<uint8_t> bytes;
  bool as_bf16 = true;
  ASSERT_TRUE(pages.Serialize(1, &bytes, &as_bf16).ok());
  EXPECT_FALSE(as_bf16);
  std::vector<uint8_t> want;
  ASSERT_TRUE(EncodePage(f, values, &want).ok());
  EXPECT_EQ(bytes, want);

  pages.Evict(1);
  EXPECT_FALSE(pages.ReadRow(70, row.data()));
  EXPECT_FALSE(pages.RowResident(70));
  EXPECT_EQ(pages.Restore(1, std::vector<uint8_t>(100)).code(), absl::StatusCode::kDataLoss);
  std::vector<uint8_t> nan_scale = want;
  nan_scale[f.entry_scales_offset(9)] = 0xff;
  EXPECT_EQ(pages.Restore(1, nan_scale).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(pages.resident(1));
  ASSERT_TRUE(pages.Restore(1, want).ok());
  for (int64_t e = 0; e < 64; ++e) ASSERT_TRUE(pages.ReadRow(64 + e, page.data() + e * 512));
  EXPECT_TRUE(SameBits(page, values));
  // The bf16 form of an older worker: held as records once restored.
  std::vector<uint8_t> bf16(f.bf16_page_bytes());
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = num::FloatToBf16Bits(values[i]);
    bf16[2 * i] = static_cast<uint8_t>(h & 0xff);
    bf16[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  pages.Evict(0);
  ASSERT_TRUE(pages.Restore(0, bf16).ok());
  EXPECT_TRUE(pages.encoded());
  ASSERT_TRUE(pages.Serialize(0, &bytes, &as_bf16).ok());
  EXPECT_FALSE(as_bf16);
  EXPECT_EQ(bytes, want);

  // An entry off the grid: the stream turns to fp32 rows, every value kept.
  std::vector<float> odd(values.begin(), values.begin() + 512);
  odd[3] = num::RoundBf16(odd[3] * 1.0625f + 1e-3f);
  pages.Evict(1);
  pages.Append(odd.data());
  EXPECT_FALSE(pages.encoded());
  EXPECT_TRUE(pages.fell_back_to_fp32());
  EXPECT_EQ(pages.page_bytes(), 64 * 512 * 4);
  ASSERT_NE(pages.Row(0), nullptr);
  EXPECT_TRUE(SameBits(std::vector<float>(pages.Row(0), pages.Row(0) + 512), std::vector<float>(values.begin(), values.begin() + 512)));
  EXPECT_TRUE(SameBits(std::vector<float>(pages.Row(129), pages.Row(129) + 512), odd));
  EXPECT_EQ(pages.Row(64), nullptr) << "evicted before the fallback, still evicted";
  ASSERT_TRUE(pages.Restore(1, want).ok());  // now decoded into fp32 rows
  EXPECT_TRUE(SameBits(std::vector<float>(pages.Row(64), pages.Row(64) + 64 * 512), values));
  ASSERT_TRUE(pages.Serialize(1, &bytes, &as_bf16).ok());  // fp32 rows on the grid still serialize compactly
  EXPECT_FALSE(as_bf16);
  EXPECT_EQ(bytes, want);
  // The page holding the off-grid row goes as bf16, and comes back with every value.
  ASSERT_TRUE(pages.Serialize(2, &bytes, &as_bf16).ok());
  EXPECT_TRUE(as_bf16);
  EXPECT_EQ(static_cast<int64_t>(bytes.size()), f.bf16_page_bytes());
  pages.Evict(2);
  ASSERT_TRUE(pages.Restore(2, bytes).ok());
  EXPECT_TRUE(SameBits(std::vector<float>(pages.Row(129), pages.Row(129) + 512), odd));
  EXPECT_TRUE(SameBits(std::vector<float>(pages.Row(128), pages.Row(128) + 512), std::vector<float>(values.begin(), values.begin() + 512)));
  pages.Evict(0);
  EXPECT_EQ(pages.Serialize(0, &bytes, &as_bf16).code(), absl::StatusCode::kFailedPrecondition);
}

// Attention over slots held as records (window ring and compressed pages, fp32 rows of a stream
// that fell back, masked and evicted slots) is SparseAttention over the decoded rows, bit for bit.
TEST(EntryPagesTest, AttentionOverRecordsInPlaceEqualsTheDecodedRows) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  const std::vector<float> values = MainKvPage(f, 31);
  EntryPages window(f, true), compressed(f, true), fallback(f, true);
  for (int64_t e = 0; e < 64; ++e) {
    window.Append(values.data() + ((e * 7) % 64) * 512);
    compressed.Append(values.data() + e * 512);
    compressed.Append(values.data() + ((e + 5) % 64) * 512);
  }
  window.Overwrite(3, values.data() + 60 * 512);  // the ring reuses a slot
  std::vector<float> odd(values.begin(), values.begin() + 512);
  odd[1] = 0.3f;
  fallback.Append(odd.data());
  ASSERT_FALSE(fallback.encoded());
  compressed.Evict(1);
  std::mt19937 g(5);
  const int64_t heads = 8;
  std::vector<float> q(heads * 512), sink(heads);
  for (float& x : q) x = num::RoundBf16(std::normal_distribution<float>(0, 1)(g));
  for (float& x : sink) x = num::RoundBf16(std::normal_distribution<float>(0, 1)(g));
  std::vector<kernels::KvSlot> slots;
  for (int64_t e = 0; e < 64; ++e) slots.push_back(window.Slot(e));
  slots.push_back(kernels::KvSlot());        // masked
  slots.push_back(compressed.Slot(70));      // evicted: masked
  for (int64_t t : {5, 0, 127 - 64, 33, 2, 64 - 1, 17}) slots.push_back(compressed.Slot(t));
  slots.push_back(fallback.Slot(0));         // an fp32 row
  EXPECT_TRUE(slots[65].masked());
  ASSERT_NE(slots.back().row, nullptr);
  std::vector<std::vector<float>> rows(slots.size(), std::vector<float>(512));
  std::vector<const float*> ptrs(slots.size(), nullptr);
  for (size_t j = 0; j < slots.size(); ++j) {
    if (slots[j].masked()) continue;
    if (slots[j].row) {
      ptrs[j] = slots[j].row;
      continue;
    }
    num::DecodeFp8Record(slots[j].record, slots[j].scales, 512, 64, rows[j].data());
    ptrs[j] = rows[j].data();
  }
  std::vector<float> want(heads * 512), got(heads * 512, -7.0f);
  kernels::CpuBackend().SparseAttention(q.data(), heads, 512, ptrs, sink.data(), 0.04f, want.data());
  kernels::CpuBackend().SparseAttentionRecords(q.data(), heads, 512, 64, slots, sink.data(), 0.04f, got.data());
  EXPECT_TRUE(SameBits(got, want));
  // And the decoded rows are the values appended.
  EXPECT_TRUE(SameBits(std::vector<float>(ptrs[66 + 1], ptrs[66 + 1] + 512), std::vector<float>(values.begin(), values.begin() + 512)));
  EXPECT_TRUE(SameBits(std::vector<float>(ptrs[3], ptrs[3] + 512), std::vector<float>(values.begin() + 60 * 512, values.begin() + 61 * 512)));
}

// A record's slot names its page for a device backend's KV reserve: the page's bytes in the
// layout the paged kernel reads, and a version that changes with every write, eviction and
// restore (so a device copy of older bytes is never used).
// A write of one entry announces what it changed (KvPage::before / changed, which a device's KV
// reserve patches its copy with): the page as it was at `before` with those ranges copied in is
// the page now, for FP8 records and for fp32 rows; a new page, a fall-back to fp32 (every page
// rewritten), an eviction and a restore announce nothing.
TEST(EntryPagesTest, AOneEntryWriteAnnouncesTheBytesItChanged) {
  for (bool encoded : {true, false}) {
    const PageFormat f = PageFormat::MainKv(512, 64);
    const std::vector<float> values = MainKvPage(f, 43);
    EntryPages pages(f, encoded);
    for (int64_t e = 0; e < 128; ++e) pages.Append(values.data() + (e % 64) * 512);
    const kernels::KvPage& page = *pages.Slot(70).page;
    EXPECT_NE(page.before, 0u) << "the append of entry 127 wrote one entry of page 1";
    for (int64_t e : {0, 37, 63, 64 + 5}) {
      const int64_t p = e / 64;
      const kernels::KvPage& m = *pages.Slot(e).page;
      const std::vector<uint8_t> old(m.bytes, m.bytes + m.size);
      const uint64_t v = m.version;
      pages.Overwrite(e, values.data() + ((e * 7 + 3) % 64) * 512);
      ASSERT_EQ(m.before, v) << "entry " << e;
      std::vector<uint8_t> patched = old;
      int64_t bytes = 0;
      for (const kernels::KvPage::Range& r : m.changed) {
        ASSERT_GE(r.offset, 0);
        ASSERT_LE(r.offset + r.bytes, m.size);
        std::memcpy(patched.data() + r.offset, m.bytes + r.offset, r.bytes);
        bytes += r.bytes;
      }
      EXPECT_EQ(std::memcmp(patched.data(), m.bytes, m.size), 0) << "entry " << e << (encoded ? " records" : " rows");
      EXPECT_NE(std::memcmp(old.data(), m.bytes, m.size), 0) << "entry " << e << ": the write changed nothing";
      EXPECT_EQ(bytes, encoded ? f.entry_bytes() : 512 * 4) << "page " << p;
    }
    std::vector<uint8_t> bytes;
    bool as_bf16 = false;
    ASSERT_TRUE(pages.Serialize(0, &bytes, &as_bf16).ok());
    pages.Evict(0);
    EXPECT_EQ(pages.Slot(70).page->before != 0, true);  // page 1 untouched
    ASSERT_TRUE(pages.Restore(0, bytes).ok());
    EXPECT_EQ(pages.Slot(5).page->before, 0u);
    if (encoded) {  // an entry off the grid: every page becomes fp32 rows
      std::vector<float> odd(values.begin(), values.begin() + 512);
      odd[1] = 0.3f;
      pages.Overwrite(70, odd.data());
      ASSERT_FALSE(pages.encoded());
      EXPECT_EQ(pages.Slot(70).page->before, 0u);
      EXPECT_EQ(pages.Slot(5).page->before, 0u);
    }
  }
}

// Backend::WriteRecords: an op writes an entry's record bytes itself (a device backend, where it
// made the row). BeginRecordWrite hands out the entry's bytes with the page's version renewed for
// that entry alone; EncodeEntry's bytes written there are the page Overwrite makes. The default
// op (the host) is Overwrite, and a row off the grid turns the stream to fp32 rows as Overwrite does.
TEST(EntryPagesTest, AnOpWritesARecordWhereBeginRecordWriteSays) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  const std::vector<float> values = MainKvPage(f, 47);
  EntryPages by_op(f, true), by_host(f, true), by_default(f, true);
  for (EntryPages* p : {&by_op, &by_host, &by_default})
    for (int64_t e = 0; e < 100; ++e) p->Append(values.data() + (e % 64) * 512);
  std::vector<kernels::RecordWrite> writes;
  for (int64_t e : {3, 64 + 17}) {
    const float* row = values.data() + ((e * 5 + 1) % 64) * 512;
    uint8_t *data = nullptr, *scales = nullptr;
    const kernels::KvPage* page = nullptr;
    int32_t entry = -1;
    const uint64_t v = by_op.Slot(e).page->version;
    ASSERT_TRUE(by_op.BeginRecordWrite(e, &data, &scales, &page, &entry));
    EXPECT_EQ(page, by_op.Slot(e).page);
    EXPECT_EQ(entry, e % 64);
    EXPECT_EQ(page->before, v);
    EXPECT_NE(page->version, v);
    EXPECT_EQ(page->changed[0].offset, f.entry_data_offset(e % 64));
    EXPECT_EQ(page->changed[1].offset, f.entry_scales_offset(e % 64));
    EXPECT_EQ(data, page->bytes + f.entry_data_offset(e % 64));
    EXPECT_EQ(scales, page->bytes + f.entry_scales_offset(e % 64));
    ASSERT_EQ(EncodeEntry(f, row, data, scales), -1);
    by_host.Overwrite(e, row);
    writes.push_back({row, &by_default, e});
  }
  kernels::CpuBackend().WriteRecords(writes, 512, 64);
  for (int64_t p = 0; p < 2; ++p) {
    const kernels::KvPage &a = *by_op.Slot(p * 64).page, &b = *by_host.Slot(p * 64).page,
                          &c = *by_default.Slot(p * 64).page;
    EXPECT_EQ(std::memcmp(a.bytes, b.bytes, a.size), 0) << "page " << p;
    EXPECT_EQ(std::memcmp(c.bytes, b.bytes, c.size), 0) << "page " << p;
  }
  // Entries that cannot take a record written elsewhere: unwritten, evicted, fp32 rows.
  uint8_t *data = nullptr, *scales = nullptr;
  const kernels::KvPage* page = nullptr;
  int32_t entry = 0;
  EXPECT_FALSE(by_op.BeginRecordWrite(100, &data, &scales, &page, &entry));
  EXPECT_FALSE(by_op.BeginRecordWrite(-1, &data, &scales, &page, &entry));
  by_op.Evict(0);
  EXPECT_FALSE(by_op.BeginRecordWrite(5, &data, &scales, &page, &entry));
  EntryPages rows(f, false);
  rows.Append(values.data());
  EXPECT_FALSE(rows.BeginRecordWrite(0, &data, &scales, &page, &entry));
  // The default on a row off the grid: fp32 rows, as Overwrite.
  std::vector<float> odd(values.begin(), values.begin() + 512);
  odd[1] = std::nanf("");
  const kernels::RecordWrite bad{odd.data(), &by_default, 7};
  kernels::CpuBackend().WriteRecords(std::span<const kernels::RecordWrite>(&bad, 1), 512, 64);
  EXPECT_FALSE(by_default.encoded());
  EXPECT_TRUE(by_default.fell_back_to_fp32());
  std::vector<float> back(512);
  ASSERT_TRUE(by_default.ReadRow(7, back.data()));
  EXPECT_TRUE(std::isnan(back[1]));
  EXPECT_EQ(back[0], odd[0]);
}

// A compressed entry appended by an op: AppendForWrite, then the op's record (or WriteOnHost) —
// the same page, rows and twin as Append, a new page included.
TEST(EntryPagesTest, AnEntryAppendedForAWriteEqualsAnAppend) {
  const PageFormat main = PageFormat::MainKv(512, 64), keys = PageFormat::IndexKeys(128);
  const std::vector<float> values = MainKvPage(main, 53), key_values = IndexKeyPage(keys, 59);
  EntryPages appended(main, true), by_op(main, true);
  EntryPages key_appended(keys, false, true), key_by_host(keys, false, true);
  for (int64_t e = 0; e < 70; ++e) {  // the 65th entry opens page 1
    const float* row = values.data() + (e % 64) * 512;
    appended.Append(row);
    const int64_t i = by_op.AppendForWrite();
    ASSERT_EQ(i, e);
    uint8_t *data = nullptr, *scales = nullptr;
    const kernels::KvPage* page = nullptr;
    int32_t entry = 0;
    ASSERT_TRUE(by_op.BeginRecordWrite(i, &data, &scales, &page, &entry));
    ASSERT_EQ(EncodeEntry(main, row, data, scales), -1);
    const float* key = key_values.data() + (e % 64) * 128;
    key_appended.Append(key);
    key_by_host.WriteOnHost(key_by_host.AppendForWrite(), key);
  }
  ASSERT_EQ(by_op.size(), 70);
  for (int64_t p = 0; p < 2; ++p) {
    const kernels::KvPage &a = *appended.Slot(p * 64).page, &b = *by_op.Slot(p * 64).page;
    EXPECT_EQ(std::memcmp(a.bytes, b.bytes, a.size), 0) << "page " << p;
    const kernels::KeyRun ka = key_appended.Run(p * 64, 6), kb = key_by_host.Run(p * 64, 6);
    EXPECT_EQ(std::memcmp(ka.rows, kb.rows, 6 * 128 * 4), 0) << "key page " << p;
    ASSERT_TRUE(ka.packed && kb.packed);
    EXPECT_EQ(std::memcmp(ka.packed->bytes, kb.packed->bytes, ka.packed->size), 0) << "twin " << p;
  }
  EXPECT_TRUE(key_by_host.has_packed_twin());
}

TEST(EntryPagesTest, SlotsNameTheirPageAndEveryWriteGivesItANewVersion) {
  const PageFormat f = PageFormat::MainKv(512, 64);
  const std::vector<float> values = MainKvPage(f, 41);
  EntryPages pages(f, true);
  for (int64_t e = 0; e < 70; ++e) pages.Append(values.data() + (e % 64) * 512);
  const kernels::KvSlot a = pages.Slot(5), b = pages.Slot(66);
  ASSERT_NE(a.page, nullptr);
  ASSERT_NE(b.page, nullptr);
  EXPECT_NE(a.page, b.page);
  EXPECT_EQ(a.entry, 5);
  EXPECT_EQ(b.entry, 2);
  EXPECT_EQ(a.page->entries, 64);
  EXPECT_EQ(a.record, a.page->bytes + f.entry_data_offset(5));
  EXPECT_EQ(a.scales, a.page->bytes + f.entry_scales_offset(5));
  EXPECT_EQ(pages.Slot(9).page, a.page);  // one KvPage per page, at a stable address
  std::vector<uint8_t> bytes;
  bool as_bf16 = true;
  ASSERT_TRUE(pages.Serialize(0, &bytes, &as_bf16).ok());
  EXPECT_EQ(std::memcmp(bytes.data(), a.page->bytes, bytes.size()), 0);

  std::vector<uint64_t> seen = {a.page->version, b.page->version};
  auto fresh = [&](uint64_t v) {
    const bool is_new = v != 0 && std::find(seen.begin(), seen.end(), v) == seen.end();
    seen.push_back(v);
    return is_new;
  };
  pages.Append(values.data());  // entry 70: page 1 written
  EXPECT_TRUE(fresh(b.page->version));
  const uint64_t v0 = a.page->version;
  pages.Overwrite(3, values.data() + 9 * 512);  // the ring reuses a slot of page 0
  EXPECT_TRUE(fresh(a.page->version));
  EXPECT_NE(a.page->version, v0);
  pages.Evict(0);
  EXPECT_EQ(a.page->bytes, nullptr);
  EXPECT_TRUE(fresh(a.page->version));
  EXPECT_TRUE(pages.Slot(5).masked());
  EXPECT_EQ(pages.Slot(5).page, nullptr);
  ASSERT_TRUE(pages.Restore(0, bytes).ok());
  EXPECT_TRUE(fresh(a.page->version));
  const kernels::KvSlot back = pages.Slot(5);
  EXPECT_EQ(back.page, a.page);
  EXPECT_EQ(back.page->bytes, back.record - f.entry_data_offset(5));
  EXPECT_EQ(std::memcmp(bytes.data(), back.page->bytes, bytes.size()), 0);
  EXPECT_EQ(a.page->size, f.page_bytes());
  // A stream of fp32 rows (here: one that fell back) names its pages as rows: 64 x dim floats.
  std::vector<float> odd(values.begin(), values.begin() + 512);
  odd[1] = 0.3f;
  pages.Append(odd.data());
  ASSERT_FALSE(pages.encoded());
  const kernels::KvSlot row = pages.Slot(5);
  ASSERT_NE(row.row, nullptr);
  EXPECT_EQ(row.record, nullptr);
  EXPECT_EQ(row.page, a.page);
  EXPECT_EQ(row.page->size, 64 * 512 * 4);
  EXPECT_EQ(reinterpret_cast<const float*>(row.page->bytes) + 5 * 512, row.row);
  EXPECT_TRUE(fresh(row.page->version));
}

// Index keys kept with an MXFP4 twin (packed_twin): each key run names the twin page, whose bytes
// are always EncodePage of the rows (unwritten entries as zero rows encode), announced like the
// rows' page (one appended entry: its data and scale bytes, under a fresh version); evicted and
// restored with the rows; Serialize sends the twin. An off-grid key drops the twin for good.
TEST(EntryPagesTest, IndexKeysKeepAnMxfp4TwinOfEveryPage) {
  const PageFormat f = PageFormat::IndexKeys(128);
  const std::vector<float> values = IndexKeyPage(f, 51);
  EntryPages keys(f, /*encoded=*/false, /*packed_twin=*/true), plain(f, false);
  EXPECT_TRUE(keys.has_packed_twin());
  EXPECT_FALSE(plain.has_packed_twin());
  EXPECT_EQ(keys.page_bytes(), 64 * 128 * 4 + 64 * 68);
  EXPECT_EQ(plain.page_bytes(), 64 * 128 * 4);
  auto twin_is_the_rows = [&](int64_t page) {
    const kernels::KvPage* twin = keys.Run(page * 64, 1).packed;
    if (twin == nullptr || twin->bytes == nullptr || twin->size != f.page_bytes() || twin->entries != 64) return false;
    std::vector<float> rows(f.page_floats(), 0.0f);
    const int64_t n = std::min<int64_t>(64, keys.size() - page * 64);
    std::copy_n(keys.Row(page * 64), n * 128, rows.begin());
    std::vector<uint8_t> want;
    if (!EncodePage(f, rows, &want).ok()) return false;
    return std::memcmp(want.data(), twin->bytes, want.size()) == 0;
  };
  for (int64_t e = 0; e < 100; ++e) {
    keys.Append(values.data() + (e % 64) * 128);
    plain.Append(values.data() + (e % 64) * 128);
    if (e % 17 == 0 || e == 63 || e == 99) {
      ASSERT_TRUE(twin_is_the_rows(e / 64)) << "after entry " << e;
    }
  }
  EXPECT_EQ(plain.Run(0, 1).packed, nullptr);
  const kernels::KeyRun run = keys.Run(70, 5);
  ASSERT_NE(run.packed, nullptr);
  EXPECT_NE(run.packed, run.page);
  EXPECT_EQ(run.entry, 6);
  EXPECT_EQ(run.rows, keys.Row(70));
  EXPECT_EQ(run.page->size, 64 * 128 * 4) << "the rows' page: its bytes, not the twin's";
  EXPECT_EQ(run.packed->size, 64 * 68);
  // The next append changes entry 36 of page 1: the twin's two byte ranges of it, nothing else.
  const kernels::KvPage& twin = *run.packed;
  const std::vector<uint8_t> old(twin.bytes, twin.bytes + twin.size);
  const uint64_t v = twin.version;
  keys.Append(values.data() + 9 * 128);
  ASSERT_EQ(twin.before, v);
  EXPECT_NE(twin.version, v);
  std::vector<uint8_t> patched = old;
  for (const kernels::KvPage::Range& r : twin.changed) std::memcpy(patched.data() + r.offset, twin.bytes + r.offset, r.bytes);
  EXPECT_EQ(std::memcmp(patched.data(), twin.bytes, twin.size), 0);
  EXPECT_EQ(twin.changed[0].offset, f.entry_data_offset(36));
  EXPECT_EQ(twin.changed[0].bytes + twin.changed[1].bytes, f.entry_bytes());
  // Serialize sends the twin: the bytes the plain stream encodes.
  std::vector<uint8_t> a, b;
  bool bf16_a = true, bf16_b = true;
  ASSERT_TRUE(keys.Serialize(0, &a, &bf16_a).ok());
  ASSERT_TRUE(plain.Serialize(0, &b, &bf16_b).ok());
  EXPECT_FALSE(bf16_a);
  EXPECT_EQ(a, b);
  // Evicted with the rows (the run names neither), restored with them.
  const kernels::KvPage* twin0 = keys.Run(0, 1).packed;
  keys.Evict(0);
  EXPECT_EQ(twin0->bytes, nullptr);
  EXPECT_EQ(keys.Run(0, 1).rows, nullptr);
  EXPECT_EQ(keys.Run(0, 1).packed, nullptr);
  const uint64_t evicted = twin0->version;
  ASSERT_TRUE(keys.Restore(0, a).ok());
  EXPECT_NE(twin0->version, evicted);
  EXPECT_EQ(twin0->before, 0u);
  EXPECT_TRUE(twin_is_the_rows(0));
  EXPECT_EQ(std::memcmp(twin0->bytes, a.data(), a.size()), 0) << "the recalled bytes, as sent";
  // The bf16 form of an older worker: the twin encoded from its values.
  std::vector<uint8_t> bf16(f.bf16_page_bytes());
  num::FloatsToBf16Bytes(keys.Row(0), f.page_floats(), bf16.data());
  keys.Evict(0);
  ASSERT_TRUE(keys.Restore(0, bf16).ok());
  EXPECT_TRUE(twin_is_the_rows(0));
  // A page with a scale byte of 0 (2^-127: never written by the encoder, nor read by a device)
  // is not kept as sent: the twin is the values' own encoding (1.0 x 2^-127 is 0.5 x 2^-126).
  std::vector<uint8_t> tiny(f.page_bytes(), 0);
  tiny[0] = 0x02;  // entry 0, dim 0: code 1.0
  for (int64_t e = 0; e < 64; ++e)
    for (int64_t b = 0; b < 4; ++b) tiny[f.entry_scales_offset(e) + b] = e == 0 && b == 0 ? 0 : 127;
  EntryPages other(f, false, true);
  for (int64_t e = 0; e < 64; ++e) other.Append(values.data() + e * 128);
  other.Evict(0);
  ASSERT_TRUE(other.Restore(0, tiny).ok());
  EXPECT_EQ(std::bit_cast<uint32_t>(other.Row(0)[0]), std::bit_cast<uint32_t>(std::ldexp(1.0f, -127)));
  ASSERT_TRUE(other.has_packed_twin());
  const kernels::KvPage* t = other.Run(0, 1).packed;
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->bytes[f.entry_scales_offset(0)], 1) << "2^-126";
  EXPECT_EQ(t->bytes[0], 0x01) << "e2m1 0.5";
  std::vector<uint8_t> want;
  ASSERT_TRUE(EncodePage(f, std::vector<float>(other.Row(0), other.Row(0) + f.page_floats()), &want).ok());
  EXPECT_EQ(std::memcmp(t->bytes, want.data(), want.size()), 0);
  // A key off the grid: the twin is dropped for good (runs name none; Serialize still encodes).
  std::vector<float> odd(values.begin(), values.begin() + 128);
  odd[5] = 0.3f;
  keys.Append(odd.data());
  EXPECT_FALSE(keys.has_packed_twin());
  EXPECT_TRUE(keys.fell_back_to_fp32());
  EXPECT_EQ(keys.page_bytes(), 64 * 128 * 4);
  EXPECT_EQ(keys.Run(0, 1).packed, nullptr);
  EXPECT_EQ(twin0->bytes, nullptr);
  EXPECT_TRUE(SameBits(std::vector<float>(keys.Row(101), keys.Row(101) + 128), odd));
  ASSERT_TRUE(keys.Serialize(0, &a, &bf16_a).ok());
  EXPECT_EQ(a, b);
  keys.Append(values.data());
  EXPECT_EQ(keys.Run(64, 1).packed, nullptr);
}

}  // namespace
}  // namespace flashmem::kv
