// The KV reserve's bookkeeping (kernels/kv_reserve.h): which pages a call must upload, where they
// go, and that a copy is never trusted once its page changed.
#include "kernels/kv_reserve.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace flashmem::kernels {
namespace {

struct Pages {
  explicit Pages(int n) : bytes(n), page(n) {
    for (int i = 0; i < n; ++i) {
      page[i].bytes = &bytes[i];
      page[i].entries = 64;
      page[i].version = NewKvPageVersion();
    }
  }
  std::vector<uint8_t> bytes;  // one byte a page stands for its bytes
  std::vector<KvPage> page;
};

TEST(KvReserve, UploadsAPageOnceThenFindsItInPlace) {
  KvReserve r(4, 37376);
  Pages p(3);
  r.Begin();
  const int64_t s0 = r.Place(p.page[0]), s1 = r.Place(p.page[1]);
  EXPECT_EQ(r.Place(p.page[0]), s0);  // twice in one call: one upload
  ASSERT_EQ(r.uploads().size(), 2u);
  EXPECT_EQ(r.uploads()[0].bytes, p.page[0].bytes);
  EXPECT_EQ(r.uploads()[0].slot, s0);
  EXPECT_EQ(r.uploads()[1].slot, s1);
  EXPECT_NE(s0, s1);
  EXPECT_EQ(p.page[0].device_slot.load(), s0);
  r.Begin();
  EXPECT_EQ(r.Place(p.page[0]), s0);
  EXPECT_EQ(r.Place(p.page[1]), s1);
  EXPECT_TRUE(r.uploads().empty());
  EXPECT_EQ(r.hits(), 2);
  EXPECT_EQ(r.uploaded(), 2);
  EXPECT_EQ(r.used(), 2);
}

TEST(KvReserve, AWrittenPageIsUploadedAgain) {
  KvReserve r(4, 64);
  Pages p(1);
  r.Begin();
  r.Place(p.page[0]);
  p.page[0].version = NewKvPageVersion();  // what EntryPages does on every write
  r.Begin();
  r.Place(p.page[0]);
  ASSERT_EQ(r.uploads().size(), 1u);
  EXPECT_EQ(r.uploads()[0].bytes, p.page[0].bytes);
  EXPECT_EQ(r.hits(), 0);
  EXPECT_EQ(r.uploaded(), 2);
}

TEST(KvReserve, ASlotHandedToAnotherPageIsNotTrustedForTheFirst) {
  KvReserve r(1, 64);
  Pages p(2);
  r.Begin();
  const int64_t s = r.Place(p.page[0]);
  r.Begin();
  EXPECT_EQ(r.Place(p.page[1]), s);  // the only slot, reclaimed
  EXPECT_EQ(p.page[0].device_slot.load(), s);  // page 0 still names it...
  r.Begin();
  EXPECT_EQ(r.Place(p.page[0]), s);  // ...but its copy is gone: uploaded again
  EXPECT_EQ(r.uploads().size(), 1u);
}

TEST(KvReserve, ACallLargerThanTheReserveIsRefusedAndAbortForgetsItsSlots) {
  KvReserve r(2, 64);
  Pages p(3);
  r.Begin();
  r.Place(p.page[0]);
  r.Begin();
  EXPECT_GE(r.Place(p.page[1]), 0);
  EXPECT_GE(r.Place(p.page[2]), 0);  // takes page 0's slot (not used by this call)
  EXPECT_EQ(r.Place(p.page[0]), -1);  // both slots are this call's
  r.Abort();
  EXPECT_EQ(r.used(), 0);  // the call's copies were never written
  EXPECT_EQ(r.uploaded(), 1);
  r.Begin();
  r.Place(p.page[1]);
  EXPECT_EQ(r.uploads().size(), 1u);  // not trusted after the abort
}

TEST(KvReserve, ClockGivesRecentlyUsedPagesASecondChance) {
  KvReserve r(3, 64);
  Pages p(4);
  for (int i = 0; i < 3; ++i) {
    r.Begin();
    r.Place(p.page[i]);
  }
  // Every slot is referenced: the hand clears them all, then takes the first (page 0's).
  r.Begin();
  const int64_t s3 = r.Place(p.page[3]);
  EXPECT_EQ(s3, p.page[0].device_slot.load());
  // Page 1 used again; the next newcomer passes it over for page 2's slot.
  r.Begin();
  r.Place(p.page[1]);
  r.Begin();
  p.page[0].version = NewKvPageVersion();
  const int64_t s0 = r.Place(p.page[0]);
  EXPECT_EQ(s0, p.page[2].device_slot.load());
  r.Begin();
  r.Place(p.page[1]);
  EXPECT_TRUE(r.uploads().empty());
}

// A page written once since its copy (KvPage::before is the copy's version) is patched in its own
// slot with the ranges the write changed; written twice, or its slot taken since, it goes whole.
// Abort forgets a patched slot too (the patch may have landed in part).
TEST(KvReserve, APageWrittenOnceSinceItsCopyIsPatchedInPlace) {
  KvReserve r(2, 37376);
  Pages p(3);
  r.Begin();
  const int64_t s0 = r.Place(p.page[0]);
  auto write = [&](KvPage& page, int64_t e) {  // what EntryPages does for one entry of FP8 records
    page.before = page.version;
    page.version = NewKvPageVersion();
    page.changed = {{{e * 576, 576}, {64 * 576 + e * 8, 8}}};
  };
  write(p.page[0], 5);
  r.Begin();
  EXPECT_EQ(r.Place(p.page[0]), s0);
  EXPECT_TRUE(r.uploads().empty());
  ASSERT_EQ(r.patches().size(), 2u);
  EXPECT_EQ(r.patches()[0].bytes, p.page[0].bytes + 5 * 576);
  EXPECT_EQ(r.patches()[0].slot, s0);
  EXPECT_EQ(r.patches()[0].offset, 5 * 576);
  EXPECT_EQ(r.patches()[0].size, 576);
  EXPECT_EQ(r.patches()[1].offset, 64 * 576 + 5 * 8);
  EXPECT_EQ(r.patches()[1].size, 8);
  EXPECT_EQ(r.patched(), 1);
  EXPECT_EQ(r.Place(p.page[0]), s0);  // again in the same call: in place now
  EXPECT_EQ(r.patches().size(), 2u);
  r.Begin();
  r.Place(p.page[0]);
  EXPECT_TRUE(r.patches().empty());
  EXPECT_TRUE(r.uploads().empty());
  // Two writes since the copy: the page goes whole.
  write(p.page[0], 6);
  write(p.page[0], 7);
  r.Begin();
  const int64_t s0b = r.Place(p.page[0]);
  EXPECT_TRUE(r.patches().empty());
  ASSERT_EQ(r.uploads().size(), 1u);
  EXPECT_EQ(r.uploads()[0].slot, s0b);
  // Its slot handed to other pages since: whole again, never patched into another page's copy.
  r.Begin();
  r.Place(p.page[1]);
  r.Begin();
  r.Place(p.page[2]);  // takes page 0's slot (CLOCK)
  write(p.page[0], 8);
  r.Begin();
  r.Place(p.page[0]);
  EXPECT_TRUE(r.patches().empty());
  EXPECT_EQ(r.uploads().size(), 1u);
  // A patch aborted: the slot is forgotten, the page goes whole next time.
  write(p.page[0], 9);
  r.Begin();
  r.Place(p.page[0]);
  ASSERT_EQ(r.patches().size(), 2u);
  const int64_t patched = r.patched();
  r.Abort();
  EXPECT_EQ(r.patched(), patched - 1);
  r.Begin();
  r.Place(p.page[0]);
  EXPECT_TRUE(r.patches().empty());
  EXPECT_EQ(r.uploads().size(), 1u);
}

TEST(KvReserve, APageItsCallerWritesIsNeitherPatchedNorTrustedAfterAnAbort) {
  KvReserve r(2, 37376);
  Pages p(2);
  r.Begin();
  const int64_t s0 = r.Place(p.page[0]);
  auto write = [&](KvPage& page, int64_t e) {  // EntryPages::BeginRecordWrite
    page.before = page.version;
    page.version = NewKvPageVersion();
    page.changed = {{{e * 576, 576}, {64 * 576 + e * 8, 8}}};
  };
  // Written once since its copy, by the caller (a device encoding the entry into the slot): the
  // slot takes the new version with no patch from the host's bytes (not written yet).
  write(p.page[0], 5);
  r.Begin();
  EXPECT_EQ(r.Place(p.page[0], /*writes_changed=*/true), s0);
  EXPECT_TRUE(r.patches().empty());
  EXPECT_TRUE(r.uploads().empty());
  EXPECT_EQ(r.written(), 1);
  EXPECT_EQ(r.patched(), 0);
  r.Begin();
  EXPECT_EQ(r.Place(p.page[0]), s0);  // the copy is current
  EXPECT_TRUE(r.patches().empty() && r.uploads().empty());
  // Not in the reserve: the whole page goes up first (the caller's write lands after it).
  write(p.page[1], 9);
  r.Begin();
  const int64_t s1 = r.Place(p.page[1], true);
  ASSERT_EQ(r.uploads().size(), 1u);
  EXPECT_EQ(r.uploads()[0].slot, s1);
  EXPECT_EQ(r.written(), 1);
  // Aborted (the write did not happen): the slot is forgotten and the count undone.
  write(p.page[0], 6);
  r.Begin();
  r.Place(p.page[0], true);
  EXPECT_EQ(r.written(), 2);
  r.Abort();
  EXPECT_EQ(r.written(), 1);
  EXPECT_EQ(r.patched(), 0);
  r.Begin();
  r.Place(p.page[0]);
  EXPECT_TRUE(r.patches().empty());
  EXPECT_EQ(r.uploads().size(), 1u);
}

TEST(KvReserve, AnEmptyReserveRefusesEveryPage) {
  KvReserve r;
  Pages p(1);
  r.Begin();
  EXPECT_EQ(r.Place(p.page[0]), -1);
  EXPECT_TRUE(r.uploads().empty());
}

}  // namespace
}  // namespace flashmem::kernels
