// How a KV page travels to memtier and back (spec §4.1). In the worker a page is 64 entries of
// fp32 values, but every value already sits on a coarser grid — the model's own round trips put
// it there — so a page moves in the compact form those grids allow, with no loss:
//   - main KV (CSA and HCA compressed entries): FlashMLA's FP8 sparse record, 584 B an entry at
//     head_dim 512 — the nope dims as e4m3 codes with one UE8M0 scale per 64 dims (the model's
//     Fp8RoundTrip blocks), the rope dims as bf16; in a page all 64 entries' data (nope codes, then
//     rope bf16) come first, then all 64 entries' scale bytes (7 + 1 pad at 512 dims). A CSA page
//     is 37,376 B, the layout the CUDA paged attention kernel reads.
//   - indexer keys: MXFP4 — e2m1 codes (two a byte, the lower dim in the low nibble) with one
//     UE8M0 scale per 32 dims (the model's Hadamard + Fp4RoundTrip blocks), 68 B an entry at 128
//     dims; data of the 64 entries first, then their scales. A page is 4,352 B.
// Against bf16 pages (1,024 B / 256 B an entry) that is 1.75x / 3.8x less memtier RAM, disk and
// recall traffic. Encoding checks that every value comes back bit for bit (the sign of zero
// included) and refuses a page that would not: nothing is stored that reads back different.
// Decoding also takes pages of the earlier bf16 form, so sessions committed by an older worker
// still restore.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace flashmem::kv {

struct PageFormat {
  enum class Kind { kFp8Record, kMxfp4 };
  Kind kind = Kind::kFp8Record;
  int64_t dim = 0;        // values an entry
  int64_t rope_dims = 0;  // kFp8Record: the last rope_dims values are bf16
  int64_t entries = 64;   // entries a page

  // Main-KV entries of `dim` values whose last `rope_dims` are rotary (bf16).
  static PageFormat MainKv(int64_t dim, int64_t rope_dims);
  // Indexer keys of `dim` values (128 in the released models; a last block may be partial).
  static PageFormat IndexKeys(int64_t dim);

  static constexpr int64_t kFp8ScaleBlock = 64;  // nope dims a UE8M0 scale covers (the model's Fp8RoundTrip block)
  static constexpr int64_t kFp4ScaleBlock = 32;  // index dims a UE8M0 scale covers (the model's Fp4RoundTrip block)

  int64_t nope_dims() const { return kind == Kind::kFp8Record ? dim - rope_dims : 0; }
  // 576 (main, 512 dims) / 64 (index, 128 dims). Inline: a decode step asks it for every slot.
  int64_t data_bytes_per_entry() const { return kind == Kind::kFp8Record ? nope_dims() + 2 * rope_dims : (dim + 1) / 2; }
  // 8 (7 scales + 1 pad) / 4
  int64_t scale_bytes_per_entry() const {
    if (kind == Kind::kMxfp4) return (dim + kFp4ScaleBlock - 1) / kFp4ScaleBlock;
    return ((nope_dims() + kFp8ScaleBlock - 1) / kFp8ScaleBlock + 7) / 8 * 8;  // 7 scales + 1 pad at 448 nope dims
  }
  int64_t entry_bytes() const { return data_bytes_per_entry() + scale_bytes_per_entry(); }
  int64_t page_bytes() const { return entries * entry_bytes(); }
  // Where entry e's data and scale bytes sit in a page.
  int64_t entry_data_offset(int64_t e) const { return e * data_bytes_per_entry(); }
  int64_t entry_scales_offset(int64_t e) const { return entries * data_bytes_per_entry() + e * scale_bytes_per_entry(); }
  int64_t page_floats() const { return entries * dim; }
  // The earlier form: every value as bf16.
  int64_t bf16_page_bytes() const { return page_floats() * 2; }
};

// One entry's `dim` values -> its data and scale bytes. -1, or the first dim that is off the
// format's grid (or not finite); the bytes are then unspecified.
int64_t EncodeEntry(const PageFormat& format, const float* values, uint8_t* data, uint8_t* scales);
// Whether an entry's scale bytes are all numbers (UE8M0 0xff is NaN).
bool ScalesValid(const PageFormat& format, const uint8_t* scales);
// An entry's bytes -> its `dim` values; false for a NaN scale byte.
bool DecodeEntry(const PageFormat& format, const uint8_t* data, const uint8_t* scales, float* values);

// `values` (page_floats()) -> out (page_bytes()). INVALID_ARGUMENT naming the entry and dim when
// a value is not on the format's grid (or not finite), or when the sizes do not match.
absl::Status EncodePage(const PageFormat& format, std::span<const float> values, std::vector<uint8_t>* out);

// page_bytes() bytes (or bf16_page_bytes(), the earlier form) -> page_floats() values. DATA_LOSS
// for any other length or a NaN scale byte.
absl::Status DecodePage(const PageFormat& format, std::span<const uint8_t> bytes, std::vector<float>* out);

}  // namespace flashmem::kv
