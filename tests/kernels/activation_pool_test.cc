// Activation memory (kernels/activation_pool.h): the pool's blocks, its limits, and model::Scratch
// taking its memory from the installed pool. The source here is the heap; the CUDA backend's is
// page-locked memory (tests/cuda cover the copies from it).
#include "kernels/activation_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "worker/model/scratch.h"

namespace flashmem::kernels {
namespace {

// A source that counts what it gives out (and never takes it back, like the real one).
struct CountingSource {
  std::vector<void*> given;
  size_t bytes = 0;
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
  ActivationPool pool(src.fn(), Small());
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
  ActivationPool pool(src.fn(), Small());
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

TEST(ActivationPool, FreeTakesOnlyItsOwnBlocksOnce) {
  CountingSource src;
  ActivationPool pool(src.fn(), Small());
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
  ActivationPool pool(src.fn(), Small());
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
  static ActivationPool* pool = new ActivationPool(src.fn(), Small());
  ASSERT_TRUE(InstallActivationPool(pool));
  CountingSource other;
  ActivationPool second(other.fn(), Small());
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
