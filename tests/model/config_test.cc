// config.json parsing and validation: every error names the key and the value.
#include "worker/model/config.h"

#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace flashmem::model {
namespace {

using nlohmann::json;

json GoldenConfig() {
  std::ifstream in(std::string(FLASHMEM_GOLDEN_DIR) + "/dsv4-tiny-c/config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

TEST(Config, ParsesEveryKeyOfTheGoldenConfig) {
  auto a = ParseModelArgs(GoldenConfig().dump());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->vocab_size, 1024);
  EXPECT_EQ(a->dim, 128);
  EXPECT_EQ(a->n_layers, 6);
  EXPECT_EQ(a->n_mtp_layers, 1);
  EXPECT_EQ(a->compress_ratios, (std::vector<int>{0, 4, 128, 4, 128, 4, 0}));
  EXPECT_EQ(a->n_heads, 4);
  EXPECT_EQ(a->head_dim, 512);
  EXPECT_EQ(a->rope_head_dim, 64);
  EXPECT_EQ(a->q_lora_rank, 128);
  EXPECT_EQ(a->o_groups, 2);
  EXPECT_EQ(a->o_lora_rank, 128);
  EXPECT_EQ(a->window_size, 128);
  EXPECT_EQ(a->index_n_heads, 4);
  EXPECT_EQ(a->index_head_dim, 128);
  EXPECT_EQ(a->index_topk, 256);
  EXPECT_EQ(a->n_routed_experts, 4);
  EXPECT_EQ(a->n_activated_experts, 4);
  EXPECT_EQ(a->moe_inter_dim, 256);
  EXPECT_EQ(a->n_hash_layers, 3);
  EXPECT_EQ(a->score_func, ScoreFunc::kSqrtSoftplus);
  EXPECT_FLOAT_EQ(a->route_scale, 1.5f);
  EXPECT_FLOAT_EQ(a->swiglu_limit, 10.0f);
  EXPECT_EQ(a->hc_mult, 4);
  EXPECT_EQ(a->hc_sinkhorn_iters, 20);
  EXPECT_DOUBLE_EQ(a->rope_theta, 10000);
  EXPECT_DOUBLE_EQ(a->compress_rope_theta, 160000);
  EXPECT_DOUBLE_EQ(a->rope_factor, 16);
  EXPECT_EQ(a->original_seq_len, 65536);
  EXPECT_EQ(a->expert_dtype, ExpertDtype::kFp4);
  // Round trip through the writer.
  auto b = ParseModelArgs(ModelArgsToJson(*a));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->compress_ratios, a->compress_ratios);
  EXPECT_EQ(b->original_seq_len, a->original_seq_len);
}

struct BadCase {
  const char* key;
  json value;
  const char* expect;  // substring of the error
};

TEST(Config, InvalidValuesNameTheKeyAndValue) {
  const std::vector<BadCase> cases = {
      {"hidden_size", 100, "'hidden_size' = 100"},
      {"q_lora_rank", 96, "'q_lora_rank' = 96"},
      {"moe_intermediate_size", 200, "'moe_intermediate_size' = 200"},
      {"o_groups", 3, "'o_groups' = 3: must divide num_attention_heads = 4"},
      {"compress_ratios", json::array({0, 4, 128}), "'compress_ratios' = 3: length must be"},
      {"compress_ratios", json::array({0, 4, 128, 4, 128, 4, 4}), "MTP layers are sliding-window only"},
      {"compress_ratios", json::array({0, 3, 128, 4, 128, 4, 0}), "'compress_ratios[1]' = 3"},
      {"scoring_func", "relu", "'scoring_func' = \"relu\""},
      {"topk_method", "group_limited_greedy", "'topk_method' = \"group_limited_greedy\""},
      {"num_key_value_heads", 2, "'num_key_value_heads' = 2"},
      {"index_head_dim", 96, "'index_head_dim' = 96"},
      {"num_experts_per_tok", 9, "'num_experts_per_tok' = 9"},
      {"vocab_size", "big", "'vocab_size' = \"big\": must be an integer"},
      {"expert_dtype", "int4", "'expert_dtype' = \"int4\""},
      {"tie_word_embeddings", true, "'tie_word_embeddings'"},
  };
  for (const BadCase& c : cases) {
    json j = GoldenConfig();
    j[c.key] = c.value;
    auto a = ParseModelArgs(j.dump());
    ASSERT_FALSE(a.ok()) << c.key;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(a.status().message()).find(c.expect), std::string::npos)
        << c.key << ": " << a.status().message();
  }
  json j = GoldenConfig();
  j["quantization_config"]["weight_block_size"] = json::array({64, 64});
  EXPECT_NE(std::string(ParseModelArgs(j.dump()).status().message()).find("weight_block_size"), std::string::npos);
  j = GoldenConfig();
  j.erase("num_hidden_layers");
  EXPECT_NE(std::string(ParseModelArgs(j.dump()).status().message()).find("missing key 'num_hidden_layers'"), std::string::npos);
  EXPECT_FALSE(ParseModelArgs("{not json").ok());
  EXPECT_FALSE(ParseModelArgs("[1,2]").ok());
}

}  // namespace
}  // namespace flashmem::model
