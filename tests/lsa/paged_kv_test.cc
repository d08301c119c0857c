// Paged KV with LSA against a real flashmem-memtier process (gRPC + UCX on 127.0.0.1): an
// 8K-token prompt on the tiny model with a small --kv-budget keeps the worker's evictable KV
// within the budget once the first resident set is in force, memtier holds every page, and
// pages recalled from memtier (staged by the LSA task, or late before a dense step) give exactly
// the tokens of the same run with nothing evicted.
#include <filesystem>
#include <future>

#include "gtest/gtest.h"
#include "memtier/client/memtier_client.h"
#include "tests/lsa/lsa_test_models.h"
#include "tests/process_util.h"
#include "worker/kv/kv_pager.h"
#include "worker/server/scheduler.h"

namespace flashmem::lsa {
namespace {

constexpr int64_t kPrompt = 8192;
constexpr uint64_t kBudget = 1u << 20;  // a few page sets of the two CSA layers; dense needs ~3.5 MB

struct Observed {
  std::vector<int32_t> tokens;
  uint64_t max_resident_after_set = 0;  // evictable bytes in memory once a set is in force
  uint64_t over_budget_after_set = 0;
};

class PagedKv : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    m_ = testing::LoadModelWithIndexer(testing::SmallVocabTiny(4), "paged_kv").release();
    ASSERT_NE(m_->loaded->model, nullptr);
    ASSERT_TRUE(m_->indexer.has_value());
    loaded_ = m_->loaded.get();
    indexer_ = &*m_->indexer;
  }
  static void TearDownTestSuite() { delete m_; }

  // Append the prompt, generate 40, append 100 more prompt tokens (a dense prefill: every
  // evicted page must come back), generate 16.
  static Observed Run(kv::KvPager* pager, uint64_t memtier_key) {
    server::SchedulerOptions so;
    so.indexer = indexer_;
    so.lsa.interval = 16;
    so.lsa.kmax = 4;
    so.lsa.tail_chunks = 64;
    so.pager = pager;
    server::Scheduler sch(*loaded_->model, so);
    server::SessionOptions opt;
    opt.memtier_key = memtier_key;
    auto id = sch.CreateSession(opt);
    EXPECT_TRUE(id.ok()) << id.status();
    Observed obs;
    bool set_in_force = false;
    uint64_t over_at_set = 0, evicted_before = 0;
    auto generate = [&](int n) {
      set_in_force = false;
      if (pager) evicted_before = pager->stats().pages_evicted;
      std::promise<void> done;
      server::GenerateParams p;
      p.max_tokens = n;
      EXPECT_TRUE(sch.Generate(*id, p, [&](int32_t t, bool last, const std::string& why) {
        EXPECT_GE(t, 0) << why;
        if (t >= 0) obs.tokens.push_back(t);
        if (pager) {  // after this step's pager pass: the reserve as the next step finds it
          const kv::KvPagerStats ps = pager->stats();
          if (set_in_force) {
            obs.max_resident_after_set = std::max(obs.max_resident_after_set, ps.resident_bytes);
            obs.over_budget_after_set = ps.over_budget_steps - over_at_set;
          } else if (ps.pages_evicted > evicted_before) {  // a set in force: eviction began
            set_in_force = true;
            over_at_set = ps.over_budget_steps;
          }
        }
        if (last) done.set_value();
      }).ok());
      done.get_future().wait();
    };
    const auto prompt = testing::Prompt(kPrompt, loaded_->model->args().vocab_size, 21);
    EXPECT_TRUE(sch.Append(*id, prompt).ok());
    generate(40);
    EXPECT_TRUE(sch.Append(*id, testing::Prompt(100, loaded_->model->args().vocab_size, 22)).ok());
    generate(16);
    auto ls = sch.LsaStats(*id);
    EXPECT_TRUE(ls.ok());
    EXPECT_GE(ls->lsa.sets_applied, 2u);
    return obs;
  }

  static testing::ModelWithIndexer* m_;
  static testing::LoadedModel* loaded_;
  static MemoryIndexer* indexer_;
};
testing::LoadedModel* PagedKv::loaded_ = nullptr;
testing::ModelWithIndexer* PagedKv::m_ = nullptr;
MemoryIndexer* PagedKv::indexer_ = nullptr;

TEST_F(PagedKv, SmallBudgetEvictsToMemtierAndRecallsExactly) {
  const std::string dir = testing::TempDir("paged_kv_mt");
  testing::Child memtier = testing::Spawn(FLASHMEM_MEMTIER_BIN, {"--grpc-listen", "127.0.0.1:0", "--data-dir", dir + "/mt",
                                                                  "--ram-bytes", "268435456"});
  ASSERT_FALSE(memtier.target.empty()) << memtier.output;
  memtier::MemTierClientOptions mo;
  mo.target = memtier.target;
  mo.buffer_bytes = 4u << 20;
  mo.name = "paged-kv-test";
  auto client = memtier::MemTierClient::Connect(mo);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->OpenSession(42).ok());

  const Observed dense = Run(nullptr, 0);  // LSA, nothing evicted
  kv::KvPagerOptions po;
  po.budget_bytes = kBudget;
  po.pinned_index_layers = indexer_->csa_layers();
  kv::KvPager pager(loaded_->model->args(), po, client->get());
  const Observed paged = Run(&pager, 42);
  const kv::KvPagerStats ps = pager.stats();

  EXPECT_EQ(paged.tokens, dense.tokens) << "pages recalled from memtier must be the pages evicted";
  EXPECT_GT(ps.pages_evicted, 0u);
  EXPECT_GT(ps.pages_recalled, 0u);
  EXPECT_GT(paged.max_resident_after_set, 0u);
  EXPECT_LE(paged.max_resident_after_set, kBudget);
  EXPECT_EQ(paged.over_budget_after_set, 0u);
  EXPECT_GT(ps.peak_resident_bytes, kBudget) << "the dense prefill holds more than the budget (documented)";
  // memtier holds the full history: every complete page of every stream was acknowledged.
  EXPECT_GE(ps.pages_committed, ps.pages_evicted);
  auto remote = (*client)->Stats();
  ASSERT_TRUE(remote.ok());
  // 2 CSA layers x (main KV + index keys) + 1 HCA layer, 8292 tokens: 32 CSA pages per stream.
  EXPECT_GE(remote->pages_total, 4u * 32u);
  EXPECT_EQ(remote->checksum_failures, 0u);
  // Every page travelled in its compact form (page_codec.h): the model's values are on the grids.
  EXPECT_EQ(ps.pages_sent_bf16, 0u);
  EXPECT_EQ(ps.streams_fp32, 0u);
  EXPECT_GT(ps.committed_bytes, 0u);
  const model::ModelArgs& a = loaded_->model->args();
  const uint64_t main_page = kv::PageFormat::MainKv(a.head_dim, a.rope_head_dim).page_bytes();
  const uint64_t index_page = kv::PageFormat::IndexKeys(a.index_head_dim).page_bytes();
  EXPECT_GE(ps.committed_bytes, ps.pages_committed * std::min(main_page, index_page));
  std::printf("paged KV: budget %llu B, max resident after the first set %llu B, dense %llu B; evicted %llu, recalled %llu "
              "(staged %llu, late %llu in %.1f ms), committed %llu (%llu B)\n",
              static_cast<unsigned long long>(kBudget), static_cast<unsigned long long>(paged.max_resident_after_set),
              static_cast<unsigned long long>(ps.dense_bytes), static_cast<unsigned long long>(ps.pages_evicted),
              static_cast<unsigned long long>(ps.pages_recalled), static_cast<unsigned long long>(ps.pages_staged),
              static_cast<unsigned long long>(ps.late_pages), ps.late_seconds * 1e3,
              static_cast<unsigned long long>(ps.pages_committed), static_cast<unsigned long long>(ps.committed_bytes));
  client->reset();  // before memtier goes away
  testing::Stop(memtier);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace flashmem::lsa
