#!/usr/bin/env bash
# memtier against its ceilings on this machine, in one run:
#   ucx_perftest put bandwidth with 37,376-byte messages (shm and tcp) vs memtier recall over UCX,
#   dd sequential write/read of the same bytes vs RocksDB spill (commit) and promote (prefetch).
# Usage: tests/bench/memtier_bench.sh [pages] [batch] [in_flight] [server_copy_threads] [client_copy_threads]
#        (build first: scripts/bootstrap.sh build; the last three go to memtier_bench, 0 = default)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD_DIR:-build}
PAGES=${1:-2048}
BATCH=${2:-64}
SIZE=37376
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"; pkill -f "ucx_perftest -p 1337" 2>/dev/null || true' EXIT

perftest_put() {  # $1 = UCX_TLS; prints MB/s
  local port=$((13370 + RANDOM % 100))
  UCX_TLS=$1 ucx_perftest -p $port > "$TMP/srv.log" 2>&1 &
  sleep 1
  UCX_TLS=$1 ucx_perftest 127.0.0.1 -p $port -t ucp_put_bw -s $SIZE -n 20000 2>/dev/null | awk '/Final:/ {print $7}'
  wait 2>/dev/null || true
}

echo "| path | transport | value |"
echo "|---|---|---|"
for tls in "posix,sysv,self" "tcp,self"; do
  name=$([ "$tls" = "tcp,self" ] && echo tcp || echo shm)
  perf=$(perftest_put "$tls")
  out=$(UCX_TLS=$tls "$BUILD/tests/bench/memtier_bench" "$PAGES" "$BATCH" "${@:3}" 2>/dev/null)
  get() { echo "$out" | awk -v k="$1" '$1 == k {print $2}'; }
  recall=$(get recall_ucx_GBps)
  echo "| ucx_perftest ucp_put_bw, $SIZE B | $name | $(awk -v p="$perf" 'BEGIN {printf "%.2f GB/s", p / 1000}') |"
  echo "| memtier recall, batches of $BATCH x $SIZE B, ${3:-4} in flight, copied out | $name | $recall GB/s (ratio $(awk -v r="$recall" -v p="$perf" 'BEGIN {printf "%.3f", r * 1000 / p}')) |"
  view=$(get recall_view_GBps)
  echo "| memtier recall, zero-copy views of the registered buffer (RecallStream) | $name | $view GB/s (ratio $(awk -v r="$view" -v p="$perf" 'BEGIN {printf "%.3f", r * 1000 / p}')) |"
  local_=$(get recall_local_GBps)
  echo "| memtier same-node recall from its mapped RAM tier (RecallLocal: pipelined Locate, copy out + verify) | $name control | $local_ GB/s (ratio $(awk -v r="$local_" -v p="$perf" 'BEGIN {printf "%.3f", r * 1000 / p}')) |"
  lview=$(get recall_local_view_GBps)
  echo "| memtier same-node zero-copy recall: leased views verified in memtier's memory (RecallLocalView) | $name control | $lview GB/s (ratio $(awk -v r="$lview" -v p="$perf" 'BEGIN {printf "%.3f", r * 1000 / p}')) |"
  echo "| memtier commit latency p50 / p99 ($BATCH pages, durable) | $name | $(get commit_p50_ms) / $(get commit_p99_ms) ms |"
  if [ "$name" = shm ]; then commit=$(get commit_GBps); promote=$(get promote_GBps); fi
done
ddw=$(dd if=/dev/zero of="$TMP/dd.bin" bs=$SIZE count=$PAGES conv=fdatasync 2>&1 | awk '/copied/ {print $(NF-1), $NF}')
ddr=$(dd if="$TMP/dd.bin" of=/dev/null bs=$SIZE 2>&1 | awk '/copied/ {print $(NF-1), $NF}')
to_gbps() { awk -v v="$1" -v u="$2" 'BEGIN { f = (u ~ /^GB/) ? 1 : (u ~ /^MB/) ? 0.001 : (u ~ /^kB/) ? 1e-6 : 1e-9; printf "%.3f", v * f }'; }
w=$(to_gbps $ddw); r=$(to_gbps $ddr)
echo "| dd write (fdatasync) of the same bytes | disk | $w GB/s |"
echo "| RocksDB spill = commit throughput | disk | $commit GB/s (ratio $(awk -v a="$commit" -v b="$w" 'BEGIN {printf "%.2f", a / b}')) |"
echo "| dd read of the same bytes (page cache) | disk | $r GB/s |"
echo "| RocksDB promote (prefetch to RAM) | disk | $promote GB/s (ratio $(awk -v a="$promote" -v b="$r" 'BEGIN {printf "%.2f", a / b}')) |"
