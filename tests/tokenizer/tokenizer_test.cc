// The DeepSeek tokenizer against ids from the Hugging Face `tokenizers` (Rust) implementation:
// every row of golden_ids.hf-tokenizers-rust.jsonl must match exactly.
#include "worker/tokenizer/tokenizer.h"

#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace flashmem::tokenizer {
namespace {

std::string ReadFile(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const Tokenizer& Tok() {
  static std::unique_ptr<Tokenizer> t = [] {
    auto r = Tokenizer::Load(FLASHMEM_TOKENIZER_JSON);
    EXPECT_TRUE(r.ok()) << r.status();
    return std::move(*r);
  }();
  return *t;
}

TEST(Tokenizer, ReproducesEveryGoldenRow) {
  std::ifstream in(std::string(FLASHMEM_SOURCE_DIR) + "/tests/tokenizer/golden_ids.hf-tokenizers-rust.jsonl");
  std::string line;
  int rows = 0, exact = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    const std::string source = j["source"];
    std::string text;
    if (j.contains("text")) {
      text = j["text"];
    } else {  // whole essays: the text lives in shared/eval_data (not copied into the repository)
      const std::string name = source.substr(source.find(':') + 1);
      text = ReadFile(std::string(FLASHMEM_EVAL_DATA) + "/paul_graham_essays/" + name);
      ASSERT_FALSE(text.empty()) << "missing essay " << name;
    }
    auto ids = Tok().Encode(text);
    ASSERT_TRUE(ids.ok()) << source << ": " << ids.status();
    ++rows;
    const int64_t n = j["n_tokens"].is_string() ? std::stoll(j["n_tokens"].get<std::string>()) : j["n_tokens"].get<int64_t>();
    EXPECT_EQ(static_cast<int64_t>(ids->size()), n) << source;
    if (j.contains("ids")) {
      const std::vector<int32_t> want = j["ids"].get<std::vector<int32_t>>();
      EXPECT_EQ(*ids, want) << source << ": " << text.substr(0, 60);
      exact += *ids == want;
      // Decoding gives the text back.
      auto back = Tok().Decode(*ids);
      ASSERT_TRUE(back.ok());
      EXPECT_EQ(*back, text) << source;
    } else {
      exact += static_cast<int64_t>(ids->size()) == n;
    }
  }
  std::printf("%d rows, %d exact\n", rows, exact);
  EXPECT_EQ(rows, 162);
  EXPECT_EQ(exact, rows);
}

TEST(Tokenizer, StreamingDecodeNeverEmitsBrokenUtf8) {
  const std::string text = "深度求索 😀👍🏽 Ünïcödé — done";
  auto ids = Tok().Encode(text);
  ASSERT_TRUE(ids.ok());
  Tokenizer::StreamDecoder dec(Tok());
  std::string all;
  for (int32_t id : *ids) {
    auto piece = dec.Push(id);
    ASSERT_TRUE(piece.ok());
    // Every emitted piece is valid UTF-8 on its own.
    auto check = Tok().Encode(*piece);
    EXPECT_TRUE(check.ok()) << "broken UTF-8 emitted after id " << id;
    all += *piece;
  }
  all += dec.Finish();
  EXPECT_EQ(all, text);
}

TEST(Tokenizer, StrayBytesComeOutAsReplacementCharacters) {
  // The byte-level token of the single byte 0xa9: a continuation byte without its lead.
  int32_t lone = -1;
  for (int32_t id = 0; id < Tok().vocab_size() && lone < 0; ++id) {
    auto d = Tok().Decode(std::vector<int32_t>{id});
    if (d.ok() && *d == "\xa9") lone = id;
  }
  ASSERT_GE(lone, 0);
  Tokenizer::StreamDecoder dec(Tok());
  std::string out;
  for (int i = 0; i < 4; ++i) out += *dec.Push(lone);
  out += dec.Finish();
  EXPECT_TRUE(Tok().Encode(out).ok()) << "output must be valid UTF-8";
  EXPECT_NE(out.find("\xEF\xBF\xBD"), std::string::npos);
}

TEST(Tokenizer, SpecialTokensAndErrors) {
  EXPECT_EQ(Tok().SpecialId("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(Tok().SpecialId("<｜end▁of▁sentence｜>"), 1);
  EXPECT_EQ(Tok().SpecialId("nope"), -1);
  EXPECT_EQ(Tok().vocab_size(), 128815);
  auto bad = Tok().Encode(std::string("ok \xff\xfe", 5));
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(bad.status().message()).find("byte 3"), std::string::npos);
  EXPECT_FALSE(Tok().Encode(std::string("\xc0\x80", 2)).ok());  // overlong
  const std::vector<int32_t> unknown = {5, 999999};
  EXPECT_NE(std::string(Tok().Decode(unknown).status().message()).find("ids[1] = 999999"), std::string::npos);
  EXPECT_FALSE(Tokenizer::Load("/nonexistent").ok());
}

}  // namespace
}  // namespace flashmem::tokenizer
