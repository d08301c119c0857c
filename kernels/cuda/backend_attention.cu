// CudaBackendImpl: sparse attention (rows, FP8 records, the KV reserve), index scores and top-k.
#include "kernels/cuda/backend_impl.h"

namespace flashmem::kernels::cuda::internal {

void CudaBackendImpl::SparseAttention(const float* q, int64_t heads, int64_t dim, std::span<const float* const> kv_rows,
                                      const float* sink, float softmax_scale, float* out) const {
  const int64_t n = static_cast<int64_t>(kv_rows.size());
  // Gather the candidate rows into one contiguous upload; null rows stay masked (-1).
  std::vector<int32_t> idx(n, -1);
  int64_t valid = 0;
  for (int64_t j = 0; j < n; ++j)
    if (kv_rows[j]) idx[j] = static_cast<int32_t>(valid++);
  Frame f;
  const size_t dq = f.In(q, heads * dim * 4), di = f.In(idx.data(), n * 4), dsink = f.In(sink, heads * 4);
  const size_t dkv = f.Scratch(valid * dim * 4), dout = f.Scratch(heads * dim * 4);
  f.Download(dout, out, heads * dim * 4);
  Launch(
      f,
      [&](Dev d) {
        return cuda::SparseAttention(d.at(dq), 1, heads, dim, d.at(dkv), d.at<int32_t>(di), n, d.at(dsink),
                                     softmax_scale, d.at(dout), stream_);
      },
      [&](char* host_scratch) {  // rows go straight into the pinned buffer
        GatherRows(kv_rows, dim, idx.data(), reinterpret_cast<float*>(host_scratch + f.Resolve(dkv) - f.in_bytes()),
                   /*zero_null=*/false);
      },
      valid * dim * 4);
}

void CudaBackendImpl::SparseAttentionRecords(const float* q, int64_t heads, int64_t dim, int64_t rope_dims,
                                             std::span<const KvSlot> slots, const float* sink, float softmax_scale,
                                             float* out) const {
  const AttentionRow row{q, slots, out};
  SparseAttentionRows(std::span<const AttentionRow>(&row, 1), heads, dim, rope_dims, sink, softmax_scale);
}

void CudaBackendImpl::SparseAttentionRows(std::span<const AttentionRow> rows, int64_t heads, int64_t dim,
                                          int64_t rope_dims, const float* sink, float softmax_scale) const {
  const bool records = dim == cuda::kRecordDim && rope_dims == cuda::kRecordRope &&
                       std::none_of(rows.begin(), rows.end(), [](const AttentionRow& r) {
                         return std::any_of(r.slots.begin(), r.slots.end(), [](const KvSlot& s) { return s.row != nullptr; });
                       });
  if (!records) {  // the decoding default, row by row (not Backend::SparseAttentionRows: it calls back here)
    FinishWrites();  // it decodes the records on the host
    for (const AttentionRow& r : rows) {
      Backend::SparseAttentionRecords(r.q, heads, dim, rope_dims, r.slots, sink, softmax_scale, r.out);
      ApplyRowOps(*this, r.out, heads * dim, r.then);
    }
    return;
  }
  const int64_t b = static_cast<int64_t>(rows.size());
  if (b == 0) return;
  if (!fused_ && std::any_of(rows.begin(), rows.end(), [](const AttentionRow& r) { return !r.then.empty(); })) {
    std::vector<AttentionRow> plain(rows.begin(), rows.end());
    for (AttentionRow& r : plain) r.then = {};
    SparseAttentionRows(plain, heads, dim, rope_dims, sink, softmax_scale);
    for (const AttentionRow& r : rows) ApplyRowOps(*this, r.out, heads * dim, r.then);
    return;
  }
  if (AttendFromReserve(rows, heads, sink, softmax_scale)) return;
  FinishWrites();  // the records are staged from the host pages
  int64_t n = 1;  // a row with no slots attends the sink alone, as one with only masked slots
  for (const AttentionRow& r : rows) n = std::max<int64_t>(n, static_cast<int64_t>(r.slots.size()));
  std::vector<int32_t> idx(b * n, -1);
  std::vector<const uint8_t*> data(b * n, nullptr), scales(b * n, nullptr);  // the records, as idx
  int64_t valid = 0;
  for (int64_t i = 0; i < b; ++i)
    for (size_t j = 0; j < rows[i].slots.size(); ++j)
      if (const KvSlot& s = rows[i].slots[j]; s.record) {
        const int64_t at = i * n + static_cast<int64_t>(j);
        idx[at] = static_cast<int32_t>(valid++);
        data[at] = s.record;
        scales[at] = s.scales;
      }
  // One page of them; the tensor-core kernel reads the page in 16-byte pieces (an even count).
  const int64_t entries = std::max<int64_t>((valid + 1) / 2 * 2, 2);
  Frame f;
  AttentionArrays a = AttentionInputs(f, rows, heads, idx, sink);
  const size_t dpage = f.Scratch(entries * cuda::kRecordBytes);
  AttentionOutputs(f, rows, heads, n, &a);
  auto ops = StageAttentionRowOps(f, rows, heads);
  if (!ops.ok()) {
    absl::MutexLock lock(&mu_);
    return Fail(ops.status());
  }
  Launch(
      f,
      [&](Dev d) {
        const cudaError_t e = AttentionKernel(d, a, b, heads, d.at<uint8_t>(dpage), entries, n, softmax_scale);
        return e != cudaSuccess ? e : EnqueueAttentionRowOps(d, a, rows, heads, *ops);
      },
      [&](char* host_scratch) {  // records straight into the pinned buffer (over the host's cores)
        GatherRecords(data, scales, idx.data(), entries,
                      reinterpret_cast<uint8_t*>(host_scratch + f.Resolve(dpage) - f.in_bytes()));
      },
      entries * cuda::kRecordBytes);
}

void CudaBackendImpl::IndexScores(const float* q, const float* w, int64_t heads, int64_t dim,
                                  std::span<const float* const> keys, float* scores) const {
  KeyScoring(q, w, heads, dim, keys, scores, /*logits=*/false);
}

KvReserveStats CudaBackendImpl::ReserveStats() const {
  absl::MutexLock lock(&mu_);
  auto kind = [](const DeviceReserve& r) {
    KvReserveStats::Kind k;
    if (!r.dev) return k;
    k.slots = r.book.slots();
    k.held = r.book.used();
    k.hits = r.book.hits();
    k.uploads = r.book.uploaded();
    k.patches = r.book.patched();
    k.written = r.book.written();
    k.bytes = r.book.slots() * r.book.page_bytes();
    return k;
  };
  return {kind(records_), kind(keys_)};
}

std::vector<std::vector<int32_t>> CudaBackendImpl::IndexTopKBatch(std::span<const IndexSelectRow> rows, int64_t heads,
                                                                  int64_t dim, int64_t k) const {
  const int64_t b = static_cast<int64_t>(rows.size());
  int64_t length = 0, shortest = INT64_MAX;
  for (int64_t i = 0; i < b; ++i) {
    const IndexSelectRow& r = rows[i];
    length = std::max(length, r.length);
    shortest = std::min(shortest, r.length);
    bool inside = r.at.size() == r.keys.size();
    for (size_t j = 0; inside && j < r.keys.size(); ++j)
      inside = r.at[j] >= 0 && r.keys[j].count >= 0 && r.at[j] + r.keys[j].count <= r.length;
    if (!inside) {  // the kernel would write outside the row's list
      absl::MutexLock lock(&mu_);
      Fail(absl::InvalidArgumentError(absl::StrCat("IndexTopKBatch: rows[", i, "]: ", r.at.size(), " run starts for ",
                                                   r.keys.size(), " runs, or a run outside its list of ", r.length)));
      return std::vector<std::vector<int32_t>>(b);
    }
  }
  const bool fused = IndexScoresOnTensorCores(heads, dim) && b > 0 && k >= 1 &&
                     k <= cuda::kTopKMaxK && shortest >= k && b * length <= INT32_MAX;
  if (fused) {
    std::vector<IndexScoreRow> score_rows(b);
    for (int64_t i = 0; i < b; ++i) score_rows[i] = {rows[i].q, rows[i].w, rows[i].keys, nullptr};
    std::vector<int32_t> picked;
    const ListSelect select{rows, length, k, &picked};
    if (ScoreFromReserve(score_rows, heads, dim, &select)) {
      std::vector<std::vector<int32_t>> out(b);
      if (picked.size() != static_cast<size_t>(b * k)) return out;  // a failed backend did nothing
      for (int64_t i = 0; i < b; ++i) out[i].assign(picked.begin() + i * k, picked.begin() + (i + 1) * k);
      return out;
    }
  }
  return Backend::IndexTopKBatch(rows, heads, dim, k);
}

std::vector<std::vector<int32_t>> CudaBackendImpl::TopKBatch(std::span<const std::span<const float>> scores,
                                                             int64_t k) const {
  const int64_t b = static_cast<int64_t>(scores.size());
  int64_t n_max = 0, n_min = INT64_MAX;
  for (std::span<const float> s : scores) {
    n_max = std::max<int64_t>(n_max, static_cast<int64_t>(s.size()));
    n_min = std::min<int64_t>(n_min, static_cast<int64_t>(s.size()));
  }
  if (b < 2 || k < 1 || k > cuda::kTopKMaxK || n_min < k || b * n_max < kTopKMinKeys)
    return Backend::TopKBatch(scores, k);
  std::vector<float> padded(b * n_max, -std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < b; ++i) std::copy(scores[i].begin(), scores[i].end(), padded.begin() + i * n_max);
  std::vector<int32_t> flat(b * k);
  Frame f;
  const size_t ds = f.In(padded.data(), padded.size() * 4), dout = f.Scratch(b * k * 4);
  f.Download(dout, flat.data(), b * k * 4);
  Launch(f, [&](Dev d) { return cuda::TopK(d.at(ds), b, n_max, k, d.at<int32_t>(dout), stream_); });
  std::vector<std::vector<int32_t>> out(b);
  for (int64_t i = 0; i < b; ++i) out[i].assign(flat.begin() + i * k, flat.begin() + (i + 1) * k);
  return out;
}

std::vector<int32_t> CudaBackendImpl::TopK(std::span<const float> scores, int64_t k) const {
  const int64_t n = static_cast<int64_t>(scores.size());
  k = std::clamp<int64_t>(k, 0, n);
  if (n < kTopKMinKeys || k == 0 || k > cuda::kTopKMaxK) return TopKIndices(scores, k);
  std::vector<int32_t> out(k);
  Frame f;
  const size_t ds = f.In(scores.data(), n * 4), dout = f.Scratch(k * 4);
  f.Download(dout, out.data(), k * 4);
  Launch(f, [&](Dev d) { return cuda::TopK(d.at(ds), 1, n, k, d.at<int32_t>(dout), stream_); });
  return out;
}

void CudaBackendImpl::IndexerLogits(const float* q, const float* w, int64_t heads, int64_t dim,
                                    std::span<const float* const> keys, float* logits) const {
  KeyScoring(q, w, heads, dim, keys, logits, /*logits=*/true);
}

bool CudaBackendImpl::ReserveLocked(DeviceReserve& r, int64_t page_bytes, int64_t page_entries) const {
  if (r.dev) return r.book.page_bytes() == page_bytes;
  if (r.tried) return false;
  r.tried = true;
  const int64_t bytes = std::min(kv_reserve_bytes_ / 2, budget_ - used_);
  // Entry numbers are int32 in the kernels.
  const int64_t slots = std::min<int64_t>(bytes / page_bytes, INT32_MAX / page_entries);
  if (slots < 2) return false;
  if (cudaMalloc(&r.dev, static_cast<size_t>(slots * page_bytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: the op stages instead
    r.dev = nullptr;
    return false;
  }
  used_ += slots * page_bytes;
  r.book = KvReserve(slots, page_bytes);
  return true;
}

auto CudaBackendImpl::StageUploads(const DeviceReserve& r, Frame& f) -> Uploads {
  Uploads u;
  const int64_t page_bytes = r.book.page_bytes();
  for (const KvReserve::Upload& p : r.book.uploads()) {
    u.src.push_back(p.bytes);
    u.slot.push_back(static_cast<int32_t>(p.slot));
  }
  const int64_t pages_end = static_cast<int64_t>(u.src.size()) * page_bytes;
  for (const KvReserve::Patch& p : r.book.patches()) {
    u.patch_src.push_back(p.bytes);
    u.patch_from.push_back(pages_end + u.patch_area);
    u.patch_to.push_back(p.slot * page_bytes + p.offset);
    u.patch_bytes.push_back(static_cast<int32_t>(p.size));
    u.patch_area += (p.size + 15) / 16 * 16;
  }
  u.dslot = f.In(u.slot.data(), u.slot.size() * 4);
  u.dfrom = f.In(u.patch_from.data(), u.patch_from.size() * 8);
  u.dto = f.In(u.patch_to.data(), u.patch_to.size() * 8);
  u.dbytes = f.In(u.patch_bytes.data(), u.patch_bytes.size() * 4);
  u.dup = f.Scratch(static_cast<size_t>(u.staged_bytes(page_bytes)));
  return u;
}

absl::Status CudaBackendImpl::RunWithUploadsLocked(DeviceReserve& r, const Frame& f, const Uploads& u,
                                                   const LaunchFn& op) const {
  const int64_t page_bytes = r.book.page_bytes(), ups = static_cast<int64_t>(u.src.size());
  const int64_t patches = static_cast<int64_t>(u.patch_bytes.size());
  phase_op_ = &op.target_type();  // FLASHMEM_CUDA_PHASES: named after the op, not this wrapper
  const absl::Status st = RunLocked(
      f,
      [&](Dev d) {
        cudaError_t e =
            cuda::ScatterPages(d.at<uint8_t>(u.dup), ups, page_bytes, d.at<int32_t>(u.dslot), r.dev, stream_);
        if (e == cudaSuccess)
          e = cuda::ScatterPieces(d.at<uint8_t>(u.dup), patches, d.at<int64_t>(u.dfrom), d.at<int64_t>(u.dto),
                                  d.at<int32_t>(u.dbytes), r.dev, stream_);
        return e != cudaSuccess ? e : op(d);
      },
      [&](char* host_scratch) {
        uint8_t* staged = reinterpret_cast<uint8_t*>(host_scratch + f.Resolve(u.dup) - f.in_bytes());
        GatherPagesHost(u.src, page_bytes, staged);
        std::vector<HostCopy> copies(patches);
        for (int64_t i = 0; i < patches; ++i)
          copies[i] = {staged + u.patch_from[i], u.patch_src[i], static_cast<size_t>(u.patch_bytes[i])};
        CopyAll(copies);
      },
      u.staged_bytes(page_bytes));
  if (!st.ok()) r.book.Abort();
  return st;
}

bool CudaBackendImpl::ReservablePage(const KvPage* page, int64_t entry, int64_t count, int64_t entry_bytes,
                                     int64_t* page_entries) {
  if (!page || !page->bytes || entry < 0 || count < 0 || entry + count > page->entries) return false;
  if (*page_entries == 0) *page_entries = page->entries;
  return page->entries == *page_entries && page->size == *page_entries * entry_bytes;
}

auto CudaBackendImpl::AttentionInputs(Frame& f, std::span<const AttentionRow> rows, int64_t heads,
                                      const std::vector<int32_t>& idx, const float* sink) -> AttentionArrays {
  const int64_t row_bytes = heads * cuda::kRecordDim * 4;
  static_assert(cuda::kRecordDim * 4 % kAlign == 0, "q rows of one frame lie end to end");
  AttentionArrays a;
  a.dq = f.In(rows[0].q, row_bytes);
  for (size_t i = 1; i < rows.size(); ++i) f.InContinued(rows[i].q, row_bytes);
  a.di = f.In(idx.data(), idx.size() * 4);
  a.dsink = f.In(sink, heads * 4);
  return a;
}

void CudaBackendImpl::AttentionOutputs(Frame& f, std::span<const AttentionRow> rows, int64_t heads, int64_t n,
                                       AttentionArrays* a) const {
  const int64_t b = static_cast<int64_t>(rows.size()), row_bytes = heads * cuda::kRecordDim * 4;
  a->dout = f.Scratch(b * row_bytes);
  if (TensorCoreAttention(heads)) a->dws = f.Scratch(cuda::PagedSparseAttentionFp8FastWorkspace(b, heads, n));
  for (int64_t i = 0; i < b; ++i) f.Download(a->dout + i * row_bytes, rows[i].out, row_bytes);
}

cudaError_t CudaBackendImpl::AttentionKernel(Dev d, const AttentionArrays& a, int64_t b, int64_t heads,
                                             const uint8_t* pages, int64_t page_entries, int64_t n,
                                             float softmax_scale) const {
  if (TensorCoreAttention(heads))
    return cuda::PagedSparseAttentionFp8Fast(d.at(a.dq), b, heads, pages, page_entries, d.at<int32_t>(a.di), n,
                                             d.at(a.dsink), softmax_scale, d.at(a.dout), d.at<void>(a.dws), stream_);
  return cuda::PagedSparseAttentionFp8(d.at(a.dq), b, heads, pages, page_entries, d.at<int32_t>(a.di), n,
                                       d.at(a.dsink), softmax_scale, d.at(a.dout), stream_);
}

bool CudaBackendImpl::AttendFromReserve(std::span<const AttentionRow> rows, int64_t heads, const float* sink,
                                        float softmax_scale) const {
  int64_t page_entries = 0;
  const int64_t b = static_cast<int64_t>(rows.size());
  int64_t n = 1;
  for (const AttentionRow& r : rows) {
    n = std::max<int64_t>(n, static_cast<int64_t>(r.slots.size()));
    for (const KvSlot& s : r.slots)
      if (s.record && !ReservablePage(s.page, s.entry, 1, cuda::kRecordBytes, &page_entries)) return false;
  }
  if (page_entries == 0) return false;  // nothing but masked slots: the staging path is as cheap
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return true;  // a failed backend does nothing (as Launch)
  if (!ReserveLocked(records_, page_entries * cuda::kRecordBytes, page_entries)) return false;
  op_clock_ = clock_ + 1;
  std::vector<int32_t> idx(b * n, -1);
  records_.book.Begin();
  for (int64_t i = 0; i < b; ++i) {
    const KvPage* last = nullptr;  // the window's slots come a page at a time: placed once
    int64_t slot = -1;
    for (size_t j = 0; j < rows[i].slots.size(); ++j) {
      const KvSlot& s = rows[i].slots[j];
      if (!s.record) continue;
      if (s.page != last) {
        slot = records_.book.Place(*s.page);
        if (slot < 0) {
          records_.book.Abort();
          return false;
        }
        last = s.page;
      }
      idx[i * n + static_cast<int64_t>(j)] = static_cast<int32_t>(slot * page_entries + s.entry);
    }
  }
  if (UploadsReadPendingLocked(records_)) {  // a page with a record on its way to the host
    if (absl::Status st = FlushWritesLocked(); !st.ok()) {
      records_.book.Abort();
      Fail(st);
      return true;
    }
  }
  Frame f;
  AttentionArrays a = AttentionInputs(f, rows, heads, idx, sink);
  const Uploads up = StageUploads(records_, f);
  AttentionOutputs(f, rows, heads, n, &a);
  auto ops = StageAttentionRowOps(f, rows, heads);
  if (!ops.ok()) {
    records_.book.Abort();
    Fail(ops.status());
    return true;
  }
  Fail(RunWithUploadsLocked(records_, f, up, [&](Dev d) {
    const cudaError_t e = AttentionKernel(d, a, b, heads, records_.dev, page_entries, n, softmax_scale);
    return e != cudaSuccess ? e : EnqueueAttentionRowOps(d, a, rows, heads, *ops);
  }));
  return true;
}

bool CudaBackendImpl::ScoreFromReserve(std::span<const IndexScoreRow> rows, int64_t heads, int64_t dim,
                                       const ListSelect* select) const {
  // Fast mode reads the keys' MXFP4 twins when every run has one (68 bytes a key against 512:
  // the reserve holds 7.5x the keys and the kernel reads 7.5x fewer bytes, for the same scores).
  const bool mma = IndexScoresOnTensorCores(heads, dim);
  bool packed = mma && packed_keys_;
  int64_t n = 0, page_entries = 0, packed_entries = 0;
  for (const IndexScoreRow& r : rows)
    for (const KeyRun& run : r.keys) {
      if (!run.rows || !ReservablePage(run.page, run.entry, run.count, dim * 4, &page_entries)) return false;
      packed = packed && ReservablePage(run.packed, run.entry, run.count, cuda::kIndexKeyMxfp4Bytes, &packed_entries);
      n += run.count;
    }
  if (n == 0) return false;
  if (packed) page_entries = packed_entries;
  const int64_t key_bytes = packed ? cuda::kIndexKeyMxfp4Bytes : dim * 4;
  if (packed && page_entries % 4 != 0) return false;  // the kernel's 16-byte loads
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return true;
  // One form a reserve: a call in the other form (a stream whose twin was dropped) is staged.
  if (!ReserveLocked(keys_, page_entries * key_bytes, page_entries)) return false;
  op_clock_ = clock_ + 1;
  std::vector<int32_t> first, query, start, count;  // per run
  keys_.book.Begin();
  int64_t k = 0;
  for (size_t i = 0; i < rows.size(); ++i)
    for (const KeyRun& run : rows[i].keys) {
      if (run.count == 0) continue;
      const int64_t slot = keys_.book.Place(packed ? *run.packed : *run.page);
      if (slot < 0) {
        keys_.book.Abort();
        return false;
      }
      first.push_back(static_cast<int32_t>(slot * page_entries + run.entry));
      query.push_back(static_cast<int32_t>(i));
      const int64_t r = static_cast<int64_t>(&run - rows[i].keys.data());
      start.push_back(static_cast<int32_t>(select ? i * select->length + select->rows[i].at[r] : k));
      count.push_back(static_cast<int32_t>(run.count));
      k += run.count;
    }
  const int64_t runs = static_cast<int64_t>(first.size());
  // The rows' queries [rows][heads * dim] go up as they are (slices of one activation buffer: one
  // transfer) when a row fills whole alignment units; else gathered here first.
  const size_t q_bytes = static_cast<size_t>(heads * dim) * 4;
  const bool q_in_place = q_bytes % kAlign == 0;
  std::vector<float> q(q_in_place ? 0 : rows.size() * heads * dim);
  for (size_t i = 0; !q_in_place && i < rows.size(); ++i) std::copy_n(rows[i].q, heads * dim, q.begin() + i * heads * dim);
  Frame f;
  size_t dq = 0;
  if (q_in_place)
    for (size_t i = 0; i < rows.size(); ++i) {
      const size_t off = i == 0 ? f.In(rows[i].q, q_bytes) : f.InContinued(rows[i].q, q_bytes);
      if (i == 0) dq = off;
    }
  else
    dq = f.In(q.data(), q.size() * 4);
  // The rows' head weights: each row an input (rows held on the device come from there, never
  // through the host), `w_stride` floats apart as the frame lays them out; read in place when
  // the held rows lie so.
  const size_t w_bytes = static_cast<size_t>(heads) * 4;
  const int64_t w_stride = static_cast<int64_t>(AlignUp(w_bytes) / 4);
  size_t dw = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const size_t off = i == 0 ? f.In(rows[i].w, w_bytes) : f.InContinued(rows[i].w, w_bytes);
    if (i == 0) dw = off;
  }
  const size_t dfirst = f.In(first.data(), runs * 4), dquery = f.In(query.data(), runs * 4),
               dstart = f.In(start.data(), runs * 4), dcount = f.In(count.data(), runs * 4);
  const Uploads up = StageUploads(keys_, f);
  // Fast mode: the tensor cores straight over the runs; exact: per-key arrays for the CPU-order kernel.
  const int64_t b = static_cast<int64_t>(rows.size()), outs = select ? b * select->length : n;
  const size_t dout = f.Scratch(outs * 4), dr = mma ? 0 : f.Scratch(n * 4), dqo = mma ? 0 : f.Scratch(n * 4);
  size_t dpicked = 0;
  if (select) {
    dpicked = f.Scratch(b * select->k * 4);
    select->picked->resize(b * select->k);
    f.Download(dpicked, select->picked->data(), b * select->k * 4);
    for (int64_t i = 0; i < b; ++i)
      if (select->rows[i].list)
        f.Download(dout + i * select->length * 4, select->rows[i].list, select->rows[i].length * 4);
  } else {
    int64_t at = 0;
    for (const IndexScoreRow& r : rows) {
      int64_t row_keys = 0;
      for (const KeyRun& run : r.keys) row_keys += run.count;
      if (row_keys > 0) f.Download(dout + at * 4, r.scores, row_keys * 4);
      at += row_keys;
    }
  }
  const float* base = reinterpret_cast<const float*>(keys_.dev);
  auto scores_mma = [&](Dev d, float* out) {
    if (packed)
      return cuda::IndexScoresRunsMmaMxfp4(d.at(dq), d.at(dw), w_stride, heads, dim, keys_.dev, page_entries,
                                           d.at<int32_t>(dfirst), d.at<int32_t>(dquery), d.at<int32_t>(dstart),
                                           d.at<int32_t>(dcount), runs, out, stream_);
    return cuda::IndexScoresRunsMma(d.at(dq), d.at(dw), w_stride, heads, dim, base, d.at<int32_t>(dfirst), d.at<int32_t>(dquery),
                                    d.at<int32_t>(dstart), d.at<int32_t>(dcount), runs, out, stream_);
  };
  Fail(RunWithUploadsLocked(keys_, f, up, [&](Dev d) {
    if (select) {
      cudaError_t e = cuda::FillFloats(d.at(dout), outs, -std::numeric_limits<float>::infinity(), stream_);
      if (e == cudaSuccess) e = scores_mma(d, d.at(dout));
      return e != cudaSuccess ? e
                              : cuda::TopK(d.at(dout), b, select->length, select->k, d.at<int32_t>(dpicked), stream_);
    }
    if (mma) return scores_mma(d, d.at(dout));
    const cudaError_t e = cuda::ExpandKeyRuns(d.at<int32_t>(dfirst), d.at<int32_t>(dquery), d.at<int32_t>(dstart),
                                              d.at<int32_t>(dcount), runs, d.at<int32_t>(dr), d.at<int32_t>(dqo), stream_);
    return e != cudaSuccess ? e
                            : cuda::IndexScoresRows(d.at(dq), d.at(dw), w_stride, heads, dim, base, d.at<int32_t>(dr),
                                                    d.at<int32_t>(dqo), n, d.at(dout), stream_);
  }));
  return true;
}

auto CudaBackendImpl::StageAttentionRowOps(Frame& f, std::span<const AttentionRow> rows, int64_t heads)
    -> absl::StatusOr<AttentionRowOps> {
  const int64_t per_row = heads * cuda::kRecordDim;
  AttentionRowOps p;
  bool any = false, same = true;
  for (const AttentionRow& r : rows) {
    any = any || !r.then.empty();
    same = same && r.then.size() == rows[0].then.size();
  }
  if (!any) return p;
  for (size_t i = 0; same && i < rows[0].then.size(); ++i) {
    const RowOp& a = rows[0].then[i];
    for (const AttentionRow& r : rows) {
      const RowOp& b = r.then[i];
      same = same && b.kind == a.kind && b.width == a.width && b.eps == a.eps && b.offset == a.offset &&
             b.rope_dims == a.rope_dims && b.rows_per_angle == a.rows_per_angle && b.inverse == a.inverse &&
             b.weight == a.weight && b.prefix == a.prefix && b.block == a.block && b.scale == a.scale;
    }
    if (a.kind == RowOp::Kind::kRope)
      same = same && a.width > 0 && a.rows_per_angle > 0 && per_row % a.width == 0 && (per_row / a.width) % a.rows_per_angle == 0;
  }
  if (!same) {
    for (const AttentionRow& r : rows) {
      FM_ASSIGN_OR_RETURN(RowOpInputs in, StageRowOps(f, r.then, per_row));
      p.inputs.push_back(std::move(in));
    }
    return p;
  }
  p.merged = true;
  p.ops.assign(rows[0].then.begin(), rows[0].then.end());
  p.angles.resize(p.ops.size());
  for (size_t i = 0; i < p.ops.size(); ++i) {
    const RowOp& op = p.ops[i];
    if (op.kind != RowOp::Kind::kRope || !op.cos || !op.sin) continue;
    const int64_t count = per_row / op.width / op.rows_per_angle * (op.rope_dims / 2);  // a row's angles
    std::vector<float>& a = p.angles[i];
    a.resize(2 * count * rows.size());
    for (size_t j = 0; j < rows.size(); ++j) {
      std::copy_n(rows[j].then[i].cos, count, a.begin() + j * count);
      std::copy_n(rows[j].then[i].sin, count, a.begin() + (rows.size() + j) * count);
    }
    p.ops[i].cos = a.data();
    p.ops[i].sin = a.data() + count * rows.size();
  }
  FM_ASSIGN_OR_RETURN(RowOpInputs in, StageRowOps(f, p.ops, per_row * static_cast<int64_t>(rows.size())));
  p.inputs.push_back(std::move(in));
  return p;
}

cudaError_t CudaBackendImpl::EnqueueAttentionRowOps(Dev d, const AttentionArrays& a, std::span<const AttentionRow> rows,
                                                    int64_t heads, const AttentionRowOps& p) const {
  const int64_t per_row = heads * cuda::kRecordDim;
  if (p.merged) return EnqueueRowOps(d, d.at(a.dout), per_row * static_cast<int64_t>(rows.size()), p.ops, p.inputs[0]);
  for (size_t j = 0; j < p.inputs.size(); ++j)
    if (cudaError_t e = EnqueueRowOps(d, d.at(a.dout) + j * per_row, per_row, rows[j].then, p.inputs[j]); e != cudaSuccess)
      return e;
  return cudaSuccess;
}

void CudaBackendImpl::KeyScoring(const float* q, const float* w, int64_t heads, int64_t dim,
                                 std::span<const float* const> keys, float* out, bool logits) const {
  const int64_t n = static_cast<int64_t>(keys.size());
  if (n == 0) return;
  std::vector<uint8_t> valid(n);
  for (int64_t t = 0; t < n; ++t) valid[t] = keys[t] != nullptr;
  Frame f;
  const size_t dq = f.In(q, heads * dim * 4), dw = f.In(w, heads * 4), dv = f.In(valid.data(), n);
  const size_t dk = f.Scratch(n * dim * 4), dout = f.Scratch(n * 4);
  f.Download(dout, out, n * 4);
  Launch(
      f,
      [&](Dev d) {
        return logits ? cuda::IndexerLogits(d.at(dq), d.at(dw), heads, dim, d.at(dk), d.at<uint8_t>(dv), n,
                                            d.at(dout), stream_)
                      : cuda::IndexScores(d.at(dq), d.at(dw), heads, dim, d.at(dk), n, d.at(dout), stream_);
      },
      [&](char* host_scratch) {
        GatherRows(keys, dim, nullptr, reinterpret_cast<float*>(host_scratch + f.Resolve(dk) - f.in_bytes()),
                   /*zero_null=*/true);
      },
      n * dim * 4);
}

}  // namespace flashmem::kernels::cuda::internal
