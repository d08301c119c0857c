#!/bin/bash
# Model-level decode on the GPU machine: a random `flash-shape` checkpoint (V4-Flash layer shapes,
# dim 4096, 64 heads, FP8 attention, FP4 experts), `flashmem generate` on cuda:0 in exact and fast
# kernel modes; prints prefill and decode rates. From the repo root with the bundle in .gpu/run:
#   bash tests/bench/cuda/flash_shape_bench.sh LAYERS EXPERTS "PROMPT_LENGTHS" [NEW_TOKENS]
set -uo pipefail
layers=${1:-8}; experts=${2:-16}; lens=${3:-"1024"}; new=${4:-32}
fm=".gpu/run/run.sh worker/cli/flashmem"
dir=/tmp/flash-shape-$layers-$experts
t0=$(date +%s)
[ -f "$dir/model.safetensors" ] || $fm ckpt random --preset flash-shape --layers "$layers" --experts "$experts" --seed 1 --out "$dir" | tail -1
echo "checkpoint written in $(( $(date +%s) - t0 )) s"
for n in $lens; do
  python3 -c "import random; random.seed($n); print(','.join(str(random.randrange(1, 129280)) for _ in range($n)))" > /tmp/prompt-$n.txt
  for mode in fast exact; do
    echo "== flash-shape ${layers}L/${experts}E, prompt $n, $new new tokens, cuda:0 --cuda-kernels $mode"
    timeout ${GEN_TIMEOUT:-120} $fm generate --model "$dir" --prompt-file /tmp/prompt-$n.txt --max-new-tokens "$new" \
      --device cuda:0 --cuda-kernels $mode --quiet 2>&1 | tail -2
  done
done
