#!/bin/bash
# The tensor-parallel GPU run (issue 8) on a machine with 2 or more GPUs, after the bundle is
# unpacked in .gpu/run (docs/benchmarks.md, "Tensor parallelism and striped recall"):
#   bash tests/cuda/run_tp_gpu.sh OUT_DIR
# NCCL group tests, striped vs unstriped recall for 1..N GPUs, and model_bench at TP=N on the
# 8-layer flash-shape checkpoint (TP=1 rows: the "Model level" table). Logs and JSON go to OUT_DIR.
set -uo pipefail
GPU_OUT_DEFAULT=/tmp/tp-gpu
source "$(dirname "$0")/gpu_env.sh"
N=$(nvidia-smi -L | wc -l)
echo "GPUs: $N"; nvidia-smi topo -m | head -$((N + 1))
timeout 400 $R tests/tp_test --gtest_filter='*Gpu*:*Striped*' > "$OUT/tp_test.log" 2>&1
echo "tp_test rc=$?: $(grep -E '^\[  (PASSED|FAILED|SKIPPED)  \]' "$OUT/tp_test.log" | tr '\n' ' ')"
grep -E "NCCL|small, 2 GPUs|Failure|Expected|Which is" "$OUT/tp_test.log" | head -20
for n in $(seq 2 "$N"); do
  timeout 120 $R tests/bench/recall_bench --ranks "$n" --pages 4096,16384 --json "$OUT/recall$n.json" 2>&1 | tail -7
done
$R worker/cli/flashmem ckpt random --preset flash-shape --layers 8 --experts 16 --seed 1 --out /tmp/fs8 > "$OUT/ckpt.log" 2>&1
port=$((29500 + RANDOM % 1000))
for r in $(seq 1 $((N - 1))); do
  timeout 900 $R tests/bench/model_bench --model /tmp/fs8 --device cuda --cuda-kernels fast --tp-size "$N" --tp-rank "$r" \
    --tp-leader 127.0.0.1:$port --batch 1,16,64 --context 65536,262144 --steps 3 --warmup 2 > "$OUT/mb_rank$r.log" 2>&1 &
done
timeout 900 $R tests/bench/model_bench --model /tmp/fs8 --device cuda --cuda-kernels fast --tp-size "$N" --tp-rank 0 \
  --tp-leader 127.0.0.1:$port --batch 1,16,64 --context 65536,262144 --steps 3 --warmup 2 --profile \
  --json "$OUT/mb_tp$N.json" > "$OUT/mb_tp$N.log" 2>&1
echo "model_bench tp=$N rc=$?"
wait
grep -E "^(dense|lsa)|^model" "$OUT/mb_tp$N.log"
