// An MoE layer's routing as the reference's Gate computes it (model.py: Gate.forward), shared by
// every backend's Backend::RoutedMoE: the CPU's is this code; a device backend that routes on the
// device is tested against it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace flashmem::kernels {

struct WeightMatrix;
struct ExpertWork;

// How the router's logits become expert scores (the reference's score_func).
enum class RouterScore { kSqrtSoftplus, kSigmoid, kSoftmax };

// One routed expert's matrices (MoeRouter::experts; ExpertWork adds the rows sent to it).
struct ExpertMatrices {
  const WeightMatrix* w1 = nullptr;  // gate projection [inter, dim]
  const WeightMatrix* w3 = nullptr;  // up projection [inter, dim]
  const WeightMatrix* w2 = nullptr;  // down projection [dim, inter]
};

// One MoE layer's router and the routed experts this rank holds (Backend::RoutedMoE).
struct MoeRouter {
  const WeightMatrix* gate = nullptr;  // [experts, dim]: the logits, fp32 (Rounding::kNone)
  std::span<const float> bias;         // [experts] or empty: shifts the selection, not the weights
  // A hash layer's picks, [n][k] (the token ids looked up in tid2eid): taken as they are, no
  // selection; empty for a scored layer.
  std::span<const int32_t> hash_ids;
  RouterScore score = RouterScore::kSqrtSoftplus;
  int64_t k = 0;              // experts a token is sent to (n_activated_experts)
  float route_scale = 1.0f;   // every weight's factor
  int64_t first_expert = 0;   // experts[0]'s id: a tensor-parallel rank holds a slice
  std::span<const ExpertMatrices> experts;
};

// The router's checks against n tokens of `dim` (InvalidArgument naming the field): the gate's
// shape, the bias's and the hash picks' sizes, k within 1..experts, picks within 0..experts-1, the
// local experts inside the layer's and each one's matrices of one consistent shape.
absl::Status ValidateRouter(const MoeRouter& r, int64_t n, int64_t dim);

// Each token's k expert ids and weights from its logits [n][experts] (fp32): scores by r.score;
// a scored layer picks the k largest score + bias (descending, ties to the lower id), a hash layer
// takes r.hash_ids; weights are the picks' scores, divided by their sum (not for softmax, whose
// scores sum to 1 already), times route_scale. ids and weights: [n][k].
void RouteFromLogits(const MoeRouter& r, const float* logits, int64_t n, int32_t* ids, float* weights);

// This rank's experts with the rows routed to them, in expert order (the order of the fp32 sum),
// each expert's rows in row order: one ExpertWork per local expert with rows (the others left
// out); picks of another rank's experts skipped.
std::vector<ExpertWork> GroupByExpert(const MoeRouter& r, const int32_t* ids, const float* weights, int64_t n);

}  // namespace flashmem::kernels
