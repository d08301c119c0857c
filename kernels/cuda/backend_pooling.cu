// CudaBackendImpl::PoolSteps: the compressors' steps of a decode step run where their projections
// are (held since the layer's LinearMany), on the backend's copies of the sessions' rings, so the
// projections never come back to the host for the pooling. The host ring stays the truth for
// state snapshots and the host's own steps: each row written into a ring goes to the host ring
// the way WriteRecords' records go to their pages (a page-locked write-back applied at the next
// op that waits, or at FinishWrites), and a ring's copy is trusted only while its version is the
// host ring's (a write elsewhere renews it).
#include <algorithm>
#include <cstring>

#include "kernels/cuda/backend_impl.h"

namespace flashmem::kernels::cuda::internal {

void CudaBackendImpl::PoolSteps(std::span<const PoolStep> steps, const PoolShape& shape) const {
  if (steps.empty()) return;
  {
    absl::MutexLock lock(&mu_);
    if (!health_.ok()) return;
    const absl::StatusOr<bool> ran = PoolOnDeviceLocked(steps, shape);
    if (!ran.ok()) return Fail(ran.status());
    if (*ran) return;
    // The host runs them: its rings first take every step the device ran before, and the pooled
    // rows it writes leave a held buffer's twin stale.
    bool pending = false;
    for (const PoolStep& s : steps) pending = pending || pending_ring_hosts_.contains(s.ring.kv);
    if (pending) {
      if (absl::Status st = FlushWritesLocked(); !st.ok()) return Fail(st);
    }
    if (shape.ratio > 0 && shape.head_dim > 0)
      for (const PoolStep& s : steps)
        if (s.pooled && (s.pos + 1) % shape.ratio == 0) {
          if (absl::Status st = SyncCrossingLocked(s.pooled, shape.head_dim * 4, /*written=*/true); !st.ok())
            return Fail(st);
        }
    // The held projections back, every buffer in one wait (a CSA layer's kv and scores of both
    // compressors: four buffers).
    const size_t row_bytes = static_cast<size_t>(std::max<int64_t>(shape.width(), 0)) * 4;
    std::vector<Held*> back;
    for (const PoolStep& s : steps)
      for (const float* p : {s.kv, s.score})
        for (Held& h : held_)
          if (p && !h.host_current && h.Overlaps(reinterpret_cast<const char*>(p), row_bytes) &&
              std::find(back.begin(), back.end(), &h) == back.end())
            back.push_back(&h);
    if (!back.empty()) {
      for (Held* h : back)
        if (cudaError_t e = cudaMemcpyAsync(h->host, h->dev, h->bytes, cudaMemcpyDeviceToHost, stream_);
            e != cudaSuccess)
          return Fail(CudaError(e, "copy a held buffer back"));
      if (cudaError_t e = cudaStreamSynchronize(stream_); e != cudaSuccess) return Fail(CudaError(e, "stream synchronize"));
      ++waits_;
      staging_in_flight_ = false;
      for (Held* h : back) h->host_current = true;
      ApplyWritesLocked();  // the stream has passed every pending write-back's copy
    }
  }
  Backend::PoolSteps(steps, shape);
}

absl::StatusOr<bool> CudaBackendImpl::PoolOnDeviceLocked(std::span<const PoolStep> steps,
                                                         const PoolShape& shape) const {
  if (!device_pooling_ || shape.ratio <= 0 || shape.head_dim <= 0 || !shape.ape) return false;
  const int64_t m = static_cast<int64_t>(steps.size()), d = shape.head_dim, r = shape.ratio;
  const int64_t width = shape.width(), slots = shape.slots();
  const size_t row_bytes = static_cast<size_t>(width) * 4;
  const size_t ring_bytes = static_cast<size_t>(2 * slots * width) * 4;
  // Only steps whose projections the device holds (a decode step's), each its own ring, their
  // pooled rows end to end (one output array); anything else is the host's — its checks
  // included.
  std::vector<const float*> rings(m);
  std::vector<int32_t> pooled_row(m, -1);
  int32_t completing = 0;
  float* first_pooled = nullptr;
  for (int64_t k = 0; k < m; ++k) {
    const PoolStep& s = steps[k];
    if (!s.ring.kv || !s.ring.score || !s.ring.version || !s.kv || !s.score || s.pos < 0) return false;
    for (const float* p : {s.kv, s.score}) {
      const Held* h = HeldContaining(p, row_bytes);
      if (!h || !h->dev_current) return false;
    }
    rings[k] = s.ring.kv;
    if ((s.pos + 1) % r != 0) continue;
    if (!s.pooled) return false;
    if (!first_pooled) first_pooled = s.pooled;
    if (s.pooled != first_pooled + static_cast<int64_t>(completing) * d) return false;
    pooled_row[k] = completing++;
  }
  std::sort(rings.begin(), rings.end());
  if (std::adjacent_find(rings.begin(), rings.end()) != rings.end()) return false;
  op_clock_ = clock_ + 1;
  FM_ASSIGN_OR_RETURN(const float* ape, ArrayOnDevice(shape.ape, static_cast<size_t>(r * width)));
  // Each step's ring on the device: its copy when current, else a buffer the host ring goes up to.
  const uint64_t since = clock_ + 1;
  std::vector<int64_t> ring_dev(m);
  std::vector<int64_t> uploads;  // steps whose ring goes up
  for (int64_t k = 0; k < m; ++k) {
    const PoolStep& s = steps[k];
    auto it = rings_.find(s.ring.kv);
    if (it != rings_.end() && it->second.bytes == ring_bytes && it->second.version == *s.ring.version) {
      it->second.last_use = ++clock_;
      ring_dev[k] = reinterpret_cast<int64_t>(it->second.dev);
      continue;
    }
    float* buf = nullptr;
    if (it != rings_.end() && it->second.bytes == ring_bytes) {
      buf = it->second.dev;
    } else {
      if (it != rings_.end()) {  // another shape at this address: not a ring this call uses
        (void)cudaFree(it->second.dev);
        ring_bytes_ -= static_cast<int64_t>(it->second.bytes);
        used_ -= static_cast<int64_t>(it->second.bytes);
        rings_.erase(it);
      }
      buf = RingBufferLocked(ring_bytes, since);
      if (!buf) return false;  // no room: the host pools this call
    }
    DeviceRing& dr = rings_[s.ring.kv];
    dr = {buf, ring_bytes, 0, ++clock_};  // version 0: no host ring's until this call's launch
    ring_dev[k] = reinterpret_cast<int64_t>(buf);
    uploads.push_back(k);
  }
  // A ring going up must be current on the host (its earlier steps applied).
  bool stale = false;
  for (int64_t k : uploads) stale = stale || pending_ring_hosts_.contains(steps[k].ring.kv);
  if (stale) FM_RETURN_IF_ERROR(FlushWritesLocked());
  const size_t area = static_cast<size_t>(m) * 2 * row_bytes;
  size_t at = 0;
  FM_RETURN_IF_ERROR(WritebackAreaLocked(area, &at));
  std::vector<int64_t> pos(m);
  for (int64_t k = 0; k < m; ++k) pos[k] = steps[k].pos;
  Frame f;
  const size_t dkv = f.In(steps[0].kv, row_bytes);
  for (int64_t k = 1; k < m; ++k) f.InContinued(steps[k].kv, row_bytes);
  const size_t dscore = f.In(steps[0].score, row_bytes);
  for (int64_t k = 1; k < m; ++k) f.InContinued(steps[k].score, row_bytes);
  const size_t drings = f.In(ring_dev.data(), m * 8), dpos = f.In(pos.data(), m * 8);
  const size_t drow = f.In(pooled_row.data(), m * 4);
  std::vector<size_t> up_kv, up_score;  // each upload's ring in the frame
  for (int64_t k : uploads) {
    up_kv.push_back(f.In(steps[k].ring.kv, ring_bytes / 2));
    up_score.push_back(f.In(steps[k].ring.score, ring_bytes / 2));
  }
  const size_t dwritten = f.Scratch(area);
  size_t dpooled = 0;
  if (completing > 0) {
    dpooled = f.Scratch(static_cast<size_t>(completing) * d * 4);
    f.Download(dpooled, first_pooled, static_cast<size_t>(completing) * d * 4);
  }
  f.DeliverLater();  // the rows reach the host rings by their own copy
  char* wb = writeback_ + at;
  const LaunchFn op = [&](Dev dv) {
    for (size_t u = 0; u < uploads.size(); ++u) {
      float* dst = reinterpret_cast<float*>(ring_dev[uploads[u]]);
      cudaError_t e = cudaMemcpyAsync(dst, dv.at(up_kv[u]), ring_bytes / 2, cudaMemcpyDeviceToDevice, stream_);
      if (e == cudaSuccess)
        e = cudaMemcpyAsync(dst + slots * width, dv.at(up_score[u]), ring_bytes / 2, cudaMemcpyDeviceToDevice,
                            stream_);
      if (e != cudaSuccess) return e;
    }
    cuda::PoolStepsArgs a;
    a.steps = m;
    a.ratio = shape.ratio;
    a.head_dim = d;
    a.overlap = shape.overlap;
    a.rings = dv.at<float* const>(drings);
    a.pos = dv.at<int64_t>(dpos);
    a.pooled_row = dv.at<int32_t>(drow);
    a.kv = dv.at(dkv);
    a.score = dv.at(dscore);
    a.in_stride = static_cast<int64_t>(AlignUp(row_bytes) / 4);
    a.ape = ape;
    a.pooled = completing > 0 ? dv.at(dpooled) : nullptr;
    a.written = dv.at(dwritten);
    cudaError_t e = cuda::PoolSteps(a, stream_);
    if (e != cudaSuccess) return e;
    return cudaMemcpyAsync(wb, dv.at<char>(dwritten), area, cudaMemcpyDeviceToHost, stream_);
  };
  // The device's copies are this call's results: a version the host rings take now and whose
  // values they get at the flush (every host read of them flushes first). Pending before the run:
  // an op that waits applies them after its wait, when the copy above has landed.
  const size_t before = pending_rings_.size();
  writeback_used_ = at + AlignUp(area);
  for (int64_t k = 0; k < m; ++k) {
    const PoolStep& s = steps[k];
    pending_rings_.push_back({s.ring.kv, s.ring.score, (shape.overlap ? r : 0) + s.pos % r, width, r,
                              shape.overlap && pooled_row[k] >= 0, at + static_cast<size_t>(k) * 2 * row_bytes});
  }
  if (absl::Status st = RunLocked(f, op); !st.ok()) {
    pending_rings_.resize(before);  // never written: not applied
    writeback_used_ = at;
    for (int64_t k = 0; k < m; ++k) {  // their copies are unknown now
      auto it = rings_.find(steps[k].ring.kv);
      if (it == rings_.end()) continue;
      (void)cudaFree(it->second.dev);
      ring_bytes_ -= static_cast<int64_t>(it->second.bytes);
      used_ -= static_cast<int64_t>(it->second.bytes);
      rings_.erase(it);
    }
    return st;
  }
  for (int64_t k = 0; k < m; ++k) {
    const PoolStep& s = steps[k];
    const uint64_t v = NewKvPageVersion();
    *s.ring.version = v;
    rings_[s.ring.kv].version = v;
    // Still pending unless the run waited and applied them.
    if (pending_rings_.size() > before) pending_ring_hosts_.insert(s.ring.kv);
  }
  device_pool_steps_ += m;
  return true;
}

float* CudaBackendImpl::RingBufferLocked(size_t bytes, uint64_t since) const {
  const int64_t cap = budget_ / 16;
  for (;;) {
    // The least recently used ring this call does not use: its buffer, if the size is right.
    auto lru = rings_.end();
    for (auto it = rings_.begin(); it != rings_.end(); ++it)
      if (it->second.last_use < since && (lru == rings_.end() || it->second.last_use < lru->second.last_use))
        lru = it;
    if (lru != rings_.end() && lru->second.bytes == bytes && ring_bytes_ + static_cast<int64_t>(bytes) > cap) {
      float* buf = lru->second.dev;
      rings_.erase(lru);  // its host ring is the truth (a later use uploads it again)
      return buf;
    }
    if (ring_bytes_ + static_cast<int64_t>(bytes) <= cap) break;
    if (lru == rings_.end()) return nullptr;
    (void)cudaFree(lru->second.dev);  // another size: freed (cudaFree waits for the device; rare)
    ring_bytes_ -= static_cast<int64_t>(lru->second.bytes);
    used_ -= static_cast<int64_t>(lru->second.bytes);
    rings_.erase(lru);
  }
  if (!Reserve(static_cast<int64_t>(bytes), "a compressor ring").ok()) return nullptr;
  float* buf = nullptr;
  if (cudaMalloc(&buf, bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: the host pools instead
    return nullptr;
  }
  ring_bytes_ += static_cast<int64_t>(bytes);
  used_ += static_cast<int64_t>(bytes);
  return buf;
}

}  // namespace flashmem::kernels::cuda::internal
