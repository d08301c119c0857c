// CudaBackendImpl: Linear in every form (groups, fused row ops, argmax) and the routed experts.
#include "kernels/cuda/backend_impl.h"

namespace flashmem::kernels::cuda::internal {

void CudaBackendImpl::Linear(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out) const {
  absl::MutexLock lock(&mu_);
  op_clock_ = clock_ + 1;
  Fail(LinearLocked(w, x, n, y, out, {}));
}

void CudaBackendImpl::LinearGroups(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y,
                                   Rounding out) const {
  if (!fused_) {  // the default gathers each group's columns on the host
    if (!w.empty()) SyncForHost(x, static_cast<size_t>(n * static_cast<int64_t>(w.size()) * w[0].cols) * 4);
    return Backend::LinearGroups(w, x, n, y, out);
  }
  absl::MutexLock lock(&mu_);
  op_clock_ = clock_ + 1;
  Fail(LinearGroupsLocked(w, x, n, y, out));
}

void CudaBackendImpl::LinearThen(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                                 std::span<const RowOp> then) const {
  if (!fused_) return Backend::LinearThen(w, x, n, y, out, then);
  absl::MutexLock lock(&mu_);
  op_clock_ = clock_ + 1;
  Fail(LinearLocked(w, x, n, y, out, then));
}

void CudaBackendImpl::LinearMany(std::span<const LinearJob> jobs, const float* x, int64_t n) const {
  if (!fused_) return Backend::LinearMany(jobs, x, n);
  absl::MutexLock lock(&mu_);
  op_clock_ = clock_ + 1;
  Fail(LinearManyLocked(jobs, x, n));
}

void CudaBackendImpl::LinearArgmax(const WeightMatrix& w, const float* x, int64_t n, int32_t* index) const {
  absl::MutexLock lock(&mu_);
  op_clock_ = clock_ + 1;
  Fail(LinearArgmaxLocked(w, x, n, index));
}

void CudaBackendImpl::RoutedExperts(std::span<const ExpertWork> experts, const float* x, int64_t n, int64_t dim,
                                    float swiglu_limit, float* y) const {
  absl::MutexLock lock(&mu_);
  if (!health_.ok() || n == 0 || experts.empty()) return;
  op_clock_ = clock_ + 1;
  Fail(RoutedExpertsLocked(experts, x, n, dim, swiglu_limit, y));
}

absl::Status CudaBackendImpl::LinearLocked(const WeightMatrix& w, const float* x, int64_t n, float* y, Rounding out,
                                           std::span<const RowOp> then) const {
  if (!health_.ok() || n == 0) return absl::OkStatus();
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  FM_ASSIGN_OR_RETURN(const DeviceWeight* dw, WeightOnDevice(w));
  const int64_t k = w.cols, m = w.rows, ld = (n + 3) / 4 * 4;
  Frame f;
  const size_t dx = f.In(x, n * k * 4), dy = f.Scratch(LinearRowsWritten(*dw, n) * m * 4);
  FM_ASSIGN_OR_RETURN(const RowOpInputs ops, StageRowOps(f, then, n * m));
  const LinearScratch s = AddLinearScratch(f, ld, k);
  f.Download(dy, y, n * m * 4);
  return RunLocked(f, [&](Dev d) {
    const cudaError_t e = EnqueueLinear(*dw, d.at(dx), n, ld, d.at(dy), out, s.At(d));
    return e != cudaSuccess ? e : EnqueueRowOps(d, d.at(dy), n * m, then, ops);
  });
}

absl::Status CudaBackendImpl::LinearManyLocked(std::span<const LinearJob> jobs, const float* x, int64_t n) const {
  if (!health_.ok() || n == 0 || jobs.empty()) return absl::OkStatus();
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (!jobs[j].w || !jobs[j].y)
      return absl::InvalidArgumentError(absl::StrCat("LinearMany: jobs[", j, "] needs its weight and its output"));
    if (jobs[j].w->cols != jobs[0].w->cols)
      return absl::InvalidArgumentError(absl::StrCat("LinearMany: jobs[", j, "].w has ", jobs[j].w->cols,
                                                     " columns, jobs[0].w ", jobs[0].w->cols, " (one input x)"));
  }
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  const int64_t k = jobs[0].w->cols, ld = (n + 3) / 4 * 4, J = static_cast<int64_t>(jobs.size());
  std::vector<const DeviceWeight*> dw(J);
  std::vector<size_t> dy(J);
  std::vector<RowOpInputs> ops(J);
  Frame f;
  const size_t dx = f.In(x, n * k * 4);
  for (int64_t j = 0; j < J; ++j) {
    FM_ASSIGN_OR_RETURN(dw[j], WeightOnDevice(*jobs[j].w));
    dy[j] = f.Scratch(LinearRowsWritten(*dw[j], n) * dw[j]->rows * 4);
    absl::StatusOr<RowOpInputs> staged = StageRowOps(f, jobs[j].then, n * dw[j]->rows);
    if (!staged.ok())
      return absl::InvalidArgumentError(absl::StrCat("LinearMany: jobs[", j, "]: ", staged.status().message()));
    ops[j] = *std::move(staged);
  }
  const LinearScratch s = AddLinearScratch(f, ld, k);  // reused job after job: one stream orders them
  for (int64_t j = 0; j < J; ++j) f.Download(dy[j], jobs[j].y, n * dw[j]->rows * 4);
  return RunLocked(f, [&](Dev d) {
    for (int64_t j = 0; j < J; ++j) {
      cudaError_t e = EnqueueLinear(*dw[j], d.at(dx), n, ld, d.at(dy[j]), jobs[j].out, s.At(d));
      if (e == cudaSuccess) e = EnqueueRowOps(d, d.at(dy[j]), n * dw[j]->rows, jobs[j].then, ops[j]);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

absl::Status CudaBackendImpl::LinearArgmaxLocked(const WeightMatrix& w, const float* x, int64_t n,
                                                 int32_t* index) const {
  if (!health_.ok() || n == 0) return absl::OkStatus();
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  FM_ASSIGN_OR_RETURN(const DeviceWeight* dw, WeightOnDevice(w));
  const int64_t k = w.cols, m = w.rows, ld = (n + 3) / 4 * 4;
  Frame f;
  const size_t dx = f.In(x, n * k * 4), dy = f.Scratch(ld * m * 4), didx = f.Scratch(n * 4);
  const LinearScratch s = AddLinearScratch(f, ld, k);
  f.Download(didx, index, n * 4);
  return RunLocked(f, [&](Dev d) {
    const cudaError_t e = EnqueueLinear(*dw, d.at(dx), n, ld, d.at(dy), Rounding::kNone, s.At(d));
    return e != cudaSuccess ? e : cuda::ArgmaxRows(d.at(dy), n, m, d.at<int32_t>(didx), stream_);
  });
}

absl::Status CudaBackendImpl::LinearGroupsLocked(std::span<const WeightMatrix> w, const float* x, int64_t n, float* y,
                                                 Rounding out) const {
  if (!health_.ok() || n == 0 || w.empty()) return absl::OkStatus();
  const int64_t G = static_cast<int64_t>(w.size()), k = w[0].cols, m = w[0].rows, ld = (n + 3) / 4 * 4;
  for (int64_t g = 1; g < G; ++g)
    if (w[g].rows != m || w[g].cols != k)
      return absl::InvalidArgumentError(absl::StrCat("LinearGroups: w[", g, "] is [", w[g].rows, ", ", w[g].cols,
                                                     "], w[0] [", m, ", ", k, "]"));
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  std::vector<const DeviceWeight*> dw(G);
  for (int64_t g = 0; g < G; ++g) {
    FM_ASSIGN_OR_RETURN(dw[g], WeightOnDevice(w[g]));
  }
  // Below cuBLASLt's 4 rows: every group in one GEMV launch, x to bf16 once, n rows written.
  bool gemv = G <= cuda::DenseGemvGroups::kMax && cuda::DenseGemvSupports(k, G * k);
  for (int64_t g = 0; g < G; ++g) gemv = gemv && DenseGemvRuns(*dw[g], n);
  if (gemv) {
    Frame f;
    const size_t dx = f.In(x, n * G * k * 4), xb = f.Scratch(n * G * k * 2), dy = f.Scratch(n * G * m * 4);
    f.Download(dy, y, n * G * m * 4);
    return RunLocked(f, [&](Dev d) { return EnqueueDenseGemv(dw, d.at(dx), n, d.at<__nv_bfloat16>(xb), d.at(dy), out); });
  }
  // Dense bf16 groups on the tensor cores: x to bf16 once, each group's GEMM reading its columns
  // and writing its outputs in place (cuBLASLt with leading dimensions G*k and G*m), one bf16
  // rounding at the end — instead of gathering and placing every group's columns. cuBLASLt's
  // algorithms assume 256-byte aligned operands: groups whose offsets are not take the path below.
  bool strided = (k * 2) % 256 == 0 && (m * 4) % 256 == 0;
  for (int64_t g = 0; g < G; ++g) strided = strided && DenseOnTensorCores(*dw[g], n);
  if (strided) {
    Frame f;
    const size_t dx = f.In(x, n * G * k * 4), xb = f.Scratch(ld * G * k * 2), dy = f.Scratch(ld * G * m * 4);
    f.Download(dy, y, n * G * m * 4);
    bool refused = false;
    const absl::Status st = RunLocked(f, [&](Dev d) {
      auto* xbf = d.at<__nv_bfloat16>(xb);
      cudaError_t e = cuda::F32ToBf16Rows(d.at(dx), n, G * k, ld, xbf, stream_);
      for (int64_t g = 0; g < G && e == cudaSuccess; ++g)
        e = cuda::LinearBf16Lt(lt_, *dw[g], xbf + g * k, ld, d.at(dy) + g * m, stream_, G * k, G * m);
      refused = e == cudaErrorNotSupported;
      if (refused) return cudaSuccess;  // nothing written that the path below does not rewrite
      return e != cudaSuccess || out != Rounding::kBf16 ? e : cuda::RoundToBf16(d.at(dy), ld * G * m, stream_);
    });
    if (!st.ok() || !refused) return st;
  }
  Frame f;
  const size_t dx = f.In(x, n * G * k * 4), xg = f.Scratch(ld * k * 4), yg = f.Scratch(ld * m * 4),
               dy = f.Scratch(n * G * m * 4);
  const LinearScratch s = AddLinearScratch(f, ld, k);
  f.Download(dy, y, n * G * m * 4);
  return RunLocked(f, [&](Dev d) {
    for (int64_t g = 0; g < G; ++g) {
      cudaError_t e = cudaMemcpy2DAsync(d.at(xg), k * 4, d.at(dx) + g * k, G * k * 4, k * 4, n, cudaMemcpyDeviceToDevice,
                                        stream_);
      if (e == cudaSuccess) e = EnqueueLinear(*dw[g], d.at(xg), n, ld, d.at(yg), out, s.At(d));
      if (e == cudaSuccess)
        e = cudaMemcpy2DAsync(d.at(dy) + g * m, G * m * 4, d.at(yg), m * 4, m * 4, n, cudaMemcpyDeviceToDevice, stream_);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

auto CudaBackendImpl::StageRowOps(Frame& f, std::span<const RowOp> ops, int64_t values, const char* field)
    -> absl::StatusOr<RowOpInputs> {
  RowOpInputs in;
  in.cos.resize(ops.size());
  in.sin.resize(ops.size());
  in.weight.resize(ops.size());
  for (size_t i = 0; i < ops.size(); ++i) {
    const RowOp& op = ops[i];
    if (op.width <= 0 || values % op.width != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(field, "[", i, "].width = ", op.width, " does not divide the op's ", values, " values"));
    if (op.kind == RowOp::Kind::kHadamard && (op.width & (op.width - 1)) != 0)
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "].width = ", op.width, ": Hadamard needs a power of two"));
    if (op.kind == RowOp::Kind::kRmsNorm) {
      if (!op.weight) return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "].weight: RmsNorm needs its weight"));
      in.weight[i] = f.In(op.weight, op.width * 4);
    }
    if (op.kind == RowOp::Kind::kFp8RoundTrip &&
        (op.block <= 0 || op.prefix < 0 || op.prefix > op.width || op.prefix % op.block != 0))
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "]: FP8 round trip of ", op.prefix,
                                                     " values a row of ", op.width, " in blocks of ", op.block,
                                                     " (a whole number of blocks within the row)"));
    if (op.kind != RowOp::Kind::kRope) continue;
    if (op.rope_dims <= 0 || op.rope_dims % 2 != 0 || op.offset < 0 || op.offset + op.rope_dims > op.width ||
        op.rows_per_angle <= 0 || !op.cos || !op.sin)
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "]: RoPE of ", op.rope_dims, " dims at offset ", op.offset,
                                                     " in rows of ", op.width, ", ", op.rows_per_angle,
                                                     " rows an angle set, needs its cos and sin"));
    const int64_t rows = values / op.width;
    const size_t angles = (rows + op.rows_per_angle - 1) / op.rows_per_angle * (op.rope_dims / 2) * 4;
    in.cos[i] = f.In(op.cos, angles);
    in.sin[i] = f.In(op.sin, angles);
  }
  return in;
}

cudaError_t CudaBackendImpl::EnqueueRowOps(Dev d, float* y, int64_t values, std::span<const RowOp> ops,
                                           const RowOpInputs& in) const {
  for (size_t i = 0; i < ops.size(); ++i) {
    const RowOp& op = ops[i];
    const int64_t rows = values / op.width;
    cudaError_t e = cudaSuccess;
    switch (op.kind) {
      case RowOp::Kind::kHeadRmsNormBf16: e = cuda::HeadRmsNormBf16(y, rows, op.width, op.eps, stream_); break;
      case RowOp::Kind::kRope:
        e = cuda::Rope(y, rows, op.width, op.offset, op.rope_dims, d.at(in.cos[i]), d.at(in.sin[i]), op.rows_per_angle,
                       op.inverse, stream_);
        break;
      case RowOp::Kind::kHadamard: e = cuda::Hadamard(y, rows, op.width, stream_); break;
      case RowOp::Kind::kFp4RoundTrip: e = cuda::RoundTrip(y, values, op.width, /*fp8=*/false, stream_); break;
      case RowOp::Kind::kRmsNorm: e = cuda::RmsNorm(y, d.at(in.weight[i]), rows, op.width, op.eps, y, stream_); break;
      case RowOp::Kind::kFp8RoundTrip:
        e = cuda::RoundTripRows(y, rows, op.width, op.prefix, op.block, /*fp8=*/true, stream_);
        break;
      case RowOp::Kind::kScaleBf16: e = cuda::ScaleRoundBf16(y, values, op.scale, y, stream_); break;
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

bool CudaBackendImpl::DenseOnTensorCores(const DeviceWeight& w, int64_t n) const {
  return !exact_ && fast_dense_ && w.format == WeightFormat::kDense && w.dense_bf16 &&
         (w.rows * w.cols >= (int64_t{1} << 22) || n >= kTensorCoreMinRows);
}

cudaError_t CudaBackendImpl::EnqueueDenseGemv(std::span<const DeviceWeight* const> w, const float* x, int64_t n,
                                              __nv_bfloat16* xb, float* y, Rounding out) const {
  const int64_t G = static_cast<int64_t>(w.size()), k = w[0]->cols, m = w[0]->rows;
  cuda::DenseGemvGroups groups;
  for (int64_t g = 0; g < G; ++g) groups.w[g] = static_cast<const uint16_t*>(w[g]->values);
  groups.count = static_cast<int>(G);
  const cudaError_t e = cuda::F32ToBf16Rows(x, n, G * k, n, xb, stream_);
  return e != cudaSuccess ? e : cuda::DenseGemv(groups, m, k, xb, G * k, n, y, G * m, out, stream_);
}

cudaError_t CudaBackendImpl::EnqueueLinear(const DeviceWeight& w, const float* x, int64_t n, int64_t ld, float* y,
                                           Rounding out, const LinearScratch::Ptrs& s) const {
  const int64_t k = w.cols, m = w.rows;
  const bool quantized = w.format != WeightFormat::kDense;
  auto rounded = [&](cudaError_t e) {
    return e != cudaSuccess || out != Rounding::kBf16 ? e : cuda::RoundToBf16(y, n * m, stream_);
  };
  if (!exact_ && quantized && k % 128 == 0) {
    if (fast_lt_ && w.format == WeightFormat::kFp8Block128 && n >= kTensorCoreMinRows && w.dequant_bf16) {
      DeviceWeight view;
      view.rows = m;
      view.cols = k;
      view.dense_bf16 = true;
      view.values = w.dequant_bf16;
      cudaError_t e = cuda::QuantizeActivationsBf16(x, n, k, ld, s.qb, stream_);
      if (e == cudaSuccess) e = cuda::LinearBf16Lt(lt_, view, s.qb, ld, y, stream_);
      if (e != cudaErrorNotSupported) return rounded(e);
    }
    if (fast_lt_ && w.format == WeightFormat::kFp8Block128 && n >= 16 && w.lt_scales) {
      // FP8 tensor cores (fast-fp8): ~14 bits kept while summing a 128-block (relative error ~1e-4
      // against fp32 sums), which moved dsv4-tiny-c's golden caches past their tolerance.
      cudaError_t e = cuda::QuantizeActivationsFp8(x, n, k, s.q8, s.qs, ld, stream_);
      if (e == cudaSuccess) e = cuda::LinearFp8Lt(lt_, w, w.lt_scales, s.q8, s.qs, ld, y, cuda::LtOutput::kF32, stream_);
      if (e != cudaErrorNotSupported) return rounded(e);
    }
    if (fast_gemv_) {
      const cudaError_t e = cuda::QuantizeActivations(x, n, k, s.qx, s.qs, stream_);
      return e != cudaSuccess ? e : cuda::LinearDecode(w, s.qx, s.qs, n, y, out, stream_);
    }
  }
  if (DenseGemvRuns(w, n)) {
    const DeviceWeight* one = &w;
    return EnqueueDenseGemv(std::span<const DeviceWeight* const>(&one, 1), x, n, s.qb, y, out);
  }
  if (DenseOnTensorCores(w, n)) {
    cudaError_t e = cuda::F32ToBf16Rows(x, n, k, ld, s.qb, stream_);
    if (e == cudaSuccess) e = cuda::LinearBf16Lt(lt_, w, s.qb, ld, y, stream_);
    if (e != cudaErrorNotSupported) return rounded(e);
  }
  if (!quantized) return cuda::Linear(w, x, x, n, y, out, stream_);
  const cudaError_t e = cuda::QuantizeActivations(x, n, k, s.qx, s.qs, stream_);
  return e != cudaSuccess ? e : cuda::Linear(w, s.qx, s.qs, n, y, out, stream_);
}

absl::Status CudaBackendImpl::RoutedExpertsLocked(std::span<const ExpertWork> experts, const float* x, int64_t n,
                                                  int64_t dim, float limit, float* y) const {
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  std::vector<ExpertPlan> plans;
  Frame f;
  const size_t dx = f.In(x, n * dim * 4), dy = f.In(y, n * dim * 4);
  int64_t max_ld = 0, max_k = dim;
  for (size_t i = 0; i < experts.size(); ++i) {
    const ExpertWork& e = experts[i];
    if (e.rows.empty()) continue;
    if (!e.w1 || !e.w2 || !e.w3 || e.w1->cols != dim || e.w3->cols != dim || e.w3->rows != e.w1->rows ||
        e.w2->rows != dim || e.w2->cols != e.w1->rows || (!e.weights.empty() && e.weights.size() != e.rows.size()))
      return absl::InvalidArgumentError(absl::StrCat("RoutedExperts: experts[", i, "] has inconsistent shapes"));
    for (int32_t r : e.rows)
      if (r < 0 || r >= n) return absl::InvalidArgumentError(absl::StrCat("RoutedExperts: experts[", i, "].rows has ", r));
    ExpertPlan p;
    p.e = &e;
    FM_ASSIGN_OR_RETURN(p.w1, WeightOnDevice(*e.w1));
    FM_ASSIGN_OR_RETURN(p.w3, WeightOnDevice(*e.w3));
    FM_ASSIGN_OR_RETURN(p.w2, WeightOnDevice(*e.w2));
    p.m = static_cast<int64_t>(e.rows.size());
    p.ld = (p.m + 3) / 4 * 4;
    p.inter = e.w1->rows;
    p.rows = f.In(e.rows.data(), p.m * 4);
    p.weighted = !e.weights.empty();
    p.wts = p.weighted ? f.In(e.weights.data(), p.m * 4) : 0;
    plans.push_back(p);
    max_ld = std::max(max_ld, p.ld);
    max_k = std::max(max_k, p.inter);
  }
  if (plans.empty()) return absl::OkStatus();
  // Decode-sized layers in fast mode: every expert's w1 and w3 in one grouped GEMV launch, then
  // every w2 (all experts of one quantized format). FP8 experts up to 16 rows each (from 16 rows
  // one expert's matrices go faster through the tensor cores, EnqueueLinear); FP4 experts up to
  // kGroupedFp4Rows (EnqueueLinear would run the same GEMV kernel, one launch per matrix: at
  // 16 experts x 24 rows, a batch of 64, that was 1.7 ms a layer).
  // A launch reads every matrix's codes in one layout: all with scale bytes (the decode layout,
  // fp4_layout.h) or none.
  bool grouped = !exact_ && fast_gemv_ && dim % 128 == 0;
  const bool bytes = plans[0].w1->scale_exps != nullptr;
  for (const ExpertPlan& p : plans)
    grouped = grouped && p.m <= (p.w1->format == WeightFormat::kFp4Group32 ? kGroupedFp4Rows : 16) &&
              p.inter % 128 == 0 && p.inter == plans[0].inter &&
              p.w1->format != WeightFormat::kDense &&
              p.w1->format == plans[0].w1->format && p.w3->format == p.w1->format && p.w2->format == p.w1->format &&
              (p.w1->scale_exps != nullptr) == bytes && (p.w3->scale_exps != nullptr) == bytes &&
              (p.w2->scale_exps != nullptr) == bytes;
  if (grouped) return RoutedExpertsGroupedLocked(plans, x, n, dim, limit, y, plans[0].w1->format);
  for (ExpertPlan& p : plans) {
    p.xs = f.Scratch(p.ld * dim * 4);
    p.gate = f.Scratch(p.ld * p.inter * 4);
    p.up = f.Scratch(p.ld * p.inter * 4);
    p.h = f.Scratch(p.ld * p.inter * 4);
    p.out = f.Scratch(p.ld * dim * 4);
  }
  const LinearScratch scratch = AddLinearScratch(f, max_ld, max_k);
  f.Download(dy, y, n * dim * 4);
  return RunLocked(f, [&](Dev d) {
    for (const ExpertPlan& p : plans) {
      const int32_t* rows = d.at<int32_t>(p.rows);
      cudaError_t e = cuda::GatherRows(d.at(dx), rows, p.m, dim, d.at(p.xs), stream_);
      auto linear = [&](const DeviceWeight& w, const float* in, float* out) {
        return EnqueueLinear(w, in, p.m, p.ld, out, Rounding::kBf16, scratch.At(d));
      };
      if (e == cudaSuccess) e = linear(*p.w1, d.at(p.xs), d.at(p.gate));
      if (e == cudaSuccess) e = linear(*p.w3, d.at(p.xs), d.at(p.up));
      if (e == cudaSuccess)
        e = cuda::SwiGlu(d.at(p.gate), d.at(p.up), p.m, p.inter, p.weighted ? d.at(p.wts) : nullptr, limit, d.at(p.h),
                         stream_);
      if (e == cudaSuccess) e = linear(*p.w2, d.at(p.h), d.at(p.out));
      if (e == cudaSuccess) e = cuda::ScatterAddRows(d.at(p.out), rows, p.m, dim, d.at(dy), stream_);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  });
}

absl::Status CudaBackendImpl::RoutedExpertsGroupedLocked(std::span<const ExpertPlan> plans, const float* x, int64_t n,
                                                         int64_t dim, float limit, float* y,
                                                         WeightFormat format) const {
  // The experts' rows end to end: plans[i]'s start at first[i]; one intermediate size (the
  // caller checked).
  std::vector<int64_t> first;
  std::vector<int32_t> rows;
  std::vector<float> wts;
  const int64_t inter = plans[0].inter;
  int64_t max_m = 0;
  for (const ExpertPlan& p : plans) {
    const ExpertWork& e = *p.e;
    first.push_back(static_cast<int64_t>(rows.size()));
    rows.insert(rows.end(), e.rows.begin(), e.rows.end());
    for (size_t r = 0; r < e.rows.size(); ++r) wts.push_back(e.weights.empty() ? 1.0f : e.weights[r]);  // x * 1 == x
    max_m = std::max(max_m, p.m);
  }
  const int64_t M = static_cast<int64_t>(rows.size()), E = static_cast<int64_t>(plans.size());
  const bool fp8 = format == WeightFormat::kFp8Block128;
  // FP4 on the tensor cores reads the scale bytes when the weights have them (every matrix or
  // none: RoutedExpertsLocked groups no mix), and its tokens as f16 in the MMA's order
  // (QuantizeActivationsMmaF16).
  const bool bytes = !fp8 && plans[0].w1->scale_exps != nullptr;
  const cuda::GemvInputs up_in{bytes, !fp8 && cuda::GroupedFp4OnTensorCores(max_m, dim, bytes)};
  const cuda::GemvInputs down_in{bytes, !fp8 && cuda::GroupedFp4OnTensorCores(max_m, inter, bytes)};
  Frame f;
  std::vector<int32_t> offsets, order;  // each token's rows in expert order: one scatter-add launch
  cuda::OrderRowsByTarget(rows, n, &offsets, &order);
  const size_t dx = f.In(x, n * dim * 4), dy = f.In(y, n * dim * 4), drows = f.In(rows.data(), M * 4),
               dwts = f.In(wts.data(), M * 4), doff = f.In(offsets.data(), (n + 1) * 4),
               dord = f.In(order.data(), M * 4);
  const size_t table_bytes = 3 * E * sizeof(cuda::GemvGroup);
  const size_t dtab = f.Scratch(table_bytes);  // first scratch: filled on the host (fill below)
  const GroupedExpertArrays a = AddGroupedExpertArrays(f, M, dim, inter);
  const size_t qx = a.qx, qs = a.qs, g = a.g, u = a.u, qh = a.qh, qhs = a.qhs, out = a.out;
  f.Download(dy, y, n * dim * 4);
  auto table = [&](char* host_scratch) {  // device pointers: dev_ is allocated before the fill
    char* base = static_cast<char*>(dev_);
    auto at = [&](size_t off) { return reinterpret_cast<float*>(base + f.Resolve(off)); };
    auto* t = reinterpret_cast<cuda::GemvGroup*>(host_scratch + f.Resolve(dtab) - f.in_bytes());
    for (int64_t i = 0; i < E; ++i) {
      const ExpertPlan& p = plans[i];
      const int64_t r0 = first[i];
      // Token rows from r0 on: fp32 grid values, or f16 ones in the same scratch (GemvInputs).
      auto group = [&](const DeviceWeight* w, size_t q, size_t qsc, int64_t k, float* yo) {
        return cuda::GemvGroup{static_cast<const uint8_t*>(w->values), w->scales, w->scale_cols, w->rows, k,
                               at(q) + r0 * k, at(qsc) + r0 * (k / 128), p.m, yo, w->scale_exps,
                               reinterpret_cast<const uint16_t*>(at(q)) + r0 * k};
      };
      t[i] = group(p.w1, qx, qs, dim, at(g) + r0 * inter);
      t[E + i] = group(p.w3, qx, qs, dim, at(u) + r0 * inter);
      t[2 * E + i] = group(p.w2, qh, qhs, inter, at(out) + r0 * dim);
    }
  };
  return RunLocked(
      f,
      [&](Dev d) {
        const GroupedLaunch l{M, n, E, dim, inter, max_m, fp8, up_in, down_in, limit};
        return EnqueueGroupedExperts(d, a, l, d.at(dx), d.at<int32_t>(drows), d.at(dwts), d.at<int32_t>(doff),
                                     d.at<int32_t>(dord), d.at<cuda::GemvGroup>(dtab), d.at(dy));
      },
      table, table_bytes);
}

CudaBackendImpl::GroupedExpertArrays CudaBackendImpl::AddGroupedExpertArrays(Frame& f, int64_t M, int64_t dim,
                                                                             int64_t inter) {
  GroupedExpertArrays a;
  a.xs = f.Scratch(M * dim * 4);
  a.qx = f.Scratch(M * dim * 4);
  a.qs = f.Scratch(M * (dim / 128) * 4);
  a.g = f.Scratch(M * inter * 4);
  a.u = f.Scratch(M * inter * 4);
  a.h = f.Scratch(M * inter * 4);
  a.qh = f.Scratch(M * inter * 4);
  a.qhs = f.Scratch(M * (inter / 128) * 4);
  a.out = f.Scratch(M * dim * 4);
  return a;
}

cudaError_t CudaBackendImpl::EnqueueGroupedExperts(Dev d, const GroupedExpertArrays& a, const GroupedLaunch& l,
                                                   const float* x, const int32_t* rows, const float* row_weights,
                                                   const int32_t* offsets, const int32_t* order,
                                                   const cuda::GemvGroup* tab, float* y) const {
  cudaError_t e = cuda::GatherRows(x, rows, l.M, l.dim, d.at(a.xs), stream_);
  auto quantize = [&](size_t in, int64_t k, size_t q, size_t qsc, bool f16) {
    return f16 ? cuda::QuantizeActivationsMmaF16(d.at(in), l.M, k, d.at<uint16_t>(q), d.at(qsc), stream_)
               : cuda::QuantizeActivations(d.at(in), l.M, k, d.at(q), d.at(qsc), stream_);
  };
  if (e == cudaSuccess) e = quantize(a.xs, l.dim, a.qx, a.qs, l.up_in.f16_activations);
  if (e == cudaSuccess)
    e = cuda::LinearDecodeGrouped(tab, static_cast<int>(2 * l.groups), l.inter, l.tile_n, l.dim, l.fp8,
                                  Rounding::kBf16, stream_, l.up_in);
  if (e == cudaSuccess) e = cuda::SwiGlu(d.at(a.g), d.at(a.u), l.M, l.inter, row_weights, l.limit, d.at(a.h), stream_);
  if (e == cudaSuccess) e = quantize(a.h, l.inter, a.qh, a.qhs, l.down_in.f16_activations);
  if (e == cudaSuccess)
    e = cuda::LinearDecodeGrouped(tab + 2 * l.groups, static_cast<int>(l.groups), l.dim, l.tile_n, l.inter, l.fp8,
                                  Rounding::kBf16, stream_, l.down_in);
  if (e == cudaSuccess) e = cuda::ScatterAddOrdered(d.at(a.out), offsets, order, l.n, l.dim, y, stream_);
  return e;
}

}  // namespace flashmem::kernels::cuda::internal
