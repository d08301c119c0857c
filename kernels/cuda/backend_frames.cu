// Running an op's frame (Frame, backend_impl.h): its inputs up through the staging buffer or
// straight from page-locked memory, its kernels, its outputs back; and the held buffers
// (Backend::HoldOnDevice) whose device twins an op reads and writes instead of the host arrays.
#include <algorithm>
#include <utility>

#include "kernels/cuda/backend_impl.h"

namespace flashmem::kernels::cuda::internal {

void CudaBackendImpl::Launch(const Frame& f, const LaunchFn& launch, const FillFn& fill, size_t fill_bytes) const {
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return;
  op_clock_ = clock_ + 1;
  Fail(RunLocked(f, launch, fill, fill_bytes));
}

absl::Status CudaBackendImpl::RunLocked(const Frame& f, const LaunchFn& launch, const FillFn& fill,
                                        size_t fill_bytes) const {
  const std::type_info* named = std::exchange(phase_op_, nullptr);  // FLASHMEM_CUDA_PHASES
  FM_CUDA_TRY(cudaSetDevice(device_), "cudaSetDevice");
  const size_t total = std::max<size_t>(f.total(), kAlign);
  if (!staged_) FM_CUDA_TRY(cudaEventCreateWithFlags(&staged_, cudaEventDisableTiming), "cudaEventCreate");
  if (total > capacity_) {
    // Ops that returned without waiting may still read the old staging buffers.
    FM_CUDA_TRY(cudaStreamSynchronize(stream_), "stream synchronize");
    ++waits_;
    staging_in_flight_ = false;
    const size_t want = std::max(total, capacity_ * 2);
    if (dev_) (void)cudaFree(dev_);
    if (host_) (void)cudaFreeHost(host_);
    dev_ = nullptr;
    host_ = nullptr;
    used_ -= static_cast<int64_t>(capacity_);
    capacity_ = 0;
    FM_RETURN_IF_ERROR(Reserve(static_cast<int64_t>(want), "staging buffer"));
    FM_CUDA_TRY(cudaMalloc(&dev_, want), "cudaMalloc(staging)");
    FM_CUDA_TRY(cudaMallocHost(&host_, want), "cudaMallocHost(staging)");
    capacity_ = want;
    used_ += static_cast<int64_t>(want);
  }
  // Inputs and outputs in page-locked activation memory (kernels/activation_pool.h) go straight
  // between the caller's buffer and the device; the rest through the staging buffer.
  const ActivationPool* pinned = InstalledActivationPool();
  auto direct = [&](const void* p, size_t bytes) { return pinned && bytes > 0 && pinned->Contains(p, bytes); };
  std::vector<char> in_direct(f.ins().size()), out_direct(f.outs().size());  // looked up once each
  for (size_t i = 0; i < f.ins().size(); ++i) in_direct[i] = direct(f.ins()[i].host, f.ins()[i].bytes);
  for (size_t i = 0; i < f.outs().size(); ++i) out_direct[i] = direct(f.outs()[i].host, f.outs()[i].bytes);
  // Held buffers (HoldOnDevice): an input wholly inside one whose twin is current comes from the
  // twin, an output wholly inside one goes to it; a range crossing a held buffer's edge first
  // brings that buffer back to the host and then moves as usual.
  std::vector<Held*> in_held(f.ins().size()), out_held(f.outs().size());
  if (!held_.empty()) {
    for (size_t i = 0; i < f.ins().size(); ++i) {
      const Frame::Copy& c = f.ins()[i];
      Held* h = HeldContaining(c.host, c.bytes);
      if (h && h->dev_current) in_held[i] = h;
      if (!h) FM_RETURN_IF_ERROR(SyncCrossingLocked(c.host, c.bytes, false));
    }
    for (size_t i = 0; i < f.outs().size(); ++i) {
      const Frame::Back& b = f.outs()[i];
      out_held[i] = HeldContaining(b.host, b.bytes);
      if (!out_held[i]) FM_RETURN_IF_ERROR(SyncCrossingLocked(b.host, b.bytes, true));
    }
  }
  // Held ranges the kernels read and write in place (InPlaceLocked) instead of copying them between
  // the twin and the staging buffer.
  std::vector<char> in_place(f.ins().size()), out_place(f.outs().size());
  const std::vector<Dev::Redirect> redirects = InPlaceLocked(f, in_held, out_held, &in_place, &out_place);
  traffic_.in_place += static_cast<int64_t>(redirects.size());
  // Every output held (on the device): the op need not wait for its kernels — nothing comes back
  // to the host (not under FLASHMEM_CUDA_PHASES, which times the wait).
  bool async = async_ && !phases_ && (!f.outs().empty() || f.delivers_later());
  for (size_t i = 0; i < f.outs().size() && async; ++i) async = out_held[i] != nullptr;
  char* h = static_cast<char*>(host_);
  char* dev = static_cast<char*>(dev_);
  // The last async op's uploads out of the staging buffer must have left it before this op writes
  // it; an op that writes none of it (every input held or page-locked) does not wait. (A ring of
  // four host buffers, letting the host run further ahead, measured the same: 7.29-7.82 against
  // 7.46 ms at batch 1, 25.0-26.8 against 26.0 at 64.)
  bool writes_host = fill != nullptr || fill_bytes > 0;
  for (size_t i = 0; i < f.ins().size() && !writes_host; ++i) writes_host = !in_direct[i] && !in_held[i];
  if (writes_host && staging_in_flight_) {
    FM_CUDA_TRY(cudaEventSynchronize(staged_), "staging event");
    staging_in_flight_ = false;
  }
  OpPhases::Marks marks;  // FLASHMEM_CUDA_PHASES
  if (phases_) marks.begin = OpPhases::Clock::now();
  std::vector<HostCopy> copies;
  copies.reserve(std::max(f.ins().size(), f.outs().size()));
  for (size_t i = 0; i < f.ins().size(); ++i)
    if (!in_direct[i] && !in_held[i]) copies.push_back({h + f.ins()[i].off, f.ins()[i].host, f.ins()[i].bytes});
  CopyAll(copies);
  if (phases_) marks.staged = OpPhases::Clock::now();
  if (fill) fill(h + f.in_bytes());
  if (phases_) marks.filled = OpPhases::Clock::now();
  // One transfer per run of arrays adjacent on both sides (a batch's attention rows are slices
  // of one activation buffer: 64 rows' queries are one copy, not 64 at ~2.7 µs each). A staged
  // input's transfer takes its alignment padding along, so adjacent staged inputs merge too. A run
  // stays inside one host allocation: two pool blocks can lie end to end, and a copy across
  // both fails (invalid argument).
  struct Transfer {
    char* dst;
    const char* src;
    size_t bytes;
    bool pinned;  // the host side is a pool block (else the staging buffer)
  };
  auto add = [&](std::vector<Transfer>& v, void* dst, const void* src, size_t bytes, bool is_pinned, bool up) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    if (bytes == 0) return;
    if (!v.empty()) {
      Transfer& t = v.back();
      const bool adjacent = t.dst + t.bytes == d && t.src + t.bytes == s && t.pinned == is_pinned;
      if (adjacent && (!is_pinned || pinned->Contains(up ? t.src : t.dst, t.bytes + bytes))) {
        t.bytes += bytes;
        return;
      }
    }
    v.push_back({d, s, bytes, is_pinned});
  };
  std::vector<Transfer> ups, downs;
  for (size_t i = 0; i < f.ins().size(); ++i) {
    const Frame::Copy& c = f.ins()[i];
    if (in_held[i]) continue;
    if (in_direct[i]) {
      add(ups, dev + c.off, c.host, c.bytes, true, true);
    } else {
      const size_t end = i + 1 < f.ins().size() ? f.ins()[i + 1].off : f.in_bytes();
      add(ups, dev + c.off, h + c.off, end - c.off, false, true);
    }
  }
  add(ups, dev + f.in_bytes(), h + f.in_bytes(), fill_bytes, false, true);
  if (phases_) FM_CUDA_TRY(cudaEventRecord(phases_->event(0), stream_), "event");
  bool direct_up = false;  // an upload straight from the caller's page-locked buffer
  for (const Transfer& t : ups) {
    FM_CUDA_TRY(cudaMemcpyAsync(t.dst, t.src, t.bytes, cudaMemcpyHostToDevice, stream_), "copy to device");
    marks.up_bytes += t.bytes;
    direct_up = direct_up || t.pinned;
  }
  // Device-to-device copies from and to held buffers, one per run of adjacent ranges on both sides
  // within one held buffer (a batch's attention rows: 64 queries are one copy, not 64).
  struct HeldCopy {
    const Held* held;
    char* dst;
    const char* src;
    size_t bytes;
  };
  auto add_held = [](std::vector<HeldCopy>& v, const Held* held, char* dst, const char* src, size_t bytes) {
    if (bytes == 0) return;
    if (!v.empty() && v.back().held == held && v.back().dst + v.back().bytes == dst &&
        v.back().src + v.back().bytes == src) {
      v.back().bytes += bytes;
      return;
    }
    v.push_back({held, dst, src, bytes});
  };
  auto enqueue_held = [&](const std::vector<HeldCopy>& v, const char* what) -> absl::Status {
    for (const HeldCopy& c : v) {
      FM_CUDA_TRY(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDeviceToDevice, stream_), what);
      ++traffic_.copies;
      traffic_.copy_bytes += static_cast<int64_t>(c.bytes);
    }
    return absl::OkStatus();
  };
  std::vector<HeldCopy> held_copies;
  for (size_t i = 0; i < f.ins().size(); ++i)
    if (const Held* held = in_held[i]; held && !in_place[i]) {
      const Frame::Copy& c = f.ins()[i];
      add_held(held_copies, held, dev + c.off, held->dev + (static_cast<const char*>(c.host) - held->host), c.bytes);
    }
  FM_RETURN_IF_ERROR(enqueue_held(held_copies, "copy from a held buffer"));
  // Outputs that cover only part of a held buffer whose twin is stale: the twin takes the host's
  // values first, so the parts the op does not write stay right. Outputs that together cover it
  // (a batch's attention rows: 64 slices of one buffer; an op's outputs never overlap) need none.
  for (size_t i = 0; i < f.outs().size(); ++i) {
    Held* held = out_held[i];
    if (!held || held->dev_current) continue;
    size_t covered = 0;
    for (size_t j = i; j < f.outs().size(); ++j)
      if (out_held[j] == held) covered += f.outs()[j].bytes;
    if (covered < held->bytes)
      FM_CUDA_TRY(cudaMemcpyAsync(held->dev, held->host, held->bytes, cudaMemcpyHostToDevice, stream_),
                  "copy to a held buffer");
    held->dev_current = true;
  }
  // An op that does not wait: every copy out of host memory is enqueued above, so once this event
  // fires the staging buffer and the caller's arrays may change (the kernels may still run).
  if (async && (writes_host || direct_up)) FM_CUDA_TRY(cudaEventRecord(staged_, stream_), "staging event");
  if (phases_) FM_CUDA_TRY(cudaEventRecord(phases_->event(1), stream_), "event");
  FM_CUDA_TRY(launch(Dev{dev, &f, &redirects}), "kernel launch");
  if (phases_) FM_CUDA_TRY(cudaEventRecord(phases_->event(2), stream_), "event");
  held_copies.clear();
  for (size_t i = 0; i < f.outs().size(); ++i) {
    const Frame::Back& b = f.outs()[i];
    if (Held* held = out_held[i]) {
      if (!out_place[i])
        add_held(held_copies, held, held->dev + (static_cast<char*>(b.host) - held->host), dev + f.Resolve(b.off),
                 b.bytes);
      held->dev_current = true;
      held->host_current = false;
      continue;
    }
    add(downs, out_direct[i] ? b.host : h + f.Resolve(b.off), dev + f.Resolve(b.off), b.bytes, out_direct[i], false);
  }
  FM_RETURN_IF_ERROR(enqueue_held(held_copies, "copy to a held buffer"));
  if (async) {
    // An op that read the caller's page-locked arrays in place waits for its uploads; others leave
    // the staging buffer's to the next op.
    if (direct_up) FM_CUDA_TRY(cudaEventSynchronize(staged_), "staging event");
    else if (writes_host) staging_in_flight_ = true;
    return absl::OkStatus();
  }
  for (const Transfer& t : downs) {
    FM_CUDA_TRY(cudaMemcpyAsync(t.dst, t.src, t.bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    marks.down_bytes += t.bytes;
  }
  if (phases_) {
    FM_CUDA_TRY(cudaEventRecord(phases_->event(3), stream_), "event");
    marks.enqueued = OpPhases::Clock::now();
  }
  FM_CUDA_TRY(cudaStreamSynchronize(stream_), "stream synchronize");
  ++waits_;
  staging_in_flight_ = false;
  ApplyWritesLocked();  // the stream has passed every pending record's copy
  if (phases_) marks.waited = OpPhases::Clock::now();
  copies.clear();
  for (size_t i = 0; i < f.outs().size(); ++i) {
    const Frame::Back& b = f.outs()[i];
    if (!out_direct[i] && !out_held[i]) copies.push_back({b.host, h + f.Resolve(b.off), b.bytes});
  }
  CopyAll(copies);
  if (phases_) {
    marks.end = OpPhases::Clock::now();
    phases_->Add(OpPhases::OpName(named ? *named : launch.target_type()), marks);
  }
  return absl::OkStatus();
}

// An input array (a slot and its InContinued slots) is read in place when every slot lies in one
// held buffer whose twin is current, laid out there as in the frame, at an aligned address (the
// kernels assume the staging buffer's 256-byte alignment: vector loads, cuBLASLt's default). An
// output is written in place when it fills its slot alone or with others laid out as in the
// frame (a batch's attention rows), in one held buffer, and no input read in place overlaps it;
// an output on an input's own slot (ops that work in place: Rope, Hadamard) when that input is
// read in place from the same range — else the input is staged after all, since the kernels would
// write it.
namespace {
// Whether an input read in place, outside the array `except`, overlaps the host range [p, p + n).
bool Overlapping(const std::vector<Frame::Copy>& ins, const std::vector<char>& in_place,
                 const std::vector<size_t>& array_of, size_t except, const char* p, size_t n) {
  for (size_t k = 0; k < ins.size(); ++k) {
    const char* q = static_cast<const char*>(ins[k].host);
    if (in_place[k] && array_of[k] != except && q < p + n && p < q + ins[k].bytes) return true;
  }
  return false;
}
}  // namespace

std::vector<Dev::Redirect> CudaBackendImpl::InPlaceLocked(const Frame& f, std::span<Held* const> in_held,
                                                          std::span<Held* const> out_held, std::vector<char>* in_place,
                                                          std::vector<char>* out_place) const {
  std::vector<Dev::Redirect> r;
  if (!in_place_ || held_.empty()) return r;
  const auto& ins = f.ins();
  const auto& outs = f.outs();
  auto aligned = [](const char* p) { return reinterpret_cast<uintptr_t>(p) % kAlign == 0; };
  auto twin = [](const Held* h, const void* host) { return h->dev + (static_cast<const char*>(host) - h->host); };
  std::vector<size_t> array_of(ins.size());  // the first slot of each input's array
  for (size_t i = 0; i < ins.size(); ++i) array_of[i] = i > 0 && ins[i].continues ? array_of[i - 1] : i;
  for (size_t i = 0; i < ins.size(); ++i) {
    const size_t a = array_of[i];
    const Held* h = in_held[a];
    bool ok = h && in_held[i] == h && aligned(twin(h, ins[a].host)) &&
              static_cast<const char*>(ins[i].host) - static_cast<const char*>(ins[a].host) ==
                  static_cast<std::ptrdiff_t>(ins[i].off - ins[a].off);
    if (i == a) (*in_place)[i] = ok;
    else if (!ok) (*in_place)[a] = false;
  }
  for (size_t i = 0; i < ins.size(); ++i) (*in_place)[i] = (*in_place)[array_of[i]];
  // Outputs on input slots.
  auto input_slot = [&](size_t off) -> int64_t {
    for (size_t k = 0; k < ins.size(); ++k)
      if (off >= ins[k].off && off < ins[k].off + std::max<size_t>(ins[k].bytes, 1)) return static_cast<int64_t>(k);
    return -1;
  };
  for (size_t i = 0; i < outs.size(); ++i) {
    const size_t off = f.Resolve(outs[i].off);
    if (off >= f.in_bytes()) continue;
    const int64_t k = input_slot(off);
    if (k < 0) continue;
    const bool same = (*in_place)[k] && out_held[i] == in_held[k] &&
                      static_cast<char*>(outs[i].host) == static_cast<const char*>(ins[k].host) + (off - ins[k].off) &&
                      off + outs[i].bytes <= ins[k].off + ins[k].bytes &&
                      !Overlapping(ins, *in_place, array_of, array_of[k], static_cast<const char*>(outs[i].host),
                                   outs[i].bytes);
    if (same) {
      (*out_place)[i] = true;
    } else if ((*in_place)[k]) {  // staged after all: the kernels write it
      for (size_t j = 0; j < ins.size(); ++j)
        if (array_of[j] == array_of[k]) (*in_place)[j] = false;
    }
  }
  for (size_t i = 0; i < outs.size(); ++i)  // an array staged by the loop above takes its outputs along
    if ((*out_place)[i]) (*out_place)[i] = (*in_place)[input_slot(f.Resolve(outs[i].off))];
  for (size_t i = 0; i < ins.size(); ++i)
    if ((*in_place)[i] && array_of[i] == i) {
      size_t last = i;
      while (last + 1 < ins.size() && array_of[last + 1] == i) ++last;
      r.push_back({ins[i].off, ins[last].off + ins[last].bytes - ins[i].off, twin(in_held[i], ins[i].host)});
    }
  // Outputs filling scratch slots.
  for (const Frame::Slot& s : f.scratch()) {
    std::vector<size_t> mine;
    for (size_t i = 0; i < outs.size(); ++i) {
      const size_t off = f.Resolve(outs[i].off);
      if (off >= s.off && off < s.off + std::max<size_t>(s.bytes, 1)) mine.push_back(i);
    }
    if (mine.empty() || s.bytes == 0) continue;
    const Held* h = out_held[mine[0]];
    if (!h) continue;
    char* dev0 = twin(h, outs[mine[0]].host) - (f.Resolve(outs[mine[0]].off) - s.off);
    size_t covered = 0;
    bool ok = aligned(dev0) && dev0 >= h->dev;
    for (size_t i : mine) {
      const size_t off = f.Resolve(outs[i].off);
      ok = ok && out_held[i] == h && twin(h, outs[i].host) == dev0 + (off - s.off) && off + outs[i].bytes <= s.off + s.bytes;
      covered += outs[i].bytes;
    }
    ok = ok && covered == s.bytes;
    if (!ok || Overlapping(ins, *in_place, array_of, ins.size(), h->host + (dev0 - h->dev), s.bytes)) continue;
    for (size_t i : mine) (*out_place)[i] = true;
    r.push_back({s.off, s.bytes, dev0});
  }
  return r;
}

auto CudaBackendImpl::HeldContaining(const void* p, size_t bytes) const -> Held* {
  const char* c = static_cast<const char*>(p);
  for (Held& h : held_)
    if (h.Contains(c, bytes)) return &h;
  return nullptr;
}

absl::Status CudaBackendImpl::SyncHeldLocked(Held& h) const {
  if (h.host_current) return absl::OkStatus();
  FM_CUDA_TRY(cudaMemcpyAsync(h.host, h.dev, h.bytes, cudaMemcpyDeviceToHost, stream_), "copy a held buffer back");
  FM_CUDA_TRY(cudaStreamSynchronize(stream_), "stream synchronize");
  ++waits_;
  h.host_current = true;
  return absl::OkStatus();
}

absl::Status CudaBackendImpl::SyncCrossingLocked(const void* p, size_t bytes, bool written) const {
  const char* c = static_cast<const char*>(p);
  for (Held& h : held_)
    if (h.Overlaps(c, bytes)) {
      FM_RETURN_IF_ERROR(SyncHeldLocked(h));
      if (written) h.dev_current = false;
    }
  return absl::OkStatus();
}

void CudaBackendImpl::DropHeldLocked(size_t i) const {
  spare_twins_.push_back({held_[i].bytes, held_[i].dev});
  held_.erase(held_.begin() + static_cast<std::ptrdiff_t>(i));
  // Spares cover the buffers a layer holds at once (about a dozen: the residual stream's next copy,
  // xn, hc_pre's mixes, the attention's qr, q, o, z and the indexer's queries, the sublayer's output
  // and the MoE's sum); the rest go back. Too few made every layer free and allocate twins again —
  // cudaFree waits for the device — which cost a batch-8 step 8.8 -> 13.1 ms when hc_pre's mixes
  // joined the held buffers with 8 spares.
  constexpr size_t kSpares = 32;
  while (spare_twins_.size() > kSpares) {
    (void)cudaFree(spare_twins_.front().second);
    used_ -= static_cast<int64_t>(TwinBytes(spare_twins_.front().first));
    spare_twins_.erase(spare_twins_.begin());
  }
}

void CudaBackendImpl::HoldOnDevice(float* p, int64_t count) const {
  if (!p || count <= 0 || !hold_ || count * 4 < min_hold_bytes_) return;
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return;
  char* c = reinterpret_cast<char*>(p);
  const size_t bytes = static_cast<size_t>(count) * 4;
  for (size_t i = held_.size(); i-- > 0;) {
    if (held_[i].host == c && held_[i].bytes == bytes) return;  // held already
    if (held_[i].Overlaps(c, bytes)) DropHeldLocked(i);  // replaced
  }
  // A hint: without device memory for the twin the buffer simply moves as before.
  char* twin = nullptr;
  for (size_t i = 0; i < spare_twins_.size(); ++i)
    if (spare_twins_[i].first == bytes) {
      twin = spare_twins_[i].second;
      spare_twins_.erase(spare_twins_.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  if (!twin) {
    if (cudaSetDevice(device_) != cudaSuccess || !Reserve(static_cast<int64_t>(TwinBytes(bytes)), "a held buffer").ok())
      return;
    if (cudaMalloc(&twin, TwinBytes(bytes)) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    used_ += static_cast<int64_t>(TwinBytes(bytes));
  }
  held_.push_back({c, bytes, twin, true, false});
}

void CudaBackendImpl::SyncForHost(const void* p, size_t bytes) const {
  absl::MutexLock lock(&mu_);
  if (health_.ok()) Fail(SyncCrossingLocked(p, bytes, /*written=*/false));
}

void CudaBackendImpl::SyncToHost(float* p) const {
  absl::MutexLock lock(&mu_);
  if (!health_.ok()) return;
  for (Held& h : held_)
    if (h.host == reinterpret_cast<char*>(p)) return Fail(SyncHeldLocked(h));
}

void CudaBackendImpl::ReleaseFromDevice(float* p, bool keep) const {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < held_.size(); ++i)
    if (held_[i].host == reinterpret_cast<char*>(p)) {
      if (keep && health_.ok()) Fail(SyncHeldLocked(held_[i]));
      DropHeldLocked(i);
      return;
    }
}

}  // namespace flashmem::kernels::cuda::internal
