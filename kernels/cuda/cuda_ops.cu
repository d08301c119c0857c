#include <cuda_runtime.h>

#include <string>

#include "kernels/cuda/cuda_ops.h"

namespace flashmem::kernels::cuda {
namespace {

absl::Status Check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(std::string(what) + ": " + cudaGetErrorString(e));
}

__device__ float RoundBf16(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}

// 2^ceil(log2(x)) by the exponent-bit trick, as the reference kernels.
__device__ float Pow2Ceil(float x) {
  const unsigned bits = __float_as_uint(x);
  const int e = static_cast<int>((bits >> 23) & 0xff) - 127 + ((bits & 0x7fffffu) != 0);
  return __uint_as_float(static_cast<unsigned>(e + 127) << 23);
}

__device__ float RoundGrid(float x, int min_exp, int man_bits, float vmax) {
  const float a = fabsf(x);
  if (!(a > 0.0f)) return x;
  int e;
  frexpf(a, &e);
  const int exp = max(e - 1, min_exp);
  const float step = ldexpf(1.0f, exp - man_bits);
  float r = rintf(a / step) * step;  // round half to even
  r = fminf(r, vmax);
  return copysignf(r, x);
}

__global__ void RmsNormKernel(const float* x, const float* w, int64_t dim, float eps, float* y) {
  const float* xr = x + blockIdx.x * dim;
  __shared__ float partial[256];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i] * xr[i];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) partial[threadIdx.x] += partial[threadIdx.x + k];
    __syncthreads();
  }
  const float inv = 1.0f / sqrtf(partial[0] / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) y[blockIdx.x * dim + i] = RoundBf16(w[i] * (xr[i] * inv));
}

// One block per quantization block; fp8 = e4m3 (min exp -6, 3 mantissa bits, max 448),
// fp4 = e2m1 (min exp 0, 1 mantissa bit, max 6).
__global__ void RoundTripKernel(float* x, int64_t block, bool fp8) {
  float* xb = x + blockIdx.x * block;
  __shared__ float amax[256];
  float m = 0.0f;
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) m = fmaxf(m, fabsf(xb[i]));
  amax[threadIdx.x] = m;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) amax[threadIdx.x] = fmaxf(amax[threadIdx.x], amax[threadIdx.x + k]);
    __syncthreads();
  }
  const float qmax = fp8 ? 448.0f : 6.0f;
  const float floor = fp8 ? 1e-4f : 6.0f * ldexpf(1.0f, -126);
  const float scale = Pow2Ceil(fmaxf(amax[0], floor) * (1.0f / qmax));
  for (int64_t i = threadIdx.x; i < block; i += blockDim.x) {
    const float v = fminf(fmaxf(xb[i] / scale, -qmax), qmax);
    xb[i] = RoundBf16((fp8 ? RoundGrid(v, -6, 3, 448.0f) : RoundGrid(v, 0, 1, 6.0f)) * scale);
  }
}

// Device buffer freed on scope exit.
struct DeviceBuffer {
  float* p = nullptr;
  ~DeviceBuffer() { if (p) (void)cudaFree(p); }
};

#define FM_CUDA_RETURN_IF_ERROR(expr, what)                     \
  do {                                                          \
    absl::Status fm_cuda_st_ = Check((expr), what);             \
    if (!fm_cuda_st_.ok()) return fm_cuda_st_;                  \
  } while (0)

template <typename F>
absl::Status OnDevice(float* host, int64_t count, F&& launch) {
  DeviceBuffer d;
  FM_CUDA_RETURN_IF_ERROR(cudaMalloc(&d.p, count * sizeof(float)), "cudaMalloc");
  FM_CUDA_RETURN_IF_ERROR(cudaMemcpy(d.p, host, count * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  launch(d.p);
  FM_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "kernel launch");
  FM_CUDA_RETURN_IF_ERROR(cudaMemcpy(host, d.p, count * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
  return absl::OkStatus();
}

}  // namespace

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

absl::Status RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y) {
  DeviceBuffer dx, dw, dy;
  FM_CUDA_RETURN_IF_ERROR(cudaMalloc(&dx.p, n * dim * sizeof(float)), "cudaMalloc");
  FM_CUDA_RETURN_IF_ERROR(cudaMalloc(&dw.p, dim * sizeof(float)), "cudaMalloc");
  FM_CUDA_RETURN_IF_ERROR(cudaMalloc(&dy.p, n * dim * sizeof(float)), "cudaMalloc");
  FM_CUDA_RETURN_IF_ERROR(cudaMemcpy(dx.p, x, n * dim * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  FM_CUDA_RETURN_IF_ERROR(cudaMemcpy(dw.p, weight, dim * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  RmsNormKernel<<<static_cast<unsigned>(n), 256>>>(dx.p, dw.p, dim, eps, dy.p);
  FM_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "RmsNormKernel");
  FM_CUDA_RETURN_IF_ERROR(cudaMemcpy(y, dy.p, n * dim * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return absl::OkStatus();
}

absl::Status Fp8RoundTrip(float* x, int64_t n, int64_t block) {
  return OnDevice(x, n, [&](float* d) { RoundTripKernel<<<static_cast<unsigned>(n / block), 256>>>(d, block, true); });
}

absl::Status Fp4RoundTrip(float* x, int64_t n, int64_t block) {
  return OnDevice(x, n, [&](float* d) { RoundTripKernel<<<static_cast<unsigned>(n / block), 256>>>(d, block, false); });
}

}  // namespace flashmem::kernels::cuda
