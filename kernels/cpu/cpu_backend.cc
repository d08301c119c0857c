// The exact CPU reference backend. Arithmetic follows the official DeepSeek-V4 reference
// (model.py + its kernels) rounding point by rounding point; only the summation order inside
// dot products differs. OpenMP spreads the big loops over the cores.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "kernels/numerics.h"
#include "kernels/ops.h"

namespace flashmem::kernels {
namespace {

// fp32 dot product in a fixed order (reproducible): 16 lanes of partial sums, then a fixed
// pairwise reduction. AVX2 where the build allows it; the scalar path computes the same order.
inline float Dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float lanes[16] = {};
#if defined(__AVX2__)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    s1 = _mm256_add_ps(s1, _mm256_mul_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8)));
  }
  _mm256_storeu_ps(lanes, s0);
  _mm256_storeu_ps(lanes + 8, s1);
#else
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[i + j] * b[i + j];
#endif
  for (int j = 0; j < 8; ++j) lanes[j] += lanes[j + 8];
  float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + num::ExpF(-x)); }

// act_quant(x, 128): e4m3 grid values and one pow2 scale per 128 block of each row.
void QuantizeActivations(const float* x, int64_t n, int64_t k, std::vector<float>* q,
                         std::vector<float>* s) {
  const int64_t nb = k / 128;
  q->resize(n * k);
  s->resize(n * nb);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * k + b * 128;
      float amax = 0.0f;
      for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float scale = num::Fp8BlockScale(amax);
      (*s)[r * nb + b] = scale;
      float* qb = q->data() + r * k + b * 128;
      for (int i = 0; i < 128; ++i) {
        const float v = std::clamp(xb[i] / scale, -num::kE4m3Max, num::kE4m3Max);
        qb[i] = num::RoundE4m3(v);
      }
    }
  }
}

// Quantize-dequantize per block: pow2 scale from the block's amax, clamp, round to the grid,
// scale back, store as bf16 (the reference's in-place act_quant / fp4_act_quant).
void RoundTrip(float* x, int64_t n, int64_t block, float (*scale_of)(float), float (*round)(float), float qmax) {
  for (int64_t b = 0; b < n / block; ++b) {
    float* xb = x + b * block;
    float amax = 0.0f;
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = scale_of(amax);
    for (int64_t i = 0; i < block; ++i) xb[i] = num::RoundBf16(round(std::clamp(xb[i] / scale, -qmax, qmax)) * scale);
  }
}

class CpuBackendImpl final : public Backend {
 public:
  const char* name() const override { return "cpu"; }

  void Linear(const WeightMatrix& w, const float* x, int64_t n, float* y,
              Rounding out) const override {
    const int64_t k = w.cols, m = w.rows;
    const bool round = out == Rounding::kBf16;
    if (w.format == WeightFormat::kDense) {
#pragma omp parallel for schedule(static) if (m * n * k > 65536)
      for (int64_t o = 0; o < m; ++o) {
        const float* wr = w.values.data() + o * k;
        for (int64_t t = 0; t < n; ++t) {
          const float v = Dot(x + t * k, wr, k);
          y[t * m + o] = round ? num::RoundBf16(v) : v;
        }
      }
      return;
    }
    std::vector<float> xq, xs;
    QuantizeActivations(x, n, k, &xq, &xs);
    const int64_t nb = k / 128;
    const int64_t sc = w.scale_cols();
    const bool fp8 = w.format == WeightFormat::kFp8Block128;
    const int64_t kblock = fp8 ? 128 : 32;
#pragma omp parallel for schedule(static) if (m * n * k > 65536)
    for (int64_t o = 0; o < m; ++o) {
      const float* wr = w.values.data() + o * k;
      const float* ws = fp8 ? w.scales.data() + (o / 128) * sc : w.scales.data() + o * sc;
      for (int64_t t = 0; t < n; ++t) {
        const float* xr = xq.data() + t * k;
        const float* xsr = xs.data() + t * nb;
        float acc = 0.0f;
        for (int64_t kb = 0; kb < k / kblock; ++kb) {
          const float partial = Dot(xr + kb * kblock, wr + kb * kblock, kblock);
          const float s_x = xsr[(kb * kblock) / 128];
          acc += partial * s_x * ws[kb];
        }
        y[t * m + o] = round ? num::RoundBf16(acc) : acc;
      }
    }
  }

  void RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
               float* y) const override {
    for (int64_t r = 0; r < n; ++r) {
      const float* xr = x + r * dim;
      const float ms = Dot(xr, xr, dim) / static_cast<float>(dim);
      const float inv = 1.0f / std::sqrt(ms + eps);
      for (int64_t i = 0; i < dim; ++i) y[r * dim + i] = num::RoundBf16(weight[i] * (xr[i] * inv));
    }
  }

  void HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps) const override {
    using num::RoundBf16;
    for (int64_t h = 0; h < heads; ++h) {
      float* qh = q + h * dim;
      float sum = 0.0f;  // q.square() is a bf16 tensor; mean accumulates in fp32
      for (int64_t i = 0; i < dim; ++i) sum += RoundBf16(qh[i] * qh[i]);
      const float mean = RoundBf16(sum / static_cast<float>(dim));
      const float r = RoundBf16(1.0f / std::sqrt(RoundBf16(mean + eps)));
      for (int64_t i = 0; i < dim; ++i) qh[i] = RoundBf16(qh[i] * r);
    }
  }

  void Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims,
            const float* cos, const float* sin, int64_t rows_per_angle, bool inverse) const override {
    const int64_t half = rope_dims / 2;
    for (int64_t r = 0; r < rows; ++r) {
      float* p = x + r * stride + offset;
      const float* cs = cos + r / rows_per_angle * half;
      const float* sn = sin + r / rows_per_angle * half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = p[2 * i], b = p[2 * i + 1];
        const float c = cs[i], s = inverse ? -sn[i] : sn[i];
        p[2 * i] = num::RoundBf16(a * c - b * s);
        p[2 * i + 1] = num::RoundBf16(a * s + b * c);
      }
    }
  }

  void Fp8RoundTrip(float* x, int64_t n, int64_t block) const override {
    RoundTrip(x, n, block, num::Fp8BlockScale, num::RoundE4m3, num::kE4m3Max);
  }

  void Fp4RoundTrip(float* x, int64_t n, int64_t block) const override {
    RoundTrip(x, n, block, num::Fp4BlockScale, num::RoundE2m1, num::kE2m1Max);
  }

  void Hadamard(float* x, int64_t rows, int64_t dim) const override {
    const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
    for (int64_t r = 0; r < rows; ++r) {
      float* v = x + r * dim;
      for (int64_t len = 1; len < dim; len <<= 1)
        for (int64_t i = 0; i < dim; i += 2 * len)
          for (int64_t j = i; j < i + len; ++j) {
            const float a = v[j], b = v[j + len];
            v[j] = a + b;
            v[j + len] = a - b;
          }
      for (int64_t i = 0; i < dim; ++i) v[i] = num::RoundBf16(v[i] * scale);
    }
  }

  void SparseAttention(const float* q, int64_t heads, int64_t dim,
                       std::span<const float* const> kv_rows, const float* sink,
                       float softmax_scale, float* out) const override {
    const int64_t n = static_cast<int64_t>(kv_rows.size());
    constexpr int64_t kBlock = 64;
    std::vector<float> acc(dim);
    float z[kBlock];
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = q + h * dim;
      std::fill(acc.begin(), acc.end(), 0.0f);
      float m = -std::numeric_limits<float>::infinity();  // running max of raw q·k
      float l = 0.0f;
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const int64_t b1 = std::min(n, b0 + kBlock);
        float bmax = m;
        for (int64_t j = b0; j < b1; ++j) {
          const float* k = kv_rows[j];
          z[j - b0] = k ? Dot(qh, k, dim) : -std::numeric_limits<float>::infinity();
          bmax = std::max(bmax, z[j - b0]);
        }
        if (bmax == -std::numeric_limits<float>::infinity()) continue;  // fully masked block
        const float alpha = num::ExpF((m - bmax) * softmax_scale);
        l *= alpha;
        for (int64_t d = 0; d < dim; ++d) acc[d] *= alpha;
        for (int64_t j = b0; j < b1; ++j) {
          if (!kv_rows[j]) continue;
          const float p = num::ExpF((z[j - b0] - bmax) * softmax_scale);
          l += p;
          const float pb = num::RoundBf16(p);  // P is cast to bf16 before P·V
          const float* k = kv_rows[j];
          for (int64_t d = 0; d < dim; ++d) acc[d] += pb * k[d];
        }
        m = bmax;
      }
      l += num::ExpF(sink[h] - m * softmax_scale);
      for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = num::RoundBf16(acc[d] / l);
    }
  }

  void IndexScores(const float* q, const float* w, int64_t heads, int64_t dim,
                   std::span<const float* const> keys, float* scores) const override {
    const int64_t n = static_cast<int64_t>(keys.size());
    // Keys are independent: threads change nothing in any score (the history grows long).
#pragma omp parallel for schedule(static) if (n * heads * dim > (1 << 20))
    for (int64_t t = 0; t < n; ++t) {
      float sum = 0.0f;
      for (int64_t h = 0; h < heads; ++h) {
        const float d = num::RoundBf16(Dot(q + h * dim, keys[t], dim));
        sum += num::RoundBf16(std::max(d, 0.0f) * w[h]);
      }
      scores[t] = num::RoundBf16(sum);
    }
  }

  void IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim,
                     std::span<const float* const> keys, float* logits) const override {
    const int64_t n = static_cast<int64_t>(keys.size());
#pragma omp parallel for schedule(static) if (n * heads * dim > (1 << 18))
    for (int64_t t = 0; t < n; ++t) {
      float sum = 0.0f;
      if (keys[t])
        for (int64_t h = 0; h < heads; ++h) sum += w[h] * std::max(Dot(q + h * dim, keys[t], dim), 0.0f);
      logits[t] = sum;
    }
  }

  void HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale,
             int hc, int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
             float* comb) const override {
    for (int64_t t = 0; t < n; ++t)
      HcPreToken(x + t * hc * dim, fn, base, scale, hc, dim, iters, norm_eps, hc_eps, y + t * dim,
                 post + t * hc, comb + t * hc * hc);
  }

  void HcPost(const float* f, const float* residual, const float* post, const float* comb,
              int64_t n, int hc, int64_t dim, float* out) const override {
    for (int64_t t = 0; t < n; ++t)
      HcPostToken(f + t * dim, residual + t * hc * dim, post + t * hc, comb + t * hc * hc, hc, dim,
                  out + t * hc * dim);
  }

 private:
  void HcPreToken(const float* x, const float* fn, const float* base, const float* scale, int hc,
                  int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
                  float* comb) const {
    const int64_t k = hc * dim;
    const int mix = (2 + hc) * hc;
    const float rs = 1.0f / std::sqrt(Dot(x, x, k) / static_cast<float>(k) + norm_eps);
    std::vector<float> mixes(mix);
    for (int m = 0; m < mix; ++m) mixes[m] = Dot(fn + m * k, x, k) * rs;
    std::vector<float> pre(hc);
    for (int i = 0; i < hc; ++i) {
      pre[i] = Sigmoid(mixes[i] * scale[0] + base[i]) + hc_eps;
      post[i] = 2.0f * Sigmoid(mixes[hc + i] * scale[1] + base[hc + i]);
    }
    for (int i = 0; i < hc; ++i) {  // row softmax + eps
      float* row = comb + i * hc;
      float mx = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < hc; ++j) {
        row[j] = mixes[2 * hc + i * hc + j] * scale[2] + base[2 * hc + i * hc + j];
        mx = std::max(mx, row[j]);
      }
      float sum = 0.0f;
      for (int j = 0; j < hc; ++j) sum += (row[j] = num::ExpF(row[j] - mx));
      for (int j = 0; j < hc; ++j) row[j] = row[j] / sum + hc_eps;
    }
    auto normalize_cols = [&] {
      for (int j = 0; j < hc; ++j) {
        float s = 0.0f;
        for (int i = 0; i < hc; ++i) s += comb[i * hc + j];
        for (int i = 0; i < hc; ++i) comb[i * hc + j] /= (s + hc_eps);
      }
    };
    normalize_cols();
    for (int it = 1; it < iters; ++it) {
      for (int i = 0; i < hc; ++i) {
        float s = 0.0f;
        for (int j = 0; j < hc; ++j) s += comb[i * hc + j];
        for (int j = 0; j < hc; ++j) comb[i * hc + j] /= (s + hc_eps);
      }
      normalize_cols();
    }
    for (int64_t d = 0; d < dim; ++d) {
      float s = 0.0f;
      for (int i = 0; i < hc; ++i) s += pre[i] * x[i * dim + d];
      y[d] = num::RoundBf16(s);
    }
  }

  void HcPostToken(const float* f, const float* residual, const float* post, const float* comb,
                   int hc, int64_t dim, float* out) const {
    for (int j = 0; j < hc; ++j)
      for (int64_t d = 0; d < dim; ++d) {
        float s = post[j] * f[d];
        for (int i = 0; i < hc; ++i) s += comb[i * hc + j] * residual[i * dim + d];
        out[j * dim + d] = num::RoundBf16(s);
      }
  }

 public:
  void HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc,
              int64_t dim, float norm_eps, float hc_eps, float* y) const override {
    for (int64_t t = 0; t < n; ++t)
      HcHeadToken(x + t * hc * dim, fn, base, scale, hc, dim, norm_eps, hc_eps, y + t * dim);
  }

 private:
  void HcHeadToken(const float* x, const float* fn, const float* base, float scale, int hc,
                   int64_t dim, float norm_eps, float hc_eps, float* y) const {
    const int64_t k = hc * dim;
    const float rs = 1.0f / std::sqrt(Dot(x, x, k) / static_cast<float>(k) + norm_eps);
    std::vector<float> pre(hc);
    for (int i = 0; i < hc; ++i) pre[i] = Sigmoid(Dot(fn + i * k, x, k) * rs * scale + base[i]) + hc_eps;
    for (int64_t d = 0; d < dim; ++d) {
      float s = 0.0f;
      for (int i = 0; i < hc; ++i) s += pre[i] * x[i * dim + d];
      y[d] = num::RoundBf16(s);
    }
  }
};

}  // namespace

const Backend& CpuBackend() {
  static const CpuBackendImpl backend;
  return backend;
}

std::unique_ptr<Backend> NewCpuBackend() { return std::make_unique<CpuBackendImpl>(); }

}  // namespace flashmem::kernels
