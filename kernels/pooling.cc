// Backend::PoolSteps' default: the gated pooling of the compressors (spec §3.2) on the host, the
// numerics every backend reproduces bit for bit (kernels/cuda/pool_steps.cu on the device).
#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kernels {
namespace {

absl::Status CheckPoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) {
  if (shape.ratio <= 0) return absl::InvalidArgumentError(absl::StrCat("PoolSteps: shape.ratio ", shape.ratio, " <= 0"));
  if (shape.head_dim <= 0)
    return absl::InvalidArgumentError(absl::StrCat("PoolSteps: shape.head_dim ", shape.head_dim, " <= 0"));
  if (!shape.ape) return absl::InvalidArgumentError("PoolSteps: shape.ape is null");
  for (size_t k = 0; k < steps.size(); ++k) {
    const PoolStep& s = steps[k];
    if (!s.ring.kv || !s.ring.score || !s.ring.version)
      return absl::InvalidArgumentError(absl::StrCat("PoolSteps: steps[", k, "].ring has a null array or version"));
    if (!s.kv || !s.score) return absl::InvalidArgumentError(absl::StrCat("PoolSteps: steps[", k, "].kv or .score is null"));
    if (s.pos < 0) return absl::InvalidArgumentError(absl::StrCat("PoolSteps: steps[", k, "].pos ", s.pos, " < 0"));
    if ((s.pos + 1) % shape.ratio == 0 && !s.pooled)
      return absl::InvalidArgumentError(absl::StrCat("PoolSteps: steps[", k, "].pooled is null at a block's end"));
  }
  return absl::OkStatus();
}

// One token's step (the reference's Compressor.forward for one decode token).
void PoolOne(const PoolStep& s, const PoolShape& shape) {
  const int64_t d = shape.head_dim, r = shape.ratio, width = shape.width();
  const bool overlap = shape.overlap;
  const int64_t slot = (overlap ? r : 0) + s.pos % r;
  // The loops over dims below touch distinct arrays, one dim a lane: `omp simd` vectorizes them
  // (-O2's cost model does not), each dim's arithmetic the same operations in the same order.
  const float* __restrict ape = shape.ape + (s.pos % r) * width;
  const float* __restrict kv_in = s.kv;
  const float* __restrict score_in = s.score;
  float* __restrict kv_row = s.ring.kv + slot * width;
  float* __restrict score_row = s.ring.score + slot * width;
#pragma omp simd
  for (int64_t e = 0; e < width; ++e) {
    kv_row[e] = kv_in[e];
    score_row[e] = score_in[e] + ape[e];
  }
  *s.ring.version = NewKvPageVersion();
  if ((s.pos + 1) % r != 0) return;
  // Per-dimension softmax over the candidates of the block, then the weighted sum (fp32).
  // Overlap: rows 0..r-1 (previous block) give their first half, rows r..2r-1 their second.
  // Candidate by candidate over contiguous dims (each dim's max, sum and weighted sum still take
  // the candidates in order, so every dim's arithmetic is unchanged).
  const int64_t n_cand = overlap ? 2 * r : r;
  auto at = [&](const float* rows, int64_t j) { return rows + j * width + (overlap && j >= r ? d : 0); };
  std::vector<float> mx_v(at(s.ring.score, 0), at(s.ring.score, 0) + d), sum_v(d, 0.0f), acc_v(d, 0.0f), p(n_cand * d);
  float* __restrict mx = mx_v.data();
  float* __restrict sum = sum_v.data();
  float* __restrict acc = acc_v.data();
  for (int64_t j = 1; j < n_cand; ++j) {
    const float* __restrict sj = at(s.ring.score, j);
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) mx[e] = mx[e] < sj[e] ? sj[e] : mx[e];  // std::max_element's first largest
  }
  for (int64_t j = 0; j < n_cand; ++j) {
    const float* __restrict sj = at(s.ring.score, j);
    float* __restrict pj = p.data() + j * d;
    // exp through double (num::ExpF): a device computes the same bits.
    for (int64_t e = 0; e < d; ++e) sum[e] += (pj[e] = num::ExpF(sj[e] - mx[e]));
  }
  for (int64_t j = 0; j < n_cand; ++j) {
    const float* __restrict vj = at(s.ring.kv, j);
    const float* __restrict pj = p.data() + j * d;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) acc[e] += vj[e] * (pj[e] / sum[e]);
  }
  for (int64_t e = 0; e < d; ++e) s.pooled[e] = num::RoundBf16(acc[e]);  // kv.to(bf16) before the norm
  if (overlap) {  // the current block becomes the previous one
    std::copy(s.ring.kv + r * width, s.ring.kv + 2 * r * width, s.ring.kv);
    std::copy(s.ring.score + r * width, s.ring.score + 2 * r * width, s.ring.score);
  }
}

}  // namespace

void Backend::PoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) const {
  if (steps.empty()) return;
  if (absl::Status st = CheckPoolSteps(steps, shape); !st.ok()) return RecordError(st);
  const int64_t m = static_cast<int64_t>(steps.size());
  // A decode step's rows are distinct sessions: independent steps, over the host's cores when
  // several blocks complete (a CSA block's softmax pooling is ~4K exps, every fourth step a row).
  int64_t completing = 0;
  std::vector<const float*> rings(m);
  for (int64_t k = 0; k < m; ++k) {
    completing += (steps[k].pos + 1) % shape.ratio == 0;
    rings[k] = steps[k].ring.kv;
  }
  std::sort(rings.begin(), rings.end());
  const bool distinct = std::adjacent_find(rings.begin(), rings.end()) == rings.end();
#pragma omp parallel for schedule(dynamic) if (completing >= 4 && distinct)
  for (int64_t k = 0; k < m; ++k) PoolOne(steps[k], shape);
}

}  // namespace flashmem::kernels
