// A random checkpoint with a memory indexer built by `indexer init`, loaded, in temp dirs that
// go with it (the LSA engine and paged-KV tests share it).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "gtest/gtest.h"
#include "tests/model/test_models.h"
#include "worker/lsa/indexer_init.h"
#include "worker/lsa/memory_indexer.h"

namespace flashmem::testing {

struct ModelWithIndexer {
  std::unique_ptr<LoadedModel> loaded;
  std::string indexer_dir;
  std::optional<lsa::MemoryIndexer> indexer;
  ~ModelWithIndexer() {
    if (!indexer_dir.empty()) std::filesystem::remove_all(indexer_dir);
  }
};

inline std::unique_ptr<ModelWithIndexer> LoadModelWithIndexer(const model::ModelArgs& a, const std::string& name) {
  auto m = std::make_unique<ModelWithIndexer>();
  m->loaded = LoadRandomModel(a, name);
  if (!m->loaded->model) return m;
  m->indexer_dir = TempDir(name + "_idx");
  const absl::Status st = lsa::InitIndexerFromModel(m->loaded->dir, {}, m->indexer_dir);
  EXPECT_TRUE(st.ok()) << st;
  auto mi = lsa::MemoryIndexer::Load(m->indexer_dir, TestBackend());
  EXPECT_TRUE(mi.ok()) << mi.status();
  if (mi.ok()) m->indexer.emplace(std::move(*mi));
  return m;
}

}  // namespace flashmem::testing
