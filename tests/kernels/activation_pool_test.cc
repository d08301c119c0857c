// Activation memory (kernels/activation_pool.h): the pool's blocks, its limits, and model::Scratch
// taking its memory from the installed pool. The source here is the heap; the CUDA backend's is
// page-locked memory (tests/cuda cover the copies from it).
#include "kernels/activation_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "worker/model/scratch.h"

namespace flashmem::kernels {
namespace {

// A source that counts what it gives out and takes back.
struct CountingSource {
  std::vector<void*> given;  // not taken back yet
  size_t bytes = 0, released = 0;
  bool fail = false;
  ActivationPool::Source fn() {
    return [this](size_t n) -> void* {
      if (fail) return nullptr;
      void* p = std::aligned_alloc(4096, n);
      given.push_back(p);
      bytes += n;
      return p;
    };
  }
  ActivationPool::Release release() {
    return [this](void* p, size_t n) {
      given.erase(std::find(given.begin(), given.end(), p));
      std::free(p);
      bytes -= n;
      ++released;
    };
  }
  ~CountingSource() {
    for (void* p : given) std::free(p);
  }
};

ActivationPoolOptions Small() {
  ActivationPoolOptions o;
  o.capacity_bytes = 1 << 20;
  o.min_bytes = 4096;
  o.max_bytes = 512 << 10;
  return o;
}

TEST(ActivationPool, ReusesAFreedBlockOfTheSameSize) {
  CountingSource src;
  ActivationPool pool(src.fn(), src.release(), Small());
  void* a = pool.Allocate(5000);  // an 8 KiB block
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(pool.held_bytes(), 8192u);
  EXPECT_EQ(pool.in_use_bytes(), 8192u);
  EXPECT_TRUE(pool.Free(a));
  EXPECT_EQ(pool.in_use_bytes(), 0u);
  void* b = pool.Allocate(8000);  // same size class: the cached block
  EXPECT_EQ(b, a);
  EXPECT_EQ(src.given.size(), 1u);
  void* c = pool.Allocate(8000);  // the cached block is in use: a new one
  ASSERT_NE(c, nullptr);
  EXPECT_NE(c, b);
  EXPECT_EQ(src.given.size(), 2u);
  EXPECT_EQ(pool.held_bytes(), 16384u);
  EXPECT_TRUE(pool.Free(b));
  EXPECT_TRUE(pool.Free(c));
}

TEST(ActivationPool, DeclinesSizesOutsideItsRangeAndPastItsCapacity) {
  CountingSource src;
  ActivationPool pool(src.fn(), src.release(), Small());
  EXPECT_EQ(pool.Allocate(0), nullptr);
  EXPECT_EQ(pool.Allocate(4095), nullptr);        // below min_bytes
  EXPECT_EQ(pool.Allocate((512 << 10) + 1), nullptr);  // above max_bytes
  std::vector<void*> held;
  for (int i = 0; i < 2; ++i) held.push_back(pool.Allocate(512 << 10));
  ASSERT_NE(held[0], nullptr);
  ASSERT_NE(held[1], nullptr);
  EXPECT_EQ(pool.held_bytes(), size_t{1} << 20);
  EXPECT_EQ(pool.Allocate(4096), nullptr);  // the capacity is taken
  src.fail = true;
  EXPECT_TRUE(pool.Free(held[0]));
  EXPECT_EQ(pool.Allocate(300 << 10), held[0]);  // a cached block needs no source
  EXPECT_EQ(pool.Allocate(300 << 10), nullptr);   // a new one would: the source fails
  EXPECT_TRUE(pool.Free(held[0]));
  EXPECT_TRUE(pool.Free(held[1]));
}

// Past the capacity, cached blocks of other sizes go back to the source (largest first) to make
// room for a size the cache lacks; blocks in use never do.
TEST(ActivationPool, GivesBackCachedBlocksToMakeRoomForOtherSizes) {
  CountingSource src;
  ActivationPool pool(src.fn(), src.release(), Small());  // 1 MiB
  void* big = pool.Allocate(512 << 10);
  void* mid = pool.Allocate(256 << 10);
  void* small = pool.Allocate(128 << 10);
  ASSERT_TRUE(big && mid && small);
  EXPECT_EQ(pool.held_bytes(), size_t{896} << 10);
  EXPECT_TRUE(pool.Free(big));
  EXPECT_TRUE(pool.Free(mid));
  // 256 KB more would pass 1 MiB: the cached 512 KB block goes (the largest), the cached 256 KB
  // one serves the request without a new block.
  void* again = pool.Allocate(200 << 10);
  EXPECT_EQ(again, mid);
  EXPECT_EQ(src.released, 0u);  // a cached block of the size: nothing to give back
  void* other = pool.Allocate(64 << 10);  // 896 + 64 <= 1024: a new block, no room needed
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(src.released, 0u);
  void* more = pool.Allocate(100 << 10);  // a 128 KB block: 960 + 128 > 1024, so the cached 512 KB goes
  ASSERT_NE(more, nullptr);
  EXPECT_EQ(src.released, 1u);
  EXPECT_FALSE(pool.Contains(big, 16));  // no longer the pool's
  EXPECT_EQ(pool.held_bytes(), size_t{576} << 10);
  // Every block in use: no room, nothing given back.
  void* huge = pool.Allocate(512 << 10);  // 576 + 512 > 1024 and no cached block
  EXPECT_EQ(huge, nullptr);
  EXPECT_EQ(src.released, 1u);
  for (void* p : {again, small, other, more}) EXPECT_TRUE(pool.Free(p));
  EXPECT_EQ(pool.in_use_bytes(), 0u);
  void* fits = pool.Allocate(512 << 10);  // now the cached 256 and 128 go (largest first) as needed
  ASSERT_NE(fits, nullptr);
  EXPECT_LE(pool.held_bytes(), size_t{1} << 20);
  EXPECT_TRUE(pool.Free(fits));
}

TEST(ActivationPool, FreeTakesOnlyItsOwnBlocksOnce) {
  CountingSource src;
  ActivationPool pool(src.fn(), src.release(), Small());
  void* a = pool.Allocate(4096);
  ASSERT_NE(a, nullptr);
  int on_stack = 0;
  EXPECT_FALSE(pool.Free(&on_stack));
  EXPECT_FALSE(pool.Free(static_cast<char*>(a) + 64));  // inside a block, not its start
  EXPECT_FALSE(pool.Free(nullptr));
  EXPECT_TRUE(pool.Free(a));
  EXPECT_FALSE(pool.Free(a));  // twice
  EXPECT_EQ(pool.in_use_bytes(), 0u);
}

TEST(ActivationPool, ContainsOnlyRangesInsideOneBlock) {
  CountingSource src;
  ActivationPool pool(src.fn(), src.release(), Small());
  char* a = static_cast<char*>(pool.Allocate(4096));
  ASSERT_NE(a, nullptr);
  EXPECT_TRUE(pool.Contains(a, 4096));
  EXPECT_TRUE(pool.Contains(a + 100, 3996));
  EXPECT_TRUE(pool.Contains(a + 4096, 0));
  EXPECT_FALSE(pool.Contains(a + 100, 3997));  // runs past the block's end
  EXPECT_FALSE(pool.Contains(a - 1, 2));
  int on_stack = 0;
  EXPECT_FALSE(pool.Contains(&on_stack, sizeof on_stack));
  EXPECT_TRUE(pool.Free(a));
  EXPECT_TRUE(pool.Contains(a, 4096));  // cached blocks are still the pool's memory
}

TEST(ActivationPool, ScratchTakesTheInstalledPoolsMemory) {
  // Allocated before the installation: the heap, freed there afterwards.
  model::Scratch before(1 << 16);
  static CountingSource src;  // the installed pool lives until the process ends
  static ActivationPool* pool = new ActivationPool(src.fn(), src.release(), Small());
  ASSERT_TRUE(InstallActivationPool(pool));
  CountingSource other;
  ActivationPool second(other.fn(), other.release(), Small());
  EXPECT_FALSE(InstallActivationPool(&second));  // the first installation stays
  EXPECT_EQ(InstalledActivationPool(), pool);
  EXPECT_FALSE(pool->Contains(before.data(), before.size() * 4));
  {
    model::Scratch x(10000);  // 40 KB: a block
    EXPECT_TRUE(pool->Contains(x.data(), x.size() * 4));
    x[9999] = 1.0f;
    model::Scratch tiny(8);  // below min_bytes: the heap
    EXPECT_FALSE(pool->Contains(tiny.data(), 32));
    x.resize(200000);  // 800 KB: above max_bytes, the heap; the block goes back
    EXPECT_FALSE(pool->Contains(x.data(), x.size() * 4));
    EXPECT_EQ(x[9999], 1.0f);
    EXPECT_EQ(pool->in_use_bytes(), 0u);
  }
  before = model::Scratch(5);  // the heap block allocated before the pool is freed to the heap
  EXPECT_EQ(pool->in_use_bytes(), 0u);
}

}  // namespace
}  // namespace flashmem::kernels
