#!/bin/bash
# The GPU test run (the GPU machine; CI has no GPU and skips these). From the repo root, after the
# bundle is unpacked in .gpu/run (docs/benchmarks.md, "CUDA backend", has the packing command):
#   bash tests/cuda/run_gpu_tests.sh OUT_DIR
# Binaries keep the absolute paths they were built with (/work/main/...): the repo root and the
# bundle are linked there. Full logs go to OUT_DIR; a summary line per suite is printed.
set -uo pipefail
GPU_OUT_DEFAULT=/tmp/gpu-tests
source "$(dirname "$0")/gpu_env.sh"
fail=0
suite() {  # suite NAME ENV... -- PROGRAM ARGS...
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local t0=$(date +%s%N)
  env "${envs[@]}" "$R" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  local summary=$(grep -E "^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \]" "$OUT/$name.log" | tr '\n' ' ')
  printf '%-34s rc=%d %7d ms %s\n' "$name" "$rc" "$dt" "$summary"
  [ $rc -eq 0 ] || { fail=1; grep -E "Failure|Expected|Which is|actual|error" "$OUT/$name.log" | head -20; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
suite cuda_backend_test -- tests/cuda_backend_test
suite cuda_gemm_test -- tests/cuda_gemm_test
suite cuda_support_test -- tests/cuda_support_test
suite cuda_index_test -- tests/cuda_index_test
suite cuda_hold_test -- tests/cuda_hold_test
suite cuda_reserve_test -- tests/cuda_reserve_test
suite cuda_model_test -- tests/cuda_model_test
grep -E "^tiny-a|^small" "$OUT/cuda_model_test.log"
[ -x .gpu/run/tests/lsa_engine_test ] || echo "(lsa_engine_test not in this bundle: skipped)"
suite golden_test.cuda FLASHMEM_TEST_DEVICE=cuda:0 -- tests/golden_test
suite golden_test.cuda-fast FLASHMEM_TEST_DEVICE=cuda:0 FLASHMEM_TEST_CUDA_KERNELS=fast -- tests/golden_test
suite engine_test.cuda FLASHMEM_TEST_DEVICE=cuda:0 -- tests/engine_test
[ -x .gpu/run/tests/lsa_engine_test ] && suite lsa_engine_test.cuda FLASHMEM_TEST_DEVICE=cuda:0 -- tests/lsa_engine_test
[ -x .gpu/run/tests/indexer_golden_test ] && suite indexer_golden_test.cuda FLASHMEM_TEST_DEVICE=cuda:0 -- tests/indexer_golden_test
exit $fail
