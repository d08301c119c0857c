// Sparse MQA with the sink over paged 584-B FP8 records for a few heads: a tensor-parallel shard's
// share of V4-Flash's 64 (32, 16 or 8 at TP 2, 4, 8), or a small model's, which the warpgroup
// kernel (M = 64 heads, sparse_attention_wgmma.cu) cannot take. A block takes 16 heads of one
// token (fewer are zero rows) over a split of its slots, chunks of 64 slots as the CPU reference
// visits them. The reference rounds P to bf16 against the running maximum of its single pass, so
// a split must start from that maximum as it stands at the split's first chunk: with more than
// one split, a scores pass (the same kernel, Pass::kScores: Q·Kᵀ alone) writes every chunk's S
// and row maxima first, and the attention pass, its programmatic dependent, reads them back,
// starting from the maxima of the chunks before its split. Both run two blocks an SM (64
// registers: the attention pass spills 52 bytes, still faster at long slot lists). A token alone
// gets the same bits as in a batch that needs no split (FewHeadsSplits). Records are
// gathered by index with cp.async one chunk ahead; the FP8 codes are converted in registers
// (never a dequantised tile in shared memory). 16 warps: warp w owns the record's 64-dim block
// w % 8 (w % 8 < 7: FP8 with scale byte w % 8; 7: the bf16 rope dims) and half w / 8 of every
// chunk's slots:
//   - S = Q·Kᵀ over its block (mma.sync m16n8k16, f16 for FP8 blocks: e4m3 -> f16 is exact, one
//     cvt per two codes; the k order inside a block is permuted so that a lane's B operand for all
//     4 k-steps is one 16-byte load of its slot's codes). Q sits in registers in the same order,
//     each row times a power of two that keeps it in f16's range (exact for bf16 values). Each
//     warp scales its partial S by its block's per-slot scale; blocks 4-7 add theirs onto 0-3's.
//   - Softmax, one warp a row: the 4 partials summed in a fixed order, the maximum moved a chunk
//     at a time, P rounded to bf16 (held as f16: exact) in shared memory, its columns in the
//     order the P·V loads want.
//   - O += P·V over its block's 64 output dims and its half of the slots: P (ldmatrix) times
//     2^(e - e_ref) per slot (e its scale byte, e_ref the block's largest so far: exact in f16),
//     V's B operand built from 8-byte loads of 4 slots' codes with byte permutes. The halves' O
//     are added once, at the end. Records sit 576 B apart with 32 B more after every pair, which
//     keeps both the QK loads (two slots a quarter-warp) and the P·V loads (four slots a
//     half-warp) on distinct banks.
// Where the time goes (docs/benchmarks.md, "Sixteenth session"): instructions, not memory. A warp
// issues ~700 a 64-slot chunk (the MMAs and code conversions are ~100 of them) at ~0.45 a cycle a
// scheduler; at b = 128 the gathers alone take 19 us, the math alone 30, both 40. Overlapping one
// chunk's scores with the previous chunk's P·V (two barriers a chunk instead of four) did not
// change the time.
// Sums are reordered against the CPU reference: results agree within bf16 rounding (and pass the
// tiny-c golden in fast mode). A scale byte e counts as 2^(e - 127); byte 0 (2^-127) as zero.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdlib>

#include "kernels/cuda/device_math.cuh"
#include "kernels/cuda/device_ops.h"
#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda/sparse_attention_parts.h"

namespace flashmem::kernels::cuda {
namespace {

using namespace ptx;

constexpr int kRows = 16;  // heads a block: M of the MMA (a shard's fewer heads are zero rows)
constexpr int kDim = kRecordDim;
constexpr int kChunk = 64;   // slots a chunk: the CPU reference's softmax blocks (P is rounded against their maxima)
constexpr int kBlocks = 8;   // 64-dim blocks of a record: 7 FP8 ones and the bf16 rope dims
constexpr int kWarps = 16;   // warp w: dim block w % 8, slot half w / 8 of every chunk
constexpr int kThreads = 32 * kWarps;
constexpr int kMaxSplits = 64;
constexpr int kHalfTiles = kChunk / 16;  // n-tiles of S (8 slots) in half a chunk
constexpr int kHalfSteps = kChunk / 32;  // P·V k-steps (16 slots) in half a chunk
__host__ __device__ constexpr int64_t Chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }
__host__ __device__ constexpr int RowOffset(int j) { return j * kRecordData + 32 * (j / 2); }
constexpr int kStageData = RowOffset(kChunk);
constexpr int kStageBytes = kStageData + kChunk * kRecordScales;
constexpr int kSPitch = kChunk + 8;  // floats a row of partial S
constexpr int kPPitch = kChunk + 8;  // 16-bit values a row of P: 144-B rows, ldmatrix without conflicts
constexpr int kOutPitch = kDim + 4;  // floats a result row in shared memory
constexpr size_t kSmem = 2 * size_t{kStageBytes} + size_t{kBlocks / 2} * kRows * kSPitch * 4 + kRows * kPPitch * 2 +
                         2 * kChunk * 4 /* entries */ + 3 * kRows * 4 /* alpha, m, l */;
static_assert(kStageBytes % 16 == 0 && kSmem <= 227 * 1024, "one block an SM");
static_assert(kRows * kOutPitch * 4 <= 2 * kStageBytes, "the result rows fit the stages");

__device__ __forceinline__ uint32_t PackF16(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
// Two e4m3 codes (bits 0-7 and 8-15) -> f16x2 of their values (exact).
__device__ __forceinline__ uint32_t CodesToF16(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair & 0xffffu), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}
__device__ __forceinline__ uint32_t MulF16(uint32_t a, uint32_t f) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&f));
  return *reinterpret_cast<const uint32_t*>(&r);
}
// f16x2 -> bf16x2 (P, bf16 values held as f16, for the rope dims' bf16 MMA).
__device__ __forceinline__ uint32_t F16ToBf16(uint32_t a) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&a));
  return PackBf16(f.x, f.y);
}
// 2^x as a float for an integer x in -126 .. 127 (clamped).
__device__ __forceinline__ float Pow2(int x) { return __uint_as_float(static_cast<uint32_t>(min(max(x + 127, 1), 254)) << 23); }
// 2^d0 and 2^d1 (d <= 0) as f16x2, d0 low: subnormal from 2^-15, 0 below 2^-24 (a slot whose scale
// is that much below the block's largest so far adds under 2^-24 of what that one adds). One
// conversion of the float powers for both: exact down to 2^-24; 2^-25 and below (Pow2's floor,
// 2^-126, included) round to 0.
__device__ __forceinline__ uint32_t Pow2F16x2(int d0, int d1) { return PackF16(Pow2(d0), Pow2(d1)); }
// UE8M0 scale byte -> 2^(e - 127) (byte 0, a zero-filled slot's, gives 0).
__device__ __forceinline__ float ScaleOf(uint8_t e) { return __uint_as_float(static_cast<uint32_t>(e) << 23); }

// The P·V token order inside a k-step of 16 slots: k = 2c + i + 8j holds slot c + 4i + 8j, so a
// lane's four slots (k = 2c, 2c + 1, 2c + 8, 2c + 9) are slots c, c + 4, c + 8, c + 12.
__device__ __forceinline__ int PvColumn(int u) { return 2 * (u % 4) + (u / 4) % 2 + 8 * (u / 8); }

// Slot j of chunk c's entry (-1: masked or past the end).
__device__ __forceinline__ int32_t EntryOf(const int32_t* tok_idx, int64_t n, int64_t c, int j) {
  const int64_t s = c * kChunk + j;
  return s < n ? tok_idx[s] : -1;
}

// A chunk's records (masked and past-the-end slots zero-filled) and entries into a stage: eight
// threads a record (slot threadIdx.x / 8 with entry e, loaded a chunk ahead), each copying every
// eighth 16-byte piece.
// page_shift: log2(page_entries) when that is a power of two (64 in the KV reserve: a shift
// instead of a 30-instruction division), else -1.
__device__ __forceinline__ void GatherChunk(const uint8_t* pages, int page_entries, int page_shift, int32_t e,
                                            uint8_t* stage, int32_t* ent) {
  const int j = threadIdx.x / 8, eighth = threadIdx.x % 8;
  const bool live = e >= 0;
  const int page_no = !live ? 0 : page_shift >= 0 ? e >> page_shift : e / page_entries;
  const int slot = live ? e - page_no * page_entries : 0;
  const uint8_t* page = pages + static_cast<int64_t>(page_no) * page_entries * kRecordBytes;
  const uint8_t* src = page + slot * kRecordData;
  uint8_t* dst = stage + RowOffset(j);
#pragma unroll
  for (int piece = eighth; piece < kRecordData / 16; piece += 8) CopyAsync16(dst + piece * 16, src + piece * 16, live ? 16 : 0);
  if (eighth == 0) {
    CopyAsync8(stage + kStageData + j * kRecordScales, page + page_entries * kRecordData + slot * kRecordScales,
               live ? 8 : 0);
    ent[j] = e;
  }
}

// This warp's partial scores over dim block `blk` for its half of the chunk's slots: n-tile t
// holds slots 8 t .. 8 t + 7; a lane's B operand is slot 8 t + g, dims 64 blk + 16 c4 + [0, 16).
// Scaled by the slots' scale bytes (FP8 blocks) and Q's row factors. kRope: the bf16 rope block
// (a template parameter, so that each form is straight-line code whose tiles interleave).
template <bool kRope>
__device__ __forceinline__ void PartialScores(const uint8_t* stage, const uint8_t* scales, const uint32_t (&qa)[4][4],
                                              const float (&q_undo)[2], int blk, int half, int g, int c4,
                                              float (&acc)[kHalfTiles][4]) {
#pragma unroll
  for (int tt = 0; tt < kHalfTiles; ++tt) {
    const int t = kHalfTiles * half + tt;
    acc[tt][0] = acc[tt][1] = acc[tt][2] = acc[tt][3] = 0.0f;
    const uint8_t* row = stage + RowOffset(8 * t + g);
    if constexpr (!kRope) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + 64 * blk + 16 * c4);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t kf[2] = {CodesToF16(words[j]), CodesToF16(words[j] >> 16)};
        MmaF16(acc[tt], qa[j], kf);
      }
    } else {
      const uint4 v0 = *reinterpret_cast<const uint4*>(row + kRecordNope + 32 * c4);
      const uint4 v1 = *reinterpret_cast<const uint4*>(row + kRecordNope + 32 * c4 + 16);
      const uint32_t words[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t bf[2] = {words[2 * j], words[2 * j + 1]};
        MmaBf16(acc[tt], qa[j], bf);
      }
    }
  }
#pragma unroll
  for (int tt = 0; tt < kHalfTiles; ++tt) {
    const int s0 = 8 * (kHalfTiles * half + tt) + 2 * c4;
    const float f0 = kRope ? 1.0f : ScaleOf(scales[s0 * kRecordScales + blk]);
    const float f1 = kRope ? 1.0f : ScaleOf(scales[(s0 + 1) * kRecordScales + blk]);
    acc[tt][0] *= q_undo[0] * f0;
    acc[tt][1] *= q_undo[0] * f1;
    acc[tt][2] *= q_undo[1] * f0;
    acc[tt][3] *= q_undo[1] * f1;
  }
}

// O += P·V over dim block `blk`'s 64 output dims and this warp's half of the chunk's slots:
// n-tile t, column g is dim 64 blk + 8 g + t. FP8 blocks: f16 MMAs with P times 2^(e - e_ref)
// per slot; the rope block: bf16 MMAs (P's values are bf16).
template <bool kRope>
__device__ __forceinline__ void AccumulatePv(const uint8_t* stage, const uint8_t* scales, const uint16_t* p_s,
                                             int e_ref, int blk, int half, int lane, float (&o)[8][4]) {
  const int mtx = lane / 8, g = lane / 4, c4 = lane % 4;
#pragma unroll
  for (int kk = 0; kk < kHalfSteps; ++kk) {
    const int ks = kHalfSteps * half + kk;
    uint32_t pa[4];
    LoadMatrices(pa, p_s + ((mtx & 1) * 8 + lane % 8) * kPPitch + 16 * ks + (mtx >> 1) * 8);
    const int s0 = 16 * ks + c4;  // this lane's slots: s0, s0 + 4, s0 + 8, s0 + 12
    if constexpr (!kRope) {
      auto d = [&](int s) { return static_cast<int>(scales[s * kRecordScales + blk]) - e_ref; };
      const uint32_t f01 = Pow2F16x2(d(s0), d(s0 + 4)), f89 = Pow2F16x2(d(s0 + 8), d(s0 + 12));
      pa[0] = MulF16(pa[0], f01);
      pa[1] = MulF16(pa[1], f01);
      pa[2] = MulF16(pa[2], f89);
      pa[3] = MulF16(pa[3], f89);
      uint2 v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = *reinterpret_cast<const uint2*>(stage + RowOffset(s0 + 4 * i) + 64 * blk + 8 * g);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const unsigned sel = (t % 4) | ((4u + t % 4) << 4);
        const uint32_t vf[2] = {CodesToF16(__byte_perm(t < 4 ? v[0].x : v[0].y, t < 4 ? v[1].x : v[1].y, sel)),
                                CodesToF16(__byte_perm(t < 4 ? v[2].x : v[2].y, t < 4 ? v[3].x : v[3].y, sel))};
        MmaF16(o[t], pa, vf);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[i] = F16ToBf16(pa[i]);  // bf16 values: exact
      uint4 v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = *reinterpret_cast<const uint4*>(stage + RowOffset(s0 + 4 * i) + kRecordNope + 16 * g);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        auto word = [&](const uint4& x) { return t / 2 == 0 ? x.x : t / 2 == 1 ? x.y : t / 2 == 2 ? x.z : x.w; };
        const unsigned sel = t % 2 ? 0x7632u : 0x5410u;
        const uint32_t bf[2] = {__byte_perm(word(v[0]), word(v[1]), sel), __byte_perm(word(v[2]), word(v[3]), sel)};
        MmaBf16(o[t], pa, bf);
      }
    }
  }
}

// What a launch of the kernel does. kFused: S, the softmax and P·V of each chunk of its split
// (one split a token: nothing else runs). With more splits, two passes over the same splits:
// kScores writes every chunk's S (masked slots -inf) to scores[((b * chunks + c) * heads + head)
// * kChunk + slot] and its row maxima to chunk_max[(b * chunks + c) * heads + head]; kAttend,
// its programmatic dependent, reads them back — its split starting from the maximum of the
// chunks before it — for the softmax and P·V (no Q·Kᵀ of its own).
enum class Pass { kFused, kScores, kAttend };

template <Pass kPass>
__global__ void __launch_bounds__(kThreads, kPass == Pass::kFused ? 1 : 2)
    FewHeadsKernel(const float* q, int64_t heads, const uint8_t* pages, int64_t page_entries, const int32_t* idx,
                   int64_t n, int splits, const float* sink, float scale, float* out, float* part_o, float* part_m,
                   float* part_l, float* chunk_max, float* scores) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint8_t* stages = smem;
  float* s_part = reinterpret_cast<float*>(smem + 2 * kStageBytes);  // [block % 4][row][kSPitch]
  // P rounded to bf16 as the reference rounds it, held as f16 (exact) for the FP8 blocks' MMAs.
  uint16_t* p_s = reinterpret_cast<uint16_t*>(s_part + kBlocks / 2 * kRows * kSPitch);  // [row][kPPitch]
  int32_t* ent_s = reinterpret_cast<int32_t*>(p_s + kRows * kPPitch);                   // [stage][kChunk]
  float* alpha_s = reinterpret_cast<float*>(ent_s + 2 * kChunk);                        // [row]
  float* m_s = alpha_s + kRows;
  float* l_s = m_s + kRows;

  const int64_t b = blockIdx.x, split = blockIdx.y, head0 = static_cast<int64_t>(blockIdx.z) * kRows;
  const int rows = static_cast<int>(heads - head0 < kRows ? heads - head0 : kRows);
  const int64_t chunks = Chunks(n);
  const int64_t c0 = split * chunks / splits, c1 = (split + 1) * chunks / splits;  // c0 < c1: splits <= chunks
  // The attention pass may start as soon as every block of this pass has: it waits for the
  // scores themselves (WaitForPrerequisite) before reading them.
  if constexpr (kPass == Pass::kScores) AllowDependents();
  const int32_t* tok_idx = idx + b * n;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c4 = lane % 4;
  const int blk = warp % kBlocks, half = warp / kBlocks;
  const bool rope = blk == kBlocks - 1;
  const int pe = static_cast<int>(page_entries);  // 32-bit division in the gather
  const int page_shift = (pe & (pe - 1)) == 0 ? __ffs(pe) - 1 : -1;

  const int gj = threadIdx.x / 8;  // the slot this thread gathers
  GatherChunk(pages, pe, page_shift, EntryOf(tok_idx, n, c0, gj), stages, ent_s);
  CommitAsync();
  if (c0 + 1 < c1) GatherChunk(pages, pe, page_shift, EntryOf(tok_idx, n, c0 + 1, gj), stages + kStageBytes, ent_s + kChunk);
  CommitAsync();
  int32_t e_ahead = c0 + 2 < c1 ? EntryOf(tok_idx, n, c0 + 2, gj) : -1;  // chunk c + 2's, loaded a chunk ahead

  // Q's A operands for dim block `blk`, k-step j: dims 64 blk + 16 c4 + 4 j + {0,1} (registers 0,
  // 1: rows g, g + 8) and + {2,3} (registers 2, 3). FP8 blocks: f16, each row times a power of
  // two that brings its largest value in this block to 2^12 .. 2^13 (exact for bf16 values;
  // undone on the partial scores); the rope block: bf16 as it is.
  uint32_t qa[4][4] = {};
  float q_undo[2] = {1.0f, 1.0f};
#pragma unroll
  for (int r = 0; r < 2 && kPass != Pass::kAttend; ++r) {
    const int row = g + 8 * r;
    float4 v[4] = {};
    if (row < rows) {
      const float4* src = reinterpret_cast<const float4*>(q + (b * heads + head0 + row) * kDim + 64 * blk + 16 * c4);
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = src[j];
    }
    if (rope) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        qa[j][r] = PackBf16(v[j].x, v[j].y);
        qa[j][2 + r] = PackBf16(v[j].z, v[j].w);
      }
    } else {
      float amax = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
      const int qk = amax > 0.0f ? 12 - (static_cast<int>((__float_as_uint(amax) >> 23) & 0xff) - 127) : 0;
      const float boost = Pow2(qk);
      q_undo[r] = Pow2(-qk);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        qa[j][r] = PackF16(v[j].x * boost, v[j].y * boost);
        qa[j][2 + r] = PackF16(v[j].z * boost, v[j].w * boost);
      }
    }
  }

  // Row `warp` (softmax lanes): the running maximum from where the reference's pass has it at
  // chunk c0 (the maxima of chunks 0 .. c0 - 1), so that P rounds as there.
  float m_run = -INFINITY, l_run = 0.0f;
  if constexpr (kPass == Pass::kAttend) {
    WaitForPrerequisite();  // the scores pass is complete
    if (warp < rows)
      for (int64_t c = lane; c < c0; c += 32) m_run = fmaxf(m_run, chunk_max[(b * chunks + c) * heads + head0 + warp]);
    m_run = WarpMax(m_run);
  }
  int e_ref = 0;  // FP8 blocks: O's scale byte
  float o[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  for (int64_t c = c0; c < c1; ++c) {
    const int st = static_cast<int>((c - c0) & 1);
    const uint8_t* stage = stages + st * kStageBytes;
    const uint8_t* scales = stage + kStageData;
    const int32_t* ent = ent_s + st * kChunk;
    WaitAsync<1>();
    __syncthreads();  // chunk c has landed (every thread's copies)

    // Partial S over block `blk` for this warp's half of the slots: n-tile t holds slots 8 t ..
    // 8 t + 7; this lane's B operand is slot 8 t + g, dims 64 blk + 16 c4 + [0, 16).
    if constexpr (kPass != Pass::kAttend) {
      float acc[kHalfTiles][4];
      if (rope)
        PartialScores<true>(stage, scales, qa, q_undo, blk, half, g, c4, acc);
      else
        PartialScores<false>(stage, scales, qa, q_undo, blk, half, g, c4, acc);
      // Blocks 0-3 leave their partials; blocks 4-7 add theirs in place (b + 4 onto b: a fixed order).
      if (blk >= kBlocks / 2) BarrierSync(1, kThreads);
#pragma unroll
      for (int tt = 0; tt < kHalfTiles; ++tt) {
        float* at = s_part + ((blk % 4) * kRows + g) * kSPitch + 8 * (kHalfTiles * half + tt) + 2 * c4;
        float2 a = make_float2(acc[tt][0], acc[tt][1]), a8 = make_float2(acc[tt][2], acc[tt][3]);
        if (blk >= kBlocks / 2) {
          const float2 x = *reinterpret_cast<const float2*>(at), y = *reinterpret_cast<const float2*>(at + 8 * kSPitch);
          a = make_float2(x.x + a.x, x.y + a.y);
          a8 = make_float2(y.x + a8.x, y.y + a8.y);
        }
        *reinterpret_cast<float2*>(at) = a;
        *reinterpret_cast<float2*>(at + 8 * kSPitch) = a8;
      }
      if (blk < kBlocks / 2) BarrierArrive(1, kThreads);
      __syncthreads();
    }

    // Softmax: warp h holds row h, lane u slots 2 u and 2 u + 1; the partials summed in a fixed
    // order (or the scores pass's sums read back). As the reference: the maximum moves a chunk at
    // a time and P is rounded to bf16.
    {
      const int h = warp;
      float* s_row = scores + ((b * chunks + c) * heads + head0 + h) * kChunk + 2 * lane;  // kScores, kAttend
      float sc[2];
      {
        float2 sum = make_float2(0, 0);
        if constexpr (kPass == Pass::kAttend) {
          if (h < rows) sum = *reinterpret_cast<const float2*>(s_row);
        } else {
#pragma unroll
          for (int w = 0; w < kBlocks / 2; ++w) {
            const float2 v = *reinterpret_cast<const float2*>(s_part + (w * kRows + h) * kSPitch + 2 * lane);
            sum.x += v.x;
            sum.y += v.y;
          }
        }
        sc[0] = ent[2 * lane] < 0 ? -INFINITY : sum.x;
        sc[1] = ent[2 * lane + 1] < 0 ? -INFINITY : sum.y;
      }
      if constexpr (kPass == Pass::kScores) {
        const float m_chunk = WarpMax(fmaxf(sc[0], sc[1]));
        if (h < rows) {
          *reinterpret_cast<float2*>(s_row) = make_float2(sc[0], sc[1]);
          if (lane == 0) chunk_max[(b * chunks + c) * heads + head0 + h] = m_chunk;
        }
      } else {
        const float m_new = fmaxf(m_run, WarpMax(fmaxf(sc[0], sc[1])));
        // No branches: with every slot so far masked (m_new -inf) P is exp(-inf) = 0, and alpha 0
        // scales an O and l that are still 0.
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = expf((m_run - m_use) * scale);
        const float p0 = expf((sc[0] - m_use) * scale), p1 = expf((sc[1] - m_use) * scale);
        l_run = l_run * alpha + p0;
        l_run += p1;
        // P is cast to bf16 before P·V (both at once, round to nearest even), held as f16 (exact).
        const float2 pr = __bfloat1622float2(__floats2bfloat162_rn(p0, p1));
        const __half2 ph = __floats2half2_rn(pr.x, pr.y);
        const uint32_t bits = *reinterpret_cast<const uint32_t*>(&ph);
        uint16_t* p_row = p_s + h * kPPitch + 16 * (lane / 8);  // slots 2 lane, 2 lane + 1: one 16-slot group
        p_row[PvColumn((2 * lane) % 16)] = static_cast<uint16_t>(bits);
        p_row[PvColumn((2 * lane + 1) % 16)] = static_cast<uint16_t>(bits >> 16);
        m_run = m_new;
        if (lane == 0) alpha_s[h] = alpha;
      }
    }
    if constexpr (kPass != Pass::kScores) __syncthreads();

    // O += P·V over block `blk`'s dims and this warp's half of the slots: n-tile t, column g is dim
    // 64 blk + 8 g + t. FP8 blocks: f16 MMAs with P times 2^(e - e_ref), e_ref the largest scale
    // byte of this block so far (O is held in units of 2^(e_ref - 127) and rescaled, exactly,
    // when a chunk raises it; both halves see the same bytes, so keep the same e_ref).
    if constexpr (kPass != Pass::kScores) {
      float a_lo = alpha_s[g], a_hi = alpha_s[g + 8];
      if (!rope) {
        const unsigned e_lane = max(static_cast<unsigned>(scales[lane * kRecordScales + blk]),
                                    static_cast<unsigned>(scales[(lane + 32) * kRecordScales + blk]));
        const int e_max = static_cast<int>(__reduce_max_sync(0xffffffffu, e_lane));
        if (e_max > e_ref) {
          const float down = Pow2(e_ref - e_max);
          a_lo *= down;
          a_hi *= down;
          e_ref = e_max;
        }
      }
      if (!__all_sync(0xffffffffu, a_lo == 1.0f && a_hi == 1.0f))
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          o[t][0] *= a_lo;
          o[t][1] *= a_lo;
          o[t][2] *= a_hi;
          o[t][3] *= a_hi;
        }
      if (rope)
        AccumulatePv<true>(stage, scales, p_s, e_ref, blk, half, lane, o);
      else
        AccumulatePv<false>(stage, scales, p_s, e_ref, blk, half, lane, o);
    }
    __syncthreads();  // stage st, P and the partials are free
    if (c + 2 < c1) {
      GatherChunk(pages, pe, page_shift, e_ahead, stages + st * kStageBytes, ent_s + st * kChunk);
      e_ahead = c + 3 < c1 ? EntryOf(tok_idx, n, c + 3, gj) : -1;
    }
    CommitAsync();
  }
  WaitAsync<0>();
  if constexpr (kPass == Pass::kScores) return;

  // Row sums, then the rows: the two halves' O added in shared memory (the stages are free),
  // then out as whole float4 rows, normalised with the sink (one split) or as partial rows.
  {
    const float l = WarpSum(l_run);
    if (lane == 0) {
      m_s[warp] = m_run;
      l_s[warp] = l;
    }
  }
  __syncthreads();
  float* out_s = reinterpret_cast<float*>(stages);
  const float unit = rope ? 1.0f : Pow2(e_ref - 127);
  for (int pass = 0; pass < 2; ++pass) {
    if (half == pass)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float* dst = out_s + (g + 8 * r) * kOutPitch + 64 * blk + 16 * c4;  // columns 2 c4, 2 c4 + 1: + t, + 8 + t
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const float v0 = o[t][2 * r] * unit, v1 = o[t][2 * r + 1] * unit;
          dst[t] = pass ? dst[t] + v0 : v0;
          dst[t + 8] = pass ? dst[t + 8] + v1 : v1;
        }
      }
    __syncthreads();
  }
  float* dst = splits == 1 ? out + (b * heads + head0) * kDim : part_o + ((b * splits + split) * heads + head0) * kDim;
  for (int i = threadIdx.x; i < rows * (kDim / 4); i += kThreads) {
    const int row = i / (kDim / 4), col = 4 * (i % (kDim / 4));
    float4 v = *reinterpret_cast<const float4*>(out_s + row * kOutPitch + col);
    if (splits == 1) {
      const float mul = 1.0f / (l_s[row] + ExpF(sink[head0 + row] - m_s[row] * scale));
      v = make_float4(RoundBf16(v.x * mul), RoundBf16(v.y * mul), RoundBf16(v.z * mul), RoundBf16(v.w * mul));
    }
    *reinterpret_cast<float4*>(dst + row * kDim + col) = v;
  }
  if (splits > 1 && threadIdx.x < rows) {
    const int64_t prow = (b * splits + split) * heads + head0 + threadIdx.x;
    part_m[prow] = m_s[threadIdx.x];
    part_l[prow] = l_s[threadIdx.x];
  }
  AllowDependents();
}

// Splits per token: the two passes run two blocks an SM, so enough splits for two blocks on
// every SM, unless that leaves a split fewer than 3 chunks (its prologue, Q and the first two
// chunks' gathers, then weighs as much as its work): then enough for one block an SM. None when
// the tokens alone fill more than half the SMs. At most one split a chunk. (H200, 16 heads,
// graph replays, FLASHMEM_FEW_HEADS_SPLITS swept 2-32: this picks the fastest count or one within
// 3% at 640 and 8,192 slots, batch 1 to 128; docs/benchmarks.md, "Fifteenth session".)
// A split rounds P as the reference's single pass does because it starts from that pass's running
// maximum at its first chunk, which the scores pass gives it (GoldenC.CachesAfterS1 in fast mode
// asks frac_exact 0.873 of the caches; a split starting from its own maximum gave 0.74).
// FLASHMEM_FEW_HEADS_SPLITS=N (measurements) sets the count instead.
int FewHeadsSplits(int64_t batch, int64_t heads, int64_t n) {
  static const int forced = [] {
    const char* v = std::getenv("FLASHMEM_FEW_HEADS_SPLITS");
    return v ? std::atoi(v) : 0;
  }();
  const int sms = std::max(1, DeviceSmLimits().count);
  const int64_t chunks = Chunks(n);
  const int64_t blocks = std::max<int64_t>(1, batch * ((heads + kRows - 1) / kRows));
  int64_t want = std::max<int64_t>(1, 2 * sms / blocks);
  if (chunks < 3 * want) want = std::max<int64_t>(1, sms / blocks);
  if (2 * blocks > sms) want = 1;  // one pass a token fills most SMs: two passes only add work
  if (forced > 0) want = forced;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, chunks, kMaxSplits})));
}

bool Wide(int64_t heads) { return heads % kFastAttentionHeads == 0; }

// Two passes (scores, then attention) when the slots are split; FLASHMEM_FEW_HEADS_PASSES=2
// (measurements) takes them with one split as well.
bool TwoPasses(int splits) {
  static const bool forced = [] {
    const char* v = std::getenv("FLASHMEM_FEW_HEADS_PASSES");
    return v != nullptr && std::atoi(v) == 2;
  }();
  return splits > 1 || forced;
}

// The scores pass's output, after the partial rows in the workspace: chunk maxima [batch][chunks]
// [heads], then S [batch][chunks][heads][kChunk].
struct ScoreRows {
  float* chunk_max;
  float* scores;
};
ScoreRows ScoreRowsAfter(float* end_of_split_rows, int64_t batch, int64_t heads, int64_t n) {
  return {end_of_split_rows, end_of_split_rows + batch * Chunks(n) * heads};
}
int64_t ScoresFloats(int64_t batch, int64_t heads, int64_t n) { return batch * Chunks(n) * heads * (1 + kChunk); }

}  // namespace

int64_t PagedSparseAttentionFp8FastWorkspace(int64_t batch, int64_t heads, int64_t n) {
  if (Wide(heads)) return detail::PagedSparseAttentionFp8WideWorkspace(batch, heads, n);
  const int splits = FewHeadsSplits(batch, heads, n);
  const int64_t rows = batch * splits * heads;
  return detail::SplitRowsBytes(rows, kDim) +
         (TwoPasses(splits) ? ScoresFloats(batch, heads, n) * static_cast<int64_t>(sizeof(float)) : 0);
}

cudaError_t PagedSparseAttentionFp8Fast(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                        int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                        float softmax_scale, float* out, void* workspace, cudaStream_t stream) {
  if (heads > 0 && Wide(heads))
    return detail::PagedSparseAttentionFp8Wide(q, batch, heads, pages, page_entries, idx, n, sink, softmax_scale, out,
                                               workspace, stream);
  if (heads <= 0 || page_entries <= 0 || page_entries > INT32_MAX || n <= 0 || (page_entries * kRecordBytes) % 16 != 0)
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  static const cudaError_t configured = [] {
    for (auto kernel : {FewHeadsKernel<Pass::kFused>, FewHeadsKernel<Pass::kScores>, FewHeadsKernel<Pass::kAttend>}) {
      const cudaError_t e =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem));
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }();
  if (configured != cudaSuccess) return configured;
  const int splits = FewHeadsSplits(batch, heads, n);
  const int64_t rows = batch * splits * heads;
  const detail::SplitRows part = detail::SplitRowsIn(workspace, rows, kDim);
  const ScoreRows sr = ScoreRowsAfter(part.l + rows, batch, heads, n);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(splits),
                  static_cast<unsigned>((heads + kRows - 1) / kRows));
  if (!TwoPasses(splits)) {
    FewHeadsKernel<Pass::kFused><<<grid, kThreads, kSmem, stream>>>(q, heads, pages, page_entries, idx, n, splits, sink,
                                                                   softmax_scale, out, part.o, part.m, part.l, nullptr,
                                                                   nullptr);
    return cudaGetLastError();
  }
  // The scores pass, then the attention pass over the same splits, launched as its dependent,
  // then the combine (with more than one split).
  FewHeadsKernel<Pass::kScores><<<grid, kThreads, kSmem, stream>>>(q, heads, pages, page_entries, idx, n, splits, sink,
                                                                  softmax_scale, out, part.o, part.m, part.l, sr.chunk_max,
                                                                  sr.scores);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  e = ptx::LaunchAsDependent(FewHeadsKernel<Pass::kAttend>, grid, dim3(kThreads), kSmem, stream, q, heads, pages,
                             page_entries, idx, n, splits, sink, softmax_scale, out, part.o, part.m, part.l, sr.chunk_max,
                             sr.scores);
  if (e != cudaSuccess || splits == 1) return e;
  return detail::CombineAttentionSplits(part.o, part.m, part.l, batch, heads, splits, sink, softmax_scale, out, stream);
}

}  // namespace flashmem::kernels::cuda
