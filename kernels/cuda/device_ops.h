// Kernel launchers of the CUDA sm_90 backend on device memory (no host copies, no syncs): the
// CudaBackend (cuda_backend.h) stages host arrays through them, and the kernel benchmarks call
// them directly. Every launcher enqueues on `stream` and returns the launch error.
// Semantics are those of the same-named Backend ops in kernels/ops.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/ops.h"

namespace flashmem::kernels::cuda {

// The current device's SM count and shared-memory limits, read once per process (count 0 when
// they could not be read): what launchers size their grids by.
struct SmLimits {
  int count = 0, bytes = 0, reserved = 0, per_block = 0;  // SMs; shared memory per SM, reserved per block, opt-in max
};
const SmLimits& DeviceSmLimits();

// A weight in device memory, compact: kDense as bf16 (when every value is a bf16) or fp32,
// kFp8Block128 as e4m3 codes (1 B each), kFp4Group32 as e2m1 codes packed two per byte (even
// column in the low nibble); scales fp32 in the layout of WeightMatrix::scales.
struct DeviceWeight {
  WeightFormat format = WeightFormat::kDense;
  int64_t rows = 0, cols = 0;
  bool dense_bf16 = false;
  const void* values = nullptr;
  const float* scales = nullptr;
  int64_t scale_cols = 0;
  const float* lt_scales = nullptr;  // FP8 only: the scales in cuBLASLt's layout (BlockScalesForLt)
  // FP8 only, fast mode: values x block scale as bf16 [rows][cols] (exact: an e4m3 value times a
  // power of two fits bf16), the operand of the tensor-core path from 16 tokens.
  const void* dequant_bf16 = nullptr;
  // FP4 only, fast mode: every scale as its E8M0 byte b (scale 2^(b - 127)), the checkpoint's own
  // form and a quarter of the fp32 bytes, which is what the decode GEMV reads (null when a scale
  // is not such a power of two, or cols % 256 != 0: ScaleExponents). A weight with them has its
  // codes (`values`) in the decode layout (fp4_layout.h), which only the GEMV's tensor-core path
  // reads; a GEMV given such a weight in a shape that path does not take refuses it.
  const uint8_t* scale_exps = nullptr;
  // Bytes of values + scales (what one pass over the weight reads; the decode GEMV reads the
  // scale bytes when there are any).
  int64_t bytes() const;
};

// The E8M0 byte of every FP4 group scale (WeightMatrix::scales order), or an empty vector when one
// is not 2^(b - 127) with b in [1, 254] (the GEMV builds the float from the byte's bits), or the
// weight is not FP4 with cols % 256 == 0 (each warp's half of a row starts on a 4-byte boundary)
// or its rows are too long for the decode GEMV's tensor-core path at 8 tokens (the bytes' reader).
std::vector<uint8_t> ScaleExponents(const WeightMatrix& w);

// Host-side encoding of a WeightMatrix into the DeviceWeight layout: values bytes, then scales.
struct EncodedWeight {
  bool dense_bf16 = false;
  std::vector<uint8_t> values;
};
EncodedWeight EncodeWeight(const WeightMatrix& w);

// act_quant: xq = e4m3 grid values (fp32), xs = pow2 scale per 128 block; k % 128 == 0.
cudaError_t QuantizeActivations(const float* x, int64_t n, int64_t k, float* xq, float* xs,
                                cudaStream_t stream);
// The same grid values as f16 bits (exact: |v| <= 448 on the e4m3 grid) in the FP4 decode GEMV's
// MMA column order — each 8 columns stored 0 2 1 3 4 6 5 7 — which its blocks copy as they are.
cudaError_t QuantizeActivationsMmaF16(const float* x, int64_t n, int64_t k, uint16_t* xh, float* xs,
                                      cudaStream_t stream);
// y[n, rows] = x · Wᵀ. Quantized formats take xq/xs from QuantizeActivations; dense takes x in xq.
cudaError_t Linear(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y,
                   Rounding out, cudaStream_t stream);

// The fast decode path of Linear for FP8/FP4 weights (cols % 128 == 0): 16-byte weight loads,
// dequantisation in registers, reordered fp32 sums (within fp32 rounding of Linear, not
// bit-identical). Tokens go in tiles of up to 8, each weight byte read once per tile.
cudaError_t LinearDecode(const DeviceWeight& w, const float* xq, const float* xs, int64_t n, float* y,
                         Rounding out, cudaStream_t stream);

// One weight matrix of a grouped decode GEMV and the (act_quant'ed) tokens it multiplies.
struct GemvGroup {
  const uint8_t* w;  // FP8 codes or packed FP4 [rows][k]
  const float* ws;   // its scales
  int64_t scale_cols, rows, k;
  const float* xq;   // [n][k] e4m3 grid values
  const float* xs;   // [n][k / 128] scales
  int64_t n;
  float* y;          // [n][rows]
  const uint8_t* wexp = nullptr;  // FP4: the scales as E8M0 bytes (DeviceWeight::scale_exps)
  const uint16_t* xh = nullptr;   // FP4: the tokens as QuantizeActivationsMmaF16 gives them, [n][k]
};
// How the FP4 tensor-core kernel's blocks share a matrix (decode_gemv.cu, Fp4Blocking): 64 rows a
// block with k split between two warps, or 128 rows with each warp over all of k (k % 512 == 0;
// otherwise split). Both give the same bits. kByShape splits k when the grid would be about one
// wave; kernel_bench and the tests ask for each.
enum class Fp4Blocks : uint8_t { kByShape, kSplitK, kWholeK };
// What the groups of a grouped launch carry besides w, ws, xq and xs (every group alike).
struct GemvInputs {
  bool scale_bytes = false;      // wexp, read instead of ws (FP4, k % 256 == 0)
  bool f16_activations = false;  // xh, read instead of xq (FP4)
  Fp4Blocks blocks = Fp4Blocks::kByShape;
};
// LinearDecode for `count` matrices of one format in one launch (groups: a device array). The
// routed experts of an MoE layer: each expert's w1 and w3 in one launch, then every w2. max_rows
// and max_k bound every group's rows and k; max_n sizes the token tiles (the grid and the shared
// memory): a group of more tokens takes its further tiles in turn (groups written on the device,
// whose sizes the host does not know). A group of n = 0 does nothing.
// `in` says which optional inputs the FP4 tensor-core path reads; the generic path (FP8, or FP4
// when GroupedFp4OnTensorCores is false) takes neither and refuses them (cudaErrorInvalidValue).
cudaError_t LinearDecodeGrouped(const GemvGroup* groups, int count, int64_t max_rows, int64_t max_n, int64_t max_k,
                                bool fp8, Rounding out, cudaStream_t stream, GemvInputs in = {});
// Dense bf16 weights of one shape (rows x k each, DeviceWeight::dense_bf16) against n bf16 token
// rows (dense_gemv.cu): y[t][g * rows + o] = x[t][g * k ..] . w_g[o] for every group g, fp32 sums
// (in another order than cuBLASLt's), rounded to bf16 with Rounding::kBf16. x's rows are ldx
// apart (>= count * k), y's ldy (>= count * rows). For a few tokens (fast mode below 4).
struct DenseGemvGroups {
  static constexpr int kMax = 32;
  const uint16_t* w[kMax] = {};
  int count = 0;
};
// Whether DenseGemv takes this k and row stride (16-byte loads: multiples of 8 values).
bool DenseGemvSupports(int64_t k, int64_t ldx);
cudaError_t DenseGemv(const DenseGemvGroups& groups, int64_t rows, int64_t k, const __nv_bfloat16* x, int64_t ldx,
                      int64_t n, float* y, int64_t ldy, Rounding out, cudaStream_t stream);
// Whether FP4 groups of up to max_n tokens and k = max_k run on the tensor cores (their staged
// tokens fit in shared memory, k % 128 == 0).
bool GroupedFp4OnTensorCores(int64_t max_n, int64_t max_k, bool scale_bytes);
// Output rows each warp of the generic (CUDA-core) decode GEMV computes — 1, 2 or 4 — for `rows`
// rows per matrix and `blocks_per_row_block` blocks over the other grid dimensions (token tiles x
// matrices): the most that still leave about one block an SM (measured: 1 token x 4096 -> 4096
// 12.3 / 10.2 / 8.5 us at 1 / 2 / 4, 1024 rows fastest at 1). FLASHMEM_DECODE_GEMV_ROWS=1|2|4
// fixes it (for measurements).
int DecodeGemvRowsPerWarp(int64_t rows, int64_t blocks_per_row_block);

cudaError_t RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps, float* y,
                    cudaStream_t stream);
cudaError_t HeadRmsNormBf16(float* q, int64_t heads, int64_t dim, float eps, cudaStream_t stream);
cudaError_t Rope(float* x, int64_t rows, int64_t stride, int64_t offset, int64_t rope_dims,
                 const float* cos, const float* sin, int64_t rows_per_angle, bool inverse, cudaStream_t stream);
cudaError_t RoundTrip(float* x, int64_t n, int64_t block, bool fp8, cudaStream_t stream);
// RoundTrip of the first `prefix` values (whole blocks) of each of `rows` rows `stride` apart.
cudaError_t RoundTripRows(float* x, int64_t rows, int64_t stride, int64_t prefix, int64_t block, bool fp8,
                          cudaStream_t stream);
cudaError_t Hadamard(float* x, int64_t rows, int64_t dim, cudaStream_t stream);

// The routed-expert pipeline on the device (Backend::RoutedExperts): out[r] = x[rows[r]];
// h = bf16(silu(min(g, L)) * clamp(u, ±L) * weights[row]) as the CPU's SwiGluRows (weights null: 1);
// y[rows[r]] += out[r] (rows of one call distinct).
cudaError_t GatherRows(const float* x, const int32_t* rows, int64_t m, int64_t dim, float* out, cudaStream_t stream);
cudaError_t SwiGlu(const float* gate, const float* up, int64_t m, int64_t inter, const float* weights, float limit,
                   float* h, cudaStream_t stream);
cudaError_t ScatterAddRows(const float* out, const int32_t* rows, int64_t m, int64_t dim, float* y,
                           cudaStream_t stream);
// The scatter-adds of rows laid end to end with repeats (a layer's experts, each expert's rows
// distinct), in one launch: y[r] += out[i] for every i with rows[i] == r, in increasing i — the
// same fp32 additions as ScatterAddRows expert by expert. offsets [n + 1] and order [M] list each
// target row's i's (OrderRowsByTarget).
cudaError_t ScatterAddOrdered(const float* out, const int32_t* offsets, const int32_t* order, int64_t n, int64_t dim,
                              float* y, cudaStream_t stream);
// The lists ScatterAddOrdered reads, from rows[i] in [0, n) (checked by the caller).
void OrderRowsByTarget(std::span<const int32_t> rows, int64_t n, std::vector<int32_t>* offsets,
                       std::vector<int32_t>* order);

// An MoE layer's routing on the device (moe_routing.cu; Backend::RoutedMoE): the limits of one
// launch.
constexpr int64_t kMaxRouteExperts = 512;  // a layer's experts (one a thread)
constexpr int64_t kMaxRouteK = 32;         // experts a token goes to
constexpr int64_t kMaxRoutePicks = 2048;   // n * k of one call
// Where a routed layer's arrays lie for RouteAndGroup: each expert's matrices as grouped-GEMV
// groups (templates [3][experts]: w1, w3, w2 with w, ws, wexp, scale_cols, rows and k set), the
// table's groups per matrix (>= min(n * k, experts)), and the pipeline's buffers of n * k rows:
// the quantized tokens (qx, qs: dim wide), w1's and w3's outputs (inter wide), SwiGLU's quantized
// output (qh, qhs) and w2's output (dim wide).
struct ExpertGroupLayout {
  const GemvGroup* templates = nullptr;
  int64_t experts = 0, groups = 0, dim = 0, inter = 0;
  const float *qx = nullptr, *qs = nullptr;
  float *gate = nullptr, *up = nullptr;
  const float *qh = nullptr, *qhs = nullptr;
  float* out = nullptr;
};
// One launch, a block a token: each of n tokens' k picks and weights from its logits [n][l.experts] by
// RouteFromLogits's rules (kernels/moe_routing.h) into ids / weights [n][k] — the same picks and,
// but for a last-bit difference of the score functions (rare) or of softmax's sum (summed in
// another order), the same weights; bias [experts] or null; hash_ids [n][k] or null (a hash
// layer: taken as the picks, each within 0..experts-1 — the caller's check). Then the picks
// grouped by expert: rows / row_weights [n * k] are GroupByExpert's lists end to end (experts in
// id order, each one's rows in row order); offsets [n + 1] and order [n * k] each token's places
// in them in expert order (ScatterAddOrdered's lists); table [3][l.groups] the non-empty experts'
// w1, w3 and w2 groups over their rows of l's buffers, then groups of no tokens — grouped by the
// last block to finish, which `done` (a device counter, 0 before the launch and left 0 after it)
// tells; launches sharing a counter must not overlap (one stream).
cudaError_t RouteAndGroup(const float* logits, int64_t n, int64_t k, RouterScore score, const float* bias,
                          const int32_t* hash_ids, float route_scale, const ExpertGroupLayout& l, int32_t* ids,
                          float* weights, int32_t* rows, float* row_weights, int32_t* offsets, int32_t* order,
                          GemvGroup* table, unsigned* done, cudaStream_t stream);

// Sparse MQA of `batch` query tokens, each with `n` candidate slots: kv [rows, dim] fp32 in
// device memory, idx [batch, n] row numbers (-1 masked), q/out [batch, heads, dim]; dim <= 1024.
cudaError_t SparseAttention(const float* q, int64_t batch, int64_t heads, int64_t dim, const float* kv,
                            const int32_t* idx, int64_t n, const float* sink, float softmax_scale,
                            float* out, cudaStream_t stream);

// Lightning-indexer scores / memory-indexer logits over keys [n, dim] (rows with valid[t] == 0 give
// score 0 for IndexerLogits; IndexScores ignores valid).
cudaError_t IndexScores(const float* q, const float* w, int64_t heads, int64_t dim, const float* keys,
                        int64_t n, float* scores, cudaStream_t stream);
cudaError_t IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim, const float* keys,
                          const uint8_t* valid, int64_t n, float* logits, cudaStream_t stream);
// IndexScores over keys scattered in an array of rows: key t is row key_rows[t] of `keys`, scored
// by query query_of[t] of q [queries, heads, dim] and w [queries, w_stride >= heads] (query_of
// null: query 0).
cudaError_t IndexScoresRows(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                            const float* keys, const int32_t* key_rows, const int32_t* query_of, int64_t n,
                            float* scores, cudaStream_t stream);
// IndexScoresRows' two arrays from runs of consecutive rows (a page's keys): run r's count[r] keys
// are keys start[r], start[r] + 1, ..., rows first[r], first[r] + 1, ... of `keys`, scored by
// query query[r]. One block a run: the host sends a run's 16 bytes instead of its keys' 8 each.
cudaError_t ExpandKeyRuns(const int32_t* first, const int32_t* query, const int32_t* start, const int32_t* count,
                          int64_t runs, int32_t* key_rows, int32_t* query_of, cudaStream_t stream);

// p[0, n) = value.
cudaError_t FillFloats(float* p, int64_t n, float value, cudaStream_t stream);
// y[i] = RoundBf16(x[i]) (y may be x).
cudaError_t RoundBf16(const float* x, int64_t n, float* y, cudaStream_t stream);
// y[i] = RoundBf16(x[i] * scale), the product in fp32 (y may be x): RowOp::ScaleBf16.
cudaError_t ScaleRoundBf16(const float* x, int64_t n, float scale, float* y, cudaStream_t stream);

// Fast mode's IndexScoresRows over the same runs, on the tensor cores (index_scores_mma.cu):
// bf16 operands (q and keys rounded to nearest even; exact for the model's FP4-grid values), fp32
// sums in another order than the CPU's, the CPU's roundings of each head's term and of the score.
// For dim == kIndexScoresMmaDim and 1 to 128 heads (IndexScoresMmaSupports; a warp takes 16).
inline constexpr int64_t kIndexScoresMmaDim = 128;
bool IndexScoresMmaSupports(int64_t heads, int64_t dim);
cudaError_t IndexScoresRunsMma(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                               const float* keys, const int32_t* first, const int32_t* query, const int32_t* start,
                               const int32_t* count, int64_t runs, float* scores, cudaStream_t stream);
// The same over keys held as MXFP4 pages (KeyRun::packed; memtier's form): `pages` holds pages of
// `page_entries` keys, each page every key's 64 code bytes then every key's 4 UE8M0 scale bytes;
// key `first[r] + j` is entry (first[r] + j) % page_entries of page (first[r] + j) / page_entries.
// A key's values are e2m1 codes times a power of two, which bf16 holds exactly: the operands, and
// so the scores, are bit for bit those of IndexScoresRunsMma over the keys' fp32 rows.
inline constexpr int64_t kIndexKeyMxfp4Bytes = kIndexScoresMmaDim / 2 + kIndexScoresMmaDim / 32;  // 68
cudaError_t IndexScoresRunsMmaMxfp4(const float* q, const float* w, int64_t w_stride, int64_t heads, int64_t dim,
                                    const uint8_t* pages,
                                    int64_t page_entries, const int32_t* first, const int32_t* query,
                                    const int32_t* start, const int32_t* count, int64_t runs, float* scores,
                                    cudaStream_t stream);

// mHC for `n` tokens (x [n, hc, dim]); post [n, hc], comb [n, hc, hc], y [n, dim].
cudaError_t HcPre(const float* x, int64_t n, const float* fn, const float* base, const float* scale,
                  int hc, int64_t dim, int iters, float norm_eps, float hc_eps, float* y, float* post,
                  float* comb, cudaStream_t stream);
// Fast mode's HcPre (hc = 4 only): the mixes' sums split over blocks, then combined — another
// summation order than the CPU's, the same weights and y from the mixes. partial: room for
// n * HcPreFastSplits(n, hc, dim) * ((2 + hc) * hc + 1) floats. HcPreFastSplits is 0 for a shape it
// does not take.
int64_t HcPreFastSplits(int64_t n, int hc, int64_t dim);
cudaError_t HcPreFast(const float* x, int64_t n, const float* fn, const float* base, const float* scale, int hc,
                      int64_t dim, int iters, float norm_eps, float hc_eps, float* partial, float* y, float* post,
                      float* comb, cudaStream_t stream);
cudaError_t HcPost(const float* f, const float* residual, const float* post, const float* comb,
                   int64_t n, int hc, int64_t dim, float* out, cudaStream_t stream);
// hc_head for `n` tokens (x [n, hc, dim], y [n, dim]), one block each.
cudaError_t HcHead(const float* x, int64_t n, const float* fn, const float* base, float scale, int hc,
                   int64_t dim, float norm_eps, float hc_eps, float* y, cudaStream_t stream);

// ---- the 584-byte FP8 KV record (spec §4.1), paged: a page of B entries holds B x 576 data bytes
// (448 e4m3 nope + 64 bf16 rope) then B x 8 scale bytes (7 UE8M0 per 64 nope dims + 1 pad).
constexpr int kRecordNope = 448, kRecordRope = 64, kRecordDim = 512;
constexpr int kRecordData = 576, kRecordScales = 8, kRecordBytes = 584;

// Sparse MQA with the sink reading paged FP8 records directly: entry e lives in page e / B at
// slot e % B of `pages` (page stride B * 584 bytes). idx [batch, n] entry numbers (-1 masked);
// q/out [batch, heads, 512] fp32 (bf16 values). Same numerics as SparseAttention on the decoded rows.
cudaError_t PagedSparseAttentionFp8(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                    int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                    float softmax_scale, float* out, cudaStream_t stream);

// The same attention on the tensor cores (16-bit operands, fp32 accumulation; an even
// page_entries): every record is read once for all heads of a token. Heads in whole groups of
// kFastAttentionHeads run on the warpgroup MMA (sm_90a), the slots split over blocks; any other
// count (a tensor-parallel shard's 32, 16 or 8) on the few-heads mma.sync kernel, 16 heads a
// block, a token's slots split over blocks when the tokens alone leave SMs idle, each split
// starting from the reference's running maximum (a scores pass first) so that P rounds to bf16
// as the reference rounds it. Agrees with PagedSparseAttentionFp8 within bf16 rounding.
// `workspace` holds PagedSparseAttentionFp8FastWorkspace(batch, heads, n) bytes of per-split
// partial results (and the few-heads kernel's scores and chunk maxima when it splits).
constexpr int64_t kFastAttentionHeads = 64;  // the warpgroup MMA's M: one token's heads a block
int64_t PagedSparseAttentionFp8FastWorkspace(int64_t batch, int64_t heads, int64_t n);
cudaError_t PagedSparseAttentionFp8Fast(const float* q, int64_t batch, int64_t heads, const uint8_t* pages,
                                        int64_t page_entries, const int32_t* idx, int64_t n, const float* sink,
                                        float softmax_scale, float* out, void* workspace, cudaStream_t stream);

}  // namespace flashmem::kernels::cuda

namespace flashmem::kernels::cuda {

// Page recall host -> GPU in one launch: page i of `count` is copied from src[i] (a device-visible
// pointer into pinned or cudaHostRegister'ed host memory, e.g. memtier's mapped RAM tier) to
// dst + i * page_bytes. Never one cudaMemcpyAsync per small page (~2.7 us each). src is a device
// array of pointers; page_bytes % 16 == 0 and 16-byte aligned pages.
cudaError_t GatherPages(const uint8_t* const* src, int64_t count, int64_t page_bytes, uint8_t* dst,
                        cudaStream_t stream);

// Pages into their slots: page i of `count` (src + i * page_bytes, device memory) to
// dst + slot[i] * page_bytes (the KV reserve). page_bytes % 16 == 0, 16-byte aligned pages.
cudaError_t ScatterPages(const uint8_t* src, int64_t count, int64_t page_bytes, const int32_t* slot, uint8_t* dst,
                         cudaStream_t stream);

// The FP8 record of each of n rows (rows + i * 512: values on the record's grids, as
// worker/kv/page_codec.h's EncodeEntry takes them) into out + i * 584 (576 data bytes, then 8
// scale bytes) and, where to_data is given and to_data[i] >= 0, into dst + to_data[i] (the data)
// and dst + to_scales[i] (the scales): a page's copy in the KV reserve. ok[i] = 1 when every value
// is on its grid (the bytes are EncodeEntry's, bit for bit); else 0, the record's scale bytes are
// 0xff (NaN: no reader takes other numbers from it) and the row is copied to bad_rows + i * 512.
cudaError_t EncodeFp8Records(const float* rows, int64_t n, uint8_t* out, int32_t* ok, float* bad_rows,
                             const int64_t* to_data, const int64_t* to_scales, uint8_t* dst, cudaStream_t stream);

// Backend::PoolSteps on the device: step i's rows (kv + i * in_stride and score + i * in_stride,
// `width` values each) into its ring (rings[i], device memory: slots x width kv values, then as
// many scores) with ape added to the scores, and copied to written + i * 2 * width (the kv row,
// then the scores as written: the host ring's update); a step with pooled_row[i] >= 0 pools its
// block into pooled + pooled_row[i] * head_dim and (overlap) moves it to the previous block's
// rows. The host's arithmetic (kernels/pooling.cc) step for step, so the same bits.
struct PoolStepsArgs {
  int64_t steps = 0;
  int ratio = 0;
  int64_t head_dim = 0;
  bool overlap = false;
  float* const* rings = nullptr;
  const int64_t* pos = nullptr;
  const int32_t* pooled_row = nullptr;
  const float* kv = nullptr;
  const float* score = nullptr;
  int64_t in_stride = 0;
  const float* ape = nullptr;  // [ratio][width]
  float* pooled = nullptr;
  float* written = nullptr;
};
cudaError_t PoolSteps(const PoolStepsArgs& a, cudaStream_t stream);

// Byte ranges into place: piece i, bytes[i] long (a multiple of 4), from src + from[i] to
// dst + to[i] (device memory; both offsets multiples of 4) — the KV reserve's patches, one entry of
// a page each.
cudaError_t ScatterPieces(const uint8_t* src, int64_t count, const int64_t* from, const int64_t* to,
                          const int32_t* bytes, uint8_t* dst, cudaStream_t stream);

// Top-k of `rows` rows of n scores each: out[r][0..k) = the indices of row r's k largest scores,
// descending, equal scores in ascending index order (kernels/topk.h's rule, bit for bit; -0 and
// +0 equal; no NaN). A radix select of the k-th score, then a sort of the k winners in one block
// per row — never a sort of all n. 1 <= k <= min(n, kTopKMaxK); INVALID_VALUE otherwise.
inline constexpr int64_t kTopKMaxK = 2048;
cudaError_t TopK(const float* scores, int64_t rows, int64_t n, int64_t k, int32_t* out, cudaStream_t stream);

// Greedy decoding's pick of each of `rows` rows of n values: out[r] = the first index of row r's
// largest value, NaN skipped, 0 when all are NaN (kernels/topk.h's ArgmaxIndex). One block a row.
cudaError_t ArgmaxRows(const float* values, int64_t rows, int64_t n, int32_t* out, cudaStream_t stream);



// The output type of LinearFp8Lt: bf16 as cuBLASLt rounds it, or fp32 (rounded by the caller: the
// backend rounds to nearest even like the CPU reference).
enum class LtOutput { kBf16, kF32 };

// cuBLASLt state for the block-scaled FP8 GEMMs: handle, workspace, one cached plan per shape.
class LtContext {
 public:
  LtContext();
  ~LtContext();
  LtContext(const LtContext&) = delete;
  LtContext& operator=(const LtContext&) = delete;
  cudaError_t Init();  // first use creates the handle and the 32 MiB workspace
  std::string last_error() const;  // why the last LinearFp8Lt was refused ("" when it was not)
  struct Impl;

 private:
  friend cudaError_t LinearFp8Lt(LtContext&, const DeviceWeight&, const float*, const uint8_t*, const float*,
                                 int64_t, void*, LtOutput, cudaStream_t);
  friend cudaError_t LinearBf16Lt(LtContext&, const DeviceWeight&, const __nv_bfloat16*, int64_t, float*, cudaStream_t,
                                  int64_t, int64_t);
  Impl* impl_;
};

// "" when libcublasLt (loaded on first use, not linked) and every entry point it needs are there;
// otherwise why not.
std::string CublasLtLoadError();

// A FP8 weight's 128x128 block scales in cuBLASLt's BLK128x128 layout (K blocks inner, padded to 4).
std::vector<float> BlockScalesForLt(const WeightMatrix& w);

// act_quant into cuBLASLt's operand form: e4m3 codes [ld tokens][k] (tokens >= n are zeros) and
// VEC128 scales [k/128][ld]; ld = n rounded up to 4 (cuBLASLt needs a multiple of 4 tokens).
cudaError_t QuantizeActivationsFp8(const float* x, int64_t n, int64_t k, uint8_t* codes, float* scales_t,
                                   int64_t ld, cudaStream_t stream);

// y [tokens][rows] (bf16 or fp32, `out`) = x · Wᵀ on the tensor cores with DeepSeek's block scaling
// (FP8 weights, tokens % 4 == 0). cudaErrorNotSupported when cuBLASLt has no algorithm for the shape.
cudaError_t LinearFp8Lt(LtContext& ctx, const DeviceWeight& w, const float* lt_scales, const uint8_t* codes,
                        const float* scales_t, int64_t tokens, void* y, LtOutput out, cudaStream_t stream);
cudaError_t Bf16ToF32(const __nv_bfloat16* in, int64_t count, float* out, cudaStream_t stream);

// Fast mode's dense Linear (the head, wo_a's groups): y [tokens][rows] fp32 = x · Wᵀ on the
// tensor cores, bf16 operands (weights whose values are all bf16, dense_bf16), fp32 accumulation
// and output; tokens % 4 == 0 (x padded by F32ToBf16Rows). Not bit-identical to the exact fp32
// dot products (different summation order). cudaErrorNotSupported when cuBLASLt has no algorithm.
// ldx / ldy: the elements from one token's x / y row to the next (0: w.cols / w.rows), for a
// weight reading some columns of x and writing some of y (LinearGroups); operands 256-byte aligned.
cudaError_t LinearBf16Lt(LtContext& ctx, const DeviceWeight& w, const __nv_bfloat16* x, int64_t tokens, float* y,
                         cudaStream_t stream, int64_t ldx = 0, int64_t ldy = 0);
// A FP8 weight dequantized to bf16 bits (values x block scale; exact), [rows][cols].
std::vector<uint16_t> DequantizeFp8ToBf16(const WeightMatrix& w);
// act_quant then dequantize into bf16: out[t][i] = xq[t][i] * xs[t][i / 128] (exact in bf16), rows
// n..ld-1 zero. With DequantizeFp8ToBf16 weights, a bf16 GEMM with fp32 accumulation computes the
// reference's block-scaled FP8 product up to fp32 summation order.
cudaError_t QuantizeActivationsBf16(const float* x, int64_t n, int64_t k, int64_t ld, __nv_bfloat16* out,
                                    cudaStream_t stream);
// x [n][k] fp32 -> [ld][k] bf16, rows n..ld-1 zero.
cudaError_t F32ToBf16Rows(const float* x, int64_t n, int64_t k, int64_t ld, __nv_bfloat16* out, cudaStream_t stream);
// In place y = bf16(y) (a Linear's Rounding::kBf16 after an fp32-output GEMM).
cudaError_t RoundToBf16(float* y, int64_t count, cudaStream_t stream);

}  // namespace flashmem::kernels::cuda
