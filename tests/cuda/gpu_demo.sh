#!/bin/bash
# The README demo on the GPU machine: the embedded tiny model through the engine on cpu and on
# cuda:0 (same text), then memtier + coordinator + 2 workers on CUDA completing text through the
# public API. Run from the repo root after tests/cuda/run_gpu_tests.sh set up the links.
set -euo pipefail
fm=".gpu/run/run.sh worker/cli/flashmem"
dir=/tmp/fm-tiny
$fm ckpt random --preset tiny --seed 1 --out "$dir" > /dev/null
p="The memory tier keeps every page of"
echo "== generate --device cpu"
$fm generate --model "$dir" --prompt "$p" --max-new-tokens 24 --device cpu | tee /tmp/cpu.txt
echo "== generate --device cuda:0"
$fm generate --model "$dir" --prompt "$p" --max-new-tokens 24 --device cuda:0 | tee /tmp/cuda.txt
if diff <(grep -v "^prompt:" /tmp/cpu.txt) <(grep -v "^prompt:" /tmp/cuda.txt) > /dev/null; then
  echo "SAME TEXT on cpu and cuda:0"
else
  echo "TEXT DIFFERS between cpu and cuda:0"
fi
echo "== cluster up --device cuda (2 workers on cuda:0 and cuda:0/1)"
n=$(nvidia-smi -L | wc -l)
dev=cuda; [ "$n" -ge 2 ] || dev=cuda:0
$fm cluster down --run-dir /tmp/fm-run > /dev/null 2>&1 || true
$fm cluster up --workers 2 --model "$dir" --run-dir /tmp/fm-run --device $dev
trap '$fm cluster down --run-dir /tmp/fm-run > /dev/null 2>&1 || true' EXIT
$fm complete --run-dir /tmp/fm-run --prompt "$p" --max-tokens 24
$fm cluster down --run-dir /tmp/fm-run
