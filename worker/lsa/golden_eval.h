// `flashmem indexer golden-eval`: runs flashmem's own memory indexer and selection code on a
// directory in the fm-indexer golden format (indexer_weights.safetensors, inputs.safetensors,
// manifest.json `parameters`) and writes the results under the names expected.safetensors uses,
// so any set of that format can be checked against its expected arrays.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "kernels/ops.h"

namespace flashmem::lsa {

// Writes logits_ref.lN, logits_fp8q.lN, ens_max.{ref,fp8q}, ens_mean.{ref,fp8q},
// sel.<C*>.<variant>.keep, sel.<P*>.<variant>.{keep,page_score,pages,K}, fb.keep, fb.triggered,
// fb.cum_thresh, fb.cum_c4, fb.n_keep and q_final.lN / q_fp8_bytes.lN / fused_w.lN.
absl::Status RunGoldenEval(const std::string& golden_dir, const std::string& out_path,
                           const kernels::Backend& be);

}  // namespace flashmem::lsa
