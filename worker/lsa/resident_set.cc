#include "worker/lsa/resident_set.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"

namespace flashmem::lsa {
namespace {

int64_t RecentStart(int64_t n, const LsaOptions& o) { return std::max<int64_t>(0, n - o.tail_chunks); }
int64_t SinkEnd(int64_t n, const LsaOptions& o) { return std::min(o.sink_chunks, n); }

absl::Status BadOption(absl::string_view key, absl::string_view value, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("lsa.", key, " = '", value, "': ", why));
}

}  // namespace

absl::StatusOr<LsaOptions> ParseLsaOptions(const std::string& text, LsaOptions o) {
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    absl::string_view key = absl::StripAsciiWhitespace(kv.first), val = absl::StripAsciiWhitespace(kv.second);
    if (absl::StartsWith(key, "lsa.")) key.remove_prefix(4);
    auto int_in = [&](int64_t* dst, int64_t lo, int64_t hi) -> absl::Status {
      int64_t v;
      if (!absl::SimpleAtoi(val, &v)) return BadOption(key, val, "not an integer");
      if (v < lo || v > hi) return BadOption(key, val, absl::StrCat("must be in [", lo, ", ", hi, "]"));
      *dst = v;
      return absl::OkStatus();
    };
    absl::Status st;
    if (key == "interval") st = int_in(&o.interval, 1, 1 << 20);
    else if (key == "tail_chunks") st = int_in(&o.tail_chunks, 0, int64_t{1} << 40);
    else if (key == "sink_chunks") st = int_in(&o.sink_chunks, 0, int64_t{1} << 40);
    else if (key == "kmax") st = int_in(&o.kmax, 1, int64_t{1} << 40);
    else if (key == "max_resident") st = int_in(&o.max_resident, 0, int64_t{1} << 40);
    else if (key == "target_context") st = int_in(&o.target_context_tokens, 1, int64_t{1} << 40);
    else if (key == "threshold") {
      float v;
      if (!absl::SimpleAtof(val, &v) || !(v >= 0.0f && v < 1.0f)) return BadOption(key, val, "must be a number in [0, 1)");
      o.threshold = v;
    } else if (key == "kmax_ratio" || key == "fallback_limit") {
      double v;
      if (!absl::SimpleAtod(val, &v) || !(v >= 0.0 && v <= 1.0)) return BadOption(key, val, "must be a number in [0, 1]");
      (key == "kmax_ratio" ? o.kmax_ratio : o.fallback_limit) = v;
    } else if (key == "ensemble") {
      if (val == "or" || val == "max") o.ensemble = Ensemble::kOr;
      else if (val == "mean") o.ensemble = Ensemble::kMean;
      else return BadOption(key, val, "must be or, max or mean");
    } else if (key == "stagger") {
      if (val == "1" || val == "true") o.stagger = true;
      else if (val == "0" || val == "false") o.stagger = false;
      else return BadOption(key, val, "must be 0 or 1");
    } else if (key == "policy") {
      if (val == "indexer") o.policy = LsaOptions::Policy::kIndexer;
      else if (val == "recency") o.policy = LsaOptions::Policy::kRecency;
      else if (val == "random") o.policy = LsaOptions::Policy::kRandom;
      else return BadOption(key, val, "must be indexer, recency or random");
    } else if (key == "target_layers") {
      o.target_layers.clear();
      for (absl::string_view s : absl::StrSplit(val, ':', absl::SkipEmpty())) {
        int v;
        if (!absl::SimpleAtoi(s, &v) || v < 0) return BadOption(key, val, "must be CSA layer ids separated by ':'");
        o.target_layers.push_back(v);
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat("unknown LSA option '", key, "' (known: interval, threshold, ensemble, tail_chunks, sink_chunks, kmax, kmax_ratio, target_context, max_resident, fallback_limit, stagger, target_layers, policy)"));
    }
    if (!st.ok()) return st;
  }
  return o;
}

int64_t ResolveKmax(const LsaOptions& o) {
  if (o.kmax_ratio > 0) {
    const int64_t chunks = (o.target_context_tokens + 3) / 4;
    const int64_t tgt_pages = (chunks + kChunksPerPage - 1) / kChunksPerPage;
    return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(tgt_pages) * o.kmax_ratio + 0.9999));
  }
  return o.kmax;
}

void EnsembleScores(std::span<const std::vector<float>> sigmoids, int64_t n, Ensemble mode, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    if (mode == Ensemble::kOr) {
      float m = -std::numeric_limits<float>::infinity();
      for (const auto& s : sigmoids) m = std::max(m, s[j]);
      out[j] = m;
    } else {
      float sum = 0.0f;
      for (const auto& s : sigmoids) sum += s[j];
      out[j] = sum / static_cast<float>(sigmoids.size());
    }
  }
}

std::vector<uint8_t> ChunkResidentSet(const float* ens, int64_t n, const LsaOptions& o) {
  std::vector<uint8_t> keep(n, 0), forced(n, 0);
  const int64_t r0 = RecentStart(n, o), s1 = SinkEnd(n, o);
  int64_t n_keep = 0, n_forced = 0;
  for (int64_t j = 0; j < n; ++j) {
    forced[j] = j >= r0 || j < s1;
    keep[j] = forced[j] || ens[j] > o.threshold;
    n_keep += keep[j];
    n_forced += forced[j];
  }
  if (o.max_resident > 0 && n_keep > o.max_resident) {
    const int64_t budget = std::max<int64_t>(0, o.max_resident - n_forced);
    std::vector<int64_t> cand;
    for (int64_t j = 0; j < n; ++j)
      if (keep[j] && !forced[j]) cand.push_back(j);
    if (static_cast<int64_t>(cand.size()) > budget) {
      std::stable_sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) { return ens[a] > ens[b]; });
      for (size_t i = budget; i < cand.size(); ++i) keep[cand[i]] = 0;
    }
  }
  return keep;
}

PageSelection SelectPages(const float* ens, int64_t n, const LsaOptions& o) {
  PageSelection sel;
  const int64_t n_pages = (n + kChunksPerPage - 1) / kChunksPerPage;
  sel.page_score.assign(n_pages, 0.0f);
  for (int64_t j = 0; j < n; ++j)
    if (ens[j] > o.threshold) sel.page_score[j / kChunksPerPage] += 1.0f;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t p = RecentStart(n, o) / kChunksPerPage; p < n_pages; ++p) sel.page_score[p] = inf;
  if (o.sink_chunks > 0)
    for (int64_t p = 0; p < (SinkEnd(n, o) + kChunksPerPage - 1) / kChunksPerPage; ++p) sel.page_score[p] = inf;
  sel.k = std::min(ResolveKmax(o), n_pages);
  std::vector<int64_t> order(n_pages);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return sel.page_score[a] > sel.page_score[b]; });
  sel.pages.assign(order.begin(), order.begin() + sel.k);
  std::sort(sel.pages.begin(), sel.pages.end());
  return sel;
}

std::vector<uint8_t> ExpandPages(const PageSelection& sel, int64_t n) {
  std::vector<uint8_t> keep(n, 0);
  for (int64_t p : sel.pages)
    for (int64_t j = p * kChunksPerPage; j < std::min(n, (p + 1) * kChunksPerPage); ++j) keep[j] = 1;
  return keep;
}

std::vector<int64_t> RecencyPages(int64_t n, const LsaOptions& o) {
  const int64_t n_pages = (n + kChunksPerPage - 1) / kChunksPerPage;
  const int64_t k = std::min(ResolveKmax(o), n_pages);
  std::vector<int64_t> pages;
  for (int64_t p = n_pages - k; p < n_pages; ++p) pages.push_back(p);
  return pages;
}

std::vector<int64_t> RandomPages(int64_t n, const LsaOptions& o, uint64_t seed) {
  // The forced pages exactly as SelectPages forces them (all chunks below threshold), then a
  // seeded uniform choice among the rest.
  std::vector<float> none(n, 0.0f);
  LsaOptions forced = o;
  forced.threshold = 1.0f;
  PageSelection base = SelectPages(none.data(), n, forced);
  std::vector<int64_t> pages, rest;
  for (int64_t p = 0; p < static_cast<int64_t>(base.page_score.size()); ++p)
    (std::isinf(base.page_score[p]) ? pages : rest).push_back(p);
  if (static_cast<int64_t>(pages.size()) > base.k) pages.resize(base.k);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  while (static_cast<int64_t>(pages.size()) < base.k && !rest.empty()) {
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    const size_t i = x % rest.size();
    pages.push_back(rest[i]);
    rest.erase(rest.begin() + static_cast<std::ptrdiff_t>(i));
  }
  std::sort(pages.begin(), pages.end());
  return pages;
}

bool ThresholdFallback::Observe(const float* ens, int64_t n, const LsaOptions& o) {
  // A new request in the slot (n shrank, or grew by more than a page since the last cycle)
  // starts the counters over.
  if (last_n_ >= 0 && (n < last_n_ || n > last_n_ + kChunksPerPage)) {
    triggered_ = false;
    cum_thresh_ = cum_c4_ = 0;
  }
  last_n_ = n;
  if (limit_ > 0 && !triggered_) {
    const int64_t r0 = RecentStart(n, o), s1 = SinkEnd(n, o);
    for (int64_t j = 0; j < n; ++j) {
      if (j >= r0 || j < s1) continue;
      ++cum_c4_;
      cum_thresh_ += ens[j] > o.threshold;
    }
    if (cum_c4_ > 0 && static_cast<double>(cum_thresh_) / static_cast<double>(cum_c4_) > limit_) triggered_ = true;
  }
  return triggered_;
}

}  // namespace flashmem::lsa
