// The two byte layouts of FP4 (e2m1) weight codes on the device, and their decode into the f16
// high bytes the decode GEMV's tensor-core path builds its operands from (decode_gemv.cu). Host and
// device code: the CPU tests check the decode bit for bit.
//
// Checkpoint layout: two codes a byte, the even column's in the low nibble, each code s.ee.m.
// Decode layout (fast mode's FP4 weights, the ones whose scales are also kept as E8M0 bytes,
// DeviceWeight::scale_exps): the same two codes a byte with their bits moved so that the even
// code's f16 high byte is one mask — even s.ee.m at bits 7, 3..1; odd s at bit 0, odd ee.m at
// bits 6..4. A word of 8 codes then decodes in 5 logic operations instead of 7 (a lane decodes two
// words a 32-column group: ~10% of the one-token MoE's instructions, Nsight Compute 2026-12-01).
//
// The f16 high byte of code s.ee.m is s.000ee.m.0: the f16 with the code at bits 15 and 11..9 and
// a zero low byte is exactly the e2m1 value x 2^-14 for every code (0.5 is an f16 subnormal).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <vector>

namespace flashmem::kernels::cuda {

// A word of 8 codes in the checkpoint layout -> the f16 high bytes of its even columns (lo:
// columns 0 2 4 6 in bytes 0..3) and of its odd ones (hi).
__host__ __device__ __forceinline__ void E2m1WordToF16High(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = ((w << 4) & 0x80808080u) | ((w << 1) & 0x0E0E0E0Eu);
  hi = (w & 0x80808080u) | ((w >> 3) & 0x0E0E0E0Eu);
}

// The same from a word in the decode layout.
__host__ __device__ __forceinline__ void E2m1DecodeLayoutWordToF16High(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = w & 0x8E8E8E8Eu;
  hi = ((w >> 3) & 0x0E0E0E0Eu) | ((w << 7) & 0x80808080u);
}

// One byte (even code in the low nibble) moved into the decode layout.
inline uint8_t Fp4ByteInDecodeLayout(uint8_t b) {
  const unsigned even = b & 15u, odd = b >> 4;
  return static_cast<uint8_t>(((even & 8u) << 4) | ((even & 7u) << 1) | ((odd & 8u) >> 3) | ((odd & 7u) << 4));
}

inline std::vector<uint8_t> Fp4CodesInDecodeLayout(std::span<const uint8_t> codes) {
  std::vector<uint8_t> out(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) out[i] = Fp4ByteInDecodeLayout(codes[i]);
  return out;
}

}  // namespace flashmem::kernels::cuda
