#include "worker/lsa/lsa_session.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "worker/lsa/indexer_init.h"

namespace flashmem::lsa {

using json = nlohmann::json;

absl::Status LsaSession::CheckCompatible(const MemoryIndexer& mi, const model::ModelArgs& a,
                                         const LsaOptions& o) {
  if (mi.hidden() != a.dim)
    return absl::FailedPreconditionError(absl::StrCat("memory indexer hidden size ", mi.hidden(), " does not match the model's dim ", a.dim));
  if (a.index_head_dim != kIndexHeadDim)
    return absl::FailedPreconditionError(absl::StrCat("the model's index keys have ", a.index_head_dim, " dims; the memory indexer scores 128"));
  const int64_t n_csa = CountCsaLayers(a);
  const std::vector<int> have = mi.csa_layers();
  for (int id : have)
    if (id >= n_csa)
      return absl::FailedPreconditionError(absl::StrCat("memory indexer layer l", id, " is not a CSA layer of this model (it has ", n_csa, ")"));
  for (int id : o.target_layers)
    if (std::find(have.begin(), have.end(), id) == have.end())
      return absl::InvalidArgumentError(absl::StrCat("lsa.target_layers: CSA layer ", id, " has no weights in the memory indexer (it has ", absl::StrJoin(have, ","), ")"));
  if (o.interval < 1) return absl::InvalidArgumentError("lsa.interval must be >= 1");
  return absl::OkStatus();
}

LsaSession::LsaSession(const MemoryIndexer& indexer, const model::ModelArgs& args, LsaOptions options,
                       LsaMode mode, int64_t phase, bool apply_at_boundary)
    : indexer_(indexer), args_(args), options_(std::move(options)), mode_(mode),
      phase_(phase % options_.interval), apply_at_boundary_(apply_at_boundary),
      fallback_(options_.fallback_limit) {
  for (int64_t l = 0; l < args_.n_layers; ++l)
    if (args_.ratio(l) == 4) layer_of_csa_.push_back(l);
  const std::vector<int> have = indexer_.csa_layers();
  for (size_t s = 0; s < have.size(); ++s) {
    if (!options_.target_layers.empty() &&
        std::find(options_.target_layers.begin(), options_.target_layers.end(), have[s]) == options_.target_layers.end())
      continue;
    slot_csa_.push_back(have[s]);
    slot_index_.push_back(static_cast<int>(s));
  }
}

LsaSession::~LsaSession() {
  if (task_.valid()) task_.wait();
}

bool LsaSession::RefreshDue(int64_t step) const {
  return step == 0 || step % options_.interval == phase_;
}

int64_t LsaSession::NextBoundary(int64_t step) const {
  int64_t s = step + 1;
  while (!RefreshDue(s)) ++s;
  return s;
}

void LsaSession::BeforeStep(model::SessionState& state, bool decode) {
  if (mode_ != LsaMode::kAuto) return;
  if (!decode) {  // prefill: the schedule starts over, dense until the first set lands
    if (task_.valid()) task_.wait();
    task_ = {};
    pending_.reset();
    pending_due_ = -1;
    step_ = 0;
    capturing_ = false;
    state.capture.enabled = false;
    const bool measure = state.residency.measure_agreement;
    const double sum = state.residency.agreement_sum;
    const int64_t cnt = state.residency.agreement_count;
    state.residency = model::Residency{};
    state.residency.measure_agreement = measure;
    state.residency.agreement_sum = sum;
    state.residency.agreement_count = cnt;
    have_current_ = false;
    current_pages_.clear();
    return;
  }
  if (pending_due_ >= 0 && step_ >= pending_due_) {
    if (task_.valid()) {
      const auto t0 = std::chrono::steady_clock::now();
      if (task_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
        task_.wait();
        stats_.stalls++;
        stats_.stall_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      }
      pending_ = task_.get();
    }
    if (pending_) Apply(state, *pending_);
    pending_.reset();
    pending_due_ = -1;
  }
  if (RefreshDue(step_)) {
    capturing_ = true;
    state.capture.enabled = true;
    state.capture.pos = -1;
    state.capture.x.resize(layer_of_csa_.size());
    for (int csa : slot_csa_) state.capture.x[csa].assign(args_.dim, 0.0f);
  }
}

void LsaSession::AfterStep(model::SessionState& state, bool decode) {
  if (mode_ != LsaMode::kAuto || !decode) return;
  if (capturing_) {
    capturing_ = false;
    state.capture.enabled = false;
    std::vector<std::vector<float>> x;
    std::vector<std::vector<const float*>> keys;
    int64_t n = -1;
    for (int id : slot_csa_) {
      x.push_back(state.capture.x[id]);
      const kv::EntryPages& ik = state.layers[layer_of_csa_[id]].index_keys;
      std::vector<const float*> rows(ik.size());
      for (int64_t j = 0; j < ik.size(); ++j) rows[j] = ik.Row(j);  // target index-K never leaves
      n = n < 0 ? ik.size() : std::min(n, ik.size());
      keys.push_back(std::move(rows));
    }
    const int64_t pos = state.capture.pos;
    if (n > 0 && pos >= 0) {
      task_ = std::async(std::launch::async, [this, x = std::move(x), pos, keys = std::move(keys), n]() mutable {
        Selection sel = Score(std::move(x), pos, std::move(keys), n);
        if (stage_hook_ && !sel.dense) stage_hook_(sel);
        return sel;
      });
      pending_due_ = apply_at_boundary_ ? NextBoundary(step_) : step_ + 1;
      stats_.refreshes++;
    }
  }
  ++step_;
}

Selection LsaSession::Score(std::vector<std::vector<float>> x, int64_t pos,
                            std::vector<std::vector<const float*>> keys, int64_t n) {
  const auto t0 = std::chrono::steady_clock::now();
  if (options_.policy != LsaOptions::Policy::kIndexer) {  // ablations: no scoring
    Selection sel;
    sel.covered_chunks = n;
    sel.pages = options_.policy == LsaOptions::Policy::kRecency
        ? RecencyPages(n, options_) : RandomPages(n, options_, static_cast<uint64_t>(pos));
    sel.ranked = sel.pages;
    sel.score_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return sel;
  }
  std::vector<std::vector<float>> sig(slot_index_.size(), std::vector<float>(n));
  for (size_t s = 0; s < slot_index_.size(); ++s) {
    const IndexerQuery q = indexer_.Query(slot_index_[s], x[s].data(), pos);
    indexer_.ScoreRef(q, keys[s].data(), n, sig[s].data());
    for (float& v : sig[s]) v = Sigmoid(v);
  }
  std::vector<float> ens(n);
  EnsembleScores(sig, n, options_.ensemble, ens.data());
  Selection sel;
  sel.covered_chunks = n;
  sel.dense = options_.fallback_limit > 0 && fallback_.Observe(ens.data(), n, options_);
  if (!sel.dense) {
    const PageSelection ps = SelectPages(ens.data(), n, options_);
    sel.pages = ps.pages;
    sel.ranked.resize(ps.page_score.size());
    std::iota(sel.ranked.begin(), sel.ranked.end(), 0);
    std::stable_sort(sel.ranked.begin(), sel.ranked.end(),
                     [&](int64_t a, int64_t b) { return ps.page_score[a] > ps.page_score[b]; });
  }
  sel.score_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return sel;
}

const Selection* LsaSession::Pending() {
  if (task_.valid()) pending_ = task_.get();
  return pending_ ? &*pending_ : nullptr;
}

void LsaSession::Apply(model::SessionState& state, const Selection& sel) {
  stats_.sets_applied++;
  stats_.last_score_ms = sel.score_ms;
  model::Residency& r = state.residency;
  if (sel.dense) {
    stats_.fallback = true;
    r.covered_chunks = -1;
    r.page_selected.clear();
    have_current_ = false;
    return;
  }
  r.covered_chunks = sel.covered_chunks;
  const int64_t n_pages = (sel.covered_chunks + kChunksPerPage - 1) / kChunksPerPage;
  r.page_selected.assign(n_pages, 0);
  for (int64_t p : sel.pages) r.page_selected[p] = 1;
  int64_t fresh = 0, common = 0;
  for (int64_t p : sel.pages) {
    const bool was = std::binary_search(current_pages_.begin(), current_pages_.end(), p);
    common += was;
    fresh += !was;
  }
  stats_.pages_recalled += fresh;
  if (have_current_) {
    const int64_t uni = static_cast<int64_t>(current_pages_.size() + sel.pages.size()) - common;
    stats_.churn_jaccard_sum += uni > 0 ? static_cast<double>(common) / static_cast<double>(uni) : 1.0;
    stats_.churn_count++;
  }
  current_pages_ = sel.pages;
  have_current_ = true;
  stats_.selected_pages = static_cast<int64_t>(sel.pages.size());
  stats_.covered_pages = n_pages;
}

std::string LsaSession::Save() {
  Pending();
  json j;
  j["step"] = step_;
  j["capturing"] = capturing_;
  j["pending_due"] = pending_due_;
  if (pending_)
    j["pending"] = {{"dense", pending_->dense}, {"covered", pending_->covered_chunks},
                    {"pages", pending_->pages}, {"ranked", pending_->ranked}};
  j["current"] = current_pages_;
  j["have_current"] = have_current_;
  const auto fb = fallback_.Save();
  j["fallback"] = {fb.triggered, fb.cum_thresh, fb.cum_c4, fb.last_n};
  j["stats"] = {stats_.refreshes, stats_.sets_applied, stats_.pages_recalled, stats_.churn_count,
                stats_.churn_jaccard_sum, stats_.fallback};
  return j.dump();
}

absl::Status LsaSession::Load(absl::string_view blob) {
  try {
    const json j = json::parse(blob.begin(), blob.end());
    step_ = j.at("step").get<int64_t>();
    capturing_ = j.at("capturing").get<bool>();
    pending_due_ = j.at("pending_due").get<int64_t>();
    pending_.reset();
    if (j.contains("pending")) {
      Selection s;
      s.dense = j["pending"].at("dense").get<bool>();
      s.covered_chunks = j["pending"].at("covered").get<int64_t>();
      s.pages = j["pending"].at("pages").get<std::vector<int64_t>>();
      s.ranked = j["pending"].at("ranked").get<std::vector<int64_t>>();
      pending_ = std::move(s);
    }
    current_pages_ = j.at("current").get<std::vector<int64_t>>();
    have_current_ = j.at("have_current").get<bool>();
    const json& fb = j.at("fallback");
    fallback_.Load({fb.at(0).get<bool>(), fb.at(1).get<int64_t>(), fb.at(2).get<int64_t>(), fb.at(3).get<int64_t>()});
    const json& st = j.at("stats");
    stats_.refreshes = st.at(0).get<uint64_t>();
    stats_.sets_applied = st.at(1).get<uint64_t>();
    stats_.pages_recalled = st.at(2).get<uint64_t>();
    stats_.churn_count = st.at(3).get<uint64_t>();
    stats_.churn_jaccard_sum = st.at(4).get<double>();
    stats_.fallback = st.at(5).get<bool>();
    if (step_ < 0 || (pending_ && pending_->covered_chunks < 0))
      return absl::InvalidArgumentError("LSA snapshot: negative step or chunk count");
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("LSA snapshot: ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace flashmem::lsa
