// CudaBackendImpl::RoutedMoE: an MoE layer routed on the device. The router's logits, the picks
// and weights and the rows grouped by expert (cuda::RouteAndGroup, one launch) and the grouped
// experts run as one chain of launches, so the host neither waits for the logits nor builds the
// expert lists: with the MoE's input and sum held (the model holds both on one rank), the call
// returns without waiting for the device at all.
#include "kernels/cuda/backend_impl.h"

namespace flashmem::kernels::cuda::internal {

void CudaBackendImpl::RoutedMoE(const MoeRouter& router, const float* x, int64_t n, int64_t dim, float swiglu_limit,
                                float* y, int32_t* ids, float* weights) const {
  if (n == 0) return;
  {
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return;
    if (absl::Status st = ValidateRouter(router, n, dim); !st.ok()) return Fail(st);
    op_clock_ = clock_ + 1;
    absl::StatusOr<bool> done = RoutedMoELocked(router, x, n, dim, swiglu_limit, y, ids, weights);
    if (!done.ok()) return Fail(done.status());
    if (*done) return;
  }
  // Not a shape the device routing takes: the logits come back and the host routes (the default's
  // path, through this backend's Linear and RoutedExperts; the router is checked already).
  RoutedMoEOnHost(router, x, n, dim, swiglu_limit, y, ids, weights);
}

absl::StatusOr<const CudaBackendImpl::ExpertTable*> CudaBackendImpl::ExpertTableLocked(const MoeRouter& r) const {
  const int64_t E = static_cast<int64_t>(r.experts.size());
  ExpertTable& t = expert_tables_[r.experts.data()];
  bool current = t.epoch == resident_epoch_ && static_cast<int64_t>(t.mats.size()) == 3 * E && t.dev != nullptr;
  for (int64_t i = 0; current && i < E; ++i) {
    const ExpertMatrices& e = r.experts[i];
    const WeightMatrix* m[3] = {e.w1, e.w3, e.w2};
    for (int j = 0; j < 3 && current; ++j)
      current = t.mats[j * E + i] == m[j] && t.identities[j * E + i] == m[j]->identity.id();
  }
  if (current) {  // every copy still where the table points: used now, as WeightOnDevice would mark them
    for (Resident* res : t.residents) res->last_use = ++clock_;
    t.dev->last_use = ++clock_;
    return &t;
  }
  t = ExpertTable();
  t.mats.resize(3 * E);
  t.identities.resize(3 * E);
  t.templates.resize(3 * E);
  for (int64_t i = 0; i < E; ++i) {
    const ExpertMatrices& e = r.experts[i];
    const WeightMatrix* m[3] = {e.w1, e.w3, e.w2};
    for (int j = 0; j < 3; ++j) {
      FM_ASSIGN_OR_RETURN(const DeviceWeight* dw, WeightOnDevice(*m[j]));
      t.mats[j * E + i] = m[j];
      t.identities[j * E + i] = m[j]->identity.id();
      t.residents.push_back(&resident_.find(m[j]->values.data())->second);
      t.residents.back()->watched = true;
      cuda::GemvGroup& g = t.templates[j * E + i];
      g.w = static_cast<const uint8_t*>(dw->values);
      g.ws = dw->scales;
      g.wexp = dw->scale_exps;
      g.scale_cols = dw->scale_cols;
      g.rows = dw->rows;
      g.k = dw->cols;
    }
  }
  // One grouped launch takes the experts when they share a quantized format, their intermediate
  // size (whole 128-column blocks) and their scale form (RoutedExpertsLocked's conditions).
  const WeightMatrix& w1 = *r.experts[0].w1;
  t.format = w1.format;
  t.inter = w1.rows;
  t.scale_bytes = t.templates[0].wexp != nullptr;
  t.routable = t.format != WeightFormat::kDense && t.inter % 128 == 0;
  for (int64_t i = 0; i < 3 * E; ++i)
    t.routable = t.routable && t.mats[i]->format == t.format && (t.templates[i].wexp != nullptr) == t.scale_bytes &&
                 (i >= 2 * E ? t.mats[i]->cols : t.mats[i]->rows) == t.inter;
  const void* parts[1] = {t.templates.data()};
  const size_t sizes[1] = {t.templates.size() * sizeof(cuda::GemvGroup)};
  // Keyed by the table (a node: its address is stable), so a rebuilt table's templates replace
  // the old copy (Upload frees it) instead of leaving it to the LRU.
  FM_ASSIGN_OR_RETURN(t.dev, Upload(&t, XXH3_64bits(t.templates.data(), sizes[0]), parts, sizes, 1,
                                    "an MoE layer's expert table"));
  t.dev->watched = true;
  t.epoch = resident_epoch_;  // after the uploads above, which may have evicted (and so moved) others
  return &t;
}

absl::StatusOr<bool> CudaBackendImpl::RoutedMoELocked(const MoeRouter& r, const float* x, int64_t n, int64_t dim,
                                                      float limit, float* y, int32_t* ids_out,
                                                      float* weights_out) const {
  const int64_t E = r.gate->rows, k = r.k, local = static_cast<int64_t>(r.experts.size());
  // The device routing: fast mode with its decode GEMV, one rank holding every expert, at most
  // kGroupedFp4Rows tokens (RoutedExpertsLocked's grouped bound for any one expert's rows).
  if (exact_ || !fast_gemv_ || !device_routing_ || dim % 128 != 0 || local != E || r.first_expert != 0 ||
      n > kGroupedFp4Rows || E > cuda::kMaxRouteExperts || k > cuda::kMaxRouteK || n * k > cuda::kMaxRoutePicks)
    return false;
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  FM_ASSIGN_OR_RETURN(const ExpertTable* t, ExpertTableLocked(r));
  const bool fp8 = t->format == WeightFormat::kFp8Block128;
  if (!t->routable || (fp8 && n > 16)) return false;  // FP8 experts: the grouped GEMV up to 16 rows, as there
  // The grid's tokens an expert, sized before the picks are known: twice the mean rows an
  // expert, at most n (one token: each expert's one row, as the host's lists would give). An
  // expert with more rows takes its further tiles in turn (LinearDecodeGrouped); fewer, its
  // blocks past them return at once. V4-Flash's 256 experts at batch 64: ~1.5 rows on average,
  // tiles of 4; the host's lists sized the tile by the busiest expert.
  const int64_t M = n * k, G = std::min(M, E), inter = t->inter;
  const int64_t tile_n = std::min(n, std::max<int64_t>(1, 2 * ((M + E - 1) / E)));
  const cuda::GemvInputs up_in{t->scale_bytes, !fp8 && cuda::GroupedFp4OnTensorCores(tile_n, dim, t->scale_bytes)};
  const cuda::GemvInputs down_in{t->scale_bytes,
                                 !fp8 && cuda::GroupedFp4OnTensorCores(tile_n, inter, t->scale_bytes)};
  if (t->scale_bytes && (!up_in.f16_activations || !down_in.f16_activations)) return false;  // bytes: MMA path only
  FM_ASSIGN_OR_RETURN(const DeviceWeight* gate, WeightOnDevice(*r.gate));
  const float* bias = nullptr;
  if (!r.bias.empty()) {
    FM_ASSIGN_OR_RETURN(bias, ArrayOnDevice(r.bias.data(), r.bias.size()));
  }
  const int64_t ld = (n + 3) / 4 * 4;
  Frame f;
  const size_t dx = f.In(x, n * dim * 4), dy = f.In(y, n * dim * 4);
  const bool hashed = !r.hash_ids.empty();
  const size_t dhash = hashed ? f.In(r.hash_ids.data(), M * 4) : 0;
  const size_t dlogits = f.Scratch(LinearRowsWritten(*gate, n) * E * 4);
  const LinearScratch s = AddLinearScratch(f, ld, dim);
  const size_t dids = f.Scratch(M * 4), dwts = f.Scratch(M * 4), drows = f.Scratch(M * 4), drw = f.Scratch(M * 4),
               doff = f.Scratch((n + 1) * 4), dord = f.Scratch(M * 4),
               dtab = f.Scratch(3 * G * sizeof(cuda::GemvGroup));
  const GroupedExpertArrays a = AddGroupedExpertArrays(f, M, dim, inter);
  f.Download(dy, y, n * dim * 4);
  if (ids_out) f.Download(dids, ids_out, M * 4);
  if (weights_out) f.Download(dwts, weights_out, M * 4);
  const auto* templates = static_cast<const cuda::GemvGroup*>(t->dev->mem);
  if (!route_done_) {
    FM_CUDA_TRY(cudaMalloc(&route_done_, sizeof(unsigned)), "cudaMalloc(routing counter)");
    FM_CUDA_TRY(cudaMemsetAsync(route_done_, 0, sizeof(unsigned), stream_), "zero the routing counter");
  }
  FM_RETURN_IF_ERROR(RunLocked(f, [&](Dev d) {
    auto* tab = d.at<cuda::GemvGroup>(dtab);
    cudaError_t e = EnqueueLinear(*gate, d.at(dx), n, ld, d.at(dlogits), Rounding::kNone, s.At(d));
    const cuda::ExpertGroupLayout layout{templates, E, G, dim, inter, d.at(a.qx), d.at(a.qs), d.at(a.g), d.at(a.u),
                                         d.at(a.qh), d.at(a.qhs), d.at(a.out)};
    if (e == cudaSuccess)
      e = cuda::RouteAndGroup(d.at(dlogits), n, k, r.score, bias, hashed ? d.at<int32_t>(dhash) : nullptr,
                              r.route_scale, layout, d.at<int32_t>(dids), d.at(dwts), d.at<int32_t>(drows),
                              d.at(drw), d.at<int32_t>(doff), d.at<int32_t>(dord), tab, route_done_, stream_);
    // From here as RoutedExpertsGroupedLocked, over every pick's row.
    const GroupedLaunch l{M, n, G, dim, inter, tile_n, fp8, up_in, down_in, limit};
    if (e == cudaSuccess)
      e = EnqueueGroupedExperts(d, a, l, d.at(dx), d.at<int32_t>(drows), d.at(drw), d.at<int32_t>(doff),
                                d.at<int32_t>(dord), tab, d.at(dy));
    return e;
  }));
  return true;
}

}  // namespace flashmem::kernels::cuda::internal
