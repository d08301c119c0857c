// Decode-sized GEMMs (a few tokens against FP8 block-128 or FP4 group-32 weights): memory-bound,
// so each weight byte is read once per step with 16-byte loads and dequantised in registers.
// Sums are reordered for speed: results match the CPU reference within fp32 rounding (the
// bit-exact path is cuda::Linear).
#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/fp4_layout.h"
#include "kernels/cuda/ptx.cuh"

namespace flashmem::kernels::cuda {
namespace {

using namespace ptx;

constexpr int kWarps = 8;  // rows per block, one warp each
int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ void DecodeFp8x16(const uint4& raw, float* w) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(words[q] >> (16 * h));
      const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&hr));
      w[q * 4 + h * 2] = f.x;
      w[q * 4 + h * 2 + 1] = f.y;
    }
  }
}

// One warp computes output rows o0 .. o0 + R - 1 for tokens t0 .. t0 + T - 1 (fewer at the ends).
// Each lane reads a token's activations for its piece of k once for all R rows: with one row a
// warp, the activations' fp32 reads were four times the weight bytes and bound the kernel by L1
// (Nsight, 1 token x 4096 -> 4096: L1/TEX 80% busy, DRAM 26%, stalls on the L1 scoreboard). A row's
// sums are the same operations in the same order for every R.
template <int T, int R, bool kFp8>
__device__ __forceinline__ void GemvRows(const uint8_t* w, const float* ws, int64_t scale_cols, int64_t rows, int64_t k,
                                         const float* xq, const float* xs, int64_t n, float* y, bool round, int64_t o0,
                                         int64_t t0) {
  const int lane = threadIdx.x & 31;
  const int nt = static_cast<int>(n - t0 < T ? n - t0 : T);  // tokens of this tile
  const int nr = static_cast<int>(rows - o0 < R ? rows - o0 : R);  // rows of this warp
  const int64_t nb = k / 128;
  constexpr int kPer = kFp8 ? 16 : 32;  // weight elements per 16-byte load
  // kUnroll 16-byte loads a row in flight per lane before any arithmetic (R * kUnroll in all): the
  // loop is bound by memory latency otherwise.
  constexpr int kUnroll = R >= 4 ? 2 : 4;
  const uint8_t* wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t o = o0 + (r < nr ? r : 0);  // rows past the end re-read the first (not stored)
    wr[r] = w + (kFp8 ? o * k : o * k / 2);
  }
  float acc[R][T];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = 0.0f;
  for (int64_t i0 = static_cast<int64_t>(lane) * kPer; i0 < k; i0 += 32 * kPer * kUnroll) {
    uint4 raw[R][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * 32 * kPer;
#pragma unroll
      for (int r = 0; r < R; ++r)
        raw[r][u] = i < k ? __ldg(reinterpret_cast<const uint4*>(wr[r] + (kFp8 ? i : i / 2))) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * 32 * kPer;
      if (i >= k) break;
#pragma unroll
      for (int t = 0; t < T; ++t) {
        if (t >= nt) break;
        const float4* xv = reinterpret_cast<const float4*>(xq + (t0 + t) * k + i);
        float4 xr[kPer / 4];
#pragma unroll
        for (int j = 0; j < kPer / 4; ++j) xr[j] = __ldg(xv + j);
        const float s_x = xs[(t0 + t) * nb + i / 128];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float wf[kPer];
          if constexpr (kFp8) {
            DecodeFp8x16(raw[r][u], wf);
          } else {
            const uint32_t words[4] = {raw[r][u].x, raw[r][u].y, raw[r][u].z, raw[r][u].w};
#pragma unroll
            for (int j = 0; j < 32; ++j) wf[j] = E2m1ToFloat((words[j / 8] >> (4 * (j % 8))) & 15u);
          }
          const int64_t o = o0 + (r < nr ? r : 0);
          const float s_w = kFp8 ? ws[(o / 128) * scale_cols + i / 128] : ws[o * scale_cols + i / 32];
          float p = 0.0f;
#pragma unroll
          for (int j = 0; j < kPer / 4; ++j) {
            const float4 v = xr[j];
            p += wf[4 * j] * v.x + wf[4 * j + 1] * v.y + wf[4 * j + 2] * v.z + wf[4 * j + 3] * v.w;
          }
          acc[r][t] += p * (s_x * s_w);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) {
      const float s = WarpSum(acc[r][t]);
      if (lane == 0 && t < nt && r < nr) y[(t0 + t) * rows + o0 + r] = round ? RoundBf16(s) : s;
    }
}

// ---- FP4 (e2m1, group-32 scales) rows on the tensor cores --------------------------------------
// A GEMV with a few tokens is bound by the work of decoding weights, not by the tensor cores, so
// the decode is what this path makes cheap: the e2m1 nibble s.ee.m placed at bits 15 and 11..9 of
// an f16 (low byte zero) reads as value x 2^-14 for every code (0.5 lands on an f16 subnormal,
// which the tensor cores take as is). Four nibbles become four such high bytes with two shifts
// and two masks, and one byte permute (prmt) spreads two of them into an f16 pair: no conversion
// instruction at all (an earlier version built e4m3 bytes and converted pairs with cvt: 4% slower
// per MoE layer, with math-pipe-throttle stalls in Nsight). The activations are staged as f16
// e4m3 grid values (exact: |v| <= 448) and their block scales apart; mma.sync m16n8k16 (f16
// operands, fp32 accumulators) sums each group of 32 columns, and the fp32 group sum is scaled
// by weight scale x activation scale x 2^14.
//
// Operand layout. Thread (g = lane / 4, t = lane % 4) of a warp reads 32-bit word t of a group
// in rows g and g + 8 (columns 8t .. 8t + 7 of the group). The MMA's k order is free as long as
// both operands follow it: its k slots 2t, 2t+1, 2t+8, 2t+9 take columns 8t + {0, 2, 1, 3} in
// the first MMA of the group and 8t + {4, 6, 5, 7} in the second, so the staged activations are
// stored per 8 columns as x0 x2 x1 x3 x4 x6 x5 x7 and a lane reads its B operands as one uint4.
constexpr int kMmaTiles = 4;  // 16-row tiles of a block whose warps w and w + 4 split k

// A word of 8 codes -> the f16 high bytes s.000ee.m.0 of its even and odd columns: fp4_layout.h
// (E2m1WordToF16High; E2m1DecodeLayoutWordToF16High for weights with scale bytes, whose codes the
// backend uploads in the decode layout).
// f16 pair (low half from byte `a`, high half from byte `b` of `bytes`), low bytes zero.
template <int a, int b>
__device__ __forceinline__ uint32_t HighBytesToHalf2(uint32_t bytes) {
  uint32_t r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(bytes), "n"(0x0404 | (a << 4) | (b << 12)));
  return r;
}
// Weights reach a warp through shared memory: 16 rows x 8 groups (2 KB) per stage, a ring of two
// (Fp4Stages), copied with 16-byte cp.async (every lane a contiguous piece of a row) and read back with
// ldmatrix, whose 8x8 b16 layout hands lane (g, t) exactly word t of a row's group. Loading the
// words straight from global memory (16 rows x 4 bytes per instruction) was bound by L1 requests
// (87% of L1 throughput, 28% of DRAM). A ring of four, or 64 registers for four blocks per SM,
// measured slower (58-60 against 51 us for a layer).
constexpr int kStageGroups = 8;
constexpr int kStageRowBytes = kStageGroups * 16 + 16;  // padded: ldmatrix rows fall in distinct banks

// The scales ride in each stage after its weights: fp32 (4 B a group) or, when the weight has
// them (DeviceWeight::scale_exps), the checkpoint's E8M0 bytes, a quarter of the scale bytes
// (kExp). A ring of three stages with the bytes measured slower than two (43.7-47.9 against
// 42.7-46.9 us a layer at one token; at 8 tokens it costs a block per SM: 1,711 against 1,293).
template <bool kExp>
struct Fp4Stages {
  static constexpr int kScaleBytes = kExp ? 1 : 4;
  static constexpr int kBytes = 16 * kStageRowBytes + 16 * kStageGroups * kScaleBytes;  // one stage
};
constexpr int kRing = 2;
// The float 2^(b - 127) of E8M0 byte b in [1, 254] (ScaleExponents checked the range).
__device__ __forceinline__ float E8m0Scale(uint32_t b) { return __uint_as_float(b << 23); }

// How a block's warps share the work (Fp4RowsMma; chosen per launch by Fp4Blocking below):
//   split k: 64 rows a block, warps w and w + 4 each take half of k for 16-row tile w, and the
//   second half hands its sums to the first through shared memory. Twice the blocks: the choice
//   when a launch is about one wave (one token's experts: 384 blocks for 132 SMs).
//   whole k (k % 512 == 0): 128 rows a block, each warp one 16-row tile over all of k — a
//   pipeline twice as long (one fill a warp instead of two) and the staged tokens serve twice the
//   rows. The k halves' sums are still kept apart and added last, so both give the same bits.
//   A batch-64 layer of V4-Flash's experts: 1,062 -> 1,002 us (kernel_bench).
// What bounds the kernel now is the integer pipe (the decode), not bytes in flight: tokens read
// from L1 instead of staged (so the weight ring could be deeper) were slower at every shape, and
// weights laid out as contiguous per-stage tiles changed nothing (docs/benchmarks.md, "MoE, sixth
// session").
template <bool kSplitKHalves>
struct Fp4Blocking {
  static constexpr bool kSplitK = kSplitKHalves;
  static constexpr int kRows = (kSplitK ? kMmaTiles : kWarps) * 16;  // rows per block
};
using Fp4SplitK = Fp4Blocking<true>;
using Fp4WholeK = Fp4Blocking<false>;

// Shared memory of a block: T staged token rows of k + 32 halves (the pad spreads the tokens'
// reads over the banks), their block scales, the k-halves' partial sums and the warps' rings of
// kRing stages.
__host__ __device__ constexpr int64_t Fp4StageLd(int64_t k) { return k + 32; }
__host__ __device__ constexpr int64_t Fp4ScaleFloats(int64_t tokens, int64_t k) { return (tokens * (k / 128) + 3) / 4 * 4; }
template <int T, bool kExp>
__host__ __device__ constexpr size_t Fp4SmemBytes(int64_t k) {
  return static_cast<size_t>(T) * Fp4StageLd(k) * 2 + Fp4ScaleFloats(T, k) * 4 + kMmaTiles * 32 * 4 * 4 +
         static_cast<size_t>(kWarps) * kRing * Fp4Stages<kExp>::kBytes;
}

// Stage: rows [r0, r0 + 16) x groups [j, j + 8) of the weights and their scales; rows past
// `rows` and groups past `j_end` read as zeros. Every lane issues 4 + 4 copies (4 + 1 with the
// scale bytes: a lane copies 4 of a row's 8, j and j_end being multiples of 4 when k % 256 == 0).
template <bool kExp>
__device__ __forceinline__ void LoadStage(const uint8_t* w, const float* ws, const uint8_t* wexp, int64_t scale_cols,
                                          int64_t rows, int64_t k, int64_t r0, int64_t j, int64_t j_end,
                                          unsigned char* stage, int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = lane + 32 * i, row = idx / kStageGroups, piece = idx % kStageGroups;
    const bool ok = r0 + row < rows && j + piece < j_end;
    const uint8_t* src = ok ? w + (r0 + row) * (k / 2) + (j + piece) * 16 : w;
    CopyAsync16(stage + row * kStageRowBytes + piece * 16, src, ok ? 16 : 0);
  }
  unsigned char* sc = stage + 16 * kStageRowBytes;
  const int row = lane / 2, part = (lane % 2) * 4;
  if constexpr (kExp) {
    const bool ok = r0 + row < rows && j + part < j_end;
    CopyAsync4(sc + row * kStageGroups + part, ok ? wexp + (r0 + row) * scale_cols + j + part : wexp, ok ? 4 : 0);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = r0 + row < rows && j + part + i < j_end;
      CopyAsync4(sc + (row * kStageGroups + part + i) * 4, ok ? ws + (r0 + row) * scale_cols + j + part + i : ws,
                 ok ? 4 : 0);
    }
  }
}

// A lane's copies of a whole stage of scale-byte weights (every group of the stage inside the
// warp's k range, every row of its tile inside the weight), set up once per warp: LoadStage works
// out each copy's address and bounds per stage in 64-bit arithmetic, ~125 instructions a stage at
// one token — a third of the kernel's instructions (Nsight Compute, 2026-12-01) — where a whole
// stage is four pointers apart by a constant stride and advances by a constant.
struct WholeStageSource {
  const uint8_t* code;  // the lane's 16-byte piece lane % 8 of row lane / 8 at group j0
  const uint8_t* exps;  // its 4 scale bytes: row lane / 2, groups j0 + 4 (lane % 2) ..
  int64_t four_rows;    // bytes between its pieces (rows lane / 8 + 4i)

  __device__ __forceinline__ WholeStageSource(const uint8_t* w, const uint8_t* wexp, int64_t scale_cols, int64_t k,
                                              int64_t r0, int64_t j0, int lane)
      : code(w + (r0 + lane / 8) * (k / 2) + (j0 + lane % 8) * 16),
        exps(wexp + (r0 + lane / 2) * scale_cols + j0 + (lane % 2) * 4),
        four_rows(4 * (k / 2)) {}
  // The stage at group j0 + dj.
  __device__ __forceinline__ void Load(int dj, unsigned char* stage, int lane) const {
    unsigned char* dst = stage + (lane / 8) * kStageRowBytes + (lane % 8) * 16;
    const uint8_t* src = code + dj * 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) CopyAsync16(dst + i * 4 * kStageRowBytes, src + i * four_rows);
    CopyAsync4(stage + 16 * kStageRowBytes + lane * 4, exps + dj);
  }
};

// Activations come as QuantizeActivations' fp32 grid values (xq), converted while staged, or
// (kHalves) as QuantizeActivationsMmaF16's f16 in the MMA's column order (xh), copied as they are
// with cp.async: half the bytes, no conversion, every copy in flight at once.
template <int T, bool kExp, bool kHalves, typename Blocking>
__device__ __forceinline__ void Fp4RowsMma(const uint8_t* w, const float* ws, const uint8_t* wexp, int64_t scale_cols,
                                           int64_t rows, int64_t k, const float* xq, const uint16_t* xh_in,
                                           const float* xs, int64_t n, float* y, bool round, int64_t row0, int64_t t0,
                                           unsigned char* smem) {
  static_assert(T <= 8, "one MMA n-tile of tokens");
  constexpr int kStageBytes = Fp4Stages<kExp>::kBytes;
  const int nt = static_cast<int>(n - t0 < T ? n - t0 : T);
  const int64_t ld = Fp4StageLd(k), blocks = k / 128;
  __half* xh = reinterpret_cast<__half*>(smem);
  float* xss = reinterpret_cast<float*>(smem + static_cast<size_t>(T) * ld * 2);
  float* partial = xss + Fp4ScaleFloats(T, k);  // [kMmaTiles][32 lanes][4], 16-byte aligned
  unsigned char* stages = reinterpret_cast<unsigned char*>(partial + kMmaTiles * 32 * 4);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  constexpr bool kSplitK = Blocking::kSplitK;
  const int tile = kSplitK ? warp % kMmaTiles : warp, khalf = kSplitK ? warp / kMmaTiles : 0;
  // Group indices in 32 bits: int64 ones cost 64-bit address math (and a signed division for a
  // block's index) at every stage.
  const int groups = static_cast<int>(k / 32), j_begin = khalf * (groups / 2),
            j_end = kSplitK && !khalf ? groups / 2 : groups;
  const int64_t r0 = row0 + tile * 16;
  unsigned char* my_stages = stages + warp * kRing * kStageBytes;
  const WholeStageSource whole(w, kExp ? wexp : w, scale_cols, k, r0, j_begin, lane);
  const bool whole_rows = kExp && r0 + 16 <= rows;
  auto load = [&](int j, unsigned char* stage) {  // the stage at group j (< j_end)
    if (whole_rows && j + kStageGroups <= j_end) whole.Load(j - j_begin, stage, lane);
    else LoadStage<kExp>(w, ws, wexp, scale_cols, rows, k, r0, j, j_end, stage, lane);
  };
#pragma unroll
  for (int st = 0; st < kRing - 1; ++st) {
    const int j = j_begin + st * kStageGroups;
    if (j < j_end) load(j, my_stages + st * kStageBytes);
    CommitAsync();
  }
  // Launched as a programmatic dependent (LaunchGrouped): the weights above stream while the
  // kernel before this one finishes; its outputs (our activations) and its reads of what we
  // write are waited for here. The kernel after us may start its own weight stages now.
  WaitForPrerequisite();
  AllowDependents();

  for (int64_t i = threadIdx.x; i < nt * (k / 8); i += blockDim.x) {
    const int64_t tk = i / (k / 8), c = (i - tk * (k / 8)) * 8;
    if constexpr (kHalves) {
      CopyAsync16(xh + tk * ld + c, xh_in + (t0 + tk) * k + c);
    } else {
      const float4 v0 = __ldg(reinterpret_cast<const float4*>(xq + (t0 + tk) * k + c));
      const float4 v1 = __ldg(reinterpret_cast<const float4*>(xq + (t0 + tk) * k + c + 4));
      const __half2 h[4] = {__floats2half2_rn(v0.x, v0.z), __floats2half2_rn(v0.y, v0.w),
                            __floats2half2_rn(v1.x, v1.z), __floats2half2_rn(v1.y, v1.w)};
      *reinterpret_cast<uint4*>(xh + tk * ld + c) = *reinterpret_cast<const uint4*>(h);
    }
  }
  for (int64_t i = threadIdx.x; i < nt * blocks; i += blockDim.x) xss[i] = xs[t0 * blocks + i];
  if constexpr (kHalves) {
    CommitAsync();
    WaitAsync<0>();  // this thread's copies (and the first weight stages, long issued)
  }
  __syncthreads();

  // This lane's B column: token g, or past the tile's tokens a copy of token 0 — a column whose
  // sums are never stored (the stores below check the token), read without a predicate: zeroing
  // the operands and a predicated load cost two instructions a group (Nsight Compute). One token
  // with whole-k blocks keeps the zeros: ptxas scheduled that kernel worse without them (one
  // token's layer forced whole-k 38.0 -> 39.4 us replayed, 42.3 -> 46-47 per call).
  constexpr bool kZeroPastTokens = T == 1 && !Blocking::kSplitK;
  const bool tok = g < nt;
  const __half* xrow = xh + (tok ? g : 0) * ld + 8 * t;
  const int tok0 = 2 * t, tok1 = 2 * t + 1;  // this lane's accumulator columns
  const int mat = lane / 8;                  // the 8x8 matrix this lane addresses in ldmatrix
  // Each group's sum times its weight scales goes into blk; a 128-column block's total is scaled
  // by the tokens' activation scales once (powers of two: exact) and added to acc.
  // acc_lo: a whole-k warp's first half (see Fp4Blocking).
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, blk[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc_lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  // The activation scales of this lane's two accumulator columns (token 0's past the tile's
  // tokens: those columns are never stored), and its ldmatrix row within a stage.
  const float* xs0 = xss + (tok0 < nt ? tok0 : 0) * blocks;
  const float* xs1 = xss + (tok1 < nt ? tok1 : 0) * blocks;
  const int ldm_lane = ((mat & 1) * 8 + lane % 8) * kStageRowBytes + (mat >> 1) * 16;
  const unsigned jend = static_cast<unsigned>(j_end);
  for (unsigned j = j_begin, st = 0; j < jend; j += kStageGroups, ++st) {
    if (!kSplitK && j == static_cast<unsigned>(groups / 2)) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc_lo[e] = acc[e];
        acc[e] = 0.0f;
      }
    }
    unsigned char* stage = my_stages + (st % kRing) * kStageBytes;
    const int ahead = static_cast<int>(j) + (kRing - 1) * kStageGroups;
    if (ahead < j_end) load(ahead, my_stages + ((st + kRing - 1) % kRing) * kStageBytes);
    CommitAsync();
    WaitAsync<kRing - 1>();
    __syncwarp();
    const unsigned char* sc = stage + 16 * kStageRowBytes;
    auto scale = [&](int r, int gr) {
      if constexpr (kExp) return E8m0Scale(sc[r * kStageGroups + gr]);
      else return reinterpret_cast<const float*>(sc)[r * kStageGroups + gr];
    };
    // Group jj + h of the stage (words q[2h], q[2h + 1] of an ldmatrix pair) times its weight
    // scales sa, sb (rows g, g + 8); block_end: the last group of a 128-column block.
    auto group = [&](int h, const uint32_t (&q)[4], unsigned jg, bool block_end, float sa, float sb) {
      const uint4 xb =
          kZeroPastTokens && !tok ? make_uint4(0, 0, 0, 0) : *reinterpret_cast<const uint4*>(xrow + 32 * jg);
      uint32_t la, ha, lb, hb;
      if constexpr (kExp) {  // scale bytes: codes in the decode layout (fp4_layout.h)
        E2m1DecodeLayoutWordToF16High(q[2 * h], la, ha);
        E2m1DecodeLayoutWordToF16High(q[2 * h + 1], lb, hb);
      } else {
        E2m1WordToF16High(q[2 * h], la, ha);
        E2m1WordToF16High(q[2 * h + 1], lb, hb);
      }
      float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint32_t a0[4] = {HighBytesToHalf2<0, 1>(la), HighBytesToHalf2<0, 1>(lb), HighBytesToHalf2<0, 1>(ha),
                              HighBytesToHalf2<0, 1>(hb)};
      const uint32_t a1[4] = {HighBytesToHalf2<2, 3>(la), HighBytesToHalf2<2, 3>(lb), HighBytesToHalf2<2, 3>(ha),
                              HighBytesToHalf2<2, 3>(hb)};
      const uint32_t b0[2] = {xb.x, xb.y}, b1[2] = {xb.z, xb.w};
      MmaF16(c, a0, b0);
      MmaF16(c, a1, b1);
      blk[0] += c[0] * sa;
      blk[1] += c[1] * sa;
      blk[2] += c[2] * sb;
      blk[3] += c[3] * sb;
      if (block_end) {  // the 128-column block's activation scales, once
        const float x0 = xs0[jg / 4], x1 = xs1[jg / 4];
        acc[0] += blk[0] * x0;
        acc[1] += blk[1] * x1;
        acc[2] += blk[2] * x0;
        acc[3] += blk[3] * x1;
        blk[0] = blk[1] = blk[2] = blk[3] = 0.0f;
      }
    };
    auto pair = [&](int jj, uint32_t (&q)[4]) {  // word t of rows g and g + 8, groups jj and jj + 1
      LoadMatrices(q, stage + ldm_lane + jj * 16);
    };
    if (j % 4 == 0 && j + kStageGroups <= jend) {
      // A whole stage from a block boundary (every stage when k % 512 == 0): straight-line code
      // with the block ends known, which lets the compiler overlap the groups' loads, decodes and
      // MMAs (the loop below, with its exits, did not: a batch-64 layer 1,242 -> 1,090 us), and the
      // scale bytes read 8 at a time.
      uint32_t q[kStageGroups / 2][4];
#pragma unroll
      for (int p = 0; p < kStageGroups / 2; ++p) pair(2 * p, q[p]);
      uint2 ea = make_uint2(0, 0), eb = make_uint2(0, 0);  // rows g and g + 8's scale bytes
      if constexpr (kExp) {
        ea = *reinterpret_cast<const uint2*>(sc + g * kStageGroups);
        eb = *reinterpret_cast<const uint2*>(sc + (g + 8) * kStageGroups);
      }
      auto byte_scale = [](uint2 e, int gr) { return E8m0Scale(((gr < 4 ? e.x : e.y) >> (8 * (gr & 3))) & 0xffu); };
#pragma unroll
      for (int jj = 0; jj < kStageGroups; ++jj) {
        const float sa = kExp ? byte_scale(ea, jj) : scale(g, jj), sb = kExp ? byte_scale(eb, jj) : scale(g + 8, jj);
        group(jj & 1, q[jj / 2], j + jj, (jj & 3) == 3, sa, sb);
      }
    } else {
#pragma unroll
      for (int jj = 0; jj < kStageGroups; jj += 2) {
        if (j + jj >= jend) break;
        uint32_t q[4];
        pair(jj, q);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const unsigned jg = j + jj + h;
          if (jg >= jend) break;
          group(h, q, jg, ((jg + 1) & 3) == 0 || jg + 1 == jend, scale(g, jj + h), scale(g + 8, jj + h));
        }
      }
    }
    __syncwarp();  // this stage is refilled kRing - 1 iterations on
  }
  WaitAsync<0>();
  // The second k half hands its sums to the first, which writes the rows.
  const int64_t ra = r0 + g, rb = ra + 8;
  float4 other = make_float4(acc[0], acc[1], acc[2], acc[3]);
  if constexpr (kSplitK) {
    float* mine = partial + (tile * 32 + lane) * 4;
    if (khalf == 1) *reinterpret_cast<float4*>(mine) = other;
    __syncthreads();
    if (khalf == 1) return;
    other = *reinterpret_cast<const float4*>(mine);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[e] = acc_lo[e];
  }
  constexpr float kUnscale = 16384.0f;  // the f16 operands are the e2m1 values x 2^-14
  const float out[4] = {(acc[0] + other.x) * kUnscale, (acc[1] + other.y) * kUnscale, (acc[2] + other.z) * kUnscale,
                        (acc[3] + other.w) * kUnscale};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int token = e % 2 ? tok1 : tok0;
    const int64_t row = e < 2 ? ra : rb;
    if (token < nt && row < rows) y[(t0 + token) * rows + row] = round ? RoundBf16(out[e]) : out[e];
  }
}

template <int T, bool kExp, typename Blocking>
__global__ void __launch_bounds__(kWarps * 32) DecodeFp4Kernel(const uint8_t* w, const float* ws, const uint8_t* wexp,
                                                               int64_t scale_cols, int64_t rows, int64_t k,
                                                               const float* xq, const float* xs, int64_t n, float* y,
                                                               bool round) {
  extern __shared__ __align__(16) unsigned char fp4_smem[];
  Fp4RowsMma<T, kExp, false, Blocking>(w, ws, wexp, scale_cols, rows, k, xq, nullptr, xs, n, y, round,
                                       static_cast<int64_t>(blockIdx.x) * Blocking::kRows,
                                       static_cast<int64_t>(blockIdx.y) * T, fp4_smem);
}

template <int T, bool kExp, bool kHalves, typename Blocking>
__device__ __forceinline__ void GroupedFp4Block(const GemvGroup* groups, bool round) {
  extern __shared__ __align__(16) unsigned char fp4_smem[];
  const GemvGroup g = groups[blockIdx.z];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * Blocking::kRows, t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (row0 >= g.rows || t0 >= g.n) return;  // the whole block: before any barrier
  // A group of more tokens than the grid's tiles cover (a launch sized before its groups were
  // known: RoutedMoE's, grouped on the device) takes its further tiles in turn.
  for (int64_t t = t0; t < g.n; t += static_cast<int64_t>(gridDim.y) * T) {
    if (t != t0) __syncthreads();  // every warp done with the last tile's tokens in shared memory
    Fp4RowsMma<T, kExp, kHalves, Blocking>(g.w, g.ws, g.wexp, g.scale_cols, g.rows, g.k, g.xq, g.xh, g.xs, g.n, g.y,
                                           round, row0, t, fp4_smem);
  }
}

// Whole-k blocks: no minimum of blocks an SM in the launch bounds — naming one lets ptxas take
// every register the minimum leaves (2 an SM: 96-104 -> 127 when tried this session), and a
// batch-64 layer was slower so (1,128 against 1,002 us, sixth session).
template <int T, bool kExp, bool kHalves, typename Blocking>
__global__ void __launch_bounds__(kWarps * 32) GroupedFp4Kernel(const GemvGroup* groups, bool round) {
  GroupedFp4Block<T, kExp, kHalves, Blocking>(groups, round);
}
// Split-k blocks: a one-token layer's grids are one wave of 3 blocks an SM, so 3 is named (at
// most 80 registers): with the whole stages' pointers (WholeStageSource) ptxas otherwise took
// ~100 and an SM would hold 2.
template <int T, bool kExp, bool kHalves, typename Blocking>
__global__ void __launch_bounds__(kWarps * 32, 3) GroupedFp4KernelThreeAnSm(const GemvGroup* groups, bool round) {
  GroupedFp4Block<T, kExp, kHalves, Blocking>(groups, round);
}

// Shared memory of the FP4 tensor-core path for T tokens of k activations; 0 when it does not fit
// or k is not a whole number of 128-column blocks (the generic path runs).
template <int T, bool kExp>
size_t Fp4Smem(int64_t k) {
  const size_t bytes = Fp4SmemBytes<T, kExp>(k);
  return k % 128 == 0 && bytes <= 200u * 1024u ? bytes : 0;
}

template <typename K>
cudaError_t AllowSmem(K kernel, size_t bytes) {
  if (bytes <= 48u * 1024u) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <int T, int R, bool kFp8>
__global__ void DecodeGemvKernel(const uint8_t* w, const float* ws, int64_t scale_cols, int64_t rows, int64_t k,
                                 const float* xq, const float* xs, int64_t n, float* y, bool round) {
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * R;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (o0 >= rows) return;
  GemvRows<T, R, kFp8>(w, ws, scale_cols, rows, k, xq, xs, n, y, round, o0, t0);
}

// Many weight matrices in one launch (blockIdx.z picks the group): the experts of an MoE layer,
// every weight byte read once, enough blocks in flight to keep HBM busy.
template <int T, int R, bool kFp8>
__global__ void GroupedGemvKernel(const GemvGroup* groups, bool round) {
  const GemvGroup g = groups[blockIdx.z];
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32) * R;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * T;
  if (o0 >= g.rows || t0 >= g.n) return;
  for (int64_t t = t0; t < g.n; t += static_cast<int64_t>(gridDim.y) * T)  // as GroupedFp4Block
    GemvRows<T, R, kFp8>(g.w, g.ws, g.scale_cols, g.rows, g.k, g.xq, g.xs, g.n, g.y, round, o0, t);
}

// f(std::integral_constant<int, R>()) for R rows a warp (DecodeGemvRowsPerWarp's choice).
template <typename F>
auto WithRowsPerWarp(int r, F&& f) {
  if (r == 4) return f(std::integral_constant<int, 4>());
  if (r == 2) return f(std::integral_constant<int, 2>());
  return f(std::integral_constant<int, 1>());
}

// A grid of about one wave takes as long as its busiest SM. When an SM could hold more of its
// blocks than the even share (ceil(blocks / SMs)), the shared memory is padded so it holds only
// that share: with the scale bytes a block needs 49 KB at one token and an SM would take 4 of the
// 384 blocks of a layer's w1/w3 launch, leaving others 2 (46.2 against 43.1 us a layer).
template <typename K>
size_t EvenWaveSmem(K kernel, size_t smem, int64_t blocks) {
  const SmLimits& sm = DeviceSmLimits();
  int resident = 0;
  if (sm.count == 0 || cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kWarps * 32, smem) != cudaSuccess)
    return smem;
  const int64_t share = CeilDiv(blocks, sm.count);
  if (share <= 0 || share >= resident) return smem;
  const size_t padded = static_cast<size_t>(sm.bytes / share - sm.reserved);
  return std::min(std::max(smem, padded), static_cast<size_t>(sm.per_block));
}

// Whole-k blocks when k allows them and their grid has at least two blocks an SM; split k when
// the grid would be about one wave (then the split's twice as many blocks keep every SM busy:
// one token's six experts took 40.5 us whole-k against 36.7 split).
bool WholeK(Fp4Blocks asked, int64_t k, int64_t whole_k_blocks) {
  if (k % 512 != 0 || asked == Fp4Blocks::kSplitK) return false;
  const int64_t sms = DeviceSmLimits().count;
  return asked == Fp4Blocks::kWholeK || (sms > 0 && whole_k_blocks >= 2 * sms);
}

template <int T, bool kExp, bool kHalves, typename Blocking>
cudaError_t LaunchGroupedFp4(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, size_t smem,
                             bool round, cudaStream_t stream) {
  const auto kernel = [] {
    if constexpr (Blocking::kSplitK) return GroupedFp4KernelThreeAnSm<T, kExp, kHalves, Blocking>;
    else return GroupedFp4Kernel<T, kExp, kHalves, Blocking>;
  }();
  if (cudaError_t e = AllowSmem(kernel, smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(CeilDiv(max_rows, Blocking::kRows)), static_cast<unsigned>(CeilDiv(max_n, T)),
                  static_cast<unsigned>(count));
  if (const size_t even = EvenWaveSmem(kernel, smem, int64_t{grid.x} * grid.y * grid.z); even != smem) {
    smem = even;
    if (cudaError_t e = AllowSmem(kernel, smem); e != cudaSuccess) return e;
  }
  // A programmatic dependent of the kernel before it (see Fp4RowsMma).
  return LaunchAsDependent(kernel, grid, dim3(kWarps * 32), smem, stream, groups, round);
}

// The token tile T of a launch of n >= 1 tokens — 1, 2, 4, or 8 (more take several tiles of 8) —
// handed to f as std::integral_constant<int, T>.
template <typename F>
auto WithTokenTile(int64_t n, F&& f) {
  if (n <= 1) return f(std::integral_constant<int, 1>());
  if (n == 2) return f(std::integral_constant<int, 2>());
  if (n <= 4) return f(std::integral_constant<int, 4>());
  return f(std::integral_constant<int, 8>());
}

// Fp4Smem with the scale form chosen at run time.
template <int T>
size_t Fp4SmemFor(int64_t k, bool scale_bytes) {
  return scale_bytes ? Fp4Smem<T, true>(k) : Fp4Smem<T, false>(k);
}

template <int T, typename Blocking>
cudaError_t LaunchGroupedFp4(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, size_t smem,
                             bool round, GemvInputs in, cudaStream_t stream) {
  if (in.scale_bytes)
    return in.f16_activations
               ? LaunchGroupedFp4<T, true, true, Blocking>(groups, count, max_rows, max_n, smem, round, stream)
               : LaunchGroupedFp4<T, true, false, Blocking>(groups, count, max_rows, max_n, smem, round, stream);
  return in.f16_activations
             ? LaunchGroupedFp4<T, false, true, Blocking>(groups, count, max_rows, max_n, smem, round, stream)
             : LaunchGroupedFp4<T, false, false, Blocking>(groups, count, max_rows, max_n, smem, round, stream);
}

template <int T>
cudaError_t LaunchGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, int64_t max_k, bool fp8,
                          bool round, GemvInputs in, cudaStream_t stream) {
  if (!fp8) {
    if (const size_t smem = Fp4SmemFor<T>(max_k, in.scale_bytes); smem > 0) {
      const int64_t whole_k_blocks = CeilDiv(max_rows, Fp4WholeK::kRows) * CeilDiv(max_n, T) * count;
      return WholeK(in.blocks, max_k, whole_k_blocks)
                 ? LaunchGroupedFp4<T, Fp4WholeK>(groups, count, max_rows, max_n, smem, round, in, stream)
                 : LaunchGroupedFp4<T, Fp4SplitK>(groups, count, max_rows, max_n, smem, round, in, stream);
    }
  }
  // The generic GEMV reads fp32 scales and fp32 activations.
  if (in.scale_bytes || in.f16_activations) return cudaErrorInvalidValue;
  const int64_t tiles = CeilDiv(max_n, T);
  return WithRowsPerWarp(DecodeGemvRowsPerWarp(max_rows, tiles * count), [&](auto rpw) {
    constexpr int R = decltype(rpw)::value;
    const dim3 grid(static_cast<unsigned>(CeilDiv(max_rows, int64_t{kWarps} * R)), static_cast<unsigned>(tiles),
                    static_cast<unsigned>(count));
    if (fp8) GroupedGemvKernel<T, R, true><<<grid, kWarps * 32, 0, stream>>>(groups, round);
    else GroupedGemvKernel<T, R, false><<<grid, kWarps * 32, 0, stream>>>(groups, round);
    return cudaGetLastError();
  });
}

template <int T>
cudaError_t Launch(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y, bool round,
                   cudaStream_t stream) {
  if (w.format == WeightFormat::kFp4Group32) {
    const bool bytes = w.scale_exps != nullptr;
    const size_t smem = Fp4SmemFor<T>(w.cols, bytes);
    // Codes in the decode layout are read by the tensor-core path only (ScaleExponents gives a
    // weight its bytes only where that path takes its shape).
    if (bytes && smem == 0) return cudaErrorInvalidValue;
    if (smem > 0) {
      auto launch = [&](auto blocking) {
        using B = decltype(blocking);
        const auto kernel = bytes ? DecodeFp4Kernel<T, true, B> : DecodeFp4Kernel<T, false, B>;
        if (cudaError_t e = AllowSmem(kernel, smem); e != cudaSuccess) return e;
        const dim3 grid(static_cast<unsigned>(CeilDiv(w.rows, B::kRows)), static_cast<unsigned>(CeilDiv(n, T)));
        kernel<<<grid, kWarps * 32, smem, stream>>>(static_cast<const uint8_t*>(w.values), w.scales, w.scale_exps,
                                                    w.scale_cols, w.rows, w.cols, xq, xs, n, y, round);
        return cudaGetLastError();
      };
      return WholeK(Fp4Blocks::kByShape, w.cols, CeilDiv(w.rows, Fp4WholeK::kRows) * CeilDiv(n, T))
                 ? launch(Fp4WholeK())
                 : launch(Fp4SplitK());
    }
  }
  const int64_t tiles = CeilDiv(n, T);
  return WithRowsPerWarp(DecodeGemvRowsPerWarp(w.rows, tiles), [&](auto rpw) {
    constexpr int R = decltype(rpw)::value;
    const dim3 grid(static_cast<unsigned>(CeilDiv(w.rows, int64_t{kWarps} * R)), static_cast<unsigned>(tiles));
    const auto* codes = static_cast<const uint8_t*>(w.values);
    if (w.format == WeightFormat::kFp8Block128)
      DecodeGemvKernel<T, R, true><<<grid, kWarps * 32, 0, stream>>>(codes, w.scales, w.scale_cols, w.rows, w.cols, xq,
                                                                      xs, n, y, round);
    else
      DecodeGemvKernel<T, R, false><<<grid, kWarps * 32, 0, stream>>>(codes, w.scales, w.scale_cols, w.rows, w.cols, xq,
                                                                       xs, n, y, round);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t LinearDecodeGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, int64_t max_k,
                                bool fp8, Rounding out, cudaStream_t stream, GemvInputs in) {
  if (count == 0 || max_rows == 0 || max_n == 0) return cudaSuccess;
  if (count > 65535 || (in.scale_bytes && (fp8 || max_k % 256 != 0))) return cudaErrorInvalidValue;
  const bool round = out == Rounding::kBf16;
  return WithTokenTile(max_n, [&](auto t) {
    return LaunchGrouped<decltype(t)::value>(groups, count, max_rows, max_n, max_k, fp8, round, in, stream);
  });
}

int DecodeGemvRowsPerWarp(int64_t rows, int64_t blocks_per_row_block) {
  static const int forced = [] {
    const char* v = std::getenv("FLASHMEM_DECODE_GEMV_ROWS");
    const int r = v ? std::atoi(v) : 0;
    return r == 1 || r == 2 || r == 4 ? r : 0;
  }();
  if (forced) return forced;
  // One block an SM, less a sixteenth: 4096 rows at 4 a warp are 128 blocks on 132 SMs, and
  // faster than 256 blocks at 2 (more rows share each activation read).
  const int64_t enough = std::max<int64_t>(DeviceSmLimits().count, 1) * 15 / 16;
  for (int r : {4, 2})
    if (CeilDiv(rows, int64_t{kWarps} * r) * std::max<int64_t>(blocks_per_row_block, 1) >= enough) return r;
  return 1;
}

bool GroupedFp4OnTensorCores(int64_t max_n, int64_t max_k, bool scale_bytes) {
  return WithTokenTile(max_n, [&](auto t) { return Fp4SmemFor<decltype(t)::value>(max_k, scale_bytes) > 0; });
}

cudaError_t LinearDecode(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y, Rounding out,
                         cudaStream_t stream) {
  if (w.format == WeightFormat::kDense || w.cols % 128 != 0) return cudaErrorInvalidValue;
  if (n == 0 || w.rows == 0) return cudaSuccess;
  const bool round = out == Rounding::kBf16;
  return WithTokenTile(n, [&](auto t) { return Launch<decltype(t)::value>(w, xq, xs, n, y, round, stream); });
}

}  // namespace flashmem::kernels::cuda
