// Activation buffers that an op overwrites whole before anything reads them, in activation
// memory (kernels/activation_pool.h: page-locked when a device backend installed its pool, so the
// device's copies run straight from and into them).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "kernels/activation_pool.h"

namespace flashmem::model {

// An allocator of activation memory whose value-less construct leaves the element
// default-initialised: for float, no write at all. A std::vector<float>(n) zero-fills its n floats
// first; at a decode step of 64 rows the queries and attention outputs alone are 8 MB a layer, and
// those fills were ~15 ms of host time a step.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(kernels::AllocateActivation(n * sizeof(T))); }
  void deallocate(T* p, size_t) noexcept { kernels::FreeActivation(p); }
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// fp32 activations, uninitialised until written (resize(n) writes nothing; resize(n, v) fills v).
using Scratch = std::vector<float, DefaultInitAllocator<float>>;

}  // namespace flashmem::model
