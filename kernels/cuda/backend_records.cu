// CudaBackendImpl::WriteRecords: the window's newest KV rows, made by the device's ops and held
// there, become their FP8 records on the device — in the KV reserve's copy of their page, where
// the attention reads them, and on their way to the host page — instead of coming back as fp32
// rows to be encoded on the host and sent up again as a patch. The host page is the truth for
// memtier and state snapshots; it takes the bytes at the next op that waits anyway (RunLocked),
// or at FinishWrites, which the model calls at the end of a forward pass. Until then the
// backend reads no such page on the host without applying them first.
#include <algorithm>
#include <cstring>

#include "kernels/cuda/backend_impl.h"

namespace flashmem::kernels::cuda::internal {

void CudaBackendImpl::WriteRecords(std::span<const RecordWrite> writes, int64_t dim, int64_t rope_dims) const {
  if (writes.empty()) return;
  // The default: each row brought back where the device holds it, then written on the host.
  auto on_host = [&](std::span<const RecordWrite> w) {
    for (const RecordWrite& x : w) SyncForHost(x.row, static_cast<size_t>(dim) * 4);
    Backend::WriteRecords(w, dim, rope_dims);
  };
  if (!device_records_ || dim != cuda::kRecordDim || rope_dims != cuda::kRecordRope) return on_host(writes);
  // Where each record goes; an entry that cannot take one written here is written on the host.
  struct Target {
    const RecordWrite* w;
    uint8_t *data, *scales;
    const KvPage* page;
    int32_t entry;
  };
  std::vector<Target> targets;
  std::vector<RecordWrite> host_writes;
  int64_t page_entries = 0;
  for (const RecordWrite& w : writes) {
    Target t{&w, nullptr, nullptr, nullptr, 0};
    if (w.sink->BeginRecordWrite(w.index, &t.data, &t.scales, &t.page, &t.entry)) {
      targets.push_back(t);
      // Not a page the reserve can hold: no copy there to write (a later op uploads it).
      if (!ReservablePage(t.page, t.entry, 1, cuda::kRecordBytes, &page_entries)) targets.back().page = nullptr;
    } else {
      host_writes.push_back(w);
    }
  }
  if (!host_writes.empty()) on_host(host_writes);
  const int64_t m = static_cast<int64_t>(targets.size());
  if (m == 0) return;
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return;
  // The reserve's copies: each page placed as this call's write (uploaded whole first when the
  // reserve lacks it; never patched from the host bytes, which are not written yet). Read only
  // while `reserved` holds.
  std::vector<int64_t> to_data(m, -1), to_scales(m, -1);
  bool reserved = page_entries > 0 && ReserveLocked(records_, page_entries * cuda::kRecordBytes, page_entries);
  if (reserved) {
    records_.book.Begin();
    for (int64_t k = 0; k < m && reserved; ++k) {
      const Target& t = targets[k];
      if (!t.page) continue;
      const int64_t slot = records_.book.Place(*t.page, /*writes_changed=*/true);
      if (slot < 0) {
        records_.book.Abort();
        reserved = false;
        break;
      }
      const int64_t base = slot * records_.book.page_bytes();
      to_data[k] = base + static_cast<int64_t>(t.entry) * cuda::kRecordData;
      to_scales[k] = base + page_entries * cuda::kRecordData + static_cast<int64_t>(t.entry) * cuda::kRecordScales;
    }
  }
  // Uploads read host pages: any with a pending record takes it first.
  if (reserved && UploadsReadPendingLocked(records_)) {
    if (absl::Status st = FlushWritesLocked(); !st.ok()) {
      records_.book.Abort();
      return Fail(st);
    }
  }
  // The write-back area: records, then flags, then rows (all of it copied back in one transfer).
  const size_t rec_bytes = AlignUp(static_cast<size_t>(m) * cuda::kRecordBytes), flag_bytes = AlignUp(m * 4);
  const size_t area = rec_bytes + flag_bytes + static_cast<size_t>(m) * cuda::kRecordDim * 4;
  size_t at = 0;
  if (absl::Status st = WritebackAreaLocked(area, &at); !st.ok()) {
    if (reserved) records_.book.Abort();
    return Fail(st);
  }
  Frame f;
  const size_t drows = f.In(targets[0].w->row, cuda::kRecordDim * 4);
  for (int64_t k = 1; k < m; ++k) f.InContinued(targets[k].w->row, cuda::kRecordDim * 4);
  const size_t dto = f.In(to_data.data(), m * 8), dtos = f.In(to_scales.data(), m * 8);
  Uploads up;
  if (reserved) up = StageUploads(records_, f);  // its scratch first (the staged pages)
  const size_t drec = f.Scratch(rec_bytes), dflag = f.Scratch(flag_bytes);
  f.Scratch(static_cast<size_t>(m) * cuda::kRecordDim * 4);  // the rows off the grid
  f.DeliverLater();
  char* wb = writeback_ + at;
  const LaunchFn op = [&](Dev d) {
    cudaError_t e = cuda::EncodeFp8Records(d.at(drows), m, d.at<uint8_t>(drec), d.at<int32_t>(dflag),
                                           reinterpret_cast<float*>(d.at<char>(dflag) + flag_bytes),
                                           reserved ? d.at<int64_t>(dto) : nullptr,
                                           reserved ? d.at<int64_t>(dtos) : nullptr, records_.dev, stream_);
    if (e != cudaSuccess) return e;
    return cudaMemcpyAsync(wb, d.at<char>(drec), area, cudaMemcpyDeviceToHost, stream_);
  };
  // Pending before the run: an op that waits (FLASHMEM_CUDA_ASYNC=0) applies them after its wait,
  // when the copy above has landed; none applies anything before its launch.
  const size_t before = pending_records_.size();
  writeback_used_ = at + AlignUp(area);
  for (int64_t k = 0; k < m; ++k) {
    const Target& t = targets[k];
    pending_records_.push_back({t.w->sink, t.w->index, t.data, t.scales, at + k * cuda::kRecordBytes,
                                at + rec_bytes + k * 4, at + rec_bytes + flag_bytes + k * cuda::kRecordDim * 4});
    if (t.page) pending_pages_.insert(t.page->bytes);
  }
  if (const absl::Status st = reserved ? RunWithUploadsLocked(records_, f, up, op) : RunLocked(f, op); !st.ok()) {
    pending_records_.resize(before);  // never written: not applied
    writeback_used_ = at;
    return Fail(st);
  }
  // Without a reserve copy written here, a later op would read such a page from the host (a
  // patch or a staged record): it must hold the bytes now.
  if (!reserved || std::any_of(targets.begin(), targets.end(), [](const Target& t) { return !t.page; }))
    Fail(FlushWritesLocked());
}

void CudaBackendImpl::FinishWrites() const {
  absl::MutexLock lock(&mu_);
  Fail(FlushWritesLocked());
}

absl::Status CudaBackendImpl::WritebackAreaLocked(size_t area, size_t* at) const {
  area = AlignUp(area);
  if (writeback_used_ + area > writeback_capacity_) {
    FM_RETURN_IF_ERROR(FlushWritesLocked());
    // Grown to twice what was asked for before: a step's write-backs (every layer's records and
    // rings) soon fit between the waits it has anyway.
    const size_t want = std::max({area, 2 * writeback_capacity_, size_t{1} << 20});
    if (want > writeback_capacity_) {
      if (writeback_) (void)cudaFreeHost(writeback_);
      writeback_ = nullptr;
      writeback_capacity_ = 0;
      if (cudaMallocHost(reinterpret_cast<void**>(&writeback_), want) != cudaSuccess) {
        (void)cudaGetLastError();
        writeback_ = nullptr;
        return absl::ResourceExhaustedError(
            absl::StrCat("cannot allocate ", want, " bytes of page-locked write-back memory"));
      }
      writeback_capacity_ = want;
    }
  }
  *at = writeback_used_;
  return absl::OkStatus();
}

absl::Status CudaBackendImpl::FlushWritesLocked() const {
  if (pending_records_.empty() && pending_rings_.empty()) return absl::OkStatus();
  FM_CUDA_TRY(cudaStreamSynchronize(stream_), "stream synchronize");
  ++waits_;
  staging_in_flight_ = false;
  ApplyWritesLocked();
  return absl::OkStatus();
}

void CudaBackendImpl::ApplyWritesLocked() const {
  if (pending_records_.empty() && pending_rings_.empty()) return;
  // The rings' rows in the order their steps ran (a ring's later step after its earlier one).
  for (const PendingRing& p : pending_rings_) {
    const size_t row = static_cast<size_t>(p.width) * 4;
    std::memcpy(p.kv + p.slot * p.width, writeback_ + p.at, row);
    std::memcpy(p.score + p.slot * p.width, writeback_ + p.at + row, row);
    if (p.shift) {  // the block becomes the previous one
      std::memmove(p.kv, p.kv + p.ratio * p.width, p.ratio * row);
      std::memmove(p.score, p.score + p.ratio * p.width, p.ratio * row);
    }
  }
  pending_rings_.clear();
  pending_ring_hosts_.clear();
  std::vector<const PendingRecord*> off_grid;
  for (const PendingRecord& p : pending_records_) {
    int32_t ok = 0;
    std::memcpy(&ok, writeback_ + p.flag, 4);
    if (!ok) {
      off_grid.push_back(&p);
      continue;
    }
    std::memcpy(p.data, writeback_ + p.record, cuda::kRecordData);
    std::memcpy(p.scales, writeback_ + p.record + cuda::kRecordData, cuda::kRecordScales);
  }
  // After every copy above: a write on the host may turn its stream into fp32 rows (new pages).
  for (const PendingRecord* p : off_grid)
    p->sink->WriteOnHost(p->index, reinterpret_cast<const float*>(writeback_ + p->row));
  pending_records_.clear();
  pending_pages_.clear();
  writeback_used_ = 0;
}

bool CudaBackendImpl::UploadsReadPendingLocked(const DeviceReserve& r) const {
  if (pending_pages_.empty()) return false;
  for (const KvReserve::Upload& u : r.book.uploads())
    if (pending_pages_.contains(u.bytes)) return true;
  for (const KvReserve::Patch& p : r.book.patches())
    if (pending_pages_.contains(p.bytes - p.offset)) return true;
  return false;
}

}  // namespace flashmem::kernels::cuda::internal
