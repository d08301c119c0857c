#define PCRE2_CODE_UNIT_WIDTH 8
#include "worker/tokenizer/tokenizer.h"

#include <pcre2.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace flashmem::tokenizer {
namespace {

using nlohmann::json;

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// Length of the UTF-8 sequence a lead byte starts (0 for a continuation/invalid byte).
int Utf8Len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xe) return 3;
  if ((c >> 3) == 0x1e) return 4;
  return 0;
}

uint32_t DecodeUtf8(absl::string_view s, size_t i, int len) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data() + i);
  switch (len) {
    case 1: return p[0];
    case 2: return ((p[0] & 0x1f) << 6) | (p[1] & 0x3f);
    case 3: return ((p[0] & 0x0f) << 12) | ((p[1] & 0x3f) << 6) | (p[2] & 0x3f);
    default: return ((p[0] & 0x07) << 18) | ((p[1] & 0x3f) << 12) | ((p[2] & 0x3f) << 6) | (p[3] & 0x3f);
  }
}

// Length of the valid UTF-8 character at s[i] (shortest form, no surrogates), 0 when invalid.
int ValidCharLen(absl::string_view s, size_t i) {
  const int len = Utf8Len(static_cast<unsigned char>(s[i]));
  if (len == 0 || i + len > s.size()) return 0;
  for (int k = 1; k < len; ++k)
    if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return 0;
  if (len == 1) return 1;
  const uint32_t cp = DecodeUtf8(s, i, len);
  if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
      (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return len;
}

uint64_t PairKey(int32_t a, int32_t b) { return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b); }

}  // namespace

struct Tokenizer::Regex {
  pcre2_code* code = nullptr;
  pcre2_match_data* md = nullptr;
  ~Regex() {
    if (md) pcre2_match_data_free(md);
    if (code) pcre2_code_free(code);
  }
};

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = (std::filesystem::path(path) / "tokenizer.json").string();
  FM_ASSIGN_OR_RETURN(std::string text, ReadFileToString(file));
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": not valid JSON: ", e.what()));
  }
  auto bad = [&](absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat(file, ": ", what)); };
  if (!j.contains("model") || !j["model"].is_object() || j["model"].value("type", "") != "BPE")
    return bad("model.type must be \"BPE\"");
  const json& model = j["model"];
  if (!model.contains("vocab") || !model["vocab"].is_object()) return bad("model.vocab must be an object");
  if (!model.contains("merges") || !model["merges"].is_array()) return bad("model.merges must be an array");
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  int32_t max_id = -1;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > (1 << 24))
      return bad(absl::StrCat("model.vocab['", it.key(), "'] must be an id in [0, 2^24]"));
    const int32_t id = it.value().get<int32_t>();
    t->vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  const json added = j.value("added_tokens", json::array());
  for (const json& a : added) {
    if (!a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") || !a["content"].is_string())
      return bad("added_tokens entries need an integer 'id' and a string 'content'");
    max_id = std::max(max_id, a["id"].get<int32_t>());
  }
  t->vocab_size_ = max_id + 1;
  t->id_to_token_.assign(t->vocab_size_, "");
  t->is_added_.assign(t->vocab_size_, false);
  for (const auto& [tok, id] : t->vocab_) t->id_to_token_[id] = tok;
  t->added_by_first_byte_.resize(256);
  for (const json& a : added) {
    const std::string content = a["content"].get<std::string>();
    const int32_t id = a["id"].get<int32_t>();
    if (content.empty()) return bad(absl::StrCat("added token ", id, " is empty"));
    t->id_to_token_[id] = content;
    t->is_added_[id] = true;
    t->added_[content] = id;
    t->added_by_first_byte_[static_cast<unsigned char>(content[0])].emplace_back(content, id);
  }
  for (auto& v : t->added_by_first_byte_)
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  // GPT-2 bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    const uint32_t cp = printable ? b : 256 + n++;
    AppendUtf8(cp, &t->byte_to_char_[b]);
    t->char_to_byte_[cp] = static_cast<uint8_t>(b);
    auto it = t->vocab_.find(t->byte_to_char_[b]);
    if (it == t->vocab_.end()) return bad(absl::StrCat("byte-level alphabet incomplete: byte ", b, " has no token"));
    t->byte_to_id_[b] = it->second;
  }
  int32_t rank = 0;
  for (const json& m : model["merges"]) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const auto sp = s.find(' ');
      if (sp == std::string::npos) return bad(absl::StrCat("merges[", rank, "] '", s, "' is not 'a b'"));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return bad(absl::StrCat("merges[", rank, "] must be \"a b\" or [a, b]"));
    }
    auto ia = t->vocab_.find(a), ib = t->vocab_.find(b), im = t->vocab_.find(a + b);
    if (ia == t->vocab_.end() || ib == t->vocab_.end() || im == t->vocab_.end())
      return bad(absl::StrCat("merges[", rank, "] refers to tokens missing from the vocabulary"));
    t->merges_.emplace(PairKey(ia->second, ib->second), std::make_pair(rank, im->second));
    ++rank;
  }
  // Pre-tokenizer: a Sequence of Split (Isolated) regexes followed by ByteLevel without regex.
  std::vector<json> pretoks;
  const json pt = j.value("pre_tokenizer", json());
  if (pt.is_object() && pt.value("type", "") == "Sequence") {
    for (const json& p : pt["pretokenizers"]) pretoks.push_back(p);
  } else if (pt.is_object()) {
    pretoks.push_back(pt);
  }
  for (const json& p : pretoks) {
    const std::string type = p.value("type", "");
    if (type == "ByteLevel") {
      if (p.value("use_regex", true)) return bad("pre_tokenizer ByteLevel with use_regex is not supported");
      continue;
    }
    if (type != "Split") return bad(absl::StrCat("pre_tokenizer type '", type, "' is not supported"));
    if (p.value("behavior", "") != "Isolated" || p.value("invert", false))
      return bad("pre_tokenizer Split supports behavior Isolated without invert");
    if (!p.contains("pattern") || !p["pattern"].contains("Regex"))
      return bad("pre_tokenizer Split needs a Regex pattern");
    const std::string pattern = p["pattern"]["Regex"].get<std::string>();
    auto re = std::make_unique<Regex>();
    int err = 0;
    PCRE2_SIZE off = 0;
    re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!re->code) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      return bad(absl::StrCat("pre_tokenizer regex '", pattern, "' at offset ", off, ": ", reinterpret_cast<char*>(msg)));
    }
    pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);  // optional speed-up; matching works without it
    re->md = pcre2_match_data_create_from_pattern(re->code, nullptr);
    t->splits_.push_back(std::move(re));
  }
  return t;
}

int32_t Tokenizer::SpecialId(absl::string_view content) const {
  auto it = added_.find(std::string(content));
  return it == added_.end() ? -1 : it->second;
}

void Tokenizer::PreTokenize(absl::string_view text, std::vector<absl::string_view>* pieces) const {
  std::vector<absl::string_view> cur = {text}, next;
  for (const auto& re : splits_) {
    next.clear();
    for (absl::string_view piece : cur) {
      size_t start = 0, pos = 0;
      while (pos < piece.size()) {
        const int rc = pcre2_match(re->code, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(), pos,
                                   PCRE2_NO_UTF_CHECK, re->md, nullptr);
        if (rc < 0) break;
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(re->md);
        const size_t m0 = ov[0], m1 = ov[1];
        if (m1 == m0) {  // empty match: move one character on
          pos = m0 + std::max(1, Utf8Len(static_cast<unsigned char>(piece[m0])));
          continue;
        }
        if (m0 > start) next.push_back(piece.substr(start, m0 - start));
        next.push_back(piece.substr(m0, m1 - m0));
        start = pos = m1;
      }
      if (start < piece.size()) next.push_back(piece.substr(start));
    }
    cur.swap(next);
  }
  pieces->insert(pieces->end(), cur.begin(), cur.end());
}

void Tokenizer::EncodePiece(absl::string_view piece, std::vector<int32_t>* out) const {
  std::vector<int32_t> sym;
  sym.reserve(piece.size());
  for (unsigned char b : piece) sym.push_back(byte_to_id_[b]);
  // Merge the lowest-ranked adjacent pair (leftmost on ties) until none applies.
  for (;;) {
    int32_t best_rank = std::numeric_limits<int32_t>::max(), best_id = -1;
    size_t best_at = 0;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = merges_.find(PairKey(sym[i], sym[i + 1]));
      if (it != merges_.end() && it->second.first < best_rank) {
        best_rank = it->second.first;
        best_id = it->second.second;
        best_at = i;
      }
    }
    if (best_id < 0) break;
    sym[best_at] = best_id;
    sym.erase(sym.begin() + best_at + 1);
  }
  out->insert(out->end(), sym.begin(), sym.end());
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text) const {
  for (size_t i = 0; i < text.size();) {  // validate UTF-8 once (the regexes then skip the check)
    const int len = ValidCharLen(text, i);
    if (len == 0) return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 at byte ", i));
    i += len;
  }
  std::vector<int32_t> ids;
  std::vector<absl::string_view> pieces;
  auto encode_plain = [&](absl::string_view s) {
    if (s.empty()) return;
    pieces.clear();
    PreTokenize(s, &pieces);
    for (absl::string_view p : pieces) EncodePiece(p, &ids);
  };
  size_t start = 0;
  for (size_t i = 0; i < text.size();) {
    int32_t found = -1;
    size_t found_len = 0;
    for (const auto& [content, id] : added_by_first_byte_[static_cast<unsigned char>(text[i])])
      if (text.substr(i, content.size()) == content) {
        found = id;
        found_len = content.size();
        break;  // longest first
      }
    if (found < 0) {
      ++i;
      continue;
    }
    encode_plain(text.substr(start, i - start));
    ids.push_back(found);
    i += found_len;
    start = i;
  }
  encode_plain(text.substr(start));
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  for (size_t k = 0; k < ids.size(); ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= vocab_size_ || (id_to_token_[id].empty()))
      return absl::InvalidArgumentError(absl::StrCat("ids[", k, "] = ", id, " is not a token of this vocabulary"));
    const std::string& tok = id_to_token_[id];
    if (is_added_[id]) {
      out += tok;
      continue;
    }
    for (size_t i = 0; i < tok.size();) {
      const int len = std::max(1, Utf8Len(static_cast<unsigned char>(tok[i])));
      auto it = char_to_byte_.find(DecodeUtf8(tok, i, len));
      if (it != char_to_byte_.end()) out.push_back(static_cast<char>(it->second));
      i += len;
    }
  }
  return out;
}

namespace {

// Valid UTF-8 of `s`, every invalid byte replaced by U+FFFD (as a lossy decode does).
std::string SanitizeUtf8(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const int len = ValidCharLen(s, i);
    if (len > 0) {
      out.append(s.data() + i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

}  // namespace

absl::StatusOr<std::string> Tokenizer::StreamDecoder::Push(int32_t id) {
  FM_ASSIGN_OR_RETURN(std::string bytes, t_.Decode(std::span<const int32_t>(&id, 1)));
  pending_ += bytes;
  // Emit everything up to the last complete UTF-8 character.
  size_t cut = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    const unsigned char c = pending_[pending_.size() - back];
    if ((c >> 6) == 0x2) continue;  // continuation byte: keep looking for its lead byte
    const int len = Utf8Len(c);
    if (len > static_cast<int>(back)) cut = pending_.size() - back;  // lead byte of an incomplete character
    break;
  }
  std::string out = SanitizeUtf8(absl::string_view(pending_).substr(0, cut));
  pending_.erase(0, cut);
  return out;
}

std::string Tokenizer::StreamDecoder::Finish() {
  std::string out = SanitizeUtf8(pending_);
  pending_.clear();
  return out;
}

}  // namespace flashmem::tokenizer
