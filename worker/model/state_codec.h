// Decode-state snapshots: a session's whole state (position, window rings, compressor states,
// compressed KV entries and indexer keys) as bytes, so another worker can continue the session
// exactly where it stopped (failover without re-prefill; memtier stores the blob). Values held
// as bf16 by the reference (rings, entries, keys) are stored as bf16 (exact); compressor states
// are fp32. The blob carries its own xxh3-64 checksum; hostile blobs give clear errors.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "worker/model/config.h"
#include "worker/model/state.h"

namespace flashmem::model {

// Whether a complete page of layer `layer` (kind 0: compressed entries, 1: indexer keys) is
// durable in memtier: such pages are referenced, not carried (evicted pages always are).
using PageInStore = std::function<bool(int64_t layer, int kind, int64_t page)>;

std::string SerializeSessionState(const SessionState& state, const ModelArgs& args,
                                  const PageInStore& in_store = nullptr);
// Referenced pages come back evicted: the worker's pager recalls them from memtier when needed.
absl::StatusOr<std::unique_ptr<SessionState>> DeserializeSessionState(absl::string_view blob, const ModelArgs& args);

}  // namespace flashmem::model
