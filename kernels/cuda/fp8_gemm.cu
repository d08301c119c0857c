// Prefill-sized FP8 GEMMs through cuBLASLt's block scaling on Hopper: weights as A (op T) with one
// fp32 scale per 128x128 block (BLK128x128_32F), activations as B with one scale per 1x128 block
// (VEC128_32F) — DeepSeek's exact scheme, so the checkpoint's scales are used as they are (E8M0
// decoded at load). Scale layouts (cuBLASLt): BLK128x128 is [N/128][roundup(K/128, 4)] with the K
// block inner; VEC128 is [K/128][roundup(tokens, 4)] with the tokens inner.
#include <cublasLt.h>
#include <dlfcn.h>
#include <cuda_bf16.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

// One warp per 128-block of a token (ld tokens; tokens >= n read as zeros): act_quant, then
// store(at, lane, v, scale, t, kb) writes the block's grid values v (element at + 32 j) its way.
template <typename Store>
__global__ void QuantizeBlocksKernel(const float* x, int64_t n, int64_t k, int64_t ld, Store store) {
  const int64_t nb = k / 128;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= ld * nb) return;
  const int64_t t = b / nb, kb = b % nb;
  const int lane = threadIdx.x & 31;
  float v[4];
  for (int j = 0; j < 4; ++j) v[j] = t < n ? x[t * k + kb * 128 + lane + 32 * j] : 0.0f;
  const float scale = QuantizeWarpBlock128(v);
  store(t * k + kb * 128 + lane, lane, v, scale, t, kb);
}

// e4m3 codes and the block scale at [kb][token] (cuBLASLt's FP8 operand).
struct StoreFp8 {
  uint8_t* codes;
  float* scales_t;
  int64_t ld;
  __device__ void operator()(int64_t at, int lane, const float* v, float scale, int64_t t, int64_t kb) const {
    for (int j = 0; j < 4; ++j) codes[at + 32 * j] = E4m3CodeOfGridValue(v[j]);
    if (lane == 0) scales_t[kb * ld + t] = scale;
  }
};

// The grid value times its scale as bf16 (exact): the bf16 tensor cores' operand.
struct StoreBf16 {
  __nv_bfloat16* out;
  __device__ void operator()(int64_t at, int, const float* v, float scale, int64_t, int64_t) const {
    for (int j = 0; j < 4; ++j) out[at + 32 * j] = __float2bfloat16_rn(v[j] * scale);
  }
};

__global__ void Bf16ToF32Kernel(const __nv_bfloat16* in, int64_t count, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) out[i] = __bfloat162float(in[i]);
}

// Rows of x [n][k] to bf16 [ld][k], rows n..ld-1 zero (round to nearest even: exact for the
// bf16-valued activations the model feeds its dense weights).
__global__ void F32ToBf16Kernel(const float* x, int64_t n, int64_t k, int64_t ld, __nv_bfloat16* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= ld * k) return;
  out[i] = __float2bfloat16_rn(i / k < n ? x[i] : 0.0f);
}


__global__ void RoundBf16Kernel(float* y, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) y[i] = RoundBf16(y[i]);
}

// cuBLASLt is loaded on first use (dlopen), not linked: only fast mode needs it, and loading it
// into every process broke civetweb's binding of port 0 (`--metrics-listen 127.0.0.1:0`) on this
// toolchain. The entry points this file calls are listed once; the table's members and their
// lookups expand from the list.
#define FM_CUBLASLT_FUNCTIONS(X)                                                                  \
  X(cublasLtCreate) X(cublasLtDestroy) X(cublasLtMatmul) X(cublasLtMatmulAlgoGetHeuristic)          \
  X(cublasLtMatmulDescCreate) X(cublasLtMatmulDescDestroy) X(cublasLtMatmulDescSetAttribute)         \
  X(cublasLtMatmulPreferenceCreate) X(cublasLtMatmulPreferenceDestroy)                               \
  X(cublasLtMatmulPreferenceSetAttribute) X(cublasLtMatrixLayoutCreate) X(cublasLtMatrixLayoutDestroy)

struct LtApi {
#define FM_CUBLASLT_MEMBER(f) decltype(&::f) f = nullptr;
  FM_CUBLASLT_FUNCTIONS(FM_CUBLASLT_MEMBER)
#undef FM_CUBLASLT_MEMBER
};

const LtApi* LoadLtApi(std::string* error) {
  static LtApi api;
  static std::string load_error;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcublasLt.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!lib) lib = dlopen("libcublasLt.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      load_error = std::string("cannot load libcublasLt: ") + (e ? e : "unknown error");
      return;
    }
#define FM_CUBLASLT_LOOKUP(f)                                          \
  api.f = reinterpret_cast<decltype(api.f)>(dlsym(lib, #f));           \
  if (!api.f && load_error.empty()) load_error = "libcublasLt lacks " #f;
    FM_CUBLASLT_FUNCTIONS(FM_CUBLASLT_LOOKUP)
#undef FM_CUBLASLT_LOOKUP
  });
  if (!load_error.empty()) {
    if (error) *error = load_error;
    return nullptr;
  }
  return &api;
}

const LtApi& Lt() { return *LoadLtApi(nullptr); }  // only after Init() succeeded

const char* cublasLt_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "NOT_SUPPORTED";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "EXECUTION_FAILED";
    default: return "other cuBLAS error";
  }
}

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

}  // namespace

struct LtContext::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 32u << 20;
  std::mutex mu;
  std::map<std::tuple<int, int64_t, int64_t, int64_t>, Plan> plans;  // (kind, rows, cols, tokens)
  std::string last_error;
};

namespace {

// Completes a plan whose descriptor and layouts were set up (`ok`: all of that succeeded): asks
// the heuristic for one algorithm within the workspace. On failure releases what was created,
// records why in c.last_error and returns false.
bool ChooseAlgorithm(LtContext::Impl& c, Plan& p, bool ok, const char* what) {
  cublasLtMatmulPreference_t pref = nullptr;
  const bool setup_ok = ok;
  ok = ok && Lt().cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS;
  ok = ok && Lt().cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &c.workspace_bytes,
                                                      sizeof c.workspace_bytes) == CUBLAS_STATUS_SUCCESS;
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  cublasStatus_t hs = CUBLAS_STATUS_SUCCESS;
  if (ok) hs = Lt().cublasLtMatmulAlgoGetHeuristic(c.handle, p.desc, p.a, p.b, p.d, p.d, pref, 1, &heur, &found);
  if (pref) Lt().cublasLtMatmulPreferenceDestroy(pref);
  if (ok && hs == CUBLAS_STATUS_SUCCESS && found > 0) {
    p.algo = heur.algo;
    c.last_error.clear();
    return true;
  }
  c.last_error = !setup_ok ? std::string(what) + ": descriptor setup failed"
                           : std::string(what) + " heuristic: " + cublasLt_status_name(hs) + ", " +
                                 std::to_string(found) + " algorithms";
  if (p.a) Lt().cublasLtMatrixLayoutDestroy(p.a);
  if (p.b) Lt().cublasLtMatrixLayoutDestroy(p.b);
  if (p.d) Lt().cublasLtMatrixLayoutDestroy(p.d);
  if (p.desc) Lt().cublasLtMatmulDescDestroy(p.desc);
  return false;
}

// D = A·B with a cached plan (alpha 1, beta 0; D also as C).
cudaError_t RunPlan(LtContext::Impl& c, const Plan& p, const void* a, const void* b, void* d, cudaStream_t stream,
                    const char* what) {
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t ms = Lt().cublasLtMatmul(c.handle, p.desc, &alpha, a, p.a, b, p.b, &beta, d, p.d, d, p.d,
                                                &p.algo, c.workspace, c.workspace_bytes, stream);
  if (ms != CUBLAS_STATUS_SUCCESS) {
    c.last_error = std::string(what) + ": cublasLtMatmul: " + cublasLt_status_name(ms);
    return cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace

LtContext::LtContext() : impl_(new Impl) {}
LtContext::~LtContext() {
  if (!impl_->handle) {  // never initialized: nothing of cuBLASLt's to release
    if (impl_->workspace) cudaFree(impl_->workspace);
    delete impl_;
    return;
  }
  for (auto& [key, p] : impl_->plans) {
    Lt().cublasLtMatrixLayoutDestroy(p.a);
    Lt().cublasLtMatrixLayoutDestroy(p.b);
    Lt().cublasLtMatrixLayoutDestroy(p.d);
    Lt().cublasLtMatmulDescDestroy(p.desc);
  }
  if (impl_->workspace) cudaFree(impl_->workspace);
  if (impl_->handle) Lt().cublasLtDestroy(impl_->handle);
  delete impl_;
}

std::string LtContext::last_error() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->last_error;
}

std::string CublasLtLoadError() {
  std::string e;
  return LoadLtApi(&e) ? std::string() : e;
}

cudaError_t LtContext::Init() {
  if (impl_->handle) return cudaSuccess;
  std::string e;
  if (!LoadLtApi(&e)) {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->last_error = e;
    return cudaErrorNotSupported;
  }
  if (Lt().cublasLtCreate(&impl_->handle) != CUBLAS_STATUS_SUCCESS) return cudaErrorNotSupported;
  return cudaMalloc(&impl_->workspace, impl_->workspace_bytes);
}

std::vector<float> BlockScalesForLt(const WeightMatrix& w) {
  const int64_t rb = (w.rows + 127) / 128, kb = w.scale_cols(), ld = (kb + 3) / 4 * 4;
  std::vector<float> out(rb * ld, 1.0f);
  for (int64_t r = 0; r < rb; ++r)
    for (int64_t c = 0; c < kb; ++c) out[r * ld + c] = w.scales[r * kb + c];
  return out;
}

cudaError_t QuantizeActivationsFp8(const float* x, int64_t n, int64_t k, uint8_t* codes, float* scales_t, int64_t ld,
                                   cudaStream_t stream) {
  const int64_t blocks = ld * (k / 128);
  if (blocks == 0) return cudaSuccess;
  QuantizeBlocksKernel<<<static_cast<unsigned>((blocks + 7) / 8), 256, 0, stream>>>(x, n, k, ld,
                                                                                  StoreFp8{codes, scales_t, ld});
  return cudaGetLastError();
}

cudaError_t LinearFp8Lt(LtContext& ctx, const DeviceWeight& w, const float* lt_scales, const uint8_t* codes,
                        const float* scales_t, int64_t tokens, void* y, LtOutput out, cudaStream_t stream) {
  if (w.format != WeightFormat::kFp8Block128 || tokens % 4 != 0 || w.cols % 128 != 0) return cudaErrorInvalidValue;
  cudaError_t e = ctx.Init();
  if (e != cudaSuccess) return e;
  LtContext::Impl& c = *ctx.impl_;
  std::lock_guard<std::mutex> lock(c.mu);
  const auto key = std::make_tuple(out == LtOutput::kF32 ? 2 : 0, w.rows, w.cols, tokens);
  auto it = c.plans.find(key);
  if (it == c.plans.end()) {
    Plan p;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const cublasLtMatmulMatrixScale_t am = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
                                      bm = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    bool ok = Lt().cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &am, sizeof am) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &bm, sizeof bm) == CUBLAS_STATUS_SUCCESS;
    // The heuristic wants the scale pointers of a block-scaled matmul set before it is asked.
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &lt_scales, sizeof lt_scales) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scales_t, sizeof scales_t) == CUBLAS_STATUS_SUCCESS;
    const cudaDataType_t dt = out == LtOutput::kF32 ? CUDA_R_32F : CUDA_R_16BF;
    ok = ok && Lt().cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8F_E4M3, w.cols, w.rows, w.cols) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8F_E4M3, w.cols, tokens, w.cols) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatrixLayoutCreate(&p.d, dt, w.rows, tokens, w.rows) == CUBLAS_STATUS_SUCCESS;
    if (!ChooseAlgorithm(c, p, ok, "FP8 block-scaled")) return cudaErrorNotSupported;
    it = c.plans.emplace(key, p).first;
  }
  Plan& p = it->second;
  if (Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &lt_scales, sizeof lt_scales) !=
          CUBLAS_STATUS_SUCCESS ||
      Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scales_t, sizeof scales_t) !=
          CUBLAS_STATUS_SUCCESS)
    return cudaErrorNotSupported;
  return RunPlan(c, p, w.values, codes, y, stream, "FP8 block-scaled");
}

cudaError_t LinearBf16Lt(LtContext& ctx, const DeviceWeight& w, const __nv_bfloat16* x, int64_t tokens, float* y,
                         cudaStream_t stream, int64_t ldx, int64_t ldy) {
  if (ldx == 0) ldx = w.cols;
  if (ldy == 0) ldy = w.rows;
  if (w.format != WeightFormat::kDense || !w.dense_bf16 || tokens % 4 != 0 || ldx < w.cols || ldy < w.rows)
    return cudaErrorInvalidValue;
  cudaError_t e = ctx.Init();
  if (e != cudaSuccess) return e;
  LtContext::Impl& c = *ctx.impl_;
  std::lock_guard<std::mutex> lock(c.mu);
  // Kinds: 1 contiguous; 2 + the leading dimensions apart (kind 1's key has no room for them).
  const bool contiguous = ldx == w.cols && ldy == w.rows;
  if (!contiguous && (tokens >= (int64_t{1} << 20) || ldx >= (int64_t{1} << 22) || ldy >= (int64_t{1} << 21)))
    return cudaErrorNotSupported;  // past what the plan's key holds: the caller's other path
  const auto key = std::make_tuple(contiguous ? 1 : 2, w.rows, w.cols, contiguous ? tokens : tokens | (ldx << 20) | (ldy << 42));
  auto it = c.plans.find(key);
  if (it == c.plans.end()) {
    Plan p;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    bool ok = Lt().cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, w.cols, w.rows, w.cols) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, w.cols, tokens, ldx) == CUBLAS_STATUS_SUCCESS;
    ok = ok && Lt().cublasLtMatrixLayoutCreate(&p.d, CUDA_R_32F, w.rows, tokens, ldy) == CUBLAS_STATUS_SUCCESS;
    if (!ChooseAlgorithm(c, p, ok, "bf16")) return cudaErrorNotSupported;
    it = c.plans.emplace(key, p).first;
  }
  return RunPlan(c, it->second, w.values, x, y, stream, "bf16");
}

std::vector<uint16_t> DequantizeFp8ToBf16(const WeightMatrix& w) {
  std::vector<uint16_t> out(w.rows * w.cols);
  const int64_t sc = w.scale_cols();
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) {
      const float v = w.values[r * w.cols + c] * w.scales[(r / 128) * sc + c / 128];
      uint32_t u;
      std::memcpy(&u, &v, 4);
      out[r * w.cols + c] = static_cast<uint16_t>(u >> 16);  // exact: the low 16 bits are zero
    }
  return out;
}

cudaError_t QuantizeActivationsBf16(const float* x, int64_t n, int64_t k, int64_t ld, __nv_bfloat16* out,
                                    cudaStream_t stream) {
  const int64_t blocks = ld * (k / 128);
  if (blocks == 0) return cudaSuccess;
  QuantizeBlocksKernel<<<static_cast<unsigned>((blocks + 7) / 8), 256, 0, stream>>>(x, n, k, ld, StoreBf16{out});
  return cudaGetLastError();
}

cudaError_t F32ToBf16Rows(const float* x, int64_t n, int64_t k, int64_t ld, __nv_bfloat16* out, cudaStream_t stream) {
  if (ld * k == 0) return cudaSuccess;
  F32ToBf16Kernel<<<static_cast<unsigned>((ld * k + 255) / 256), 256, 0, stream>>>(x, n, k, ld, out);
  return cudaGetLastError();
}

cudaError_t RoundToBf16(float* y, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  RoundBf16Kernel<<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(y, count);
  return cudaGetLastError();
}

cudaError_t Bf16ToF32(const __nv_bfloat16* in, int64_t count, float* out, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  Bf16ToF32Kernel<<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(in, count, out);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
