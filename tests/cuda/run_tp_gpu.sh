#!/bin/bash
# The tensor-parallel GPU run (issue 8) on a machine with 2 or more GPUs, after the bundle is
# unpacked in .gpu/run (docs/benchmarks.md, "Tensor parallelism and striped recall"):
#   bash tests/cuda/run_tp_gpu.sh OUT_DIR [tests|bench|profile|all]
# tests: NCCL group tests (small, and 8-layer flash-shape with every GPU), striped vs unstriped
# recall for 2..N GPUs; bench: model_bench at TP=N on flash-shape (TP=1 rows: the "Model level"
# table); profile: collective latency (collective_bench) and per-op profiles of every rank at
# TP=1 and TP=N, batch 1 and 16 at 64K, on the same machine (where a TP step's time goes). Each
# part fits the device tool's 10-minute command limit. Logs and JSON go to OUT_DIR.
set -uo pipefail
GPU_OUT_DEFAULT=/tmp/tp-gpu
source "$(dirname "$0")/gpu_env.sh"
PART=${2:-all}
N=$(nvidia-smi -L | wc -l)
fs8() { [ -e /tmp/fs8/config.json ] || $R worker/cli/flashmem ckpt random --preset flash-shape --layers 8 --experts 16 \
  --seed 1 --out /tmp/fs8 > "$OUT/ckpt.log" 2>&1; }
echo "GPUs: $N"; nvidia-smi topo -m | head -$((N + 1))
# model_bench on flash-shape as a group of N processes (rank r on cuda:r; rank 0 prints), logs in
# OUT/TAG_rankR.log: group_bench N TAG TIMEOUT MODEL_BENCH_FLAGS...
port=$((29500 + RANDOM % 1000))
group_bench() {
  local n=$1 tag=$2 limit=$3; shift 3
  for r in $(seq 1 $((n - 1))); do
    FLASHMEM_BENCH_ALL_RANKS=1 timeout "$limit" $R tests/bench/model_bench --model /tmp/fs8 --device cuda \
      --tp-size "$n" --tp-rank "$r" --tp-leader 127.0.0.1:$port "$@" > "$OUT/${tag}_rank$r.log" 2>&1 &
  done
  timeout "$limit" $R tests/bench/model_bench --model /tmp/fs8 --device cuda --tp-size "$n" --tp-rank 0 \
    --tp-leader 127.0.0.1:$port "$@" > "$OUT/${tag}_rank0.log" 2>&1
  echo "model_bench tp=$n rc=$?"; wait; port=$((port + 1))
}
if [ "$PART" = profile ]; then
  timeout 120 $R tests/bench/collective_bench --ranks "$N" --device cuda --floats 4096,65536,1048576 2>&1 | tail -5
  fs8
  flags=(--cuda-kernels fast --batch 1,16 --context 65536 --steps 3 --warmup 2 --profile)
  group_bench 1 prof_tp1 300 "${flags[@]}"; group_bench "$N" "prof_tp$N" 300 "${flags[@]}"
  grep -E "^(dense|lsa)" "$OUT"/prof_tp*_rank0.log
  exit 0
fi
if [ "$PART" != bench ]; then
timeout 400 $R tests/tp_test --gtest_filter='*Gpu*:*Striped*' > "$OUT/tp_test.log" 2>&1
echo "tp_test rc=$?: $(grep -E '^\[  (PASSED|FAILED|SKIPPED)  \]' "$OUT/tp_test.log" | tr '\n' ' ')"
grep -E "NCCL|GPUs vs 1|Failure|Expected|Which is" "$OUT/tp_test.log" | head -20
for n in $(seq 1 "$N"); do
  for copy in kernel engines; do
    timeout 120 $R tests/bench/recall_bench --ranks "$n" --copy $copy --pages 4096,16384 \
      --json "$OUT/recall${n}_$copy.json" 2>&1 | tail -8
  done
done
fs8
# The group against one GPU on flash-shape too, with every GPU in the group.
FLASHMEM_TP_GPU_MODEL=/tmp/fs8 FLASHMEM_TP_GPU_RANKS=$N timeout 400 $R tests/tp_test \
  --gtest_filter='*GpuGroupMatchesOneGpu*' > "$OUT/tp_test_fs8.log" 2>&1
echo "tp_test flash-shape rc=$?"; grep -E "GPUs vs 1|Failure|Expected|Which is" "$OUT/tp_test_fs8.log" | head -10
fi
[ "$PART" = tests ] && exit 0
fs8
group_bench "$N" "mb_tp$N" 540 --cuda-kernels fast --batch 1,16,64 --context 65536,262144 --steps 3 --warmup 2 \
  --profile --json "$OUT/mb_tp$N.json"
grep -E "^(dense|lsa)|^model" "$OUT/mb_tp${N}_rank0.log"
