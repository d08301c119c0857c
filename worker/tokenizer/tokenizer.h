// DeepSeek byte-level BPE tokenizer, loaded from a Hugging Face tokenizer.json (the model
// directory's, by HF convention). Encoding follows the `tokenizers` (Rust) pipeline the file
// describes: added tokens split first (leftmost-longest), then the pre-tokenizer sequence (Split
// regexes with Isolated behaviour, evaluated with PCRE2 for Unicode classes and lookahead), the
// byte-level mapping, and BPE merges by rank.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace flashmem::tokenizer {

class Tokenizer {
 public:
  // `path` is a tokenizer.json file or a directory holding one.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  ~Tokenizer();

  // INVALID_ARGUMENT when `text` is not valid UTF-8.
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text) const;
  // Bytes of the tokens (may end inside a UTF-8 sequence; see StreamDecoder).
  // INVALID_ARGUMENT names the first unknown id.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids) const;
  int32_t vocab_size() const { return vocab_size_; }  // largest id + 1
  // Id of an added/special token by its content, -1 when absent.
  int32_t SpecialId(absl::string_view content) const;

  // Streaming decode that never emits a broken UTF-8 sequence across token boundaries: bytes of
  // an incomplete character are held until the rest arrives (or Finish); bytes that can never
  // form a character (a model may emit any byte token) come out as U+FFFD, so every piece is
  // valid UTF-8.
  class StreamDecoder {
   public:
    explicit StreamDecoder(const Tokenizer& t) : t_(t) {}
    absl::StatusOr<std::string> Push(int32_t id);
    std::string Finish();  // whatever is held (possibly incomplete) at the end of the stream

   private:
    const Tokenizer& t_;
    std::string pending_;
  };

 private:
  Tokenizer() = default;
  void EncodePiece(absl::string_view piece, std::vector<int32_t>* out) const;
  void PreTokenize(absl::string_view text, std::vector<absl::string_view>* pieces) const;

  struct Regex;
  std::vector<std::unique_ptr<Regex>> splits_;                 // pre-tokenizer Split patterns, in order
  absl::flat_hash_map<std::string, int32_t> vocab_;            // BPE vocabulary
  std::vector<std::string> id_to_token_;                       // byte-level strings (or added token contents)
  std::vector<bool> is_added_;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (left, right) -> (rank, merged id)
  int32_t byte_to_id_[256] = {};
  std::string byte_to_char_[256];                              // GPT-2 bytes_to_unicode, UTF-8 encoded
  absl::flat_hash_map<uint32_t, uint8_t> char_to_byte_;
  // Added tokens by first byte, longest first.
  std::vector<std::vector<std::pair<std::string, int32_t>>> added_by_first_byte_;
  absl::flat_hash_map<std::string, int32_t> added_;
  int32_t vocab_size_ = 0;
};

}  // namespace flashmem::tokenizer
