// The main KV's FP8 records written on the device (Backend::WriteRecords): the host encoder's
// rules (worker/kv/page_codec.cc, EncodeEntry) step for step, so the bytes are the same; the number
// formats are device_math.cuh's twins of kernels/numerics.h.
#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"

namespace flashmem::kernels::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: 7 nope blocks of 64 values, then the 64 rope values
static_assert(kRecordNope == 7 * 64 && kRecordRope == 64 && kThreads == 32 * (kRecordNope / 64 + 1));

// page_codec's E4m3Code: v / s's code straight from the float's bits, true when it decodes back
// to v bit for bit.
__device__ bool E4m3CodeDev(float v, float inv_s, float s, uint32_t* code) {
  const uint32_t bits = __float_as_uint(__fmul_rn(v, inv_s));
  const uint32_t sign = (bits >> 24) & 0x80;
  const uint32_t mag = bits & 0x7fffffffu;
  const int exp = static_cast<int>(mag >> 23) - 127;
  uint32_t c;
  if (mag == 0) {
    c = 0;
  } else if (exp >= -6) {
    if (exp > 8) return false;
    c = (static_cast<uint32_t>(exp + 7) << 3) | ((mag >> 20) & 7);
  } else {
    c = static_cast<uint32_t>(__fmul_rn(__uint_as_float(mag), 512.0f));
    if (c > 7) return false;
  }
  *code = sign | c;
  return __float_as_uint(__fmul_rn(E4m3ToFloat(static_cast<uint8_t>(*code)), s)) == __float_as_uint(v);
}

__global__ void __launch_bounds__(kThreads)
    EncodeFp8RecordsKernel(const float* rows, uint8_t* out, int32_t* ok, float* bad_rows, const int64_t* to_data,
                           const int64_t* to_scales, uint8_t* dst) {
  const int64_t i = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __shared__ uint32_t scale_bytes[8];
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const int j = warp * 64 + lane * 2;  // this thread's two values
  const float2 x = *reinterpret_cast<const float2*>(rows + i * kRecordDim + j);
  uint8_t* rec = out + i * kRecordBytes;
  const int64_t td = to_data ? to_data[i] : -1;
  bool good;
  if (warp < kRecordNope / 64) {
    // BlockScale: the smallest power of two s with amax <= 448 s (1 for a zero block); std::max
    // over fabs skips a NaN as fmaxf does, and a NaN value fails its code below.
    float amax = fmaxf(fabsf(x.x), fabsf(x.y));
    for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    good = isfinite(amax);
    const float s = amax == 0.0f ? 1.0f : Pow2Ceil(__fdiv_rn(amax, 448.0f));
    const uint32_t e = (__float_as_uint(s) >> 23) & 0xff;
    good = good && e != 0 && e != 0xff;
    const float inv = __fdiv_rn(1.0f, s);
    uint32_t c0 = 0, c1 = 0;
    good = good && E4m3CodeDev(x.x, inv, s, &c0);
    good = good && E4m3CodeDev(x.y, inv, s, &c1);
    const uint16_t pair = static_cast<uint16_t>(c0 | (c1 << 8));
    *reinterpret_cast<uint16_t*>(rec + j) = pair;
    if (td >= 0) *reinterpret_cast<uint16_t*>(dst + td + j) = pair;
    if (lane == 0) scale_bytes[warp] = e;
  } else {  // the rope values as bf16, when they are bf16 values
    const uint32_t b0 = __float_as_uint(RoundBf16(x.x)), b1 = __float_as_uint(RoundBf16(x.y));
    good = b0 == __float_as_uint(x.x) && b1 == __float_as_uint(x.y);
    const uint32_t pair = (b0 >> 16) | (b1 & 0xffff0000u);
    const int at = kRecordNope + 2 * (j - kRecordNope);
    *reinterpret_cast<uint32_t*>(rec + at) = pair;
    if (td >= 0) *reinterpret_cast<uint32_t*>(dst + td + at) = pair;
    if (lane == 0) scale_bytes[7] = 0;  // the pad byte
  }
  if (!__all_sync(0xffffffffu, good) && lane == 0) bad = 1;
  __syncthreads();
  if (bad) reinterpret_cast<float2*>(bad_rows + i * kRecordDim)[threadIdx.x] = x;  // for the host's fallback
  if (threadIdx.x == 0) {
    uint64_t scales = 0;
    for (int b = 0; b < 8; ++b) scales |= static_cast<uint64_t>(bad && b < 7 ? 0xffu : scale_bytes[b]) << (8 * b);
    *reinterpret_cast<uint64_t*>(rec + kRecordData) = scales;
    if (to_scales && to_scales[i] >= 0) *reinterpret_cast<uint64_t*>(dst + to_scales[i]) = scales;
    ok[i] = bad ? 0 : 1;
  }
}

}  // namespace

cudaError_t EncodeFp8Records(const float* rows, int64_t n, uint8_t* out, int32_t* ok, float* bad_rows,
                             const int64_t* to_data, const int64_t* to_scales, uint8_t* dst, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > INT32_MAX) return cudaErrorInvalidValue;
  EncodeFp8RecordsKernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(rows, out, ok, bad_rows, to_data,
                                                                            to_scales, dst);
  return cudaGetLastError();
}

}  // namespace flashmem::kernels::cuda
