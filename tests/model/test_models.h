// Small random checkpoints for engine and loader tests (real loader, real files in a temp dir).
#pragma once

#include <filesystem>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "kernels/device.h"
#include "tests/test_prompt.h"
#include "worker/model/random_checkpoint.h"
#include "worker/model/safetensors.h"
#include "worker/model/transformer.h"

namespace flashmem::testing {

// The backend the model tests run on: FLASHMEM_TEST_DEVICE (cpu | cuda:N), cpu when unset, and
// FLASHMEM_TEST_CUDA_KERNELS (exact | fast | fast-fp8). The
// GPU runs (tests/cuda/run_gpu_tests.sh) run the engine, golden and LSA suites on cuda:0 this way.
// A device that cannot be opened ends the run: never a silent fall-back to the CPU.
inline const kernels::Backend& TestBackend() {
  static kernels::BackendHandle* handle = [] {
    const char* env = std::getenv("FLASHMEM_TEST_DEVICE");
    const char* kinds = std::getenv("FLASHMEM_TEST_CUDA_KERNELS");  // exact (default) | fast
    auto h = kernels::OpenBackend(env && *env ? env : "cpu", 0, kinds && *kinds ? kinds : "exact");
    if (!h.ok()) {
      std::fprintf(stderr, "FLASHMEM_TEST_DEVICE: %s\n", std::string(h.status().message()).c_str());
      std::exit(2);
    }
    return new kernels::BackendHandle(std::move(*h));
  }();
  return *handle->backend;
}

// The tiny preset with a small vocabulary (fast to write and load).
inline model::ModelArgs SmallVocabTiny(int64_t layers = 0) {
  auto a = model::PresetArgs("tiny", layers);
  EXPECT_TRUE(a.ok()) << a.status();
  a->vocab_size = 512;
  return *a;
}

inline std::string TempDir(const std::string& name) {
  const auto p = std::filesystem::temp_directory_path() /
                 (std::string("flashmem_") + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

inline std::string WriteModel(const model::ModelArgs& a, const std::string& name, uint64_t seed = 7) {
  const std::string dir = TempDir(name);
  auto st = model::WriteRandomCheckpoint(a, seed, dir);
  EXPECT_TRUE(st.ok()) << st.status();
  return dir;
}

// A random checkpoint written to a temp dir and loaded; the dir goes with it.
struct LoadedModel {
  std::string dir;
  std::unique_ptr<model::Transformer> model;
  ~LoadedModel() { std::filesystem::remove_all(dir); }
};
inline std::unique_ptr<LoadedModel> LoadRandomModel(const model::ModelArgs& a, const std::string& name) {
  auto m = std::make_unique<LoadedModel>();
  m->dir = WriteModel(a, name);
  auto tf = model::Transformer::Load(m->dir, TestBackend());
  EXPECT_TRUE(tf.ok()) << tf.status();
  if (tf.ok()) m->model = std::move(*tf);
  return m;
}

// Reads every tensor of a safetensors file back into writable form.
inline std::vector<model::TensorToWrite> ReadAll(const std::string& path) {
  std::vector<model::TensorToWrite> out;
  auto f = model::SafetensorsFile::Open(path);
  EXPECT_TRUE(f.ok()) << f.status();
  for (const auto& [name, v] : (*f)->tensors())
    out.push_back({name, v.dtype, v.shape, std::vector<uint8_t>(v.bytes.begin(), v.bytes.end())});
  return out;
}

}  // namespace flashmem::testing
