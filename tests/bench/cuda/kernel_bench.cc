// CUDA kernel benchmarks against the machine's limits measured in the same run (device-to-device
// copy bandwidth, cuBLAS bf16 GEMM rate). Times are CUDA-event medians over many launches after a
// warm-up; inputs are random (never zeros) and rotated across copies larger than L2 where a kernel
// streams weights. Prints a markdown table (docs/benchmarks.md records it with the command).
//   kernel_bench [--quick] [--only SECTION] [--attention-shape B,H,SLOTS] [--attention-pages P]
//   (sections: gemv linear dense moe attention index topk recall elementwise hc; the ceilings
//   always run; --attention-shape runs that attention shape alone, --attention-pages P puts the
//   records in P pages of 64)
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/device_ops.h"
#include "kernels/numerics.h"
#include "kernels/topk.h"

namespace cu = flashmem::kernels::cuda;
using flashmem::kernels::Rounding;
using flashmem::kernels::WeightFormat;

namespace {

#define CHECK_CUDA(x)                                                                          \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

std::mt19937 rng(12345);

void* DeviceRandomBytes(size_t bytes, uint8_t avoid_mask = 0) {
  std::vector<uint8_t> h(bytes);
  for (auto& b : h) {
    b = static_cast<uint8_t>(rng());
    if (avoid_mask && (b & 0x7f) == 0x7f) b &= 0xfe;  // no e4m3 NaN codes
  }
  void* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, bytes));
  CHECK_CUDA(cudaMemcpy(d, h.data(), bytes, cudaMemcpyHostToDevice));
  return d;
}
float* DeviceRandomFloats(size_t n, float std, bool pow2 = false) {
  std::normal_distribution<float> nd(0.0f, std);
  std::uniform_int_distribution<int> e(-9, -3);
  std::vector<float> h(n);
  for (float& v : h) v = pow2 ? std::ldexp(1.0f, e(rng)) : flashmem::num::RoundBf16(nd(rng));
  float* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, n * 4));
  CHECK_CUDA(cudaMemcpy(d, h.data(), n * 4, cudaMemcpyHostToDevice));
  return d;
}

// Median over `reps` of the time between two events on `stream` around body(i), divided by
// `per_rep` (the number of units body enqueues).
double EventMedianUs(int reps, cudaStream_t stream, int per_rep, const std::function<void(int)>& body) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(a, stream));
    body(i);
    CHECK_CUDA(cudaEventRecord(b, stream));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0 / per_rep);
  }
  CHECK_CUDA(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Median microseconds of `reps` launches of f(i) (i rotates input copies), after `warm` launches.
double TimeUs(const std::function<void(int)>& f, int reps = 50, int warm = 5) {
  for (int i = 0; i < warm; ++i) f(i);
  CHECK_CUDA(cudaDeviceSynchronize());
  return EventMedianUs(reps, nullptr, 1, f);
}

// The same work captured once in a CUDA graph (f enqueues on the stream it is given) and replayed
// `chain` times back to back between two events: the time per replay without the host's launch
// latency in front of every rep (METHOD.md: many small launches are timed as graph replays, as the
// decode step would run them). Median over reps.
double TimeGraphUs(const std::function<void(cudaStream_t)>& f, int chain = 20, int reps = 20) {
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  f(s);
  CHECK_CUDA(cudaStreamEndCapture(s, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaGraphLaunch(exec, s));
  CHECK_CUDA(cudaStreamSynchronize(s));
  const double us = EventMedianUs(reps, s, chain, [&](int) {
    for (int i = 0; i < chain; ++i) CHECK_CUDA(cudaGraphLaunch(exec, s));
  });
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  return us;
}

struct Row {
  std::string kernel, shape;
  double us, gbs, tflops;
  std::string vs_limit;
};
std::vector<Row> rows;

void Print() {
  std::printf("\n| kernel | shape | time (us) | GB/s | TFLOP/s | vs limit |\n|---|---|---:|---:|---:|---|\n");
  for (const Row& r : rows)
    std::printf("| %s | %s | %.1f | %.0f | %.2f | %s |\n", r.kernel.c_str(), r.shape.c_str(), r.us, r.gbs, r.tflops,
                r.vs_limit.c_str());
}

std::string Pct(double v, double limit, const char* what) {
  char b[64];
  std::snprintf(b, sizeof b, "%.0f%% of %s", 100.0 * v / limit, what);
  return b;
}

std::string Speedup(double x) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2fx", x);
  return b;
}

std::string only;  // --only: the one section to run (empty: all)
bool Want(const char* section) { return only.empty() || only == section; }
// --attention-shape BATCH,HEADS,SLOTS: the attention section runs that shape alone (profiling).
int64_t shape_batch = 0, shape_heads = 0, shape_slots = 0;
// --attention-pages P: the records the attention section reads lie in P pages of 64 (default 4,096:
// 153 MB, past L2; a few pages keep them in L2, which separates the kernel from DRAM).
int64_t attention_pages = 4096;

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) {
      only = argv[++i];
    } else if (std::strcmp(argv[i], "--attention-shape") == 0 && i + 1 < argc) {
      const char* v = argv[++i];
      long long b = 0, h = 0, n = 0;
      if (std::sscanf(v, "%lld,%lld,%lld", &b, &h, &n) != 3 || b <= 0 || h <= 0 || n <= 0) {
        std::fprintf(stderr, "--attention-shape wants BATCH,HEADS,SLOTS (positive), got '%s'\n", v);
        return 2;
      }
      shape_batch = b, shape_heads = h, shape_slots = n;
    } else if (std::strcmp(argv[i], "--attention-pages") == 0 && i + 1 < argc) {
      attention_pages = std::atoll(argv[++i]);
      if (attention_pages <= 0) {
        std::fprintf(stderr, "--attention-pages wants a positive page count, got '%s'\n", argv[i]);
        return 2;
      }
    } else {
      std::fprintf(stderr,
                   "usage: kernel_bench [--quick] [--only SECTION] [--attention-shape BATCH,HEADS,SLOTS]\n"
                   "                    [--attention-pages P]; unknown argument '%s'\n",
                   argv[i]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);

  // ---- ceilings ------------------------------------------------------------------------------
  const size_t copy_bytes = size_t{1} << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMemset(src, 0x5a, copy_bytes));  // not zeros
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  const double copy_us = TimeUs([&](int) { CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); }, 20);
  const double hbm = 2.0 * copy_bytes / copy_us / 1e3;  // GB/s, read + write
  rows.push_back({"ceiling: D2D copy", "1 GiB", copy_us, hbm, 0, "HBM limit (read+write)"});
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));

  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return 1;
  const int g = 8192;
  void *ga = nullptr, *gb = nullptr, *gc = nullptr;
  CHECK_CUDA(cudaMalloc(&ga, size_t{2} * g * g));
  CHECK_CUDA(cudaMalloc(&gb, size_t{2} * g * g));
  CHECK_CUDA(cudaMemset(ga, 0x3c, size_t{2} * g * g));  // bf16 0x3c3c ~ 0.0115: finite, non-zero
  CHECK_CUDA(cudaMemset(gb, 0x3b, size_t{2} * g * g));
  CHECK_CUDA(cudaMalloc(&gc, size_t{2} * g * g));
  const float one = 1.0f, zero = 0.0f;
  const double gemm_us = TimeUs([&](int) {
    cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, g, g, g, &one, ga, CUDA_R_16BF, g, gb, CUDA_R_16BF, g, &zero, gc,
                 CUDA_R_16BF, g, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }, 10);
  const double bf16_tflops = 2.0 * g * g * g / gemm_us / 1e6;
  rows.push_back({"ceiling: cuBLAS bf16 GEMM", "8192^3", gemm_us, 0, bf16_tflops, "tensor-core limit"});
  CHECK_CUDA(cudaFree(ga));
  CHECK_CUDA(cudaFree(gb));
  CHECK_CUDA(cudaFree(gc));
  cublasDestroy(blas);

  // ---- the FP8 decode GEMV (fast mode below 4 tokens) on V4-Flash's projection shapes, graph
  // replays over copies of the weight larger than L2, as a step runs them. FLASHMEM_DECODE_GEMV_ROWS
  // (1, 2, 4) fixes the rows a warp computes; unset, the backend's choice.
  if (Want("gemv")) {
    const char* forced = std::getenv("FLASHMEM_DECODE_GEMV_ROWS");
    const std::string tag = std::string(" (rows a warp: ") + (forced ? forced : "by shape") + ")";
    struct GemvShape { int64_t rows, cols; const char* name; };
    for (GemvShape s : {GemvShape{1024, 4096, "wq_a"}, GemvShape{4096, 4096, "4096^2"}, GemvShape{32768, 1024, "wq_b"},
                        GemvShape{4096, 8192, "wo_b"}, GemvShape{2048, 4096, "shared w1"}}) {
      const int64_t value_bytes = s.rows * s.cols, scale_cols = s.cols / 128;
      const int copies = static_cast<int>(std::max<int64_t>(2, (int64_t{256} << 20) / value_bytes));
      std::vector<cu::DeviceWeight> ws(copies);
      for (auto& w : ws) {
        w.format = WeightFormat::kFp8Block128;
        w.rows = s.rows;
        w.cols = s.cols;
        w.values = DeviceRandomBytes(value_bytes, 1);
        w.scales = DeviceRandomFloats(((s.rows + 127) / 128) * scale_cols, 0, true);
        w.scale_cols = scale_cols;
      }
      for (int64_t n : {1, 2, 3}) {
        float* x = DeviceRandomFloats(n * s.cols, 1.0f);
        float *xq, *xs, *y;
        CHECK_CUDA(cudaMalloc(&xq, n * s.cols * 4));
        CHECK_CUDA(cudaMalloc(&xs, n * scale_cols * 4));
        CHECK_CUDA(cudaMalloc(&y, n * s.rows * 4));
        CHECK_CUDA(cu::QuantizeActivations(x, n, s.cols, xq, xs, nullptr));
        const double us = TimeGraphUs([&](cudaStream_t st) {
          for (int i = 0; i < copies; ++i) CHECK_CUDA(cu::LinearDecode(ws[i], xq, xs, n, y, Rounding::kBf16, st));
        }) / copies;
        const double bytes = static_cast<double>(ws[0].bytes()) + n * s.cols * 8.0 + n * s.rows * 4.0;
        rows.push_back({std::string("decode GEMV FP8 ") + s.name + ", graph replays" + tag,
                        std::to_string(n) + "x" + std::to_string(s.cols) + " -> " + std::to_string(s.rows), us,
                        bytes / us / 1e3, 2.0 * n * s.rows * s.cols / us / 1e6, Pct(bytes / us / 1e3, hbm, "HBM")});
        for (void* p : {static_cast<void*>(x), static_cast<void*>(xq), static_cast<void*>(xs), static_cast<void*>(y)})
          CHECK_CUDA(cudaFree(p));
      }
      for (auto& w : ws) {
        CHECK_CUDA(cudaFree(const_cast<void*>(w.values)));
        CHECK_CUDA(cudaFree(const_cast<float*>(w.scales)));
      }
    }
  }

  // ---- Linear (FP8 block-128 and FP4 group-32 weights) at decode and prefill sizes -----------
  if (Want("linear")) {
    struct LinShape { WeightFormat f; int64_t rows, cols; const char* name; };
    for (LinShape s : {LinShape{WeightFormat::kFp8Block128, 4096, 4096, "FP8 wq_b-like"},
                       LinShape{WeightFormat::kFp4Group32, 2048, 4096, "FP4 expert w1"}}) {
      const bool fp8 = s.f == WeightFormat::kFp8Block128;
      const int64_t value_bytes = fp8 ? s.rows * s.cols : s.rows * s.cols / 2;
      const int64_t scale_cols = fp8 ? (s.cols + 127) / 128 : s.cols / 32;
      const int64_t scale_count = fp8 ? ((s.rows + 127) / 128) * scale_cols : s.rows * scale_cols;
      const int copies = static_cast<int>(std::max<int64_t>(2, (int64_t{256} << 20) / value_bytes));  // > L2
      std::vector<cu::DeviceWeight> ws(copies);
      for (auto& w : ws) {
        w.format = s.f;
        w.rows = s.rows;
        w.cols = s.cols;
        w.values = DeviceRandomBytes(value_bytes, fp8 ? 1 : 0);
        w.scales = DeviceRandomFloats(scale_count, 0, true);
        w.scale_cols = scale_cols;
      }
      for (int64_t n : quick ? std::vector<int64_t>{1, 64} : std::vector<int64_t>{1, 2, 4, 8, 32, 64, 4096}) {
        float* x = DeviceRandomFloats(n * s.cols, 1.0f);
        float *xq, *xs, *y;
        CHECK_CUDA(cudaMalloc(&xq, n * s.cols * 4));
        CHECK_CUDA(cudaMalloc(&xs, n * (s.cols / 128) * 4));
        CHECK_CUDA(cudaMalloc(&y, n * s.rows * 4));
        const double us = TimeUs([&](int i) {
          CHECK_CUDA(cu::QuantizeActivations(x, n, s.cols, xq, xs, nullptr));
          CHECK_CUDA(cu::Linear(ws[i % copies], xq, xs, n, y, Rounding::kBf16, nullptr));
        }, n >= 4096 ? 5 : 50, n >= 4096 ? 1 : 5);
        const double bytes = static_cast<double>(ws[0].bytes()) + n * s.cols * 4.0 * 3 + n * s.rows * 4.0;
        const double gbs = bytes / us / 1e3, tf = 2.0 * n * s.rows * s.cols / us / 1e6;
        const std::string shape = std::to_string(n) + "x" + std::to_string(s.cols) + " -> " + std::to_string(s.rows);
        rows.push_back({std::string("Linear (exact) ") + s.name, shape, us, gbs, tf,
                        n >= 4096 ? Pct(tf, bf16_tflops, "bf16 GEMM") : Pct(gbs, hbm, "HBM")});
        if (n <= 64) {
          const double fus = TimeUs([&](int i) {
            CHECK_CUDA(cu::QuantizeActivations(x, n, s.cols, xq, xs, nullptr));
            CHECK_CUDA(cu::LinearDecode(ws[i % copies], xq, xs, n, y, Rounding::kBf16, nullptr));
          });
          const double fgbs = bytes / fus / 1e3;
          rows.push_back({std::string("Linear decode (fast, + act quant) ") + s.name, shape, fus, fgbs, 2.0 * n * s.rows * s.cols / fus / 1e6,
                          Pct(fgbs, hbm, "HBM")});
          const double gus = TimeUs([&](int i) {
            CHECK_CUDA(cu::LinearDecode(ws[i % copies], xq, xs, n, y, Rounding::kBf16, nullptr));
          });
          rows.push_back({std::string("Linear decode GEMV alone ") + s.name, shape, gus, bytes / gus / 1e3,
                          2.0 * n * s.rows * s.cols / gus / 1e6, Pct(bytes / gus / 1e3, hbm, "HBM")});
          // As a decode step's stream runs them: quantize + GEMV over every copy in turn, replayed
          // without the host's launch latency in front of each (the per-call rows above include it).
          const double rus = TimeGraphUs([&](cudaStream_t st) {
            for (int i = 0; i < copies; ++i) {
              CHECK_CUDA(cu::QuantizeActivations(x, n, s.cols, xq, xs, st));
              CHECK_CUDA(cu::LinearDecode(ws[i], xq, xs, n, y, Rounding::kBf16, st));
            }
          }) / copies;
          rows.push_back({std::string("Linear decode (fast, + act quant), graph replays ") + s.name, shape, rus,
                          bytes / rus / 1e3, 2.0 * n * s.rows * s.cols / rus / 1e6, Pct(bytes / rus / 1e3, hbm, "HBM")});
        }
        for (void* p : {static_cast<void*>(x), static_cast<void*>(xq), static_cast<void*>(xs), static_cast<void*>(y)})
          CHECK_CUDA(cudaFree(p));
      }
      if (fp8) {  // cuBLASLt block-scaled FP8 (the fast mode's prefill path)
        cu::LtContext lt;
        float* lt_scales = DeviceRandomFloats(((s.rows + 127) / 128) * ((s.cols / 128 + 3) / 4 * 4), 0, true);
        for (int64_t n : quick ? std::vector<int64_t>{64, 4096} : std::vector<int64_t>{16, 64, 512, 4096}) {
          float* x = DeviceRandomFloats(n * s.cols, 1.0f);
          uint8_t* codes = nullptr;
          float* st = nullptr;
          float* yb = nullptr;  // fp32 out, as the backend runs it
          CHECK_CUDA(cudaMalloc(&codes, n * s.cols));
          CHECK_CUDA(cudaMalloc(&st, n * (s.cols / 128) * 4));
          CHECK_CUDA(cudaMalloc(&yb, n * s.rows * 4));
          CHECK_CUDA(cu::QuantizeActivationsFp8(x, n, s.cols, codes, st, n, nullptr));
          if (cu::LinearFp8Lt(lt, ws[0], lt_scales, codes, st, n, yb, cu::LtOutput::kF32, nullptr) != cudaSuccess) {
            std::printf("cuBLASLt refused %lldx%lld -> %lld: %s\n", static_cast<long long>(n), static_cast<long long>(s.cols),
                        static_cast<long long>(s.rows), lt.last_error().c_str());
            for (void* p : {static_cast<void*>(x), static_cast<void*>(codes), static_cast<void*>(st), static_cast<void*>(yb)})
              CHECK_CUDA(cudaFree(p));
            continue;
          }
          const double gus = TimeUs([&](int i) {
            CHECK_CUDA(cu::LinearFp8Lt(lt, ws[i % copies], lt_scales, codes, st, n, yb, cu::LtOutput::kF32, nullptr));
          }, n >= 4096 ? 20 : 50);
          const double qus = TimeUs([&](int) { CHECK_CUDA(cu::QuantizeActivationsFp8(x, n, s.cols, codes, st, n, nullptr)); });
          const double tf = 2.0 * n * s.rows * s.cols / gus / 1e6;
          const double bytes = static_cast<double>(ws[0].bytes()) + n * s.cols + n * s.rows * 2.0;
          rows.push_back({std::string("cuBLASLt FP8 block-scaled ") + s.name,
                          std::to_string(n) + "x" + std::to_string(s.cols) + " -> " + std::to_string(s.rows) +
                              " (+" + std::to_string(static_cast<int>(qus)) + " us act quant)",
                          gus, bytes / gus / 1e3, tf, n >= 512 ? Pct(tf, bf16_tflops, "bf16 GEMM") : Pct(bytes / gus / 1e3, hbm, "HBM")});
          for (void* p : {static_cast<void*>(x), static_cast<void*>(codes), static_cast<void*>(st), static_cast<void*>(yb)})
            CHECK_CUDA(cudaFree(p));
        }
        CHECK_CUDA(cudaFree(lt_scales));
        // The fast mode's path from 16 tokens: the weight dequantized to bf16 (2 B per value), act_quant
        // into bf16, the bf16 tensor cores with fp32 sums (the reference's product up to summation order).
        cu::DeviceWeight deq;
        deq.rows = s.rows;
        deq.cols = s.cols;
        deq.dense_bf16 = true;
        deq.values = DeviceRandomBytes(size_t(s.rows) * s.cols * 2);  // timing only: the values do not matter
        for (int64_t n : quick ? std::vector<int64_t>{64, 4096} : std::vector<int64_t>{1, 2, 4, 8, 16, 64, 512, 4096}) {
          float* x = DeviceRandomFloats(n * s.cols, 1.0f);
          __nv_bfloat16* xb = nullptr;
          float* y = nullptr;
          CHECK_CUDA(cudaMalloc(&xb, n * s.cols * 2));
          CHECK_CUDA(cudaMalloc(&y, n * s.rows * 4));
          CHECK_CUDA(cu::QuantizeActivationsBf16(x, n, s.cols, n, xb, nullptr));
          if (cu::LinearBf16Lt(lt, deq, xb, n, y, nullptr) != cudaSuccess) {
            std::printf("cuBLASLt bf16 refused %lld tokens: %s\n", static_cast<long long>(n), lt.last_error().c_str());
          } else {
            const double gus = TimeUs([&](int) { CHECK_CUDA(cu::LinearBf16Lt(lt, deq, xb, n, y, nullptr)); }, n >= 4096 ? 20 : 50);
            const double qus = TimeUs([&](int) { CHECK_CUDA(cu::QuantizeActivationsBf16(x, n, s.cols, n, xb, nullptr)); });
            const double tf = 2.0 * n * s.rows * s.cols / gus / 1e6;
            const double bytes = s.rows * s.cols * 2.0 + n * s.cols * 2.0 + n * s.rows * 4.0;
            rows.push_back({std::string("bf16 tensor cores on dequantized FP8 (fast) ") + s.name,
                            std::to_string(n) + "x" + std::to_string(s.cols) + " -> " + std::to_string(s.rows) + " (+" +
                                std::to_string(static_cast<int>(qus)) + " us act quant)",
                            gus, bytes / gus / 1e3, tf,
                            n >= 512 ? Pct(tf, bf16_tflops, "bf16 GEMM") : Pct(bytes / gus / 1e3, hbm, "HBM")});
          }
          for (void* p : {static_cast<void*>(x), static_cast<void*>(xb), static_cast<void*>(y)}) CHECK_CUDA(cudaFree(p));
        }
        CHECK_CUDA(cudaFree(const_cast<void*>(deq.values)));
      }
      for (auto& w : ws) {
        CHECK_CUDA(cudaFree(const_cast<void*>(w.values)));
        CHECK_CUDA(cudaFree(const_cast<float*>(w.scales)));
      }
    }
  }

  // ---- wo_a's groups: dense bf16, 8 x (1024 x 4096), a few tokens (fast mode) ---------------------
  // The grouped dense GEMV (one launch, n rows written) against what fast mode ran below 4 tokens
  // before: cuBLASLt's bf16 GEMM per group, tokens padded to 4. Bytes: the weights (64 MB), each
  // read once; three sets in turn, past the L2.
  if (Want("dense")) {
    const int64_t G = 8, m = 1024, k = 4096, sets = 3;
    std::vector<cu::DeviceWeight> w(G * sets);
    for (auto& d : w) {
      d.rows = m;
      d.cols = k;
      d.dense_bf16 = true;
      d.values = DeviceRandomFloats(size_t(m) * k / 2, 0.05f);  // m * k bf16 values' bytes
    }
    cu::LtContext lt;
    __nv_bfloat16* xb = nullptr;
    float* y = nullptr;
    CHECK_CUDA(cudaMalloc(&xb, 4 * G * k * 2));
    CHECK_CUDA(cudaMemset(xb, 0x3c, 4 * G * k * 2));
    CHECK_CUDA(cudaMalloc(&y, 4 * G * m * 4));
    const double bytes = double(G) * m * k * 2;
    for (int64_t n : {1, 2, 3}) {
      auto gemv = [&](int i, cudaStream_t st) {
        cu::DenseGemvGroups groups;
        for (int64_t g = 0; g < G; ++g) groups.w[g] = static_cast<const uint16_t*>(w[(i % sets) * G + g].values);
        groups.count = static_cast<int>(G);
        CHECK_CUDA(cu::DenseGemv(groups, m, k, xb, G * k, n, y, G * m, Rounding::kBf16, st));
      };
      auto padded = [&](int i, cudaStream_t st) {
        for (int64_t g = 0; g < G; ++g)
          CHECK_CUDA(cu::LinearBf16Lt(lt, w[(i % sets) * G + g], xb + g * k, 4, y + g * m, st, G * k, G * m));
      };
      const std::string shape = std::to_string(n) + " tok x 8 groups of 4096 -> 1024 (64 MB)";
      for (int v = 0; v < 2; ++v) {
        auto f = v == 0 ? std::function<void(int, cudaStream_t)>(gemv) : std::function<void(int, cudaStream_t)>(padded);
        const char* name = v == 0 ? "wo_a groups, dense GEMV (one launch)" : "wo_a groups, cuBLASLt bf16 per group (4 rows)";
        const double us = TimeUs([&](int i) { f(i, nullptr); });
        rows.push_back({name, shape, us, bytes / us / 1e3, 2.0 * n * G * m * k / us / 1e6, Pct(bytes / us / 1e3, hbm, "HBM")});
        const double gus = TimeGraphUs([&](cudaStream_t st) { for (int i = 0; i < sets; ++i) f(i, st); }) / sets;
        rows.push_back({std::string(name) + ", graph replays", shape, gus, bytes / gus / 1e3, 2.0 * n * G * m * k / gus / 1e6,
                        Pct(bytes / gus / 1e3, hbm, "HBM")});
      }
    }
    for (auto& d : w) CHECK_CUDA(cudaFree(const_cast<void*>(d.values)));
    CHECK_CUDA(cudaFree(xb));
    CHECK_CUDA(cudaFree(y));
  }

  // ---- MoE layer: the routed experts' FP4 GEMVs grouped in two launches (fast mode, decode) -------
  // V4-Flash expert shapes (dim 4096, inter 2048) out of its 256 experts: w1 and w3 of every
  // active expert in one launch, then every w2; bytes = the FP4 codes and their scales, each read
  // once — fp32 scales, or the checkpoint's E8M0 bytes as fast mode uploads them. Routings: one
  // token (6 experts), 16 experts x 4 tokens, 24 experts x 1 token, and batches of 64 and 8
  // tokens each routed to 6 of the 256 at random (~200 experts touched, 1-6 tokens each: what a
  // batch-64 decode step reads; ~45 experts, 1-2 tokens each, at batch 8).
  if (Want("moe")) {
    const int64_t dim = 4096, inter = 2048, pool = 256, mat_codes = dim * inter / 2, mat_groups = dim * inter / 32;
    uint8_t* codes = nullptr;  // [pool][3][mat_codes]: w1, w3, w2
    CHECK_CUDA(cudaMalloc(&codes, size_t(pool) * 3 * mat_codes));
    {
      void* block = DeviceRandomBytes(size_t(mat_codes));
      for (int64_t m = 0; m < pool * 3; ++m)
        CHECK_CUDA(cudaMemcpy(codes + m * mat_codes, block, mat_codes, cudaMemcpyDeviceToDevice));
      CHECK_CUDA(cudaFree(block));
    }
    std::vector<uint8_t> exps_h(size_t(pool) * 3 * mat_groups);
    std::vector<float> scales_h(exps_h.size());
    for (size_t i = 0; i < exps_h.size(); ++i) {
      exps_h[i] = static_cast<uint8_t>(118 + rng() % 7);  // 2^-9 .. 2^-3
      scales_h[i] = std::ldexp(1.0f, exps_h[i] - 127);
    }
    uint8_t* exps = nullptr;
    float* scales = nullptr;
    CHECK_CUDA(cudaMalloc(&exps, exps_h.size()));
    CHECK_CUDA(cudaMalloc(&scales, scales_h.size() * 4));
    CHECK_CUDA(cudaMemcpy(exps, exps_h.data(), exps_h.size(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(scales, scales_h.data(), scales_h.size() * 4, cudaMemcpyHostToDevice));
    struct Routing { const char* shape; std::vector<int> tokens_of; };  // tokens per expert of the pool
    std::vector<Routing> routings;
    routings.push_back({"6 experts x 1 tok", std::vector<int>(pool, 0)});
    for (int e = 0; e < 6; ++e) routings.back().tokens_of[e * 41] = 1;
    routings.push_back({"16 experts x 4 tok", std::vector<int>(pool, 0)});
    for (int e = 0; e < 16; ++e) routings.back().tokens_of[e * 16] = 4;
    // A batch of 4 with no expert shared: one-token tiles over enough experts for whole-k blocks.
    routings.push_back({"24 experts x 1 tok", std::vector<int>(pool, 0)});
    for (int e = 0; e < 24; ++e) routings.back().tokens_of[e * 10] = 1;
    for (int batch : {64, 8}) {  // 64 first: its routing draws the same numbers as before
      routings.push_back({batch == 8 ? "8 tok, top-6 of 256 experts" : "64 tok, top-6 of 256 experts",
                          std::vector<int>(pool, 0)});
      for (int t = 0; t < batch; ++t) {
        std::vector<int> picked;
        while (picked.size() < 6) {
          const int e = static_cast<int>(rng() % pool);
          if (std::find(picked.begin(), picked.end(), e) == picked.end()) picked.push_back(e);
        }
        for (int e : picked) ++routings.back().tokens_of[e];
      }
    }
    for (const Routing& r : routings) {
      std::vector<int64_t> active;
      int64_t m = 0, max_n = 0;
      for (int64_t e = 0; e < pool; ++e)
        if (r.tokens_of[e] > 0) {
          active.push_back(e);
          m += r.tokens_of[e];
          max_n = std::max<int64_t>(max_n, r.tokens_of[e]);
        }
      const int64_t E = static_cast<int64_t>(active.size());
      float* xq = DeviceRandomFloats(size_t(m) * dim, 1.0f);  // every expert's rows end to end
      float* xs = DeviceRandomFloats(size_t(m) * (dim / 128), 0, true);
      float* hq = DeviceRandomFloats(size_t(m) * inter, 1.0f);
      float* hs = DeviceRandomFloats(size_t(m) * (inter / 128), 0, true);
      uint16_t *xh = nullptr, *hh = nullptr;  // the same tokens as f16 in the MMA's order (fast mode's form)
      float* junk = nullptr;
      CHECK_CUDA(cudaMalloc(&xh, size_t(m) * dim * 2));
      CHECK_CUDA(cudaMalloc(&hh, size_t(m) * inter * 2));
      CHECK_CUDA(cudaMalloc(&junk, size_t(m) * (dim / 128) * 4));
      CHECK_CUDA(cu::QuantizeActivationsMmaF16(xq, m, dim, xh, junk, nullptr));
      CHECK_CUDA(cu::QuantizeActivationsMmaF16(hq, m, inter, hh, junk, nullptr));
      float* y = nullptr;
      CHECK_CUDA(cudaMalloc(&y, size_t(m) * (2 * inter + dim) * 4));
      std::vector<cu::GemvGroup> tab(3 * E);
      for (int64_t i = 0, r0 = 0; i < E; r0 += r.tokens_of[active[i]], ++i) {
        const int64_t n = r.tokens_of[active[i]];
        auto group = [&](int mat, int64_t rows_n, int64_t k, const float* x, const uint16_t* x16, const float* x_s,
                         float* out) {
          const int64_t at = active[i] * 3 + mat;
          return cu::GemvGroup{codes + at * mat_codes, scales + at * mat_groups, k / 32, rows_n, k, x, x_s, n, out,
                               exps + at * mat_groups, x16};
        };
        tab[i] = group(0, inter, dim, xq + r0 * dim, xh + r0 * dim, xs + r0 * (dim / 128), y + r0 * inter);
        tab[E + i] = group(1, inter, dim, xq + r0 * dim, xh + r0 * dim, xs + r0 * (dim / 128), y + (m + r0) * inter);
        tab[2 * E + i] = group(2, dim, inter, hq + r0 * inter, hh + r0 * inter, hs + r0 * (inter / 128),
                               y + 2 * m * inter + r0 * dim);
      }
      cu::GemvGroup* dtab = nullptr;
      CHECK_CUDA(cudaMalloc(&dtab, tab.size() * sizeof(cu::GemvGroup)));
      CHECK_CUDA(cudaMemcpy(dtab, tab.data(), tab.size() * sizeof(cu::GemvGroup), cudaMemcpyHostToDevice));
      const double flop = 2.0 * 3 * m * dim * inter;
      const std::string shape = std::string(r.shape) + " (" + std::to_string(E) + " experts, max " +
                                std::to_string(max_n) + " tok), 4096 <-> 2048";
      // fp32 scales and tokens (before 2026-11-30 evening); E8M0 scale bytes and f16 tokens (fast
      // mode) with k split between a block's warps and with each warp over all of k (Fp4Blocks).
      using cu::Fp4Blocks;
      for (cu::GemvInputs in : {cu::GemvInputs{false, false}, cu::GemvInputs{true, true, Fp4Blocks::kSplitK},
                                cu::GemvInputs{true, true, Fp4Blocks::kWholeK}}) {
        auto layer = [&](cudaStream_t s) {  // w1 and w3 of every expert, then every w2
          CHECK_CUDA(cu::LinearDecodeGrouped(dtab, 2 * E, inter, max_n, dim, false, Rounding::kBf16, s, in));
          CHECK_CUDA(cu::LinearDecodeGrouped(dtab + 2 * E, E, dim, max_n, inter, false, Rounding::kBf16, s, in));
        };
        const double bytes = 3.0 * E * (mat_codes + mat_groups * (in.scale_bytes ? 1.0 : 4.0));
        auto add = [&](std::string name, double us) {
          rows.push_back({name + (in.scale_bytes ? ", E8M0 scale bytes" : ", fp32 scales") +
                              (in.f16_activations ? ", f16 tokens" : ", fp32 tokens") +
                              (in.blocks == Fp4Blocks::kSplitK   ? ", k split"
                               : in.blocks == Fp4Blocks::kWholeK ? ", whole k a warp"
                                                                 : ""),
                          shape, us, bytes / us / 1e3, flop / us / 1e6, Pct(bytes / us / 1e3, hbm, "HBM")});
        };
        add("MoE routed experts, FP4, grouped GEMV (2 launches)", TimeUs([&](int) { layer(nullptr); }));
        add("same, graph replays back to back", TimeGraphUs(layer));
      }
      for (void* p : {static_cast<void*>(xq), static_cast<void*>(xs), static_cast<void*>(hq), static_cast<void*>(hs),
                      static_cast<void*>(xh), static_cast<void*>(hh), static_cast<void*>(junk), static_cast<void*>(y),
                      static_cast<void*>(dtab)})
        CHECK_CUDA(cudaFree(p));
    }
    for (void* p : {static_cast<void*>(codes), static_cast<void*>(exps), static_cast<void*>(scales)})
      CHECK_CUDA(cudaFree(p));
    // The device routing before those launches (RoutedMoE): a batch's picks from its router
    // logits (sqrt-softplus, bias) and their grouping into the grouped GEMV's table, V4-Flash's 256
    // experts, top 6.
    for (int64_t n : {1, 8, 64}) {
      const int64_t E = 256, k = 6, M = n * k;
      float* logits = DeviceRandomFloats(size_t(n) * E, 1.0f);
      float* bias = DeviceRandomFloats(E, 0.05f);
      int32_t *ids = nullptr, *rows_d = nullptr, *off = nullptr, *ord = nullptr;
      float *wts = nullptr, *rw = nullptr;
      cu::GemvGroup *tmpl = nullptr, *tab = nullptr;
      CHECK_CUDA(cudaMalloc(&ids, M * 4));
      CHECK_CUDA(cudaMalloc(&wts, M * 4));
      CHECK_CUDA(cudaMalloc(&rows_d, M * 4));
      CHECK_CUDA(cudaMalloc(&rw, M * 4));
      CHECK_CUDA(cudaMalloc(&off, (n + 1) * 4));
      CHECK_CUDA(cudaMalloc(&ord, M * 4));
      CHECK_CUDA(cudaMalloc(&tmpl, 3 * E * sizeof(cu::GemvGroup)));
      CHECK_CUDA(cudaMemset(tmpl, 0, 3 * E * sizeof(cu::GemvGroup)));
      const int64_t G = std::min(M, E);
      CHECK_CUDA(cudaMalloc(&tab, 3 * G * sizeof(cu::GemvGroup)));
      float* bufs = DeviceRandomFloats(1, 1.0f);  // the layout's buffers: only their addresses are written
      unsigned* done = nullptr;
      CHECK_CUDA(cudaMalloc(&done, 4));
      CHECK_CUDA(cudaMemset(done, 0, 4));
      const cu::ExpertGroupLayout layout{tmpl, E, G, 4096, 2048, bufs, bufs, bufs, bufs, bufs, bufs, bufs};
      auto route = [&](cudaStream_t s) {
        CHECK_CUDA(cu::RouteAndGroup(logits, n, k, flashmem::kernels::RouterScore::kSqrtSoftplus, bias, nullptr, 1.5f,
                                     layout, ids, wts, rows_d, rw, off, ord, tab, done, s));
      };
      const std::string shape = std::to_string(n) + " tok, top-6 of 256 experts";
      rows.push_back({"MoE routing on the device (RouteAndGroup)", shape,
                      TimeUs([&](int) { route(nullptr); }), 0, 0, "1 launch"});
      rows.push_back({"same, graph replays back to back", shape, TimeGraphUs(route), 0, 0, ""});
      for (void* p : {static_cast<void*>(logits), static_cast<void*>(bias), static_cast<void*>(ids),
                      static_cast<void*>(wts), static_cast<void*>(rows_d), static_cast<void*>(rw),
                      static_cast<void*>(off), static_cast<void*>(ord), static_cast<void*>(tmpl),
                      static_cast<void*>(tab), static_cast<void*>(bufs), static_cast<void*>(done)})
        CHECK_CUDA(cudaFree(p));
    }
  }

  // ---- sparse MQA over paged 584-B FP8 records (V4-Flash: h_q 64, 128 window + 512 CSA slots;
  // 16 and 8 heads: a shard of them at tensor-parallel 4 and 8, which reads the same records) ---
  if (Want("attention")) {
    const int64_t B = 64, pages = attention_pages, entries = pages * B;  // 153 MB of records by default
    uint8_t* recs = static_cast<uint8_t*>(DeviceRandomBytes(size_t(pages) * B * cu::kRecordBytes, 1));
    // Scale bytes stay in a sane range: rewrite every page's scale area.
    std::vector<uint8_t> sc(B * cu::kRecordScales, 124);
    for (int64_t p = 0; p < pages; ++p)
      CHECK_CUDA(cudaMemcpy(recs + p * B * cu::kRecordBytes + B * cu::kRecordData, sc.data(), sc.size(), cudaMemcpyHostToDevice));
    // 640 slots: a CSA layer's top-k 512 and window 128. 8,192: an HCA layer's compressed entries
    // at a 1M context (ratio 128), where the few-heads kernel splits a token's slots over blocks.
    struct Shape {
      int64_t n, heads;
      std::vector<int64_t> batches;
    };
    const std::vector<int64_t> batches = quick ? std::vector<int64_t>{1, 64} : std::vector<int64_t>{1, 8, 32, 64, 128};
    std::vector<Shape> shapes = {Shape{640, 64, batches}, Shape{640, 16, batches}, Shape{640, 8, batches},
                                 Shape{8192, 16, quick ? std::vector<int64_t>{1} : std::vector<int64_t>{1, 8, 32}}};
    if (shape_batch > 0) shapes = {Shape{shape_slots, shape_heads, {shape_batch}}};
    for (const Shape& shape : shapes)
      for (int64_t batch : shape.batches) {
        const int64_t n = shape.n, heads = shape.heads;
        std::vector<int32_t> idx(batch * n);
        for (auto& i : idx) i = static_cast<int32_t>(rng() % entries);
        int32_t* didx = nullptr;
        CHECK_CUDA(cudaMalloc(&didx, idx.size() * 4));
        CHECK_CUDA(cudaMemcpy(didx, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
        float *q = DeviceRandomFloats(batch * heads * 512, 0.05f), *sink = DeviceRandomFloats(heads, 1.0f), *out;
        CHECK_CUDA(cudaMalloc(&out, batch * heads * 512 * 4));
        const double bytes = batch * n * 584.0 + 2.0 * batch * heads * 512 * 4;
        const double flop = 2.0 * batch * heads * n * (512 + 512);
        auto add = [&](const char* name, double us) {
          rows.push_back({name, "b=" + std::to_string(batch) + " h=" + std::to_string(heads) + " slots=" + std::to_string(n), us,
                          bytes / us / 1e3, flop / us / 1e6, Pct(bytes / us / 1e3, hbm, "HBM")});
        };
        if (n == 640 && (heads == 64 || batch == 64))
          add("sparse MQA, paged FP8 (exact)", TimeUs([&](int) {
                CHECK_CUDA(cu::PagedSparseAttentionFp8(q, batch, heads, recs, B, didx, n, sink, 0.044f, out, nullptr));
              }));
        void* ws = nullptr;
        CHECK_CUDA(cudaMalloc(&ws, cu::PagedSparseAttentionFp8FastWorkspace(batch, heads, n)));
        auto attend = [&](cudaStream_t s) {
          CHECK_CUDA(cu::PagedSparseAttentionFp8Fast(q, batch, heads, recs, B, didx, n, sink, 0.044f, out, ws, s));
        };
        add(heads == 64 ? "sparse MQA, paged FP8 (tensor cores)" : "sparse MQA, paged FP8 (few-heads kernel)",
            TimeUs([&](int) { attend(nullptr); }));
        add("same, graph replays back to back", TimeGraphUs(attend));
        CHECK_CUDA(cudaFree(ws));
        for (void* p : {static_cast<void*>(didx), static_cast<void*>(q), static_cast<void*>(sink), static_cast<void*>(out)})
          CHECK_CUDA(cudaFree(p));
      }
    CHECK_CUDA(cudaFree(recs));
  }

  // ---- lightning-indexer scores and memory-indexer logits over a long history -----------------
  if (Want("index")) {
    for (int64_t keys_n : quick ? std::vector<int64_t>{16384} : std::vector<int64_t>{16384, 65536}) {
      const int64_t heads = 64, dim = 128;
      float *q = DeviceRandomFloats(heads * dim, 1.0f), *w = DeviceRandomFloats(heads, 0.5f),
            *keys = DeviceRandomFloats(keys_n * dim, 1.0f), *out;
      uint8_t* valid = static_cast<uint8_t*>(DeviceRandomBytes(keys_n));
      CHECK_CUDA(cudaMalloc(&out, keys_n * 4));
      const double us = TimeUs([&](int) { CHECK_CUDA(cu::IndexScores(q, w, heads, dim, keys, keys_n, out, nullptr)); });
      const double bytes = keys_n * dim * 4.0;
      rows.push_back({"lightning-indexer scores", std::to_string(keys_n) + " keys, 64 heads", us, bytes / us / 1e3,
                      2.0 * keys_n * heads * dim / us / 1e6, Pct(bytes / us / 1e3, hbm, "HBM")});
      const double us2 = TimeUs([&](int) {
        CHECK_CUDA(cu::IndexerLogits(q, w, heads, dim, keys, valid, keys_n, out, nullptr));
      });
      rows.push_back({"memory-indexer logits", std::to_string(keys_n) + " keys, 64 heads", us2, bytes / us2 / 1e3,
                      2.0 * keys_n * heads * dim / us2 / 1e6, Pct(bytes / us2 / 1e3, hbm, "HBM")});
      for (void* p : {static_cast<void*>(q), static_cast<void*>(w), static_cast<void*>(keys), static_cast<void*>(out),
                      static_cast<void*>(valid)})
        CHECK_CUDA(cudaFree(p));
    }
  }

  // ---- the same scores over key runs (pages of 64 keys) of a batch of queries, as a decode step
  // scores them from the KV reserve: the exact kernel (per-key arrays expanded on the device) and
  // fast mode's tensor cores. b = 64 x 16,384 keys is a 64K-token context (compression 4) --------
  if (Want("index")) {
    for (int64_t b : quick ? std::vector<int64_t>{64} : std::vector<int64_t>{8, 64}) {  // keys past L2's 60 MB
      const int64_t heads = 64, dim = 128, per_query = 16384, runs = b * per_query / 64;
      const int64_t keys_n = b * per_query;
      float *q = DeviceRandomFloats(b * heads * dim, 1.0f), *w = DeviceRandomFloats(b * heads, 0.5f),
            *keys = DeviceRandomFloats(keys_n * dim, 1.0f), *out;
      std::vector<int32_t> first(runs), query(runs), start(runs), count(runs, 64);
      for (int64_t r = 0; r < runs; ++r) {
        const int64_t page = (r * 7919) % runs;  // pages scattered over the reserve
        first[r] = static_cast<int32_t>(page * 64);
        query[r] = static_cast<int32_t>(r / (per_query / 64));
        start[r] = static_cast<int32_t>(r * 64);
      }
      int32_t *dfirst, *dquery, *dstart, *dcount, *dr, *dqo;
      for (auto [d, h] : {std::pair{&dfirst, &first}, std::pair{&dquery, &query}, std::pair{&dstart, &start},
                          std::pair{&dcount, &count}}) {
        CHECK_CUDA(cudaMalloc(d, runs * 4));
        CHECK_CUDA(cudaMemcpy(*d, h->data(), runs * 4, cudaMemcpyHostToDevice));
      }
      CHECK_CUDA(cudaMalloc(&dr, keys_n * 4));
      CHECK_CUDA(cudaMalloc(&dqo, keys_n * 4));
      CHECK_CUDA(cudaMalloc(&out, keys_n * 4));
      const double bytes = keys_n * dim * 4.0 + b * heads * dim * 4.0 + keys_n * 4.0;
      const std::string shape = std::to_string(b) + " x " + std::to_string(per_query) + " keys, 64 heads";
      const double exact_us = TimeUs([&](int) {
        CHECK_CUDA(cu::ExpandKeyRuns(dfirst, dquery, dstart, dcount, runs, dr, dqo, nullptr));
        CHECK_CUDA(cu::IndexScoresRows(q, w, heads, heads, dim, keys, dr, dqo, keys_n, out, nullptr));
      }, 10, 2);
      rows.push_back({"lightning-indexer scores over key runs (exact)", shape, exact_us, bytes / exact_us / 1e3,
                      2.0 * keys_n * heads * dim / exact_us / 1e6, Pct(bytes / exact_us / 1e3, hbm, "HBM")});
      const double mma_us = TimeUs([&](int) {
        CHECK_CUDA(cu::IndexScoresRunsMma(q, w, heads, heads, dim, keys, dfirst, dquery, dstart, dcount, runs, out, nullptr));
      });
      rows.push_back({"lightning-indexer scores over key runs (fast: mma.sync bf16)", shape, mma_us, bytes / mma_us / 1e3,
                      2.0 * keys_n * heads * dim / mma_us / 1e6, Pct(bytes / mma_us / 1e3, hbm, "HBM")});
      // The keys as fast mode holds them in the reserve: MXFP4 pages (KeyRun::packed), 68 B a key.
      uint8_t* packed = static_cast<uint8_t*>(DeviceRandomBytes(keys_n * cu::kIndexKeyMxfp4Bytes));
      const double mx_us = TimeUs([&](int) {
        CHECK_CUDA(cu::IndexScoresRunsMmaMxfp4(q, w, heads, heads, dim, packed, 64, dfirst, dquery, dstart, dcount, runs, out,
                                               nullptr));
      });
      const double mx_bytes = keys_n * static_cast<double>(cu::kIndexKeyMxfp4Bytes) + b * heads * dim * 4.0 + keys_n * 4.0;
      rows.push_back({"lightning-indexer scores over key runs (fast, MXFP4 key pages)", shape, mx_us,
                      mx_bytes / mx_us / 1e3, 2.0 * keys_n * heads * dim / mx_us / 1e6,
                      Pct(mx_bytes / mx_us / 1e3, hbm, "HBM") + "; " + Speedup(mma_us / mx_us) + " the fp32 rows' rate"});
      CHECK_CUDA(cudaFree(packed));
      for (void* p : {static_cast<void*>(q), static_cast<void*>(w), static_cast<void*>(keys), static_cast<void*>(out),
                      static_cast<void*>(dfirst), static_cast<void*>(dquery), static_cast<void*>(dstart),
                      static_cast<void*>(dcount), static_cast<void*>(dr), static_cast<void*>(dqo)})
        CHECK_CUDA(cudaFree(p));
    }
  }

  // ---- top-k of the indexer scores (radix select + sort of the winners, one block per row), and
  // the host's heap select (kernels/topk.h) on the same scores, what the model ran before --------
  if (Want("topk")) {
    for (int64_t keys_n : {int64_t{16384}, int64_t{65536}}) {
      std::vector<float> host_s(keys_n);
      for (float& v : host_s) v = static_cast<float>(rng() % 4096) / 512.0f - 4.0f;  // ties, as bf16 scores have
      float* s = nullptr;
      int32_t* out = nullptr;
      CHECK_CUDA(cudaMalloc(&s, keys_n * 4));
      CHECK_CUDA(cudaMemcpy(s, host_s.data(), keys_n * 4, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMalloc(&out, cu::kTopKMaxK * 4));
      for (int64_t k : {int64_t{512}, cu::kTopKMaxK}) {
        const double us = TimeUs([&](int) { CHECK_CUDA(cu::TopK(s, 1, keys_n, k, out, nullptr)); });
        std::vector<double> host_us;
        for (int r = 0; r < 20; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          const auto top = flashmem::kernels::TopKIndices(host_s, k);
          host_us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
          if (top.size() != static_cast<size_t>(k)) std::abort();
        }
        std::sort(host_us.begin(), host_us.end());
        rows.push_back({"indexer top-k (radix select)", std::to_string(keys_n) + " scores, k=" + std::to_string(k), us,
                        keys_n * 4.0 / us / 1e3, 0.0,
                        "host heap select " + std::to_string(static_cast<int>(host_us[host_us.size() / 2])) + " us"});
      }
      CHECK_CUDA(cudaFree(s));
      CHECK_CUDA(cudaFree(out));
    }
  }

  // ---- page recall host -> GPU: 4096 scattered 37,376-byte pages (CSA main-KV) ------------------
  if (Want("recall")) {
    const int64_t page = 37376, pages = 8192, picked = 4096;
    uint8_t* host = nullptr;
    CHECK_CUDA(cudaHostAlloc(&host, pages * page, cudaHostAllocMapped));
    std::memset(host, 0x5a, pages * page);
    std::vector<const uint8_t*> src(picked);
    std::vector<int64_t> which(picked);
    for (int64_t i = 0; i < picked; ++i) {
      which[i] = rng() % pages;
      void* d = nullptr;
      CHECK_CUDA(cudaHostGetDevicePointer(&d, host + which[i] * page, 0));
      src[i] = static_cast<const uint8_t*>(d);
    }
    const uint8_t** dsrc = nullptr;
    uint8_t* dst = nullptr;
    CHECK_CUDA(cudaMalloc(&dsrc, picked * sizeof(void*)));
    CHECK_CUDA(cudaMalloc(&dst, picked * page));
    CHECK_CUDA(cudaMemcpy(dsrc, src.data(), picked * sizeof(void*), cudaMemcpyHostToDevice));
    const double bytes = static_cast<double>(picked) * page;
    const double gus = TimeUs([&](int) { CHECK_CUDA(cu::GatherPages(dsrc, picked, page, dst, nullptr)); }, 10, 2);
    rows.push_back({"page recall: gather kernel (mapped host)", "4096 x 37,376 B", gus, bytes / gus / 1e3, 0,
                    Pct(bytes / gus / 1e3, 55.5, "pinned H2D 55.5 GB/s")});
    const double cus = TimeUs([&](int) {
      for (int64_t i = 0; i < picked; ++i)
        CHECK_CUDA(cudaMemcpyAsync(dst + i * page, host + which[i] * page, page, cudaMemcpyHostToDevice));
    }, 5, 1);
    rows.push_back({"page recall: one cudaMemcpyAsync per page", "4096 x 37,376 B", cus, bytes / cus / 1e3, 0,
                    Pct(bytes / cus / 1e3, 55.5, "pinned H2D 55.5 GB/s")});
    CHECK_CUDA(cudaFree(dsrc));
    CHECK_CUDA(cudaFree(dst));
    CHECK_CUDA(cudaFreeHost(host));
  }

  // ---- element-wise and norm ops at a decode batch of 64 (flash dims) --------------------------
  if (Want("elementwise")) {
    const int64_t n = 64, dim = 4096;
    float *x = DeviceRandomFloats(n * dim, 1.0f), *wt = DeviceRandomFloats(dim, 1.0f), *y;
    CHECK_CUDA(cudaMalloc(&y, n * dim * 4));
    const double us = TimeUs([&](int) { CHECK_CUDA(cu::RmsNorm(x, wt, n, dim, 1e-6f, y, nullptr)); });
    rows.push_back({"RMSNorm", "64x4096", us, 2.0 * n * dim * 4 / us / 1e3, 0, Pct(2.0 * n * dim * 4 / us / 1e3, hbm, "HBM")});
    const double us2 = TimeUs([&](int) { CHECK_CUDA(cu::Hadamard(y, n * 8, 512, nullptr)); });
    rows.push_back({"Hadamard", "512 rows x 512", us2, 2.0 * n * dim * 4 / us2 / 1e3, 0, Pct(2.0 * n * dim * 4 / us2 / 1e3, hbm, "HBM")});
    const double us3 = TimeUs([&](int) { CHECK_CUDA(cu::RoundTrip(y, n * dim, 64, true, nullptr)); });
    rows.push_back({"FP8 round trip", "64x4096 /64", us3, 2.0 * n * dim * 4 / us3 / 1e3, 0, Pct(2.0 * n * dim * 4 / us3 / 1e3, hbm, "HBM")});
    for (void* p : {static_cast<void*>(x), static_cast<void*>(wt), static_cast<void*>(y)}) CHECK_CUDA(cudaFree(p));
  }

  // ---- hyper-connection mixes (mHC, exact: the CPU's dot order) at V4-Flash's hc 4, dim 4096 ---
  // bytes: the (2 + hc) * hc rows of hc * dim fp32 weights + each token's hc * dim input.
  if (Want("hc")) {
    for (int64_t n : {1, 64}) {
      const int hc = 4;
      const int64_t dim = 4096, k = hc * dim, mix = (2 + hc) * hc;
      float *x = DeviceRandomFloats(n * k, 1.0f), *fn = DeviceRandomFloats(mix * k, 0.01f),
            *base = DeviceRandomFloats(mix, 0.1f), *scale = DeviceRandomFloats(3, 0.1f), *y, *post, *comb;
      CHECK_CUDA(cudaMalloc(&y, n * dim * 4));
      CHECK_CUDA(cudaMalloc(&post, n * hc * 4));
      CHECK_CUDA(cudaMalloc(&comb, n * hc * hc * 4));
      const double us = TimeUs([&](int) {
        CHECK_CUDA(cu::HcPre(x, n, fn, base, scale, hc, dim, 20, 1e-6f, 1e-6f, y, post, comb, nullptr));
      });
      const double bytes = 4.0 * (mix * k + n * k);
      rows.push_back({"hc_pre (mixes + 20 Sinkhorn iterations), exact", std::to_string(n) + " tok, hc 4 x 4096", us,
                      bytes / us / 1e3, 0, Pct(bytes / us / 1e3, hbm, "HBM")});
      for (void* p : {static_cast<void*>(x), static_cast<void*>(fn), static_cast<void*>(base), static_cast<void*>(scale),
                      static_cast<void*>(y), static_cast<void*>(post), static_cast<void*>(comb)})
        CHECK_CUDA(cudaFree(p));
    }
  }
  Print();
  return 0;
}
